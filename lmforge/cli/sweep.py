"""`lmforge sweep` (issue 18): small models x token counts within a time budget -> a fitted L(N, D), its plot and
the compute-optimal size it predicts. The work is `lmforge.train.sweep`."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli.common import (
    Formatter, add_data_flags, add_device_flag, add_progress_flag, fail, float_arg, nonneg_int, para, positive_int,
    progress_enabled,
)


def _token_counts(text: str) -> list[int]:
    try:
        counts = [int(float(t)) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token counts separated by commas (1e5,2e5), got {text!r}") from None
    if any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"token counts must be positive, got {text!r}")
    return counts


def cmd_sweep(args) -> int:
    from lmforge.train.loop import TrainingDiverged
    from lmforge.train.sweep import SweepOptions, format_summary, parse_sizes, sweep

    opts = SweepOptions(
        out=Path(args.out), data=args.data or "builtin:pydocs", budget_minutes=args.budget,
        sizes=parse_sizes(args.sizes) if args.sizes else None, tokens=args.tokens, levels=args.levels,
        vocab_size=args.vocab_size, context_length=args.context_length, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, eval_tokens=args.eval_tokens, predict_flops=args.predict_flops, bootstrap=args.bootstrap,
        device=args.device, errors=args.errors, progress=progress_enabled(args),
        on_info=lambda line: print(line, flush=True))
    try:
        summary = sweep(opts)
    except TrainingDiverged as e:
        return fail(str(e), code=1)
    print(format_summary(summary))
    if summary["interrupted"]:
        print(f"stopped early (signal): the finished runs are kept in {opts.out}; run the same command to continue")
        return 0
    print(f"{len(summary['runs'])} runs ({summary['reused']} reused) in {summary['elapsed_s']:.0f}s; "
          f"runs and fit: {opts.out / 'sweep.json'}" + (f"   plot: {summary['plot']}" if summary["plot"] else ""))
    return 0


def register(sub) -> list[argparse.ArgumentParser]:
    """Add `sweep` to `sub`; returns the parsers whose numeric flags get short metavars."""
    p = sub.add_parser(
        "sweep", help="train small models x token counts in a time budget; fit and plot a scaling law",
        formatter_class=Formatter,
        description=para("Train a grid of small models (sizes x token counts) sized to fit --budget minutes on this "
                          "machine, fit L(N, D) = E + A/N^alpha + B/D^beta to their validation losses (Chinchilla's "
                          "third approach: Huber loss on log-losses, L-BFGS from many starts), plot the iso-loss "
                          "contours and the compute-optimal frontier, and predict the compute-optimal size for a FLOP "
                          "budget with a bootstrap interval. N counts non-embedding parameters. Finished runs are "
                          "reused: run the same command again to continue or to refit.")
        + "\n\nexample:\n  lmforge sweep --data builtin:pydocs --budget 60 --predict-flops 1e18")
    add_data_flags(p, "builtin:pydocs")
    p.add_argument("--budget", type=float_arg, default=60.0, metavar="MINUTES",
                   help="wall-clock minutes for the whole sweep, timing and fit included (default: 60)")
    p.add_argument("--out", default="runs/sweep", metavar="DIR",
                   help="directory for the runs, sweep.json and sweep.png (default: runs/sweep)")
    p.add_argument("--sizes", metavar="WxD,...", help="model sizes as WIDTHxDEPTH (d_model x layers) "
                   "(default: 48x2,96x3,160x4,256x4: about 56k to 2.9M non-embedding parameters)")
    p.add_argument("--tokens", type=_token_counts, metavar="T,...",
                   help="train every size on these token counts, e.g. 1e5,2e5 (default: sized from --budget)")
    p.add_argument("--levels", type=positive_int, default=4, help="token counts (x2 apart) when sized from --budget (default: 4)")
    p.add_argument("--predict-flops", type=float_arg, metavar="FLOPS",
                   help="the compute budget to predict the optimal size for (default: 100x the largest run)")
    p.add_argument("--bootstrap", type=nonneg_int, default=100, help="resamples for the prediction's interval (default: 100)")
    p.add_argument("--vocab-size", type=positive_int, default=2048, help="BPE tokenizer size (default: 2048)")
    p.add_argument("--context-length", type=positive_int, default=128, help="tokens a window (default: 128)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="windows a step (default: 16)")
    p.add_argument("--lr", type=float_arg, default=2e-3, help="peak learning rate of every run (default: 0.002)")
    p.add_argument("--eval-tokens", type=positive_int, default=16384, help="validation tokens scored at the end of each run (default: 16384)")
    p.add_argument("--seed", type=int, default=1337, help="seed of every run (default: 1337)")
    add_device_flag(p)
    add_progress_flag(p)
    p.set_defaults(func=cmd_sweep)
    return [p]
