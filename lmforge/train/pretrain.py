"""Pretraining, end to end: text -> tokenizer -> token shards -> model -> `fit()` -> model directory.

This module wires the pieces together (and resolves a `--resume`); the pieces themselves live in
`tokenizer/`, `data/`, `model/`, `train/loop.py`, `train/checkpointer.py` and `loaders/model_dir.py`.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lmforge import __version__
from lmforge.checkpoint import TRAINER_STATE, read_trainer_state
from lmforge.data.corpus import corpus_fingerprint, load_documents
from lmforge.data.shards import TokenData, get_batch, prepare_data
from lmforge.device import resolve_device
from lmforge.errors import UserError
from lmforge.io import check_writable
from lmforge.loaders.model_dir import is_model_dir, load_config, load_model, read_lmforge_meta
from lmforge.model.gpt import GPT, unwrap
from lmforge.paths import cache_dir
from lmforge.presets import get_preset
from lmforge.tokenizer import Tokenizer, check_vocab_size, train_tokenizer
from lmforge.train import objectives
from lmforge.train.checkpointer import Checkpointer
from lmforge.train.distributed import check_backend, check_fits, launched_by_torchrun, parse_parallel, setup, wrap
from lmforge.train.hardware import resolve_run
from lmforge.train.loop import FitResult, TrainConfig, fit
from lmforge.train.memory import apply_activation_checkpointing
from lmforge.train.plan import estimate, format_plan

DEFAULT_PRESET = "small"
DEFAULT_DATA = "builtin:pydocs"


class WindowBatches:
    """Pretraining batches: random windows of the training tokens, and a fixed validation set.

    Training window starts are a pure function of (seed, step, micro) through `get_batch`. Validation
    uses consecutive non-overlapping windows from the start of the held-out tokens (up to `eval_tokens`),
    built once, so every evaluation scores the same tokens and `val_chars_per_token` converts the loss
    to nats per character exactly.

    With several processes (`rank` of `world_size`), `batch_size` is the global micro-batch: every rank draws
    the same windows and keeps its own contiguous rows, so the ranks' slices are disjoint, cover the batch,
    and depend on (seed, step) alone. `tokens_per_batch` stays the global count.
    """

    def __init__(self, data: TokenData, *, batch_size: int, block_size: int, grad_accum: int, seed: int,
                 eval_tokens: int, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise UserError(f"--batch-size {batch_size} is the global micro-batch and must divide evenly among "
                            f"{world_size} processes")
        self.data, self.B, self.T, self.accum, self.seed, self.device = data, batch_size, block_size, grad_accum, seed, device
        per = batch_size // world_size
        self.rows = slice(rank * per, (rank + 1) * per)
        self.tokens_per_batch = batch_size * block_size
        val = np.asarray(data.val)
        n_windows = max(1, min((len(val) - 1) // block_size, max(1, eval_tokens // block_size)))
        x = torch.from_numpy(val[: n_windows * block_size].astype(np.int64)).view(n_windows, block_size)
        y = torch.from_numpy(val[1: n_windows * block_size + 1].astype(np.int64)).view(n_windows, block_size)
        self._val = [(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)) for i in range(0, n_windows, batch_size)]
        # chars per token over the whole validation split: converts nats/token into nats/char.
        self.val_chars_per_token = data.meta["val_chars"] / max(1, data.meta["val_tokens"])

    def train_batch(self, step: int, micro: int):
        x, y = get_batch(self.data.train, self.B, self.T, seed=self.seed, step=step * self.accum + micro)
        return x[self.rows].to(self.device), y[self.rows].to(self.device)

    def val_batches(self):
        return self._val


@dataclass
class PretrainOptions:
    out: Path
    data: str | None = None  # None: builtin:pydocs, or the data of the run being resumed
    preset: str | None = None  # None: small, or the resumed model's config
    tokenizer: Path | None = None  # a directory with tokenizer.json; None: train one on the data
    vocab_size: int | None = None
    context_length: int | None = None
    dropout: float | None = None
    val_fraction: float = 0.05
    errors: str = "strict"
    eval_tokens: int = 131072
    resume: bool = False
    dry_run: bool = False
    overwrite: bool = False  # replace a model already in `out` instead of refusing
    device: str = "auto"
    progress: bool = True
    parallel: str = "none"  # none, or a --parallel spec (lmforge.parallel): ddp, fsdp, tp=N, pp=N, tp=2,dp=2 ...
    world: int | None = None  # processes the job will have (None: as torchrun set WORLD_SIZE; 1 without it)
    backend: str = "auto"  # process-group backend: auto (gloo on CPU, NCCL on CUDA), gloo or nccl
    recipe: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields the user set explicitly
    on_log: Callable[[dict], None] | None = None  # called with every metrics record
    on_info: Callable[[str], None] | None = None  # gets the run's hardware decisions (precision, compile) before training


def get_tokenizer(data: str, vocab_size: int, *, errors: str, progress: bool) -> Tokenizer:
    """A BPE tokenizer trained on `data`, cached by (corpus fingerprint, vocab size) under LMFORGE_HOME."""
    check_vocab_size(vocab_size)  # before the corpus is read or fingerprinted
    key = hashlib.sha256(f"{corpus_fingerprint(data)}|{vocab_size}|{errors}|tok-v1".encode()).hexdigest()[:16]
    where = cache_dir("tokenizers") / key
    if (where / "tokenizer.json").is_file():
        return Tokenizer.load(where)
    tok = train_tokenizer(load_documents(data, errors=errors), vocab_size, show_progress=progress)
    where.mkdir(parents=True, exist_ok=True)
    tok.save(where)
    return tok


def _recipe(opts: PretrainOptions, saved: dict[str, Any] | None) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    base = {k: v for k, v in (saved or {}).items() if k in known}
    cfg = TrainConfig(**{**base, **{k: v for k, v in opts.recipe.items() if v is not None}})
    if "warmup_steps" not in opts.recipe and saved is None:
        cfg.warmup_steps = min(cfg.warmup_steps, max(1, cfg.max_steps // 10))
    for name in ("max_steps", "batch_size", "grad_accum", "log_interval", "eval_interval"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UserError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"--precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}")
    return cfg


def _torchrun_run_id() -> str | None:
    """The id torchrun gives a job, the same for every worker and kept across its restarts (--max-restarts)."""
    return os.environ.get("TORCHELASTIC_RUN_ID") if launched_by_torchrun() else None


def restarted_from(out: Path) -> int | None:
    """The step to continue from when torchrun restarted this job's workers (`--max-restarts`) after a failure
    and this same job (the same run id) had saved a checkpoint in `out`; None otherwise. The restarted workers
    run the same command line, which has no --resume: without this they would refuse the directory their own
    first attempt wrote. The run id keeps a restart from continuing some other run's checkpoint."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) < 1 or not is_model_dir(out):
        return None
    if not (out / TRAINER_STATE / "state.json").is_file():
        return None
    if read_lmforge_meta(out).get("lineage", {}).get("torchrun_run_id") != _torchrun_run_id():
        return None
    return read_trainer_state(out)[0]["step"]


def pretrain(opts: PretrainOptions) -> tuple[FitResult | None, dict[str, Any]]:
    """Run (or plan, with `dry_run`) a pretraining job. Returns the fit result and a summary dict."""
    out = Path(opts.out)
    if not opts.resume and not opts.dry_run and (step := restarted_from(out)) is not None:
        if os.environ.get("RANK", "0") == "0":
            print(f"torchrun restarted the workers (restart {os.environ['TORCHELASTIC_RESTART_COUNT']}): continuing "
                  f"{out} from its checkpoint at step {step}", file=sys.stderr, flush=True)
        opts = replace(opts, resume=True, preset=None, tokenizer=None, vocab_size=None)
    par = parse_parallel(opts.parallel, opts.world)
    device = resolve_device(opts.device)
    if par is None and opts.backend != "auto":
        raise UserError("--backend chooses how processes talk; it needs --parallel ddp, fsdp, tp=N or pp=N")
    check_backend(opts.backend, device)
    saved_state = None
    if opts.resume:
        if not is_model_dir(out):
            raise UserError(f"{out} is not a checkpoint to resume: it has no config.json")
        saved_state, _ = read_trainer_state(out)
        meta = read_lmforge_meta(out)
        cfg = load_config(out)
        changes = {k: v for k, v in (("context_length", opts.context_length), ("dropout", opts.dropout)) if v is not None}
        if opts.preset or changes:
            asked = get_preset(opts.preset, vocab_size=cfg.vocab_size, **changes) if opts.preset else cfg.replace(**changes)
            diff = cfg.diff(asked)
            if diff:
                raise UserError(f"cannot resume {out} with a different model shape ({'; '.join(diff)})")
        data = opts.data or meta.get("lineage", {}).get("data") or DEFAULT_DATA
        tokenizer = Tokenizer.load(out)
    else:
        data = opts.data or DEFAULT_DATA
        preset = opts.preset or DEFAULT_PRESET
        base = get_preset(preset)  # validates the name before any slow work
        if opts.tokenizer is not None:
            tokenizer = Tokenizer.load(opts.tokenizer)
        else:
            tokenizer = get_tokenizer(data, opts.vocab_size or base.vocab_size, errors=opts.errors, progress=opts.progress)
        overrides = {"vocab_size": tokenizer.vocab_size}
        if opts.context_length is not None:
            overrides["context_length"] = opts.context_length
        if opts.dropout is not None:
            overrides["dropout"] = opts.dropout
        cfg = get_preset(preset, **overrides)

    check_fits(par, cfg, opts.parallel)
    recipe = _recipe(opts, saved_state["train_config"] if saved_state else None)
    token_data = prepare_data(data, tokenizer, cache_dir("data"), val_fraction=opts.val_fraction, seed=0,
                              errors=opts.errors, block_size=cfg.context_length, show_progress=opts.progress)
    plan = estimate(cfg, batch_size=recipe.batch_size, grad_accum=recipe.grad_accum, max_steps=recipe.max_steps,
                    train_tokens=token_data.meta["train_tokens"])
    summary: dict[str, Any] = {"plan": plan, "plan_text": format_plan(cfg, plan), "config": cfg, "data": data,
                               "data_meta": token_data.meta, "recipe": recipe, "device": str(device), "rank": 0}
    if opts.dry_run:
        return None, summary
    dist, device = setup(par, device, opts.backend)
    ok = False
    try:
        trained = _train(opts, out, cfg, tokenizer, token_data, recipe, data, summary, dist, device)
        ok = True
        return trained
    finally:
        dist.close(ok)  # no closing barrier after a failure: see Dist.close


def _train(opts: PretrainOptions, out: Path, cfg, tokenizer: Tokenizer, token_data: TokenData, recipe: TrainConfig,
           data: str, summary: dict[str, Any], dist, device: torch.device) -> tuple[FitResult, dict[str, Any]]:
    """The training part of `pretrain`, inside the process group (when there is one)."""
    summary.update(rank=dist.rank, world_size=dist.world_size, device=str(device))

    if not opts.resume and is_model_dir(out) and not opts.overwrite:
        raise UserError(f"{out} already holds a model; continue it with --resume {out}, "
                        f"or pass --overwrite to start over there")
    check_writable(out)
    if opts.resume:
        model = load_model(out, device=device)
    else:
        torch.manual_seed(recipe.seed)
        model = GPT(cfg).to(device)
    batches = WindowBatches(token_data, batch_size=recipe.batch_size, block_size=cfg.context_length,
                            grad_accum=recipe.grad_accum, seed=recipe.seed, eval_tokens=opts.eval_tokens, device=device,
                            rank=dist.data_rank, world_size=dist.data_world)
    # precision and compile resolved (measured where "auto" asks for it), said, and recorded with the run
    recipe, hw = resolve_run(recipe, cfg, device, dist=dist, resume_dir=out if opts.resume else None, on_info=opts.on_info)
    if recipe.activation_checkpointing:
        apply_activation_checkpointing(model)  # before wrapping, as DDP, FSDP2 and TP expect
    model = wrap(model, dist, recipe.precision)
    lineage = {"objective": "pretrain", "data": data, "data_fingerprint": token_data.meta.get("corpus_fingerprint"),
               "preset": cfg.name, "parent": None, "tokenizer": str(opts.tokenizer) if opts.tokenizer else f"BPE trained on {data}",
               "lmforge_version": __version__}
    if opts.resume:
        lineage = {**read_lmforge_meta(out).get("lineage", {}), "lmforge_version": __version__}
    if _torchrun_run_id():
        lineage["torchrun_run_id"] = _torchrun_run_id()  # lets a torchrun restart find its own checkpoint
    lineage["hardware"] = hw.record()
    summary.update(recipe=recipe, hardware=hw.record())
    checkpointer = Checkpointer(out, tokenizer=tokenizer, lineage=lineage)
    objective = objectives.Pretrain(recipe.router_aux_loss_coef, recipe.router_z_loss_coef)
    result = fit(model, objective, batches, recipe, checkpointer, resume=opts.resume, device=device,
                 progress=opts.progress, description="pretrain", on_log=opts.on_log, dist=dist)
    if result.val_loss is not None:
        summary["val_nats_per_char"] = result.val_loss / batches.val_chars_per_token
    # FSDP2 and TP leave each rank a shard; rank 0 reads the whole model back from what it saved
    bare = load_model(out, device=device) if dist.gathers and dist.is_main else unwrap(model)
    summary.update(model=bare, tokenizer=tokenizer, plot=out / "loss.png")
    return result, summary
