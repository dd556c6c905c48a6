"""AdamW step time on this machine: plain (for-loop) vs foreach vs fused, for a preset's parameters.

    python bench/optimizer_step.py                       # the `small` preset, 20 timed steps each
    python bench/optimizer_step.py --preset base --steps 10

`lmforge.train.optim.make_optimizer` picks the implementation from these figures (its docstring records
them). Each variant steps an AdamW with lmforge's parameter groups over the same parameters and random
gradients (the step's cost does not depend on the values), on the same thread count; the figure is the
median seconds per `optimizer.step()` after two warm-up steps, and the ratio is against the plain loop.
Speed is reported, never asserted: compare variants within one run of this script.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.model.gpt import GPT
from lmforge.presets import get_preset
from lmforge.train.optim import param_groups

VARIANTS = {"plain": dict(foreach=False, fused=False), "foreach": dict(foreach=True, fused=False),
            "fused": dict(foreach=False, fused=True)}


def time_step(model: torch.nn.Module, steps: int, **kind) -> float:
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), **kind)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="whose parameters to step (default: small)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant (default: 20)")
    ap.add_argument("--rounds", type=int, default=2, help="alternate the variants this many times, keep each "
                    "one's best round: a busy machine slows whichever ran at the wrong moment (default: 2)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = GPT(get_preset(args.preset))
    n = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.preset}: {n / 1e6:.1f}M parameters")
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, kind in VARIANTS.items():
            try:
                s = time_step(model, args.steps, **kind)
            except RuntimeError as e:  # e.g. fused AdamW not built for this device
                print(f"{name}: cannot run here ({str(e).splitlines()[0]})")
                continue
            best[name] = min(best.get(name, float("inf")), s)
    plain = best.get("plain")
    for name, s in best.items():
        ratio = f"{plain / s:.2f}x plain" if plain else ""
        print(f"{name:8s} {s * 1e3:8.2f} ms/step  {ratio}")


if __name__ == "__main__":
    main()
