"""`fit()`: the one training loop. Pretraining, SFT and DPO differ only in their objective and data.

Per step: learning rate from the schedule (a pure function of the step), `grad_accum` micro-batches under
autocast, gradient clipping, a finiteness guard, the optimizer update. Around it: periodic validation,
JSONL metrics, a loss-curve PNG, checkpoints (model + trainer state, one atomic transaction each), and a
SIGINT/SIGTERM handler that saves at the next step boundary.

Several processes (torchrun, `lmforge.train.distributed`): the caller wraps the model (DDP or FSDP2) and
passes its `Dist`; each rank's `data` yields its own slice of every global micro-batch. Here that changes
four things only: micro-steps before the last skip the gradient all-reduce, the reported loss (and the stop
flag, so every rank stops at the same step) is summed over ranks, the checkpoint gathers the weights (FSDP2's
ranks write their own optimizer slices: `lmforge.train.sharded_state`), and only rank 0 logs, plots and
writes. A pipelined model (`--parallel pp=N`, `lmforge.train.pipeline`) runs a step's micro-batches, the
gradient norm and the validation loss itself, through its schedule and stages.

Exact resume rests on three facts: batches are a pure function of (seed, step), the schedule is a pure
function of the step, and the checkpoint carries optimizer moments and RNG states. So a resumed run
computes bit-for-bit what the uninterrupted run would have (on CPU).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
from tqdm.auto import tqdm

from lmforge.checkpoint import WholeOptimizerState, read_trainer_state, restore_rng
from lmforge.io import atomic_write, atomic_write_text
from lmforge.model.gpt import GPT, unwrap
from lmforge.train import sharded_state
from lmforge.train.checkpointer import Checkpointer
from lmforge.train.distributed import Dist
from lmforge.train.hardware import compile_in_fit
from lmforge.train.memory import apply_activation_checkpointing
from lmforge.train.optim import lr_at, make_optimizer

Objective = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict]]


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf. The message names the step, value and learning rate."""


class DataSource(Protocol):
    tokens_per_batch: int  # tokens in one micro-batch, for throughput figures

    def train_batch(self, step: int, micro: int) -> Any: ...

    def val_batches(self) -> Iterable[Any]: ...


@dataclass
class TrainConfig:
    """The training recipe. Saved with every checkpoint so a resume continues the same schedule."""

    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # None: max_steps (cosine reaches min_lr at the last step)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still computed and checked)
    eval_interval: int = 250
    save_interval: int = 500  # 0: save only at the end (and on interrupt)
    log_interval: int = 10
    seed: int = 1337
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (pretraining records the resolved one: lmforge.train.hardware)
    group_by_length: bool = False  # fine-tuning: batches of similar lengths (lmforge.data.batching)
    compile: str | bool = "auto"  # auto | on | off (True/False from older checkpoints): lmforge.train.hardware
    activation_checkpointing: bool = False  # recompute each block in the backward (lmforge.train.memory)
    # Mixture-of-experts models only: weights of the router's load-balancing and z losses (Mixtral's default)
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0

    def resolved(self) -> "TrainConfig":
        d = asdict(self)
        d["min_lr"] = self.lr / 10 if self.min_lr is None else self.min_lr
        d["lr_decay_steps"] = self.max_steps if self.lr_decay_steps is None else self.lr_decay_steps
        return TrainConfig(**d)


@dataclass
class FitResult:
    step: int
    train_loss: float | None = None
    val_loss: float | None = None
    tokens_seen: int = 0
    tokens_per_s: float = 0.0
    elapsed_s: float = 0.0
    interrupted: bool = False
    history: list[dict] = field(default_factory=list)
    val_metrics: dict[str, float] = field(default_factory=dict)


def autocast_context(device: torch.device, precision: str):
    """Mixed precision where it helps. An "auto" that reaches here unresolved (fine-tuning; pretraining
    resolves it by measuring, `lmforge.train.hardware`) is bf16 on GPUs that have it and fp32 on CPUs, where
    bf16 is only faster on some (AMX, AVX-512-BF16) and several times slower on AVX2-only ones."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return nullcontext(), precision
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype), precision


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves and returns at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def evaluate(model: torch.nn.Module, objective: Objective, batches: Iterable[Any], autocast) -> tuple[float, dict]:
    """Mean objective loss (and mean of each metric) over the validation batches: a fixed set, so numbers
    compare across steps."""
    model.eval()
    total, n, sums = 0.0, 0, {}
    with torch.no_grad(), autocast:
        for batch in batches:
            loss, metrics = objective(model, batch)
            total += float(loss)
            n += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    model.train()
    return total / max(n, 1), {k: v / max(n, 1) for k, v in sums.items()}


def _metric_key(name: str) -> str:
    return name.replace("/", "_")  # "rewards/margin" -> "rewards_margin": plain JSON keys


def print_evaluations(rec: dict) -> None:
    """An `on_log` for runs without a progress bar (no terminal: CI logs, `make demo | tee`): one line per
    evaluation, so a long run still shows where it is. Perplexity is shown when the loss is a language-model
    loss, i.e. when the objective reports no metrics of its own (DPO's loss is not one)."""
    if "val_loss" not in rec:
        return
    extra = {k[4:]: v for k, v in rec.items() if k.startswith("val_") and k not in ("val_loss", "val_ppl")}
    shown = "".join(f", {k} {v:.3f}" for k, v in extra.items()) if extra else f" (ppl {rec['val_ppl']:.2f})"
    print(f"step {rec['step']}: val loss {rec['val_loss']:.4f}{shown}", flush=True)


def plot_losses(history: list[dict], path: Path, title: str = "") -> None:
    """Training loss (raw and smoothed) and validation loss against steps, as a PNG a person can open."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        xs, ys = zip(*train)
        ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=1, label="train")
        # Bias-corrected EMA (as TensorBoard): no drag towards the first value; smoothing scales with points.
        beta = min(0.95, max(0.0, 1 - 10 / len(ys)))
        smooth, ema = [], 0.0
        for i, y in enumerate(ys, 1):
            ema = beta * ema + (1 - beta) * y
            smooth.append(ema / (1 - beta**i) if beta else y)
        ax.plot(xs, smooth, color="tab:blue", linewidth=1.5, label="train (EMA)")
    if val:
        xs, ys = zip(*val)
        ax.plot(xs, ys, "o-", color="tab:orange", markersize=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _grad_norm(params: list[torch.Tensor], clip: float) -> float:
    """Clip the gradients to `clip` (0: no clipping) and return their global norm. Under FSDP2 the gradients
    are shards (DTensors) and so is the norm: `full_tensor()` makes it the whole model's, the same on every rank.
    Under tensor parallelism only the split weights are DTensors; `implicit_replication` counts the
    others (identical on every rank) once. With FSDP2 on top (a 2-D mesh) the gradients span two meshes,
    whose norms `lmforge.train.mesh` adds."""
    from torch.distributed.tensor.experimental import implicit_replication

    from lmforge.train import mesh

    if mesh.several_meshes(params):
        return mesh.clip_grad_norm(params, clip)

    with implicit_replication():
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _read_history(path: Path, upto_step: int) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if rec.get("step", 0) <= upto_step:
            out.append(rec)
    return out


def fit(
    model: torch.nn.Module,
    objective: Objective,
    data: DataSource,
    cfg: TrainConfig,
    checkpointer: Checkpointer,
    *,
    resume: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
    description: str = "train",
    on_log: Callable[[dict], None] | None = None,
    dist: Dist | None = None,
) -> FitResult:
    """Train `model` on `objective` until `cfg.max_steps`, checkpointing into `checkpointer.directory`.

    With `resume=True` the optimizer moments, RNG state, step and metric history are restored from the
    checkpoint directory first; the model weights must already have been loaded from it by the caller.
    With `dist` (several processes) `model` is already wrapped by `lmforge.train.distributed.wrap`.
    """
    cfg = cfg.resolved()
    dist = dist or Dist()
    main = dist.is_main
    device = torch.device(device)
    out = Path(checkpointer.directory)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path, plot_path = out / "metrics.jsonl", out / "loss.png"
    autocast, precision = autocast_context(device, cfg.precision)

    model.to(device).train()
    bare = unwrap(model)
    param_names = [n for n, p in bare.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(bare, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    params = [p for p in bare.parameters() if p.requires_grad]
    if cfg.activation_checkpointing:  # (pretraining applied it already, before wrapping: idempotent)
        apply_activation_checkpointing(bare)
    fwd = torch.compile(model) if compile_in_fit(cfg.compile, device) else model
    pipe = model if getattr(model, "is_pipeline", False) else None  # --parallel pp=N: its schedule runs the step

    step, tokens_seen, best_val = 0, 0, math.inf
    if resume:
        state, tensors = read_trainer_state(out)
        if state["param_names"] != param_names:
            raise ValueError("the checkpoint's optimizer state belongs to different parameters")
        # whole or sharded, written by any number of processes: each rank keeps what it holds of it
        sharded_state.restore_optimizer_state(out, bare, optimizer, state, tensors, dist)
        restore_rng(tensors)
        step, tokens_seen = state["step"], state["tokens_seen"]
        best_val = state.get("best_val_loss") or math.inf
    else:
        torch.manual_seed(cfg.seed)
    history = _read_history(metrics_path, step)
    if main:
        atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))

    last_saved = step if resume else None
    result = FitResult(step=step, tokens_seen=tokens_seen, history=history)

    def write() -> None:
        state = {"step": step, "tokens_seen": tokens_seen, "best_val_loss": None if math.isinf(best_val) else best_val,
                 "train_config": asdict(cfg), "precision": precision, "objective": description}
        if sharded_state.writes_sharded(dist):  # FSDP2: rank 0 writes the model, every rank its optimizer slices
            sharded_state.save_sharded(checkpointer, bare, optimizer, param_names, state, dist)
        elif dist.gathers:  # every rank gathers; rank 0 writes a plain copy of the whole model
            full, optim = dist.full_state_dict(bare), dist.full_optimizer_state(bare, optimizer)
            if main:
                whole = GPT(bare.config)
                whole.load_state_dict(full)
                checkpointer.save(whole, WholeOptimizerState(optim), param_names, state)
        elif main:
            checkpointer.save(bare, optimizer, param_names, state)

    def save() -> None:
        """Write a checkpoint, and agree on the outcome: no rank runs ahead of (or exits before) a checkpoint
        being written, and a save that failed on one rank (rank 0 alone writes and commits) fails on all,
        instead of the others going on as if it had been saved."""
        nonlocal last_saved
        try:
            write()
        except Exception:
            try:
                dist.sum([1.0])
            except Exception:  # noqa: BLE001, S110 - a peer gone (its loss failed the save): report the first error
                pass
            raise
        (failed,) = dist.sum([0.0])
        if failed:
            raise RuntimeError(f"the checkpoint of step {step} failed on {int(failed)} other process(es) (see their "
                               f"error); the last good one is kept in {out}")
        last_saved = step

    def log(rec: dict) -> None:
        history.append(rec)
        if not main:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if on_log:
            on_log(rec)

    def run_eval() -> float:
        nonlocal best_val
        if pipe is not None:
            val, metrics = pipe.evaluate(objective, data.val_batches(), autocast)
        else:
            val, metrics = evaluate(fwd, objective, data.val_batches(), autocast)
        best_val = min(best_val, val)
        log({"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0)),
             **{f"val_{_metric_key(k)}": round(v, 6) for k, v in metrics.items()}})
        result.val_metrics = metrics
        if main:
            plot_losses(history, plot_path, title=f"{description} · {out.name}")
        result.val_loss = val
        return val

    bar = tqdm(total=cfg.max_steps, initial=step, desc=description, unit="step", disable=not (progress and main),
               dynamic_ncols=True, leave=True)
    t_start = t_log = time.perf_counter()
    tokens_at_log, tokens_at_start = tokens_seen, tokens_seen
    with _StopFlag() as stop:
        while step < cfg.max_steps:
            lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, decay_steps=cfg.lr_decay_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, metrics = 0.0, {}
            if pipe is not None:  # the same micro-batches through the stages; every rank gets the same loss sum
                micros = [data.train_batch(step, m) for m in range(cfg.grad_accum)]
                loss_sum, metrics = pipe.train_step(objective, micros, autocast)
            else:
                for micro in range(cfg.grad_accum):
                    batch = data.train_batch(step, micro)
                    with dist.grad_sync(fwd, micro == cfg.grad_accum - 1):
                        with autocast:
                            loss, metrics = objective(fwd, batch)
                        (loss / cfg.grad_accum).backward()
                    loss_sum += float(loss.detach())
            loss_sum, stops = dist.sum([loss_sum, float(stop.signum is not None)])
            loss_val = loss_sum / cfg.grad_accum / dist.world_size
            gnorm = pipe.clip_grad_norm(cfg.grad_clip) if pipe is not None else _grad_norm(params, cfg.grad_clip)
            if not (math.isfinite(loss_val) and math.isfinite(gnorm)):
                what = f"loss {loss_val}" if not math.isfinite(loss_val) else f"gradient norm {gnorm}"
                kept = f"the last good checkpoint (step {last_saved}) is kept in {out}" if last_saved is not None \
                    else "no checkpoint had been saved yet"
                bar.close()
                raise TrainingDiverged(f"training stopped: non-finite {what} at step {step + 1} (lr {lr:.3g}); {kept}. "
                                       f"Try a lower --lr or more --warmup-steps.")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += data.tokens_per_batch * cfg.grad_accum
            result.train_loss = loss_val
            bar.update(1)

            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                now = time.perf_counter()
                tps = (tokens_seen - tokens_at_log) / max(now - t_log, 1e-9)
                t_log, tokens_at_log = now, tokens_seen
                log({"step": step, "loss": loss_val, "lr": lr, "grad_norm": gnorm, "tokens": tokens_seen,
                     "tokens_per_s": round(tps, 1), "elapsed_s": round(now - t_start, 2),
                     **{_metric_key(k): round(float(v), 6) for k, v in metrics.items()}})
                bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                run_eval()
            if stops or (stop.signum is not None and not dist.active):  # one process: the flag as it is now
                if main:
                    bar.write(f"{signal.Signals(stop.signum or signal.SIGTERM).name} received: saving step {step} "
                              f"to {out} and stopping")
                save()
                result.interrupted = True
                break
            if (cfg.save_interval and step % cfg.save_interval == 0) or step == cfg.max_steps:
                save()
    bar.close()
    if last_saved != step:  # e.g. max_steps already reached on resume
        save()
    elapsed = time.perf_counter() - t_start
    result.step, result.tokens_seen, result.elapsed_s = step, tokens_seen, elapsed
    result.tokens_per_s = (tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
    if main and history and plot_path.parent.exists() and not plot_path.exists():
        plot_losses(history, plot_path, title=f"{description} · {out.name}")
    return result
