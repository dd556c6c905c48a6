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
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.loaders.hf_read import config_from_hf  # noqa: E402


def start(preset: str, out: Path, data: str, steps: int, *, tokenizer: Path | None, eval_interval: int | None,
          extra: list[str], threads: int | None) -> subprocess.Popen:
    """`lmforge pretrain` of `preset` into `out`, started (with `threads` intra-op threads when given);
    evaluated every `eval_interval` steps (None: four times)."""
    eval_interval = eval_interval or max(1, steps // 4)
    cmd = [sys.executable, "-m", "lmforge", "pretrain", "--preset", preset, "--data", data, "--out", str(out),
           "--max-steps", str(steps), "--eval-interval", str(eval_interval), "--save-interval", "0",
           "--log-interval", "5", "--samples", "0", "--no-progress", "--overwrite", *extra]
    if tokenizer is not None:
        cmd += ["--tokenizer", str(tokenizer)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen, preset: str, out: Path) -> list[dict]:
    """Wait for a `start`ed run; its metrics.jsonl records."""
    _, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"lmforge pretrain --preset {preset} failed:\n{err[-2000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_all(presets: list[str], dirs: dict[str, Path], together: bool, threads: int | None, **kw) -> dict[str, list[dict]]:
    """Train every preset (kw["steps"] may be a dict per preset): one after the other, or all at once."""
    steps = kw.pop("steps")
    def one(p):
        return start(p, dirs[p], steps=steps[p], threads=threads, **kw)
    if together:
        procs = {p: one(p) for p in presets}
        return {p: finish(procs[p], p, dirs[p]) for p in presets}
    return {p: finish(one(p), p, dirs[p]) for p in presets}


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
    ap.add_argument("--together", action="store_true", help="train the presets at the same time, each on an equal "
                    "share of the cores (fair on a machine that is doing other work too; default: one after another)")
    a = ap.parse_args(argv)
    presets = a.presets.split(",")
    a.out.mkdir(parents=True, exist_ok=True)
    extra = ["--batch-size", str(a.batch_size)]
    # --together: every preset trains at the same time on an equal share of the cores, so that whatever else
    # the machine does slows all of them alike (a shared machine); otherwise one after the other, all cores each.
    threads = max(1, (os.cpu_count() or 1) // len(presets)) if a.together else None

    # The tokenizer: trained once (a 1-step run), then shared, so that every run reads the same tokens.
    tok = a.out / "tokenizer"
    finish(start(presets[0], tok, a.data, 1, tokenizer=None, eval_interval=1000, extra=extra, threads=None), presets[0], tok)
    calib = run_all(presets, {p: a.out / f"calibrate-{p}" for p in presets}, a.together, threads,
                    steps={p: 20 for p in presets}, data=a.data, tokenizer=tok, eval_interval=1000, extra=extra)
    rate = {p: seconds_per_step(calib[p]) for p in presets}
    for p in presets:
        print(f"{p}: {rate[p]:.3f} s/step", flush=True)

    steps = {p: max(20, int(a.minutes * 60 / rate[p])) for p in presets}
    dirs = {p: a.out / f"run-{p}" for p in presets}
    runs = run_all(presets, dirs, a.together, threads, steps=steps, data=a.data, tokenizer=tok,
                   eval_interval=None, extra=extra)
    rows = []
    for p in presets:
        history = runs[p]
        wall = max(h["elapsed_s"] for h in history if "elapsed_s" in h)  # training only (not start-up, data prep)
        cfg = config_from_hf(json.loads((dirs[p] / "config.json").read_text()))  # the vocabulary the run really had
        val = [h["val_loss"] for h in history if "val_loss" in h]
        tps = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
        rows.append((p, cfg.num_params(), cfg.num_params(active=True), sorted(tps)[len(tps) // 2], steps[p],
                     steps[p] * a.batch_size * cfg.context_length, val[-1], wall / 60))
        print(f"{p}: {steps[p]} steps, val loss {val[-1]:.4f}, {wall / 60:.1f} min", flush=True)

    print("\n| preset | params total | params active | tokens/s (median) | steps | tokens | val loss | wall (min) |")
    print("|---|---|---|---|---|---|---|---|")
    for p, total, active, tps, steps, tokens, val, wall in rows:
        print(f"| {p} | {total / 1e6:.2f}M | {active / 1e6:.2f}M | {tps:,.0f} | {steps} | {tokens / 1e6:.2f}M | "
              f"{val:.4f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
