"""LoRA (Hu et al. 2021) as a module swap: frozen base weights plus a trainable low-rank update.

    y = W x + b + (alpha / r) * B (A dropout(x))        A: (r, in), kaiming-uniform;  B: (out, r), zeros

so a freshly wrapped model computes exactly what the base model computes, and training moves only A and
B (r * (in + out) numbers per matrix instead of in * out). `apply_lora` swaps chosen `nn.Linear`s of a
`GPT` for `LoRALinear`s and freezes every base parameter; `merge_lora` folds W += (alpha / r) B A back in
and restores plain `nn.Linear`s, so a merged model is an ordinary GPT that exports, quantizes and runs on
the fast path like any other. `model/gpt.py` knows nothing of this file.

Targets are named in Hugging Face / PEFT vocabulary, because that is what recipes and users say:

    Llama-like (SwiGLU MLP)   q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
    GPT-2-like (GELU MLP)     c_attn (= q, k, v)  c_proj (= attn.c_proj and mlp.c_proj, as PEFT's suffix
                              match does)  attn.c_proj  mlp.c_proj  c_fc; and the Llama names above that exist
                              (q_proj .. o_proj, up_proj = c_fc, down_proj = mlp.c_proj)
    either                    all-linear (every projection of every block, not lm_head, as in PEFT)

Fused projections. Our model computes q|k|v with one matrix (`attn.qkv`) and gate|up with one (`mlp.fc`).
A `LoRALinear` on a fused matrix may adapt only some row slices of it ("parts": e.g. q and v of qkv): it has
ONE A (r, in) shared by its parts and a B holding only the adapted rows, whose update is added into those
output rows. Sharing A is exactly "q, k and v adapters that happen to have the same A, with B's rows split",
which is how such an adapter is saved (see below); it costs r * in fewer parameters per extra part than
PEFT's separate adapters of the same rank, and runs as two matmuls instead of two per part.

Adapters on disk use PEFT's layout, so `peft.PeftModel.from_pretrained` (and vLLM, llama.cpp's
convert_lora_to_gguf, ...) accept them: `adapter_config.json` and `adapter_model.safetensors` with names such as
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (Llama-like) or
`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight` (GPT-2-like, where c_attn is one fused module in
transformers too: parts left out are saved as zero rows of B). A shared-A adapter is saved as per-projection
tensors with A repeated. Loading goes the other way and also accepts adapters made by peft, whose q, k and v
have different A's: they are combined exactly by stacking the A's and making B block-diagonal,

    A = [A_q; A_k; A_v]  (r_q + r_k + r_v, in)     B = diag(B_q, B_k, B_v)  (rows_q + rows_k + rows_v, r_q + r_k + r_v)

so the module's rank grows to the sum (B A = the three updates, nothing else). While B's off-diagonal blocks are
still zero (no further training), saving writes the original per-projection tensors back; after training
they generally are not, and each projection is saved with the full stacked A (ranks recorded in PEFT's
`rank_pattern` / `alpha_pattern`). Differing scales (alpha_pattern, rslora) are folded into B.

The base model's fingerprint goes into adapter_config.json under "lmforge" (its config, and a few sampled
weight values compared with a tolerance that allows a bf16/fp16 copy of the same weights), and loading refuses
an adapter made for a different base model. PEFT ignores the unknown key (with a warning).

Inference: `engine/fastpath.accelerate` swaps plain `nn.Linear`s, so on a LoRA model it would accelerate the
wrapped base matrices only (still correct, but the adapter matmuls stay slow, and `merge_lora` then merges into
the FastLinear). Merge first for serving.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import UserError
from lmforge.io import atomic_write, atomic_write_json

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoRAInfo",
    "LoRALinear",
    "apply_lora",
    "available_targets",
    "base_fingerprint",
    "has_lora",
    "load_adapter",
    "lora_modules",
    "lora_parameters",
    "merge_lora",
    "save_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"
FINGERPRINT_VERSION = 1
# Settings of a ModelConfig that don't change what a model computes at inference (or its weights' shapes).
_TRAINING_ONLY_FIELDS = ("name", "dropout", "init_std")
# Largest relative difference of a sampled base weight still taken for "the same weights": a bf16 copy rounds
# each value by at most 2^-9 (0.2%), fp16 by 2^-12; twice bf16's bound also covers a rounding of a rounding.
_SAMPLE_RTOL = 4e-3
_SAMPLE_SIZE = 64


# ---------------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """A frozen linear layer plus a low-rank update of some (or all) of its output rows.

    `parts` lists the adapted row slices of the base output as (name, start, stop), e.g.
    [("q", 0, 64), ("v", 96, 128)] for q and v of a fused qkv; None adapts every row as one part "all".
    B's rows are the parts' rows, concatenated in the order given.

    `rank` and `alpha` are the adapter's nominal settings (what adapter_config.json says); the update uses
    `scaling` (alpha / rank unless given) and A's actual row count, which exceeds `rank` where `load_adapter`
    stacked several projections' A's (`rank_blocks` then says which A rows belong to which part).

    A is kaiming-uniform (as nn.Linear's weight, and PEFT's default) and B is zero, so the update starts at
    exactly zero. The adapter parameters are float32 whatever the base dtype (an optimizer needs the
    precision; the update is cast to the output dtype), as PEFT does.
    """

    def __init__(self, base: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
                 parts: list[tuple[str, int, int]] | None = None, scaling: float | None = None) -> None:
        super().__init__()
        out_features, in_features = base.weight.shape
        if not isinstance(rank, int) or rank <= 0:
            raise UserError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.parts = list(parts) if parts is not None else [("all", 0, out_features)]
        self.rank, self.alpha, self.dropout_p = rank, float(alpha), float(dropout)
        self.scaling = float(alpha) / rank if scaling is None else float(scaling)
        # A's row ranges per part when A is a stack of per-part A's (set by `load_adapter`); None: shared A.
        self.rank_blocks: list[tuple[int, int]] | None = None

        rows = [r for _, start, stop in self.parts for r in range(start, stop)]
        if not rows or len(set(rows)) != len(rows) or min(rows) < 0 or max(rows) >= out_features:
            raise ValueError(f"LoRA parts {self.parts} are not distinct row slices of {out_features} rows")
        w = base.weight
        # Row indices the update is added into; None when it covers every row in order (a plain add).
        index = None if rows == list(range(out_features)) else torch.tensor(rows, dtype=torch.long, device=w.device)
        self.register_buffer("row_index", index, persistent=False)

        dtype = torch.promote_types(w.dtype, torch.float32) if w.is_floating_point() else torch.float32
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(len(rows), rank, dtype=dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, so code that reads `.weight` of a projection (shapes, dtype) keeps working."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        delta = (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)  # (..., adapted rows)
        if self.row_index is None:
            return y + delta
        return y.index_add(-1, self.row_index, delta)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) * B @ A in float32: the update of the adapted rows, (adapted rows, in)."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def part_rows(self) -> Iterator[tuple[str, int, int, int]]:
        """(part name, first base row, row count, offset of its rows in B) for every part."""
        offset = 0
        for name, start, stop in self.parts:
            yield name, start, stop - start, offset
            offset += stop - start

    def extra_repr(self) -> str:
        parts = ",".join(p[0] for p in self.parts)
        return (f"in={self.in_features}, out={self.out_features}, parts={parts}, rank={self.lora_A.shape[0]}, "
                f"scaling={self.scaling:g}, dropout={self.dropout_p:g}")


# ---------------------------------------------------------------------------------------------------
# Which modules a target name means
# ---------------------------------------------------------------------------------------------------
# Our per-block projections, by path under blocks.N. ("mlp.fc" is gate|up for SwiGLU, up for GELU.)
_MODULES = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")

# HF / PEFT target name -> (our module, part) pairs, per family. The family is decided by the MLP alone
# (SwiGLU: Llama's module names; GELU: GPT-2's), which is also what our exporter's architecture decision
# comes down to for these names.
_LLAMA_TARGETS: dict[str, list[tuple[str, str]]] = {
    "q_proj": [("attn.qkv", "q")], "k_proj": [("attn.qkv", "k")], "v_proj": [("attn.qkv", "v")],
    "o_proj": [("attn.proj", "o")],
    "gate_proj": [("mlp.fc", "gate")], "up_proj": [("mlp.fc", "up")], "down_proj": [("mlp.proj", "down")],
}
_GPT2_TARGETS: dict[str, list[tuple[str, str]]] = {
    "c_attn": [("attn.qkv", "q"), ("attn.qkv", "k"), ("attn.qkv", "v")],
    "c_proj": [("attn.proj", "o"), ("mlp.proj", "down")],
    "attn.c_proj": [("attn.proj", "o")],
    "mlp.c_proj": [("mlp.proj", "down")],
    "c_fc": [("mlp.fc", "up")],
    **{k: v for k, v in _LLAMA_TARGETS.items() if k != "gate_proj"},
}
# Names of the saved tensors' modules: (our module, part) -> module path under the HF layer prefix.
_LLAMA_NAMES = {("attn.qkv", "q"): "self_attn.q_proj", ("attn.qkv", "k"): "self_attn.k_proj",
                ("attn.qkv", "v"): "self_attn.v_proj", ("attn.proj", "o"): "self_attn.o_proj",
                ("mlp.fc", "gate"): "mlp.gate_proj", ("mlp.fc", "up"): "mlp.up_proj",
                ("mlp.proj", "down"): "mlp.down_proj"}
_GPT2_NAMES = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
_LLAMA_LAYER, _GPT2_LAYER = "model.layers.{}.", "transformer.h.{}."
_PEFT_PREFIX = "base_model.model."


def _is_llama_family(cfg) -> bool:
    return cfg.mlp == "swiglu"


def _parts(cfg, module: str) -> list[tuple[str, int, int]]:
    """The named row slices of one of our projections: (part, start, stop)."""
    if module == "attn.qkv":
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        return [("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv)]
    if module == "attn.proj":
        return [("o", 0, cfg.d_model)]
    if module == "mlp.fc":
        if cfg.mlp == "swiglu":
            return [("gate", 0, cfg.d_ff), ("up", cfg.d_ff, 2 * cfg.d_ff)]
        return [("up", 0, cfg.d_ff)]
    return [("down", 0, cfg.d_model)]


def available_targets(model_or_config) -> list[str]:
    """The target names this model accepts (HF / PEFT vocabulary of its family), `all-linear` last."""
    cfg = getattr(_bare(model_or_config), "config", model_or_config)
    table = _LLAMA_TARGETS if _is_llama_family(cfg) else _GPT2_TARGETS
    return [*table, ALL_LINEAR]


def _resolve(cfg, targets: str | Iterable[str]) -> dict[str, list[str]]:
    """Target names -> {our module: adapted parts in row order}."""
    if isinstance(targets, str):
        targets = targets.split(",")
    names = list(dict.fromkeys(t.strip() for t in targets if t and t.strip()))
    if not names:
        raise UserError(f"no LoRA targets given; available: {', '.join(available_targets(cfg))}")
    table = _LLAMA_TARGETS if _is_llama_family(cfg) else _GPT2_TARGETS
    family = "Llama-style (SwiGLU)" if _is_llama_family(cfg) else "GPT-2-style (GELU)"
    chosen: set[tuple[str, str]] = set()
    for name in names:
        if name == ALL_LINEAR:
            chosen |= {(m, p) for m in _MODULES for p, _, _ in _parts(cfg, m)}
        elif name in table:
            chosen |= set(table[name])
        else:
            raise UserError(f"LoRA target {name!r} matches no module of this {family} model; available: "
                            f"{', '.join(available_targets(cfg))}")
    return {m: [p for p, _, _ in _parts(cfg, m) if (m, p) in chosen] for m in _MODULES
            if any((m, p) in chosen for p, _, _ in _parts(cfg, m))}


# ---------------------------------------------------------------------------------------------------
# Apply, inspect, merge
# ---------------------------------------------------------------------------------------------------
@dataclass
class LoRAInfo:
    """What `apply_lora` / `load_adapter` adapted, and how many parameters now train."""

    targets: list[str]  # HF / PEFT names, as saved in adapter_config.json's target_modules
    modules: dict[str, list[str]] = field(default_factory=dict)  # our module name -> adapted parts
    rank: int = 0
    alpha: float = 0.0
    dropout: float = 0.0
    trainable_params: int = 0
    total_params: int = 0

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def summary(self) -> str:
        return (f"LoRA r={self.rank} alpha={self.alpha:g} dropout={self.dropout:g} on {', '.join(self.targets)} "
                f"({len(self.modules)} modules): {self.trainable_params:,} trainable of {self.total_params:,} "
                f"parameters ({100 * self.trainable_fraction:.2f}%)")


def _bare(model):
    """The model under torch.compile / DDP wrappers (LoRA is applied to, and read from, the bare GPT)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(model, "module"):
            model = model.module
        else:
            return model


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, module) for every LoRALinear in the model, in module order."""
    for name, m in _bare(model).named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def has_lora(model: nn.Module) -> bool:
    return next(lora_modules(model), None) is not None


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (what an optimizer should get)."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


def _info(model: nn.Module, targets: list[str]) -> LoRAInfo:
    mods = list(lora_modules(model))
    params = {id(p): p for p in _bare(model).parameters()}.values()  # tied weights once
    first = mods[0][1] if mods else None
    return LoRAInfo(
        targets=targets,
        modules={name: [p[0] for p in m.parts] for name, m in mods},
        rank=first.rank if first else 0,
        alpha=first.alpha if first else 0.0,
        dropout=first.dropout_p if first else 0.0,
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
    )


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _install(m: nn.Module, cfg, new: dict[str, "LoRALinear"]) -> "LoRAInfo":
    """Freeze every base parameter, swap the LoRA modules in (only their A and B train), report."""
    for p in m.parameters():
        p.requires_grad_(False)
    for name, lora in new.items():
        lora.lora_A.requires_grad_(True)
        lora.lora_B.requires_grad_(True)
        _swap(m, name, lora)
    return _info(m, _target_names(cfg, m))


def apply_lora(model: nn.Module, *, targets: str | Iterable[str], rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0) -> LoRAInfo:
    """Wrap the targeted projections of every block in `LoRALinear`s (in place) and freeze the base.

    `targets`: HF / PEFT names (see the module docstring) as a list or a comma-separated string. Every base
    parameter (embeddings and norms included) gets requires_grad False; only the adapters' A and B train.
    Returns what was adapted and the trainable / total parameter counts.
    """
    m = _bare(model)
    cfg = m.config
    if has_lora(m):
        raise UserError("this model already has LoRA adapters; merge them (lmforge merge) before adding new ones")
    if not alpha > 0:
        raise UserError(f"LoRA alpha must be positive, got {alpha}")
    plan = _resolve(cfg, targets)
    new = {}
    for i in range(cfg.n_layers):
        for module, part_names in plan.items():
            name = f"blocks.{i}.{module}"
            base = m.get_submodule(name)
            if type(base) is not nn.Linear:
                raise UserError(f"{name} is a {type(base).__name__}, not a plain nn.Linear: LoRA wraps unquantized "
                                "projections (apply it before quantizing or accelerating the model)")
            parts = [p for p in _parts(cfg, module) if p[0] in part_names]
            new[name] = LoRALinear(base, rank=rank, alpha=alpha, dropout=dropout, parts=parts)
    return _install(m, cfg, new)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, W[rows] += (alpha / r) B A, and put the base modules back.

    In place; returns the model, now a plain GPT whose parameters all have requires_grad True again (as a
    freshly built or loaded model's). The sum is formed in float32 and rounded once into the weight's dtype.
    """
    m = _bare(model)
    for name, lora in list(lora_modules(m)):
        base = lora.base
        with torch.no_grad():
            delta = lora.delta_weight().to(base.weight.device)
            w = base.weight
            if lora.row_index is None:
                w.copy_((w.float() + delta).to(w.dtype))
            else:
                idx = lora.row_index.to(w.device)
                w[idx] = (w[idx].float() + delta).to(w.dtype)
        _swap(m, name, base)
    for p in m.parameters():
        p.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------------------------
# Base-model fingerprint
# ---------------------------------------------------------------------------------------------------
def _base_weight(m: nn.Module, name: str) -> torch.Tensor | None:
    try:
        mod = m.get_submodule(name)
    except AttributeError:
        return None
    w = getattr(mod, "weight", None)  # a LoRALinear's is its base weight
    return w if isinstance(w, torch.Tensor) and w.is_floating_point() else None


def _sample(t: torch.Tensor, n: int = _SAMPLE_SIZE) -> list[float]:
    flat = t.detach().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, min(n, flat.numel()), dtype=torch.float64).round().long()
    return flat[idx.to(flat.device)].float().cpu().tolist()


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the base model: its config (minus training-only settings) and evenly spaced samples
    of a few weight matrices (the embedding, the first and the last block's projections).

    Samples rather than a hash of the bytes, so that the same weights loaded in bf16 or fp16 still match
    (compared with a relative tolerance); a different model differs in practically every sampled value.
    """
    m = _bare(model)
    cfg = m.config
    names = ["tok_emb", "blocks.0.attn.qkv", f"blocks.{cfg.n_layers - 1}.mlp.proj"]
    samples = {n: _sample(w) for n in names if (w := _base_weight(m, n)) is not None}
    conf = {k: v for k, v in cfg.to_dict().items() if k not in _TRAINING_ONLY_FIELDS}
    return {"fingerprint_version": FINGERPRINT_VERSION, "base_config": conf, "weight_samples": samples}


def _check_fingerprint(model: nn.Module, stored: Any, source: str) -> None:
    if not isinstance(stored, dict) or "base_config" not in stored:
        return  # not made here (or by a future format): the tensor shapes are still checked on load
    mine = base_fingerprint(model)
    theirs_conf, my_conf = stored.get("base_config") or {}, mine["base_config"]
    # Fields only one side knows (another lmforge version's ModelConfig) are not compared.
    diffs = [f"{k}: {theirs_conf[k]!r} in the adapter's base, {v!r} here" for k, v in my_conf.items()
             if k in theirs_conf and k not in _TRAINING_ONLY_FIELDS and theirs_conf[k] != v]
    if diffs:
        raise UserError(f"{source}: this adapter was made for a different base model "
                        f"(config differs: {'; '.join(diffs)})")
    for name, values in (stored.get("weight_samples") or {}).items():
        here = mine["weight_samples"].get(name)
        if here is None or len(here) != len(values):
            continue
        a, b = torch.tensor(here, dtype=torch.float64), torch.tensor(values, dtype=torch.float64)
        if not torch.all((a - b).abs() <= _SAMPLE_RTOL * b.abs() + 1e-8):
            raise UserError(f"{source}: this adapter was trained on another model: the shape matches but the base "
                            f"weights differ ({name}); load it onto the model it was trained on")


# ---------------------------------------------------------------------------------------------------
# Saving in PEFT's layout
# ---------------------------------------------------------------------------------------------------
def _target_names(cfg, model: nn.Module) -> list[str]:
    """target_modules for adapter_config.json: the HF module names adapted, most specific where needed."""
    adapted = {(name.split(".", 2)[2], p[0]) for name, m in lora_modules(model) for p in m.parts}
    if _is_llama_family(cfg):
        return [t for t, pairs in _LLAMA_TARGETS.items() if pairs[0] in adapted]
    mods = {mod for mod, _ in adapted}
    out = [n for n, mod in (("c_attn", "attn.qkv"), ("c_fc", "mlp.fc")) if mod in mods]
    if {"attn.proj", "mlp.proj"} <= mods:
        out.append("c_proj")
    else:
        out += [n for n, mod in (("attn.c_proj", "attn.proj"), ("mlp.c_proj", "mlp.proj")) if mod in mods]
    return out


def _compact(lora: LoRALinear, i: int, offset: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of part i: its own A rows if A is a stack whose other blocks this part's B does not use yet."""
    A, B = lora.lora_A.detach(), lora.lora_B.detach()[offset:offset + n]
    if lora.rank_blocks is not None:
        lo, hi = lora.rank_blocks[i]
        outside = torch.cat([B[:, :lo], B[:, hi:]], dim=1)
        if not outside.any():
            return A[lo:hi], B[:, lo:hi]
    return A, B


def _adapter_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """PEFT tensor names -> tensors, and each saved module's key -> its scaling."""
    m = _bare(model)
    cfg = m.config
    tensors, scalings = {}, {}
    for name, lora in lora_modules(m):
        _, layer, module = name.split(".", 2)
        if _is_llama_family(cfg):
            for i, (part, _, n, offset) in enumerate(lora.part_rows()):
                key = _LLAMA_LAYER.format(layer) + _LLAMA_NAMES[(module, part)]
                A, B = _compact(lora, i, offset, n)
                tensors[f"{_PEFT_PREFIX}{key}.lora_A.weight"], tensors[f"{_PEFT_PREFIX}{key}.lora_B.weight"] = A, B
                scalings[key] = lora.scaling
        else:
            # transformers' GPT-2 has c_attn as one module: one A, B over every row (zero where not adapted).
            key = _GPT2_LAYER.format(layer) + _GPT2_NAMES[module]
            B = lora.lora_B.detach()
            if lora.row_index is not None:
                B = torch.zeros(lora.out_features, B.shape[1], dtype=B.dtype, device=B.device).index_copy(
                    0, lora.row_index, B)
            tensors[f"{_PEFT_PREFIX}{key}.lora_A.weight"] = lora.lora_A.detach()
            tensors[f"{_PEFT_PREFIX}{key}.lora_B.weight"] = B
            scalings[key] = lora.scaling
    return tensors, scalings


def save_adapter(model: nn.Module, directory: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapters as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

    Each file is written atomically. Ranks or scales that differ from the first adapter's (only after loading a
    PEFT adapter with per-projection A's, see the module docstring) go into `rank_pattern` / `alpha_pattern`
    under the full module name, which PEFT matches as a suffix.
    """
    from safetensors.torch import save_file

    m = _bare(model)
    cfg = m.config
    mods = list(lora_modules(m))
    if not mods:
        raise UserError("this model has no LoRA adapters to save")
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {directory}: {e.strerror or e}") from None
    tensors, scalings = _adapter_tensors(m)
    first = mods[0][1]
    r, alpha = first.rank, first.alpha
    rank_pattern, alpha_pattern = {}, {}
    for key, s in scalings.items():
        r_key = tensors[f"{_PEFT_PREFIX}{key}.lora_A.weight"].shape[0]
        if r_key != r:
            rank_pattern[key] = r_key
        a_key = s * r_key
        if not math.isclose(a_key, alpha, rel_tol=1e-9):
            alpha_pattern[key] = a_key
    layers = sorted({int(name.split(".")[1]) for name, _ in mods})
    llama = _is_llama_family(cfg)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path if base_model_name_or_path is not None else cfg.name,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": first.dropout_p,
        "target_modules": _target_names(cfg, m),
        "bias": "none",
        # transformers' GPT-2 keeps its weights as Conv1D (in, out); PEFT sets this for it anyway.
        "fan_in_fan_out": not llama,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None if layers == list(range(cfg.n_layers)) else layers,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": False,
        "use_dora": False,
        "revision": None,
        "lmforge": base_fingerprint(m),
    }
    # A shared by several projections is written once per projection: each its own copy (safetensors
    # refuses tensors that share memory).
    cpu = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}))
    atomic_write_json(directory / ADAPTER_CONFIG, config)
    return directory


# ---------------------------------------------------------------------------------------------------
# Loading (ours or PEFT's)
# ---------------------------------------------------------------------------------------------------
# PEFT tensor names: group 1 the module (PEFT's key for rank/alpha patterns), 2 the layer, 3 the projection,
# 4 A or B (an adapter name before ".weight", as in files saved with one, is allowed).
_LLAMA_KEY = re.compile(r"^(?:base_model\.model\.)?"
                        r"(model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj))"
                        r"\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_GPT2_KEY = re.compile(r"^(?:base_model\.model\.)?"
                       r"((?:transformer\.)?h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj))"
                       r"\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_REFUSED_SETTINGS = {
    "use_dora": "DoRA adapters (use_dora) are not supported",
    "modules_to_save": "adapters that also save whole modules (modules_to_save) are not supported",
    "trainable_token_indices": "adapters with trainable tokens are not supported",
}


def _pattern(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern that matches the end of `key`."""
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def _read_config(directory: Path) -> dict:
    f = directory / ADAPTER_CONFIG
    if not directory.is_dir():
        raise UserError(f"{directory}: no such adapter directory")
    if not f.is_file():
        raise UserError(f"{directory} is not a LoRA adapter directory: it has no {ADAPTER_CONFIG}")
    try:
        conf = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(conf, dict):
        raise UserError(f"{f}: not a JSON object")
    if conf.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{f}: a {conf.get('peft_type')} adapter; only LoRA adapters are supported")
    for key, msg in _REFUSED_SETTINGS.items():
        if conf.get(key):
            raise UserError(f"{f}: {msg}")
    if conf.get("bias", "none") != "none":
        raise UserError(f"{f}: adapters that train biases (bias={conf.get('bias')!r}) are not supported")
    return conf


def load_adapter(model: nn.Module, directory: str | Path, *, check_base: bool = True,
                 dropout: float | None = None) -> LoRAInfo:
    """Put the adapter saved in `directory` (by us or by peft) onto `model`, in place; freezes the base.

    Every tensor in the file becomes part of an adapter (so `layers_to_transform` and any subset of targets
    load as saved); shapes must match the model's projections exactly. An adapter saved here records its base
    model, and one made for a different base is refused (`check_base=False` skips that check, not the shape
    checks). `dropout` None keeps the adapter's lora_dropout (it matters only when training on).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    m = _bare(model)
    cfg = m.config
    directory = Path(directory)
    conf = _read_config(directory)
    src = str(directory)
    if has_lora(m):
        raise UserError("this model already has LoRA adapters; merge them (lmforge merge) before loading another")
    if check_base:
        _check_fingerprint(m, conf.get("lmforge"), src)
    wfile = directory / ADAPTER_WEIGHTS
    if not wfile.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise UserError(f"{directory} holds only a pickled adapter (adapter_model.bin); lmforge reads "
                            f"{ADAPTER_WEIGHTS} only (loading a pickle can run code)")
        raise UserError(f"{directory} has no {ADAPTER_WEIGHTS}")
    try:
        tensors = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{wfile}: not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None

    llama = _is_llama_family(cfg)
    pattern = _LLAMA_KEY if llama else _GPT2_KEY
    hf_to_ours = ({v: k for k, v in _LLAMA_NAMES.items()} if llama else {v: k for k, v in _GPT2_NAMES.items()})
    r_default, alpha_default = conf.get("r", 8), conf.get("lora_alpha", 8)
    rslora = bool(conf.get("use_rslora"))
    # (layer, our module) -> list of entries: (parts [(name, start, stop)], A, B, scaling)
    found: dict[tuple[int, str], dict[str, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        match = pattern.match(key)
        if not match:
            family = "Llama-style" if llama else "GPT-2-style"
            raise UserError(f"{wfile}: tensor {key!r} is not a LoRA weight of a {family} model's projections "
                            f"(this model accepts {', '.join(available_targets(cfg)[:-1])})")
        module_key, layer, hf_mod, ab = match.group(1), int(match.group(2)), match.group(3), match.group(4)
        if layer >= cfg.n_layers:
            raise UserError(f"{wfile}: tensor {key!r} is for layer {layer}, but this model has {cfg.n_layers} layers")
        found.setdefault((layer, hf_mod), {"key": module_key})[ab] = t

    per_module: dict[str, list[tuple[list[tuple[str, int, int]], torch.Tensor, torch.Tensor, float]]] = {}
    for (layer, hf_mod), entry in sorted(found.items()):
        if "A" not in entry or "B" not in entry:
            raise UserError(f"{wfile}: {entry['key']} has lora_{'A' if 'A' not in entry else 'B'} missing")
        A, B, key = entry["A"], entry["B"], entry["key"]
        if llama:  # one projection: one part of a fused module
            module, part = hf_to_ours[hf_mod]
            parts = [p for p in _parts(cfg, module) if p[0] == part]
        else:  # transformers' GPT-2 modules are whole: every part of ours
            module = hf_to_ours[hf_mod]
            parts = _parts(cfg, module)
            key = "transformer." + key.removeprefix("transformer.")
        rows = sum(stop - start for _, start, stop in parts)
        in_features = m.get_submodule(f"blocks.{layer}.{module}").weight.shape[1]
        r = _pattern(conf.get("rank_pattern"), key, r_default)
        alpha = _pattern(conf.get("alpha_pattern"), key, alpha_default)
        if A.dim() != 2 or B.dim() != 2 or A.shape != (r, in_features) or B.shape != (rows, r):
            raise UserError(f"{wfile}: {key} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; this model "
                            f"needs ({r}, {in_features}) and ({rows}, {r}) (r={r}): the adapter is for another model")
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        per_module.setdefault(f"blocks.{layer}.{module}", []).append((parts, A.float(), B.float(), scaling))

    drop = float(conf.get("lora_dropout", 0.0) if dropout is None else dropout)
    new = {}
    for name, entries in per_module.items():
        entries.sort(key=lambda e: e[0][0][1])  # by first row
        base = m.get_submodule(name)
        if type(base) is not nn.Linear:
            raise UserError(f"{name} is a {type(base).__name__}, not a plain nn.Linear: LoRA wraps unquantized "
                            "projections (load the adapter before quantizing or accelerating the model)")
        parts = [p for e in entries for p in e[0]]
        s0 = entries[0][3]
        shared = all(torch.equal(e[1], entries[0][1]) and e[3] == s0 for e in entries)
        if shared:  # one A (ours, saved per projection): B's rows side by side
            A, B, blocks = entries[0][1], torch.cat([e[2] for e in entries]), None
        else:  # separate A's (PEFT's q, k, v): A stacked, B block-diagonal, scales folded into B
            A = torch.cat([e[1] for e in entries])
            B = torch.block_diag(*[e[2] * (e[3] / s0) for e in entries])
            blocks, lo = [], 0
            for e in entries:
                blocks += [(lo, lo + e[1].shape[0])] * len(e[0])
                lo += e[1].shape[0]
        lora = LoRALinear(base, rank=A.shape[0], alpha=s0 * A.shape[0], dropout=drop, parts=parts, scaling=s0)
        lora.rank, lora.alpha = int(r_default), float(alpha_default)  # the adapter's nominal settings, saved back
        lora.rank_blocks = blocks
        with torch.no_grad():
            lora.lora_A.copy_(A)
            lora.lora_B.copy_(B)
        new[name] = lora
    if not new:
        raise UserError(f"{wfile}: no LoRA weights in the file")
    return _install(m, cfg, new)
