"""`lmforge finetune` (SFT, full or LoRA) and `lmforge align` (DPO / IPO): the objectives plugged into `fit()`.

Both start from any model lmforge can load (a run directory, a store name, a .gguf file or a LoRA run),
render the data through that model's own chat template, and write a run directory like pretraining
does: a model directory (or, for LoRA, a PEFT adapter directory naming its base), trainer state for an
exact `--resume`, metrics.jsonl and loss.png.

Validation. For the built-in data the validation set is the held-out split (questions about Python
modules never seen in training), so the logged validation loss measures generalisation; for user files
5% of the records are held out.

DPO's reference. The reference model is the starting policy. Its log-probs of every example the run will
touch (the batches are a pure function of the seed and step, so these are known in advance) and of the
validation set are computed once, before training, and cached in `reference_logps.safetensors` in the
run directory, so the reference never occupies memory during training and a resumed run reuses them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from lmforge import __version__
from lmforge.checkpoint import TRAINER_STATE
from lmforge.errors import UserError
from lmforge.loaders.model_dir import read_lmforge_meta
from lmforge.train import objectives
from lmforge.train.checkpointer import Checkpointer
from lmforge.train.hardware import compile_mode
from lmforge.train.loop import FitResult, TrainConfig, fit
from lmforge.device import resolve_device
from lmforge.io import check_writable

REFERENCE_FILE = "reference_logps.safetensors"
DEFAULT_LORA_TARGETS = "all-linear"  # every attention and MLP projection (not lm_head), as in PEFT


@dataclass
class FinetuneOptions:
    model: str  # a path (store names are resolved by the caller)
    data: str
    out: Path
    method: str = "sft"  # sft | dpo | ipo
    val_data: str | None = None  # None: the held-out split of builtin data, else 5% of the records
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str = DEFAULT_LORA_TARGETS
    beta: float = 0.1
    epochs: float = 1.0
    recipe: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields given explicitly
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    progress: bool = True
    limit: int | None = None  # use at most this many records (quick runs)
    base_ref: str | None = None  # how the user named the model (recorded in lineage / adapter_config)
    on_log: Callable[[dict], None] | None = None
    on_info: Callable[[str], None] | None = None  # gets the summary lines (data, trainable share) before training


def _default_val(spec: str) -> str | None:
    for name in ("builtin:pydocs-qa", "builtin:pydocs-prefs", "builtin:pydocs-qa-open", "builtin:pydocs-prefs-open"):
        if spec in (name, f"{name}:train"):
            return f"{name}:heldout"
    return None


def _data_fingerprint(examples: list) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([list(getattr(e, k)) if isinstance(getattr(e, k), (list, tuple)) else getattr(e, k)
                             for k in e.__dataclass_fields__], default=int).encode())
    return h.hexdigest()[:16]


def _load_start(opts: FinetuneOptions, device: torch.device):
    """The model to train: the starting model, or on --resume the run's own weights (or base + adapter).

    LoRA trains on a frozen base, so the base stays in its stored precision (QLoRA: a quantized GGUF stays
    in its blocks, a bf16 checkpoint in bf16; the adapters are float32); full fine-tuning needs float32."""
    from lmforge.loaders.auto import load

    dtype = "auto" if opts.lora else None
    if opts.resume:
        if not (opts.out / TRAINER_STATE / "state.json").is_file():
            raise UserError(f"{opts.out} has no trainer state to resume from")
        return load(opts.out, device=device, merge=False, dtype=dtype)  # an adapter run: its adapter unmerged
    return load(opts.model, device=device, merge=True, dtype=dtype)  # a LoRA starting point is merged: train on top


def _recipe(opts: FinetuneOptions, n_examples: int, saved: dict | None) -> TrainConfig:
    """The run's TrainConfig: the checkpoint's on --resume (with what was given now on top), else fine-tuning's
    defaults. Compile "auto" (TrainConfig's default) resolves to off here, and only a caller's explicit "on"
    compiles: SFT and DPO batches are padded to their longest record, so batches come in many sequence
    lengths, each new one a recompile until dynamo falls back to dynamic shapes (generic kernels), and
    fine-tuning runs are short, so the compile (tens of seconds and more) is rarely repaid; nothing measured
    here says otherwise. Unresolved, `fit()` would read "auto" as on for CUDA. An "auto" saved by runs from
    before this default is read the same way on --resume."""
    if saved is not None:
        cfg = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
        cfg = TrainConfig(**{**cfg.__dict__, **opts.recipe})
        return replace(cfg, compile="off") if compile_mode(cfg.compile) == "auto" else cfg
    r = dict(opts.recipe)
    batch, accum = r.get("batch_size", 8), r.get("grad_accum", 1)
    if "max_steps" not in r:
        r["max_steps"] = max(1, math.ceil(opts.epochs * n_examples / (batch * accum)))
    default_lr = 2e-4 if opts.lora else (5e-6 if opts.method != "sft" else 2e-5)
    defaults = dict(batch_size=batch, grad_accum=accum, lr=default_lr, weight_decay=0.0,
                    warmup_steps=min(100, max(1, r["max_steps"] // 10)), eval_interval=max(1, r["max_steps"] // 5),
                    save_interval=0, log_interval=max(1, min(10, r["max_steps"] // 20)))
    cfg = TrainConfig(**{**defaults, **r})
    return replace(cfg, compile="off") if compile_mode(cfg.compile) == "auto" else cfg


def _examples(opts: FinetuneOptions, tokenizer, max_len: int):
    """(train examples, val examples, summary lines) for the method."""
    from lmforge.data.preferences import encode_preferences
    from lmforge.data.records import read_conversations, read_preferences, train_val_split
    from lmforge.data.sft import encode_conversations

    val_spec = opts.val_data or _default_val(opts.data)
    read, encode = ((read_conversations, encode_conversations) if opts.method == "sft"
                    else (read_preferences, encode_preferences))
    data = read(opts.data, limit=opts.limit)
    enc = encode(tokenizer, data, max_len)
    lines = [data.summary(), enc.summary()]
    if val_spec:
        train, val = enc.examples, encode(tokenizer, read(val_spec), max_len).examples
    else:
        train, val = train_val_split(enc.examples)
    if not train:
        raise UserError(f"{opts.data}: no example fits the model's context ({max_len} tokens)")
    return train, val, lines


class _WithReference:
    """A preference DataSource whose batches also carry the cached reference log-probs of their examples."""

    def __init__(self, inner, ref_train: torch.Tensor, ref_val: torch.Tensor) -> None:
        self.inner, self.ref_train, self.ref_val = inner, ref_train, ref_val
        self.tokens_per_batch = inner.tokens_per_batch
        self._val = [self._attach(b, ref_val) for b in inner.val_batches()]

    @staticmethod
    def _attach(batch: dict, table: torch.Tensor) -> dict:
        rows = table[batch["index"].cpu()].to(batch["chosen_input_ids"].device)
        return {**batch, "ref_chosen_logps": rows[:, 0], "ref_rejected_logps": rows[:, 1]}

    def train_batch(self, step: int, micro: int) -> dict:
        return self._attach(self.inner.train_batch(step, micro), self.ref_train)

    def val_batches(self):
        return self._val


@torch.no_grad()
def reference_logps(model: torch.nn.Module, batches, n: int, *, progress: bool, desc: str) -> torch.Tensor:
    """(n, 2) log-probs of chosen and rejected under `model` for the examples the batches contain (NaN for
    examples never seen)."""
    from tqdm.auto import tqdm

    model.eval()
    out = torch.full((n, 2), float("nan"))
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
        pc, pr = objectives.policy_logps(model, batch)
        idx = batch["index"].cpu()
        out[idx, 0], out[idx, 1] = pc.float().cpu(), pr.float().cpu()
    model.train()
    return out


def _reference_tables(opts, model, data, val_data, recipe, fingerprint: str, n_train: int, n_val: int):
    from safetensors.torch import load_file, save_file

    f = opts.out / REFERENCE_FILE
    if f.is_file():
        try:
            t = load_file(f)
            if bytes(t["fingerprint"].tolist()).decode() == fingerprint:
                return t["train"], t["val"]
        except Exception:  # noqa: BLE001 - a stale or damaged cache is recomputed
            pass
    # The batches of every step are known in advance: score exactly the examples the run will use.
    seen, batches = set(), []
    for step in range(recipe.max_steps):
        for micro in range(recipe.grad_accum):
            b = data.train_batch(step, micro)
            key = tuple(b["index"].tolist())
            if key not in seen:
                seen.add(key)
                batches.append(b)
    ref_train = reference_logps(model, batches, n_train, progress=opts.progress, desc="reference log-probs")
    ref_val = reference_logps(model, val_data.val_batches(), n_val, progress=opts.progress, desc="reference (val)")
    opts.out.mkdir(parents=True, exist_ok=True)
    save_file({"train": ref_train, "val": ref_val, "fingerprint": torch.tensor(list(fingerprint.encode()), dtype=torch.uint8)},
              str(f))
    return ref_train, ref_val


def finetune(opts: FinetuneOptions) -> tuple[FitResult, dict[str, Any]]:
    """Run SFT (`method="sft"`) or preference alignment (`"dpo"`, `"ipo"`) and return the fit result and a
    summary (data lines, trainable share, paths)."""
    from lmforge.data.preferences import PreferenceBatches
    from lmforge.data.sft import SFTBatches
    from lmforge.loaders.peft import apply_lora
    from lmforge.model.lora import has_lora

    if opts.method not in ("sft", "dpo", "ipo"):
        raise UserError(f"unknown method {opts.method!r}; use sft, dpo or ipo")
    device = resolve_device(opts.device)
    out = opts.out
    holds_model = (out / "config.json").is_file() or (out / "adapter_config.json").is_file()
    if not opts.resume and holds_model and not opts.overwrite:
        raise UserError(f"{out} already holds a model; continue it with --resume, or pass --overwrite")
    check_writable(out)
    saved = None
    if opts.resume:
        saved = json.loads((out / TRAINER_STATE / "state.json").read_text())["train_config"] \
            if (out / TRAINER_STATE / "state.json").is_file() else None
    loaded = _load_start(opts, device)
    model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer.chat_template is None:
        raise UserError(f"{opts.model} has no chat template to render conversations with")
    ctx = model.config.context_length
    train, val, lines = _examples(opts, tokenizer, ctx)
    recipe = _recipe(opts, len(train), saved)

    lora_info = None
    if opts.lora and not opts.resume:
        torch.manual_seed(recipe.seed)  # the adapters' A init: same seed, same run
        lora_info = apply_lora(model, targets=opts.lora_targets, rank=opts.lora_rank, alpha=opts.lora_alpha,
                               dropout=opts.lora_dropout)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    lines.append(f"training {trainable:,} of {total:,} parameters ({trainable / total:.2%})"
                 + (f" with LoRA rank {opts.lora_rank} on {opts.lora_targets}" if has_lora(model) else ""))

    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    if opts.method == "sft":
        data = SFTBatches(train, batch_size=recipe.batch_size, grad_accum=recipe.grad_accum, seed=recipe.seed,
                          val_examples=val, pad_id=pad, device=device, group_by_length=recipe.group_by_length)
        objective = objectives.sft
    else:
        inner = PreferenceBatches(train, batch_size=recipe.batch_size, grad_accum=recipe.grad_accum, seed=recipe.seed,
                                  val_examples=val, pad_id=pad, device=device, group_by_length=recipe.group_by_length)
        fp = hashlib.sha256(f"{_data_fingerprint(train)}|{_data_fingerprint(val)}|{recipe.seed}|{recipe.batch_size}|"
                            f"{recipe.grad_accum}|{recipe.max_steps}|{opts.model}".encode()).hexdigest()
        ref_train, ref_val = _reference_tables(opts, model, inner, inner, recipe, fp, len(train), len(val))
        data = _WithReference(inner, ref_train, ref_val)
        objective = objectives.DPO(opts.beta, "ipo" if opts.method == "ipo" else "sigmoid")

    parent = opts.base_ref or str(opts.model)
    lineage = {"objective": opts.method, "data": opts.data, "parent": parent, "lmforge_version": __version__,
               "lora": {"rank": opts.lora_rank, "alpha": opts.lora_alpha, "targets": opts.lora_targets} if has_lora(model) else None,
               **({"beta": opts.beta} if opts.method != "sft" else {})}
    if opts.resume:
        lineage = {**read_lmforge_meta(out).get("lineage", {}), "lmforge_version": __version__}
    base_model = None
    if has_lora(model):
        from lmforge.loaders.peft import adapter_base, is_adapter_dir

        base_model = adapter_base(out) if opts.resume and is_adapter_dir(out) else str(Path(opts.model).resolve()) \
            if Path(opts.model).exists() else str(opts.model)
    checkpointer = Checkpointer(out, tokenizer=tokenizer, lineage=lineage, base_model=base_model)
    for line in lines if opts.on_info else ():
        opts.on_info(line)
    result = fit(model, objective, data, recipe, checkpointer, resume=opts.resume, device=device,
                 progress=opts.progress, description=opts.method, on_log=opts.on_log)
    summary = {"lines": lines, "model": model, "tokenizer": tokenizer, "plot": out / "loss.png",
               "trainable": trainable, "total": total, "lora": lora_info, "recipe": recipe,
               "n_train": len(train), "n_val": len(val)}
    return result, summary
