"""Which precision to train in on this CPU: decided by measuring, not by a table of CPU names.

A CPU's bf16 speed varies by an order of magnitude between the machines lmforge runs on: Intel's AMX tiles
and AVX-512-BF16 (`vdpbf16ps`) make bf16 matmuls faster than fp32, while a CPU with AVX2 only converts bf16
to fp32 around every kernel and runs several times *slower*. Which kernels PyTorch picks also depends on
the shapes and its oneDNN build. So `lmforge quickstart` times a few forward+backward passes of the model
at its training shape in each precision and keeps bf16 autocast only when it is clearly faster
(`MIN_SPEEDUP`); the figures are logged with the choice.

Why not do this for every `precision="auto"` CPU run: the choice is a timing, so two runs of the same
command could train in different precisions, and bf16 autocast on CPU is not bit-reproducible across
runs; "auto" stays fp32 on CPUs so that a run, and a resumed run, are exactly reproducible by default.

The measurement leaves no trace: gradients are cleared and the RNG state restored afterwards.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["MIN_SPEEDUP", "PrecisionChoice", "choose_cpu_precision", "measure_for_config"]

#: bf16 autocast must be at least this much faster than fp32 to be chosen: its rounding is not free.
MIN_SPEEDUP = 1.15


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # "fp32" | "bf16"
    fp32_s: float  # seconds per forward+backward, best of the timed repetitions
    bf16_s: float | None  # None when bf16 could not run here

    def describe(self) -> str:
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
    pick = "bf16" if bf16 is not None and fp32 / bf16 >= MIN_SPEEDUP else "fp32"
    return PrecisionChoice(pick, fp32, bf16)


def measure_for_config(config, batch_size: int, *, reps: int = 2) -> PrecisionChoice:
    """`choose_cpu_precision` for a freshly initialised model of `config` (a `ModelConfig`) training on
    random token ids of shape (batch_size, config.context_length): the shape a run is about to train at."""
    import torch.nn.functional as F

    from lmforge.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(config)
    ids = torch.randint(0, config.vocab_size, (batch_size, config.context_length + 1))

    def loss() -> torch.Tensor:
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    return choose_cpu_precision(model, loss, reps=reps)
