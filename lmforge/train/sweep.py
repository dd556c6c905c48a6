"""`lmforge sweep`: see a scaling law on this machine. Train a grid of small models (sizes x token counts) within a
time budget, fit L(N, D) = E + A/N^alpha + B/D^beta to their final validation losses (`scaling_fit`), plot the
iso-loss contours and the compute-optimal frontier, and predict the compute-optimal size for a FLOP budget.

Every run is an ordinary pretraining run through the one training loop (`loop.fit` with the `Pretrain`
objective and pretraining's `WindowBatches`), on one tokenizer and one set of token shards, each in its own
directory. Each run has its own cosine schedule that ends at its own token count, as the Chinchilla runs do
(the loss part-way through a longer run is not the loss of a run that stops there). N counts the
non-embedding parameters (as Kaplan et al. 2020): for models this small the embedding table would otherwise
be most of N while costing almost no compute per token.

Sizing: a few timed steps of each size through `fit` itself measure its tokens/s and its per-run overhead
(evaluation, save); the token counts are then a geometric ladder (x2 a rung) whose largest rung makes the whole
grid fit the budget. The plan is kept in the output directory, and a finished run leaves `result.json`, so a
second invocation with the same settings retrains nothing, and an interrupted one continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from lmforge.checkpoint import TRAINER_STATE
from lmforge.config import ModelConfig
from lmforge.data.shards import prepare_data
from lmforge.device import resolve_device
from lmforge.errors import UserError
from lmforge.io import atomic_write, atomic_write_json, check_writable
from lmforge.loaders.model_dir import load_model
from lmforge.model.gpt import GPT
from lmforge.paths import cache_dir
from lmforge.train import objectives, scaling_fit
from lmforge.train.checkpointer import Checkpointer
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.pretrain import WindowBatches, get_tokenizer

# (d_model, n_layers): about 56k, 330k, 1.2M and 2.9M non-embedding parameters
DEFAULT_SIZES = ((48, 2), (96, 3), (160, 4), (256, 4))
CALIBRATION_STEPS = 8  # timed steps per size when sizing the grid (the first is not counted: warm-up)
RUNG = 2.0  # ratio between neighbouring token counts
MIN_STEPS = 10  # the smallest run worth fitting: below this warm-up and noise are the whole run
FIT_RESERVE_S = 45.0  # kept from the budget for the fit, the bootstrap and the plot


@dataclass
class SweepOptions:
    out: Path
    data: str = "builtin:pydocs"
    budget_minutes: float = 60.0
    sizes: list[tuple[int, int]] | None = None  # (d_model, n_layers); None: DEFAULT_SIZES
    tokens: list[int] | None = None  # explicit token counts per run (no sizing from the budget)
    levels: int = 4  # how many token counts when sized from the budget
    vocab_size: int = 2048
    context_length: int = 128
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 1337
    eval_tokens: int = 16384
    val_fraction: float = 0.05
    max_epochs: float = 4.0  # the largest run sees the training tokens at most this many times
    predict_flops: float | None = None  # None: 100 x the largest run's compute
    bootstrap: int = 100
    device: str = "auto"
    errors: str = "strict"
    progress: bool = True
    on_info: Callable[[str], None] = field(default=print)


def sweep_config(d_model: int, n_layers: int, *, vocab_size: int, context_length: int) -> ModelConfig:
    """A Llama-shaped model of width `d_model` and depth `n_layers`: heads of 16-32 dims, GQA by 2 when the head
    count is even, an MLP of about 8/3 d_model (a multiple of 16), as the `small` preset is shaped."""
    if d_model < 16 or d_model % 16 or n_layers < 1:
        raise UserError(f"a sweep size is WIDTHxDEPTH with the width a multiple of 16 (at least 16) and depth at "
                        f"least 1, got {d_model}x{n_layers}")
    heads = d_model // 32 if d_model % 32 == 0 else d_model // 16
    kv = heads // 2 if heads % 2 == 0 else heads
    d_ff = max(16, round(d_model * 8 / 3 / 16) * 16)
    return ModelConfig(name=f"sweep-{d_model}x{n_layers}", vocab_size=vocab_size, context_length=context_length,
                       d_model=d_model, n_layers=n_layers, n_heads=heads, n_kv_heads=kv, d_ff=d_ff)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'48x2,96x3' -> [(48, 2), (96, 3)]; one line for anything else."""
    out = []
    for part in text.split(","):
        try:
            d, l = part.strip().lower().split("x")
            out.append((int(d), int(l)))
        except ValueError:
            raise UserError(f"--sizes takes WIDTHxDEPTH pairs separated by commas (48x2,96x3), got {part.strip()!r}") from None
    return out


def plan_token_counts(seconds: float, tokens_per_s: list[float], overhead_s: list[float], *, levels: int,
                      tokens_per_step: int, max_tokens: int) -> list[int]:
    """Step counts for a ladder of `levels` token counts (x RUNG apart) such that every size trained at every
    count takes about `seconds` in all, each size at its measured tokens/s plus its per-run overhead. The
    largest count is capped at `max_tokens`. Raises UserError when even MIN_STEPS a rung does not fit."""
    rungs = [RUNG ** -(levels - 1 - j) for j in range(levels)]  # fractions of the largest count
    fixed = levels * sum(overhead_s)
    per_token = sum(rungs) * sum(1.0 / t for t in tokens_per_s)  # seconds per token of the largest count
    largest = min((seconds - fixed) / per_token, max_tokens) if seconds > fixed else 0.0
    steps = [int(largest * r // tokens_per_step) for r in rungs]
    if steps[0] < MIN_STEPS:
        need = fixed + MIN_STEPS * tokens_per_step / rungs[0] * per_token
        raise UserError(f"the budget is too small for {len(tokens_per_s)} sizes x {levels} token counts on this "
                        f"machine: it needs about {need / 60 + FIT_RESERVE_S / 60:.1f} minutes or more "
                        f"(or fewer --sizes / --levels)")
    return steps


def _spec_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def _train(cfg: ModelConfig, steps: int, run_dir: Path, opts: SweepOptions, tokenizer, token_data, device, *,
           log_interval: int, lineage: dict, on_log=None):
    """One pretraining run of `cfg` for `steps` steps into `run_dir` (continued if an earlier one was cut short)."""
    recipe = TrainConfig(max_steps=steps, batch_size=opts.batch_size, lr=opts.lr, warmup_steps=max(1, steps // 10),
                         eval_interval=steps, save_interval=0, log_interval=log_interval, seed=opts.seed)
    resume = (run_dir / TRAINER_STATE / "state.json").is_file()
    if resume:
        model = load_model(run_dir, device=device)
    else:
        torch.manual_seed(opts.seed)
        model = GPT(cfg).to(device)
    batches = WindowBatches(token_data, batch_size=opts.batch_size, block_size=cfg.context_length, grad_accum=1,
                            seed=opts.seed, eval_tokens=opts.eval_tokens, device=device)
    checkpointer = Checkpointer(run_dir, tokenizer=tokenizer, lineage={**lineage, "preset": cfg.name})
    objective = objectives.Pretrain(recipe.router_aux_loss_coef, recipe.router_z_loss_coef)
    return fit(model, objective, batches, recipe, checkpointer, resume=resume, device=device, progress=False,
               description="sweep", on_log=on_log)


def _calibrate(cfgs, opts, tokenizer, token_data, device, where: Path) -> tuple[list[float], list[float]]:
    """(tokens/s, per-run overhead in seconds) of each config, from CALIBRATION_STEPS steps through `fit`."""
    tps, overhead = [], []
    for cfg in cfgs:
        run_dir = where / cfg.name
        shutil.rmtree(run_dir, ignore_errors=True)
        result = _train(cfg, CALIBRATION_STEPS, run_dir, opts, tokenizer, token_data, device, log_interval=1,
                        lineage={"objective": "pretrain", "data": opts.data, "sweep": "calibration"})
        times = [h["elapsed_s"] for h in result.history if "elapsed_s" in h]
        # the steps after the first, less the slowest (one step slowed by another process on a shared machine);
        # a sum over several, as the log keeps times to 10 ms and a tiny model's step takes about that long
        steps = np.diff(times)
        per_step = float((steps.sum() - steps.max()) / (len(steps) - 1)) if len(steps) > 1 else times[-1]
        tps.append(opts.batch_size * cfg.context_length / max(per_step, 1e-6))
        overhead.append(max(0.0, result.elapsed_s - times[-1]))
        shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(where, ignore_errors=True)
    return tps, overhead


def sweep(opts: SweepOptions) -> dict[str, Any]:
    """Train the grid (reusing finished runs), fit the law, plot it, predict. Returns what sweep.json holds."""
    t0 = time.perf_counter()
    if not (opts.budget_minutes > 0 and math.isfinite(opts.budget_minutes)):
        raise UserError(f"--budget must be a positive number of minutes, got {opts.budget_minutes:g}")
    if opts.predict_flops is not None and not (opts.predict_flops > 0 and math.isfinite(opts.predict_flops)):
        raise UserError(f"--predict-flops must be a positive number, got {opts.predict_flops:g}")
    if not (opts.lr > 0 and math.isfinite(opts.lr)):
        raise UserError(f"--lr must be a positive number, got {opts.lr:g}")
    if opts.tokens is not None and (not opts.tokens or min(opts.tokens) < 1):
        raise UserError("--tokens takes positive token counts separated by commas")
    if opts.tokens is None and opts.levels < 2:
        raise UserError(f"--levels must be at least 2 (a law in D needs two token counts), got {opts.levels}")
    sizes = list(opts.sizes or DEFAULT_SIZES)
    cfgs = [sweep_config(d, l, vocab_size=opts.vocab_size, context_length=opts.context_length) for d, l in sizes]
    if len({c.name for c in cfgs}) != len(cfgs):
        raise UserError("--sizes names a size twice")
    out = Path(opts.out)
    check_writable(out)
    device = resolve_device(opts.device)

    tokenizer = get_tokenizer(opts.data, opts.vocab_size, errors=opts.errors, progress=opts.progress)
    cfgs = [c.replace(vocab_size=tokenizer.vocab_size) for c in cfgs]
    token_data = prepare_data(opts.data, tokenizer, cache_dir("data"), val_fraction=opts.val_fraction, seed=0,
                              errors=opts.errors, block_size=opts.context_length, show_progress=opts.progress)
    tokens_per_step = opts.batch_size * opts.context_length
    spec = {"data": token_data.meta.get("corpus_fingerprint"), "vocab_size": tokenizer.vocab_size,
            "context_length": opts.context_length, "batch_size": opts.batch_size, "lr": opts.lr, "seed": opts.seed,
            "eval_tokens": opts.eval_tokens, "val_fraction": opts.val_fraction, "version": 1}
    key = _spec_key(spec)

    plan_path = out / "plan.json"
    plan_key = {"spec": key, "sizes": sizes, "budget_minutes": opts.budget_minutes, "levels": opts.levels,
                "tokens": opts.tokens, "device": str(device)}
    saved = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    if opts.tokens is not None:
        steps = sorted({max(1, math.ceil(t / tokens_per_step)) for t in opts.tokens})
        measured = None
    elif saved and saved.get("key") == json.loads(json.dumps(plan_key)):
        steps, measured = saved["steps"], saved.get("measured")
        opts.on_info(f"reusing the grid planned earlier in {plan_path}")
    else:
        opts.on_info(f"timing {len(cfgs)} sizes ({CALIBRATION_STEPS} steps each) to fit the grid into "
                     f"{opts.budget_minutes:g} minutes ...")
        tps, overhead = _calibrate(cfgs, opts, tokenizer, token_data, device, out / "calibration")
        left = opts.budget_minutes * 60 - (time.perf_counter() - t0) - FIT_RESERVE_S
        max_tokens = int(opts.max_epochs * token_data.meta["train_tokens"])
        measured = [{"size": c.name, "tokens_per_s": round(t, 1), "overhead_s": round(o, 2)}
                    for c, t, o in zip(cfgs, tps, overhead)]
        for m in measured:
            opts.on_info(f"  {m['size']:>14}: {m['tokens_per_s']:,.0f} tokens/s, {m['overhead_s']:.1f}s a run besides")
        steps = plan_token_counts(left, tps, overhead, levels=opts.levels, tokens_per_step=tokens_per_step,
                                  max_tokens=max_tokens)
        if steps[-1] * tokens_per_step >= max_tokens - tokens_per_step:
            opts.on_info(f"the largest runs are capped at {opts.max_epochs:g} epochs of the {token_data.meta['train_tokens']:,} "
                         f"training tokens; more data would let the budget buy longer runs")
    atomic_write_json(plan_path, {"key": plan_key, "steps": steps, "measured": measured})

    grid = [(cfg, s) for cfg in cfgs for s in steps]
    speed = {m["size"]: m for m in (measured or [])}
    def estimate_s(cfg, s):  # for the progress bar's ETA only: the measured speed, else FLOPs-proportional guess
        m = speed.get(cfg.name)
        if m:
            return s * tokens_per_step / m["tokens_per_s"] + m["overhead_s"]
        return s * tokens_per_step * cfg.flops_per_token(cfg.context_length) / 1e9
    lineage = {"objective": "pretrain", "data": opts.data, "data_fingerprint": spec["data"], "parent": None,
               "tokenizer": f"BPE trained on {opts.data}", "sweep": key}
    runs, reused, interrupted, warned = [], 0, False, opts.tokens is not None  # explicit --tokens: no budget to keep
    run_dirs = {(cfg.name, s): out / "runs" / f"{cfg.name.removeprefix('sweep-')}-{s}steps-{key}" for cfg, s in grid}
    # The bar counts estimated seconds of the runs still to train (reused ones would make its rate, so its ETA, wrong)
    total = sum(estimate_s(c, s) for c, s in grid if not (run_dirs[c.name, s] / "result.json").is_file())
    bar = tqdm(total=round(total, 1), desc="sweep", unit="s", disable=not opts.progress, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} est. s [{elapsed}<{remaining}]{postfix}")
    for cfg, s in grid:
        run_dir = run_dirs[cfg.name, s]
        result_path = run_dir / "result.json"
        est = estimate_s(cfg, s)
        if result_path.is_file():
            runs.append({**json.loads(result_path.read_text()), "reused": True})
            reused += 1
            continue
        if not warned and time.perf_counter() - t0 > opts.budget_minutes * 60:
            warned = True  # the grid is kept whole (a law needs all of it); say why it runs late
            bar.write(f"past the {opts.budget_minutes:g}-minute budget: training runs slower than it was timed "
                      f"(another process on this machine?); the remaining runs continue, or stop and rerun to resume")
        bar.set_postfix_str(f"{cfg.name.removeprefix('sweep-')}, {s * tokens_per_step:,} tokens")
        done = [0.0]

        def advance(rec, est=est, s=s, done=done):
            if "step" in rec and "loss" in rec:
                now = est * rec["step"] / s
                bar.update(now - done[0])
                done[0] = now
        result = _train(cfg, s, run_dir, opts, tokenizer, token_data, device, log_interval=max(1, s // 20),
                        lineage=lineage, on_log=advance)
        bar.update(est - done[0])
        if result.interrupted:
            interrupted = True
            break
        n = cfg.num_params(include_embeddings=False)
        record = {"run": run_dir.name, "d_model": cfg.d_model, "n_layers": cfg.n_layers, "params": cfg.num_params(),
                  "non_embedding_params": n, "steps": s, "tokens": result.tokens_seen, "flops": 6.0 * n * result.tokens_seen,
                  "val_loss": result.val_loss, "train_loss": result.train_loss, "elapsed_s": round(result.elapsed_s, 2),
                  "tokens_per_s": round(result.tokens_per_s, 1)}
        atomic_write_json(result_path, record)
        shutil.rmtree(run_dir / TRAINER_STATE, ignore_errors=True)  # finished for good: the model is what stays
        runs.append({**record, "reused": False})
    bar.close()

    summary: dict[str, Any] = {"spec": spec, "steps": steps, "tokens_per_step": tokens_per_step, "measured": measured,
                               "runs": runs, "reused": reused, "interrupted": interrupted, "fit": None,
                               "prediction": None, "plot": None}
    if not interrupted:
        summary.update(_fit_and_plot(runs, opts, out))
    summary["elapsed_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "sweep.json", summary)
    return summary


def _fit_and_plot(runs: list[dict], opts: SweepOptions, out: Path) -> dict:
    N = np.array([r["non_embedding_params"] for r in runs], dtype=np.float64)
    D = np.array([r["tokens"] for r in runs], dtype=np.float64)
    L = np.array([r["val_loss"] for r in runs], dtype=np.float64)
    if len(set(N)) < 2 or len(set(D)) < 2:
        return {"fit_note": "no fit: a law in N and D needs at least two sizes and two token counts"}
    best = scaling_fit.fit_scaling_law(N, D, L)
    fits = scaling_fit.bootstrap_fits(N, D, L, best, samples=opts.bootstrap, seed=opts.seed) if opts.bootstrap else []
    flops = opts.predict_flops or 100.0 * float((6 * N * D).max())
    prediction = scaling_fit.predict_with_uncertainty(best, fits, flops)
    residual = np.log(best.predict(N, D)) - np.log(L)
    note = None
    if len(runs) < 6:
        note = f"{len(runs)} runs for 5 coefficients: the fit is underdetermined, its numbers are not to be trusted"
    plot = out / "sweep.png"
    plot_scaling(best, runs, prediction, plot)
    return {"fit": {**best.as_dict(), "rms_log_residual": float(np.sqrt(np.mean(residual ** 2)))},
            "prediction": prediction, "plot": str(plot), "fit_note": note}


def plot_scaling(best: scaling_fit.LossFit, runs: list[dict], prediction: dict, path: Path) -> None:
    """Iso-loss contours of the fitted L over (FLOPs, N), the runs coloured by their loss, and the compute-optimal
    frontier N_opt(C) (Chinchilla's figure 4, left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C = np.array([r["flops"] for r in runs])
    N = np.array([r["non_embedding_params"] for r in runs], dtype=np.float64)
    L = np.array([r["val_loss"] for r in runs])
    c_hi = max(C.max(), prediction["flops"]) * 3
    cs = np.logspace(math.log10(C.min() / 3), math.log10(c_hi), 200)
    n_opt = np.array([best.compute_optimal(c)[0] for c in cs])
    n_lo = min(N.min() / 3, np.nanmin(n_opt) if np.isfinite(n_opt).any() else N.min())
    n_hi = max(N.max() * 3, np.nanmax(n_opt) if np.isfinite(n_opt).any() else N.max(),
               prediction.get("n_hi", 0.0) if math.isfinite(prediction.get("n_hi", math.nan)) else 0.0)
    ns = np.logspace(math.log10(n_lo), math.log10(n_hi), 200)
    CC, NN = np.meshgrid(cs, ns)
    LL = best.predict(NN, CC / (6 * NN))
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
    levels = np.quantile(LL[np.isfinite(LL)], np.linspace(0.02, 0.98, 14))
    cont = ax.contour(CC, NN, LL, levels=np.unique(levels), cmap="viridis", linewidths=0.8)
    ax.clabel(cont, fontsize=7, fmt="%.2f")
    if np.isfinite(n_opt).any():
        ax.plot(cs, n_opt, color="tab:red", linewidth=2, label="compute-optimal N (fit)")
    sc = ax.scatter(C, N, c=L, cmap="viridis", edgecolors="black", zorder=3, label="runs (colour: val loss)")
    fig.colorbar(sc, ax=ax, label="validation loss (nats/token)")
    if math.isfinite(prediction["n_opt"]):
        ax.scatter([prediction["flops"]], [prediction["n_opt"]], marker="*", s=160, color="tab:red", zorder=4,
                   label=f"prediction at {prediction['flops']:.1e} FLOPs")
        if math.isfinite(prediction.get("n_lo", math.nan)):
            ax.vlines(prediction["flops"], prediction["n_lo"], prediction["n_hi"], color="tab:red", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs (6 N D)")
    ax.set_ylabel("non-embedding parameters N")
    ax.set_title(f"L = {best.E:.2f} + {best.A:.3g}/N^{best.alpha:.2f} + {best.B:.3g}/D^{best.beta:.2f}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def format_summary(summary: dict) -> str:
    """What the command prints after the sweep: the runs, the fitted law, the prediction."""
    lines = [f"{'run':>24} {'N (non-emb.)':>13} {'tokens':>11} {'FLOPs':>9} {'val loss':>9} {'time':>7}"]
    for r in summary["runs"]:
        lines.append(f"{r['run'][:24]:>24} {r['non_embedding_params']:>13,} {r['tokens']:>11,} {r['flops']:>9.2e} "
                     f"{r['val_loss']:>9.4f} {r['elapsed_s']:>6.0f}s" + (" (reused)" if r.get("reused") else ""))
    f = summary.get("fit")
    if f:
        lines.append(f"fit  L(N, D) = {f['E']:.3f} + {f['A']:.4g} / N^{f['alpha']:.3f} + {f['B']:.4g} / D^{f['beta']:.3f}"
                     f"   (Huber {f['objective']:.2e}, rms log-residual {f['rms_log_residual']:.4f}, {f['n_runs']} runs)")
        p = summary["prediction"]
        if math.isfinite(p["n_opt"]):
            band = ""
            if math.isfinite(p.get("n_lo", math.nan)):
                band = (f" ({p['level']:.0%} bootstrap interval {p['n_lo']:.3g} - {p['n_hi']:.3g}, "
                        f"{p['bootstrap_usable']} resamples)")
            lines.append(f"at {p['flops']:.3g} FLOPs the fit's compute-optimal model has N = {p['n_opt']:.3g} non-embedding "
                         f"parameters{band}, trained on D = {p['d_opt']:.3g} tokens ({p['d_opt'] / p['n_opt']:.3g} tokens "
                         f"a parameter); predicted loss {p['loss']:.3f}")
        else:
            lines.append("the fit has a flat direction (an exponent of 0): no compute-optimal size to predict")
    if summary.get("fit_note"):
        lines.append(f"note: {summary['fit_note']}")
    return "\n".join(lines)
