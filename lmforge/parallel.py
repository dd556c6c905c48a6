"""`--parallel`: how N devices (or processes) share a training job, parsed once for `lmforge plan` and for training.

The spec is a comma-separated list of degrees, as torchtitan and Megatron write them:

- `ddp` (or `dp`): data parallelism over every device, each holding the whole model;
- `fsdp`: sharded data parallelism (FSDP2 / ZeRO-3) over every device;
- `tp=N`: tensor parallelism, each block's projections, the embeddings and the head split over N devices;
- `pp=N`: pipeline parallelism, the blocks split into N stages;
- combinations such as `tp=2,dp=4` or `tp=2,fsdp` (a 2-D device mesh): a data-parallel degree left out
  fills the devices the others leave (as DDP, or FSDP when `fsdp` is named without a number).

The product of the degrees must be the number of devices. With the model's config the split must also fit
the model: whole attention and key/value heads and an equal share of the MLP per tensor-parallel rank, at
least one block per pipeline stage. Every mistake is one `UserError` line naming the spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmforge.config import ModelConfig
from lmforge.errors import UserError

__all__ = ["Parallel", "check_model", "parse_parallel"]

KEYS = ("dp", "fsdp", "tp", "pp")


@dataclass(frozen=True)
class Parallel:
    """How `world` devices are used: dp replicas (DDP), fsdp shards (FSDP/ZeRO-3: also data-parallel), tp
    tensor-parallel ranks, pp pipeline stages; dp * fsdp * tp * pp = world.

    `sharded` says the data parallelism is FSDP even where its degree is 1 (`--parallel fsdp` on one process:
    the N=1 case of the same code); it does not change what the degrees mean, so it is not compared."""

    dp: int = 1
    fsdp: int = 1
    tp: int = 1
    pp: int = 1
    sharded: bool = field(default=False, compare=False)

    @property
    def world(self) -> int:
        return self.dp * self.fsdp * self.tp * self.pp

    @property
    def data_parallel(self) -> int:
        """Into how many slices every global batch is divided (the replicas and the shards together)."""
        return self.dp * self.fsdp

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in (("dp", self.dp), ("fsdp", self.fsdp), ("tp", self.tp), ("pp", self.pp)) if v > 1]
        return ",".join(parts) or ("fsdp=1" if self.sharded else "single device")


def parse_parallel(spec: str | None, world: int, cfg: ModelConfig | None = None, *, unit: str = "devices",
                   count_flag: str = "--gpus") -> Parallel:
    """'ddp' | 'fsdp' | 'tp=2,dp=4' | 'pp=2' | 'tp=2,pp=2,fsdp=2' for `world` devices. None, or a bare 'ddp'
    or 'fsdp', spans them all (None: DDP, the plain data parallelism). `unit` and `count_flag` name the
    devices and the flag that sets their number in the messages ("processes", "--nproc" for training)."""
    text = (spec or "ddp").replace(" ", "").lower()
    if text in ("ddp", "dp", "fsdp"):
        return check_model(Parallel(**{"dp" if text != "fsdp" else "fsdp": world}, sharded=text == "fsdp"),
                           world, cfg, spec or "ddp", unit=unit, count_flag=count_flag)
    degrees: dict[str, int] = {}
    fill = "dp"
    for item in text.split(","):
        key, eq, val = item.partition("=")
        key = {"ddp": "dp"}.get(key, key)
        if key not in KEYS or (eq and not val.isdigit()) or key in degrees:
            raise UserError(f"--parallel {spec!r}: expected ddp, fsdp, or a list of dp=N, fsdp=N, tp=N, pp=N")
        if not eq:
            if key not in ("dp", "fsdp"):
                raise UserError(f"--parallel {spec!r}: {key} needs a degree ({key}=N)")
            fill = key
            continue
        if int(val) < 1:
            raise UserError(f"--parallel {spec!r}: degrees must be >= 1")
        degrees[key] = int(val)
    given = math.prod(degrees.values())
    if world < given:
        raise UserError(f"--parallel {spec!r} uses {given} {unit}, but {count_flag} is {world}")
    if world % given:
        raise UserError(f"--parallel {spec!r} needs a multiple of {given} {unit}, not {count_flag} {world}")
    if world // given > 1:
        if fill in degrees:
            raise UserError(f"--parallel {spec!r} uses {given} {unit}, but {count_flag} is {world}")
        degrees[fill] = world // given
    return check_model(Parallel(**degrees, sharded=fill == "fsdp" or "fsdp" in degrees), world, cfg, spec,
                       unit=unit, count_flag=count_flag)


def check_model(par: Parallel, world: int, cfg: ModelConfig | None, spec: str, *, unit: str = "devices",
                count_flag: str = "--gpus") -> Parallel:
    """`par` uses exactly `world` devices and, given `cfg`, splits the model into whole pieces."""
    if par.world != world:
        raise UserError(f"--parallel {spec!r} uses {par.world} {unit}, but {count_flag} is {world}")
    if cfg is not None:
        if par.tp > 1:
            for what, n in (("attention heads", cfg.n_heads), ("key/value heads", cfg.n_kv_heads),
                            ("MLP width (d_ff)", cfg.d_ff)):
                if n % par.tp:
                    raise UserError(f"--parallel {spec!r}: the model's {n} {what} do not divide evenly among "
                                    f"tp={par.tp} ranks")
        if par.pp > cfg.n_layers:
            raise UserError(f"--parallel {spec!r}: pp={par.pp} stages need at least one block each, and the "
                            f"model has {cfg.n_layers} layers")
    return par
