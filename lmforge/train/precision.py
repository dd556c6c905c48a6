"""Which precision to train in: on a CPU, decided by measuring, not by a table of CPU names.

A CPU's bf16 speed varies by an order of magnitude between the machines lmforge runs on: Intel's AMX tiles
and AVX-512-BF16 (`vdpbf16ps`) make bf16 matmuls faster than fp32, while a CPU with AVX2 only converts bf16
to fp32 around every kernel and runs several times *slower*. Which kernels PyTorch picks also depends on
the shapes and its oneDNN build. So `--precision auto` on a CPU times a few forward+backward passes of the
model at the run's sequence length in each precision and keeps bf16 autocast only when it is clearly faster
(`MIN_SPEEDUP`, `decide`); the figures are logged with the choice. On a CUDA GPU, auto is bf16 where the GPU
has it (tensor cores: always faster), else fp32.

The timing is of a capped micro-batch (`measure_rows`: at most `MEASURE_ROWS` rows and `MEASURE_TOKENS`
tokens), not the run's whole one, and a slow pass is timed once, not best of `reps`. It must take seconds:
under torchrun only rank 0 measures while the other ranks wait for its decision in a collective bounded by
the process group's timeout (300 s), and a whole micro-batch of `base` on one thread took ~16 s a row over
the six passes (a batch of 16 ~260 s, of 32 ~520 s: the peers gave up before step 1); capped at 2 rows it
took 30 and 32 s (two measurements on the busy 2-core machine, one thread), whatever the batch. What decides
is the RATIO of the fp32 and bf16 times, which a couple of rows of full sequence length (matmuls of 2 x
context rows) already show; the absolute time, which the compile rule needs, is scaled to the micro-batch
by rows (`PrecisionChoice.step_s`): linear in rows is what the matmuls cost, and slightly over for the
fixed per-pass overhead, which only makes the compile estimate lean towards a longer run.

Reproducibility, although the choice comes from a timing:
  - the decision is cached under LMFORGE_HOME by (CPU model and flags, torch version, threads, model shape,
    rows timed), so running the same command again on the same machine decides the same, without measuring;
  - the run records the RESOLVED precision (the checkpoint's train config says fp32 or bf16, never auto),
    so a resumed run trains in the precision it started in, whatever a new measurement would say;
  - `LMFORGE_PRECISION_AUTO=fp32|bf16` pins what auto means (no measurement): for scripts that must not
    depend on a timing, and for the test suite. `pinned()` reads and checks it; every rank of a job calls
    it before any collective, so a bad pin is one line on every rank rather than rank 0's alone;
  - a cache entry that does not hold a precision and positive times (edited, truncated, another version's)
    is measured again, not trusted.

The measurement leaves no trace: gradients are cleared and the RNG state restored afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from lmforge.errors import UserError
from lmforge.io import atomic_write_json
from lmforge.paths import cache_dir

__all__ = ["ENV_PIN", "MEASURE_ROWS", "MEASURE_TOKENS", "MIN_SPEEDUP", "PrecisionChoice", "choose_cpu_precision", "cpu_identity",
           "decide", "measure_for_config", "measure_rows", "pinned", "resolve_auto", "time_step"]

#: `LMFORGE_PRECISION_AUTO=fp32|bf16`: what `--precision auto` resolves to, without measuring.
ENV_PIN = "LMFORGE_PRECISION_AUTO"

#: bf16 autocast must be at least this much faster than fp32 to be chosen: its rounding is not free.
MIN_SPEEDUP = 1.15

#: Rows of the micro-batch timed (at most): enough for the fp32/bf16 ratio, few enough that the measurement
#: takes seconds while the other ranks of a job wait (see the module docstring).
MEASURE_ROWS = 2
#: ... and at most this many tokens (one row, whatever its length): a 2048-token context times one row.
MEASURE_TOKENS = 2048
#: A pass slower than this (the warm-up's time) is timed once rather than best of `reps`: its noise is small
#: against its length, and every pass more is seconds that the other ranks wait.
SLOW_PASS_S = 2.0


def measure_rows(config, batch_size: int) -> int:
    """Rows of the micro-batch the measurement times: `MEASURE_ROWS` and `MEASURE_TOKENS` at most, one at least."""
    return max(1, min(batch_size, MEASURE_ROWS, MEASURE_TOKENS // max(1, config.context_length)))


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "fp32" | "bf16"
    fp32_s: float | None  # seconds per forward+backward of `rows` rows, best of the timed repetitions (None: not measured)
    bf16_s: float | None  # None when bf16 could not run here (or was not measured)
    source: str = "measured"  # measured | cached | pinned (LMFORGE_PRECISION_AUTO) | device (CUDA) | checkpoint | asked
    rows: int | None = None  # rows the times are of (None: a whole micro-batch)
    batch: int | None = None  # rows of the run's micro-batch, which `step_s` scales the times to

    @property
    def step_s(self) -> float | None:
        """Seconds per forward+backward of one micro-batch in the chosen precision, when measured: the
        timing of `rows` rows scaled to the micro-batch's `batch` rows."""
        t = self.bf16_s if self.precision == "bf16" else self.fp32_s
        if t is None or not self.rows or not self.batch:
            return t
        return t * self.batch / self.rows

    def describe(self) -> str:
        if self.source == "pinned":
            return f"precision {self.precision}: auto pinned by {ENV_PIN}={self.precision} (not measured)"
        if self.source == "device":
            return f"precision {self.precision}: auto on a CUDA GPU ({'has' if self.precision == 'bf16' else 'no'} bf16)"
        if self.source == "checkpoint":
            return f"precision {self.precision}: the precision this run was started in (from its checkpoint)"
        if self.fp32_s is None:  # asked for by name, or rank 0's decision
            return f"precision {self.precision} ({self.source})"
        text = self._figures()
        return text + " [cached measurement of this machine, model shape and batch]" if self.source == "cached" else text

    def _figures(self) -> str:
        if self.bf16_s is None:
            return (f"precision fp32 (bf16 autocast does not run on this CPU; fp32 forward+backward "
                    f"{self.fp32_s * 1e3:.0f} ms{self._of_rows()})")
        ratio = self.fp32_s / self.bf16_s
        why = "faster" if self.precision == "bf16" else f"not >= {MIN_SPEEDUP}x faster"
        return (f"precision {self.precision}: measured forward+backward fp32 {self.fp32_s * 1e3:.0f} ms, "
                f"bf16 autocast {self.bf16_s * 1e3:.0f} ms ({ratio:.2f}x, {why}){self._of_rows()}")

    def _of_rows(self) -> str:
        if self.rows and self.batch and self.rows < self.batch:
            return f" on {self.rows} of the micro-batch's {self.batch} rows"
        return ""


def _time(step: Callable[[], None], reps: int) -> float:
    t = time.perf_counter()
    step()  # warm-up: allocations, oneDNN primitive creation
    if time.perf_counter() - t > SLOW_PASS_S:
        reps = 1
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t)
    return best


def choose_cpu_precision(model: torch.nn.Module, forward_loss: Callable[[], torch.Tensor], *, reps: int = 2) -> PrecisionChoice:
    """Time `forward_loss()` + backward on `model` in fp32 and under bf16 autocast; the faster by
    `MIN_SPEEDUP` wins. `forward_loss` computes the training loss of one fixed batch."""
    rng = torch.get_rng_state()

    def step(ctx) -> Callable[[], None]:
        def run() -> None:
            with ctx():
                loss = forward_loss()
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    try:
        fp32 = _time(step(nullcontext), reps)
        try:
            bf16 = _time(step(lambda: torch.autocast("cpu", dtype=torch.bfloat16)), reps)
        except RuntimeError:
            bf16 = None
    finally:
        model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng)
    return PrecisionChoice(decide(fp32, bf16), fp32, bf16)


def decide(fp32_s: float, bf16_s: float | None) -> str:
    """The rule, on measured seconds per step: bf16 when it runs and is at least `MIN_SPEEDUP` times faster.
    Example: fp32 300 ms, bf16 200 ms -> 1.5x -> bf16; bf16 280 ms -> 1.07x -> fp32; bf16 fails -> fp32."""
    return "bf16" if bf16_s is not None and bf16_s > 0 and fp32_s / bf16_s >= MIN_SPEEDUP else "fp32"


def _model_and_loss(config, batch_size: int):
    """A freshly initialised model of `config` and the loss of random token ids of shape
    (batch_size, context_length): the shape a run is about to train at."""
    import torch.nn.functional as F

    from lmforge.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(config)
    ids = torch.randint(0, config.vocab_size, (batch_size, config.context_length + 1))

    def loss() -> torch.Tensor:
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    return model, loss


def measure_for_config(config, rows: int, *, reps: int = 2) -> PrecisionChoice:
    """`choose_cpu_precision` for a freshly initialised model of `config` (a `ModelConfig`) training on
    random token ids of shape (rows, config.context_length): the run's sequence length on `rows` rows (the
    caller caps them, `measure_rows`)."""
    rng = torch.get_rng_state()
    try:
        model, loss = _model_and_loss(config, rows)
    finally:
        torch.set_rng_state(rng)
    return choose_cpu_precision(model, loss, reps=reps)


def time_step(config, batch_size: int, precision: str, *, reps: int = 1) -> float:
    """Seconds of one forward+backward of a `batch_size`-row micro-batch at the run's sequence length in
    `precision` (fp32 or bf16 autocast, CPU): for a run whose precision was given rather than measured, when
    a decision needs the step time. Timed on `measure_rows` rows and scaled to `batch_size`, so it takes
    seconds whatever the batch (other ranks may be waiting)."""
    rows = measure_rows(config, batch_size)
    rng = torch.get_rng_state()
    try:
        model, loss = _model_and_loss(config, rows)
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext

        def run() -> None:
            with ctx():
                value = loss()
            value.backward()
            model.zero_grad(set_to_none=True)

        return _time(run, reps) * batch_size / rows
    finally:
        torch.set_rng_state(rng)


def cpu_identity() -> dict:
    """What makes two machines time alike: the CPU model, its ISA flags that decide bf16 kernels, threads,
    and the torch build (its oneDNN). Part of the cache key, and logged with the decision."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the model name alone
        pass
    isa = sorted(f for f in flags if f.startswith(("amx", "avx512", "avx2", "fma", "sve", "asimd", "bf16")))
    return {"cpu": model, "isa": isa, "threads": torch.get_num_threads(), "torch": torch.__version__}


def _cache_key(config, rows: int) -> str:
    """By the rows timed, not the run's batch: runs with batches 16 and 32 share one measurement. (v2: the
    entries hold times of `rows` rows; v1's were of whole micro-batches.)"""
    shape = {k: v for k, v in asdict(config).items() if k != "name"}
    blob = json.dumps({"machine": cpu_identity(), "shape": shape, "rows": rows, "v": 2}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _seconds(value, *, optional: bool = False) -> bool:
    """A time a cache entry may hold: a positive finite number (or, where `optional`, None)."""
    if value is None:
        return optional
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _cached(saved, rows: int, batch: int) -> PrecisionChoice | None:
    """The choice a cache entry holds, or None when it is not one this version wrote whole (a precision of
    fp32 or bf16, positive times, bf16's present when bf16 was chosen, of `rows` rows): measure again."""
    if not isinstance(saved, dict) or saved.get("precision") not in ("fp32", "bf16") or saved.get("rows") != rows:
        return None
    fp32, bf16 = saved.get("fp32_s"), saved.get("bf16_s")
    if not _seconds(fp32) or not _seconds(bf16, optional=saved["precision"] == "fp32"):
        return None
    return PrecisionChoice(saved["precision"], float(fp32), None if bf16 is None else float(bf16), source="cached",
                           rows=rows, batch=batch)


def pinned() -> str | None:
    """What `LMFORGE_PRECISION_AUTO` pins auto to (fp32 or bf16), None when unset; a UserError when it is
    anything else. Every rank of a job calls this before any collective (`hardware.resolve_run`)."""
    pin = os.environ.get(ENV_PIN, "").strip().lower()
    if pin and pin not in ("fp32", "bf16"):
        raise UserError(f"{ENV_PIN} must be fp32 or bf16 (what --precision auto resolves to), got {pin!r}")
    return pin or None


def resolve_auto(config, batch_size: int, device: torch.device | str = "cpu", *, reps: int = 2) -> PrecisionChoice:
    """What `--precision auto` trains in for a model of `config` at micro-batch `batch_size` on `device`:
    the pin (`LMFORGE_PRECISION_AUTO`), else on CUDA bf16 where supported, else on a CPU the cached or
    freshly measured (`measure_for_config` on `measure_rows` rows, then cached) choice."""
    pin = pinned()
    if pin:
        return PrecisionChoice(pin, None, None, source="pinned")
    device = torch.device(device)
    if device.type == "cuda":
        return PrecisionChoice("bf16" if torch.cuda.is_bf16_supported() else "fp32", None, None, source="device")
    if device.type != "cpu":  # (mps and others: no measurement here, the safe choice)
        return PrecisionChoice("fp32", None, None, source="device")
    rows = measure_rows(config, batch_size)
    path = cache_dir("precision") / f"{_cache_key(config, rows)}.json"
    try:
        hit = _cached(json.loads(path.read_text()), rows, batch_size)
    except (OSError, ValueError):
        hit = None  # none yet (or unreadable): measure
    if hit is not None:
        return hit
    m = measure_for_config(config, rows, reps=reps)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"precision": m.precision, "fp32_s": m.fp32_s, "bf16_s": m.bf16_s, "rows": rows,
                             "machine": cpu_identity(), "measured_at": time.time()})
    return PrecisionChoice(m.precision, m.fp32_s, m.bf16_s, source="measured", rows=rows, batch=batch_size)
