"""Training throughput and model FLOPs utilisation (MFU) of the real training loop.

    python bench/train_throughput.py                 # small and base, on this machine
    python bench/train_throughput.py --presets small --steps 20 --batch-size 8

For each preset it runs `lmforge.train.loop.fit` (AdamW, clipping, the same code as `lmforge pretrain`) on
random tokens and takes the median tokens/s over the steps after warm-up. MFU is reported two ways:
  - 6 * params * tokens/s / peak, the issue's definition (params include the embedding table), and
  - training FLOPs/token (6 * matmul params + attention) * tokens/s / peak, the PaLM-paper definition,
where peak is this machine's measured fp32 matmul rate (a large square matmul, best of several runs).
Speed is reported, never asserted: compare runs on the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.train.checkpointer import Checkpointer  # noqa: E402
from lmforge.model.gpt import GPT  # noqa: E402
from lmforge.presets import get_preset  # noqa: E402
from lmforge.train import objectives  # noqa: E402
from lmforge.train.loop import TrainConfig, fit  # noqa: E402


def matmul_peak(n: int = 2048, repeats: int = 10, dtype=torch.float32) -> float:
    """Measured FLOP/s of an n x n matmul: the ceiling a training step's matmuls can approach."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class RandomTokens:
    def __init__(self, vocab: int, batch: int, block: int) -> None:
        self.vocab, self.batch, self.block = vocab, batch, block
        self.tokens_per_batch = batch * block

    def train_batch(self, step: int, micro: int):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, self.vocab, (self.batch, self.block + 1), generator=g)
        return x[:, :-1], x[:, 1:]

    def val_batches(self):
        return [self.train_batch(-1, 0)]


def measure(preset: str, *, steps: int, batch_size: int, block: int | None) -> dict:
    cfg = get_preset(preset, **({"context_length": block} if block else {}))
    torch.manual_seed(0)
    model = GPT(cfg)
    rates: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        fit(model, objectives.pretrain, RandomTokens(cfg.vocab_size, batch_size, cfg.context_length),
            TrainConfig(max_steps=steps, batch_size=batch_size, warmup_steps=1, log_interval=1, eval_interval=10**9,
                        save_interval=0),
            Checkpointer(tmp), progress=False,
            on_log=lambda r: rates.append(r["tokens_per_s"]) if "tokens_per_s" in r and r["step"] > 2 and r["step"] < steps else None)
    tps = statistics.median(rates)
    return {"preset": preset, "params": cfg.num_params(), "context": cfg.context_length, "batch": batch_size,
            "tokens_per_s": tps, "flops_per_token": cfg.flops_per_token()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "base"], help="presets to measure (default: small base)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per preset (default: 12)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: 8)")
    ap.add_argument("--block", type=int, default=256, help="tokens per sequence; 0 = the preset's context (default: 256)")
    args = ap.parse_args()

    peak = matmul_peak()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s\n")
    print("| preset | params | batch x context | tokens/s | MFU (6*N) | MFU (6*N + attention) |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        r = measure(preset, steps=args.steps, batch_size=args.batch_size, block=args.block or None)
        mfu_simple = 6 * r["params"] * r["tokens_per_s"] / peak
        mfu_full = r["flops_per_token"] * r["tokens_per_s"] / peak
        print(f"| {preset} | {r['params'] / 1e6:.1f}M | {r['batch']} x {r['context']} | {r['tokens_per_s']:,.0f} | "
              f"{mfu_simple:.1%} | {mfu_full:.1%} |", flush=True)


if __name__ == "__main__":
    main()
