"""A mixture of experts against the dense model of the same FLOPs per token, at equal wall-clock time.

    python bench/moe_vs_dense.py                              # small vs moe-small, 5 minutes each, builtin:pydocs
    python bench/moe_vs_dense.py --minutes 10 --presets small,moe-small --data corpus/

`moe-small` is `small`'s shape with 8 half-width SwiGLU experts, 2 per token: ~2.5x the parameters, the same
matmul FLOPs per token. Whether those extra parameters pay on *this* machine depends on how fast the sparse
layer runs here (routing, gathering tokens per expert, E small matmuls instead of one big one), so the fair
comparison is equal wall-clock, not equal steps:

1. each preset trains 20 steps through the real CLI (`lmforge pretrain`) to measure its seconds per step
   (steps 5-20, after warm-up), on the same tokenizer (trained once, on the first run);
2. each then trains from scratch for as many steps as fit in `--minutes` (the cosine schedule sized to them),
   same seed, data and batch, evaluating on the same held-out tokens;
3. the table: parameters (total / active per token), tokens/s, steps, tokens seen, final validation loss.

Speed is measured, never asserted; run it on a quiet machine (it uses every core it is given).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.loaders.hf_read import config_from_hf  # noqa: E402


def pretrain(preset: str, out: Path, data: str, steps: int, *, tokenizer: Path | None, eval_interval: int,
             extra: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "lmforge", "pretrain", "--preset", preset, "--data", data, "--out", str(out),
           "--max-steps", str(steps), "--eval-interval", str(eval_interval), "--save-interval", "0",
           "--log-interval", "5", "--samples", "0", "--no-progress", "--overwrite", *extra]
    if tokenizer is not None:
        cmd += ["--tokenizer", str(tokenizer)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"lmforge pretrain --preset {preset} failed:\n{r.stderr[-2000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def seconds_per_step(history: list[dict]) -> float:
    logged = [h for h in history if "elapsed_s" in h]
    first = next(h for h in logged if h["step"] >= 5)
    last = logged[-1]
    return (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="small,moe-small", help="comma-separated presets (default: small,moe-small)")
    ap.add_argument("--minutes", type=float, default=5.0, help="training time per preset (default: 5)")
    ap.add_argument("--data", default="builtin:pydocs", help="training text (default: builtin:pydocs)")
    ap.add_argument("--out", type=Path, default=Path("/work/benchfiles/moe_vs_dense"), help="work directory")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    a = ap.parse_args(argv)
    presets = a.presets.split(",")
    a.out.mkdir(parents=True, exist_ok=True)
    extra = ["--batch-size", str(a.batch_size)]

    tokenizer, rate = None, {}
    for p in presets:
        run = a.out / f"calibrate-{p}"
        rate[p] = seconds_per_step(pretrain(p, run, a.data, 20, tokenizer=tokenizer, eval_interval=1000, extra=extra))
        tokenizer = tokenizer or run
        print(f"{p}: {rate[p]:.3f} s/step", flush=True)

    rows = []
    for p in presets:
        steps = max(20, int(a.minutes * 60 / rate[p]))
        run = a.out / f"run-{p}"
        history = pretrain(p, run, a.data, steps, tokenizer=tokenizer, eval_interval=max(1, steps // 4), extra=extra)
        wall = max(h["elapsed_s"] for h in history if "elapsed_s" in h)  # training only (not start-up, data prep)
        cfg = config_from_hf(json.loads((run / "config.json").read_text()))  # the vocabulary the run really had
        val = [h["val_loss"] for h in history if "val_loss" in h]
        tps = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
        rows.append((p, cfg.num_params(), cfg.num_params(active=True), sorted(tps)[len(tps) // 2], steps,
                     steps * a.batch_size * cfg.context_length, val[-1], wall / 60))
        print(f"{p}: {steps} steps, val loss {val[-1]:.4f}, {wall / 60:.1f} min", flush=True)

    print("\n| preset | params total | params active | tokens/s (median) | steps | tokens | val loss | wall (min) |")
    print("|---|---|---|---|---|---|---|---|")
    for p, total, active, tps, steps, tokens, val, wall in rows:
        print(f"| {p} | {total / 1e6:.2f}M | {active / 1e6:.2f}M | {tps:,.0f} | {steps} | {tokens / 1e6:.2f}M | "
              f"{val:.4f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
