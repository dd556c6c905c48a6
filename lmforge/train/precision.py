"""Which precision to train in: on a CPU, decided by measuring, not by a table of CPU names.

A CPU's bf16 speed varies by an order of magnitude between the machines lmforge runs on: Intel's AMX tiles
and AVX-512-BF16 (`vdpbf16ps`) make bf16 matmuls faster than fp32, while a CPU with AVX2 only converts bf16
to fp32 around every kernel and runs several times *slower*. Which kernels PyTorch picks also depends on
the shapes and its oneDNN build. So `--precision auto` on a CPU times a few forward+backward passes of the
model at the run's training shape in each precision and keeps bf16 autocast only when it is clearly faster
(`MIN_SPEEDUP`, `decide`); the figures are logged with the choice. On a CUDA GPU, auto is bf16 where the GPU
has it (tensor cores: always faster), else fp32.

Reproducibility, although the choice comes from a timing:
  - the decision is cached under LMFORGE_HOME by (CPU model and flags, torch version, threads, model shape,
    batch), so running the same command again on the same machine decides the same, without measuring;
  - the run records the RESOLVED precision (the checkpoint's train config says fp32 or bf16, never auto),
    so a resumed run trains in the precision it started in, whatever a new measurement would say;
  - `LMFORGE_PRECISION_AUTO=fp32|bf16` pins what auto means (no measurement): for scripts that must not
    depend on a timing, and for the test suite.

The measurement leaves no trace: gradients are cleared and the RNG state restored afterwards.
"""

from __future__ import annotations

import hashlib
import json
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

__all__ = ["ENV_PIN", "MIN_SPEEDUP", "PrecisionChoice", "choose_cpu_precision", "cpu_identity", "decide",
           "measure_for_config", "resolve_auto", "time_step"]

#: `LMFORGE_PRECISION_AUTO=fp32|bf16`: what `--precision auto` resolves to, without measuring.
ENV_PIN = "LMFORGE_PRECISION_AUTO"

#: bf16 autocast must be at least this much faster than fp32 to be chosen: its rounding is not free.
MIN_SPEEDUP = 1.15


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "fp32" | "bf16"
    fp32_s: float | None  # seconds per forward+backward, best of the timed repetitions (None: not measured)
    bf16_s: float | None  # None when bf16 could not run here (or was not measured)
    source: str = "measured"  # measured | cached | pinned (LMFORGE_PRECISION_AUTO) | device (CUDA) | checkpoint | asked

    @property
    def step_s(self) -> float | None:
        """Seconds per forward+backward of one micro-batch in the chosen precision, when measured."""
        return self.bf16_s if self.precision == "bf16" else self.fp32_s

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
            return f"precision fp32 (bf16 autocast does not run on this CPU; fp32 step {self.fp32_s * 1e3:.0f} ms)"
        ratio = self.fp32_s / self.bf16_s
        why = "faster" if self.precision == "bf16" else f"not >= {MIN_SPEEDUP}x faster"
        return (f"precision {self.precision}: measured forward+backward fp32 {self.fp32_s * 1e3:.0f} ms, "
                f"bf16 autocast {self.bf16_s * 1e3:.0f} ms ({ratio:.2f}x, {why})")


def _time(step: Callable[[], None], reps: int) -> float:
    step()  # warm-up: allocations, oneDNN primitive creation
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


def measure_for_config(config, batch_size: int, *, reps: int = 2) -> PrecisionChoice:
    """`choose_cpu_precision` for a freshly initialised model of `config` (a `ModelConfig`) training on
    random token ids of shape (batch_size, config.context_length): the shape a run is about to train at."""
    rng = torch.get_rng_state()
    try:
        model, loss = _model_and_loss(config, batch_size)
    finally:
        torch.set_rng_state(rng)
    return choose_cpu_precision(model, loss, reps=reps)


def time_step(config, batch_size: int, precision: str, *, reps: int = 1) -> float:
    """Seconds of one forward+backward at the run's shape in `precision` (fp32 or bf16 autocast, CPU):
    for a run whose precision was given rather than measured, when a decision needs the step time."""
    rng = torch.get_rng_state()
    try:
        model, loss = _model_and_loss(config, batch_size)
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext

        def run() -> None:
            with ctx():
                value = loss()
            value.backward()
            model.zero_grad(set_to_none=True)

        return _time(run, reps)
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


def _cache_key(config, batch_size: int) -> str:
    shape = {k: v for k, v in asdict(config).items() if k != "name"}
    blob = json.dumps({"machine": cpu_identity(), "shape": shape, "batch": batch_size, "v": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def resolve_auto(config, batch_size: int, device: torch.device | str = "cpu", *, reps: int = 2) -> PrecisionChoice:
    """What `--precision auto` trains in for a model of `config` at micro-batch `batch_size` on `device`:
    the pin (`LMFORGE_PRECISION_AUTO`), else on CUDA bf16 where supported, else on a CPU the cached or
    freshly measured (`measure_for_config`, then cached) choice."""
    pin = os.environ.get(ENV_PIN, "").strip().lower()
    if pin:
        if pin not in ("fp32", "bf16"):
            raise UserError(f"{ENV_PIN} must be fp32 or bf16 (what --precision auto resolves to), got {pin!r}")
        return PrecisionChoice(pin, None, None, source="pinned")
    device = torch.device(device)
    if device.type == "cuda":
        return PrecisionChoice("bf16" if torch.cuda.is_bf16_supported() else "fp32", None, None, source="device")
    if device.type != "cpu":  # (mps and others: no measurement here, the safe choice)
        return PrecisionChoice("fp32", None, None, source="device")
    path = cache_dir("precision") / f"{_cache_key(config, batch_size)}.json"
    try:
        saved = json.loads(path.read_text())
        return PrecisionChoice(saved["precision"], saved["fp32_s"], saved["bf16_s"], source="cached")
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet (or unreadable): measure
    choice = measure_for_config(config, batch_size, reps=reps)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"precision": choice.precision, "fp32_s": choice.fp32_s, "bf16_s": choice.bf16_s,
                             "machine": cpu_identity(), "batch": batch_size, "measured_at": time.time()})
    return choice
