"""LoRA (Hu et al. 2021) as a module swap: frozen base weights plus a trainable low-rank update.

    y = W x + b + (alpha / r) * B (A dropout(x))        A: (r, in), kaiming-uniform;  B: (out, r), zeros

so a freshly wrapped model computes exactly what the base model computes, and training moves only A and
B (r * (in + out) numbers per matrix instead of in * out). `apply_lora` swaps chosen `nn.Linear`s of a
`GPT` for `LoRALinear`s and freezes every base parameter; `merge_lora` folds W += (alpha / r) B A back in
and restores plain `nn.Linear`s, so a merged model is an ordinary GPT that exports, quantizes and runs on
the fast path like any other. `model/gpt.py` knows nothing of this file.

Targets here are in OUR vocabulary: a per-block projection (`lora_projections`: attn.qkv, attn.proj, mlp.fc,
mlp.proj) and the named row slices of it to adapt (`lora_parts`: q, k, v of attn.qkv; gate, up of a SwiGLU
mlp.fc; o; down), e.g. `apply_lora(model, targets={"attn.qkv": ["q", "v"]})`. A mixture of experts has no
mlp.fc / mlp.proj: in their place are its router (`mlp.router`, one part "router") and its experts, named as
in the tensor-name tables with "{}" for the expert's number (`mlp.experts.{}.fc`: gate, up; `mlp.experts.{}.proj`:
down). A target on an expert projection adapts that projection of EVERY expert, each with its own A and B
(as PEFT adapts each expert's w1 / w3 / w2); the router is adapted only when named. What users and
recipes say (q_proj, c_attn, all-linear: Hugging Face / PEFT names, which depend on the architecture
family) and PEFT's adapter files are `lmforge.loaders.peft`'s business: it resolves those names with the
one tensor-name table in `lmforge.loaders.hf` and calls this module. The model layer never imports the
loaders, so the names cannot be decided twice.

Fused projections. Our model computes q|k|v with one matrix (`attn.qkv`) and gate|up with one (`mlp.fc`).
A `LoRALinear` on a fused matrix may adapt only some row slices of it ("parts": e.g. q and v of qkv): it has
ONE A (r, in) shared by its parts and a B holding only the adapted rows, whose update is added into those
output rows. Sharing A is exactly "q, k and v adapters that happen to have the same A, with B's rows split",
which is how such an adapter is saved in PEFT's layout; it costs r * in fewer parameters per extra part
than PEFT's separate adapters of the same rank, and runs as two matmuls instead of two per part. Adapters
made by peft, whose q, k and v have different A's, are loaded as a stacked A and a block-diagonal B
(`rank_blocks` records the stacking; see `lmforge.loaders.peft`).

The base model's fingerprint (`base_fingerprint`: its config and a few sampled weight values) identifies
the model an adapter was trained on; the adapter files record it and refuse a different base.

Inference: `engine/fastpath.accelerate` swaps plain `nn.Linear`s, so on a LoRA model it would accelerate the
wrapped base matrices only (still correct, but the adapter matmuls stay slow, and `merge_lora` then merges into
the FastLinear). Merge first for serving.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import TRAINING_ONLY_FIELDS
from lmforge.errors import UserError
from lmforge.model.gpt import PROJECTIONS, projection_parts, unwrap

__all__ = [
    "EXPERT_FC",
    "EXPERT_PROJ",
    "LoRAInfo",
    "LoRALinear",
    "ROUTER",
    "adapted_parts",
    "apply_lora",
    "base_fingerprint",
    "has_lora",
    "install_lora",
    "lora_modules",
    "lora_parameters",
    "lora_parts",
    "lora_projections",
    "merge_lora",
    "module_template",
]

FINGERPRINT_VERSION = 1
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
        out_features, in_features = base.out_features, base.in_features
        if not isinstance(rank, int) or rank <= 0:
            raise UserError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.parts = list(parts) if parts is not None else [("all", 0, out_features)]
        self.rank, self.alpha, self.dropout_p = rank, float(alpha), float(dropout)
        self.scaling = float(alpha) / rank if scaling is None else float(scaling)
        # A's row ranges per part when A is a stack of per-part A's (set by loaders.peft.load_adapter); None: shared A.
        self.rank_blocks: list[tuple[int, int]] | None = None

        rows = [r for _, start, stop in self.parts for r in range(start, stop)]
        if not rows or len(set(rows)) != len(rows) or min(rows) < 0 or max(rows) >= out_features:
            raise ValueError(f"LoRA parts {self.parts} are not distinct row slices of {out_features} rows")
        w = _reference_tensor(base)
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
        """The base weight, so code that reads `.weight` of a projection (shapes, dtype) keeps working.
        (A base whose weight stays packed, `quant.GGMLLinear`, has none: read `in_features`/`out_features`.)"""
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
# Our projections and their parts
# ---------------------------------------------------------------------------------------------------
# A mixture of experts' modules under blocks.N (`lmforge.model.gpt.MoE`), "{}" the expert's number: the
# notation of the tensor-name tables (`lmforge.loaders.hf_tensors`), so that one name means one thing everywhere.
ROUTER, EXPERT_FC, EXPERT_PROJ = "mlp.router", "mlp.experts.{}.fc", "mlp.experts.{}.proj"
SHARED_FC, SHARED_PROJ = "mlp.shared.fc", "mlp.shared.proj"  # a shared expert (Qwen2-MoE): one per block
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(fc|proj)")


def lora_projections(cfg) -> tuple[str, ...]:
    """The modules under blocks.N that LoRA adapts, in block order: PROJECTIONS for a dense model; attention's
    two, the router, every expert's fc / proj and the shared expert's for a mixture of experts (which has no
    mlp.fc / mlp.proj)."""
    if cfg.n_experts:
        shared = (SHARED_FC, SHARED_PROJ) if cfg.shared_expert_d_ff else ()
        return ("attn.qkv", "attn.proj", ROUTER, EXPERT_FC, EXPERT_PROJ, *shared)
    return PROJECTIONS


def lora_parts(cfg, module: str) -> list[tuple[str, int, int]]:
    """The named row slices of one of `lora_projections(cfg)`, in row order: (part, start, stop). An expert's
    fc / proj are shaped as the dense mlp.fc / mlp.proj; the router's rows (one per expert) are one part."""
    if cfg.n_experts and module == ROUTER:
        return [("router", 0, cfg.n_experts)]
    if cfg.n_experts and module in (EXPERT_FC, EXPERT_PROJ):
        return projection_parts(cfg, "mlp." + module.rpartition(".")[2])
    return projection_parts(cfg, module)


def module_template(name: str) -> str:
    """A module's name under blocks.N with an expert's number written "{}": "blocks.3.mlp.experts.5.fc" ->
    "mlp.experts.{}.fc" (what `lora_projections` lists); other names lose only the block prefix."""
    under = name.split(".", 2)[2] if name.startswith("blocks.") else name
    return _EXPERT.sub(r"mlp.experts.{}.\2", under)


def _instances(cfg, module: str) -> list[str]:
    """Every module of the model that `module` (a `lora_projections` name) stands for: one per block, and one
    per expert of every block for an expert projection."""
    experts = range(cfg.n_experts) if "{}" in module else [None]
    return [f"blocks.{i}.{module.format(e) if e is not None else module}" for i in range(cfg.n_layers) for e in experts]


def _plan(cfg, targets: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """{our module: parts} checked against the model, parts in row order, modules in `lora_projections` order."""
    projections = lora_projections(cfg)
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Mapping):
        raise TypeError("model.lora.apply_lora takes {projection: [parts]} (e.g. {'attn.qkv': ['q', 'v']}); "
                        "Hugging Face / PEFT names (q_proj, c_attn, all-linear) go through lmforge.loaders.peft.apply_lora")
    if not targets:
        raise UserError("no LoRA targets given")
    plan = {}
    for module, wanted in targets.items():
        if module not in projections:
            raise UserError(f"{module!r} is not a projection of this model; LoRA adapts {', '.join(projections)}")
        names = [p for p, _, _ in lora_parts(cfg, module)]
        wanted = set(wanted)
        if not wanted or not wanted <= set(names):
            raise UserError(f"{module} has the parts {', '.join(names)}; asked for {sorted(wanted)}")
        plan[module] = [p for p in names if p in wanted]
    return {m: plan[m] for m in projections if m in plan}


# ---------------------------------------------------------------------------------------------------
# Apply, inspect, merge
# ---------------------------------------------------------------------------------------------------
@dataclass
class LoRAInfo:
    """What `apply_lora` / `load_adapter` adapted, and how many parameters now train."""

    # The targets in the caller's vocabulary: `module.part` names of ours from this module, Hugging Face /
    # PEFT names (as saved in adapter_config.json's target_modules) from lmforge.loaders.peft.
    targets: list[str]
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


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, module) for every LoRALinear in the model, in module order."""
    for name, m in unwrap(model).named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def has_lora(model: nn.Module) -> bool:
    return next(lora_modules(model), None) is not None


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (what an optimizer should get)."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


def adapted_parts(model: nn.Module) -> set[tuple[str, str]]:
    """(our module without blocks.N., an expert's number as "{}": `module_template`, part) for every part
    adapted in at least one block (and expert)."""
    return {(module_template(name), p[0]) for name, m in lora_modules(model) for p in m.parts}


def _our_targets(model: nn.Module) -> list[str]:
    cfg = unwrap(model).config
    adapted = adapted_parts(model)
    return [f"{m}.{p}" for m in lora_projections(cfg) for p, _, _ in lora_parts(cfg, m) if (m, p) in adapted]


def _info(model: nn.Module, targets: list[str]) -> LoRAInfo:
    mods = list(lora_modules(model))
    params = {id(p): p for p in unwrap(model).parameters()}.values()  # tied weights once
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


def require_plain_linear(model: nn.Module, name: str, doing: str) -> nn.Module:
    """The module called `name`, which LoRA can wrap if it is a plain nn.Linear or a frozen layer that keeps
    its weight in stored bytes (`stays_packed`: quant.GGMLLinear, the QLoRA case). A layer the engine has
    converted for speed is refused: its weights are a copy the adapter would not see."""
    base = unwrap(model).get_submodule(name)
    if type(base) is not nn.Linear and not getattr(base, "stays_packed", False):
        raise UserError(f"{name} is a {type(base).__name__}, not a plain nn.Linear: LoRA wraps unquantized "
                        f"or stored-format projections ({doing} before accelerating the model)")
    return base


def install_lora(model: nn.Module, new: dict[str, LoRALinear]) -> LoRAInfo:
    """Freeze every base parameter, swap the LoRA modules in (only their A and B train), report."""
    m = unwrap(model)
    for p in m.parameters():
        p.requires_grad_(False)
    for name, lora in new.items():
        lora.lora_A.requires_grad_(True)
        lora.lora_B.requires_grad_(True)
        _swap(m, name, lora)
    return _info(m, _our_targets(m))


def apply_lora(model: nn.Module, *, targets: Mapping[str, Iterable[str]], rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0) -> LoRAInfo:
    """Wrap the targeted projections of every block in `LoRALinear`s (in place) and freeze the base.

    `targets`: our projections and the parts of each to adapt, {"attn.qkv": ["q", "v"], "mlp.proj": ["down"]};
    a mixture of experts' {"mlp.experts.{}.fc": ["gate", "up"]} adapts those rows of every expert, each expert
    with adapters of its own (Hugging Face / PEFT names go through `lmforge.loaders.peft.apply_lora`).
    Every base parameter (embeddings and norms included) gets requires_grad False; only the adapters' A and B
    train.
    Returns what was adapted and the trainable / total parameter counts.
    """
    m = unwrap(model)
    cfg = m.config
    if has_lora(m):
        raise UserError("this model already has LoRA adapters; merge them (lmforge merge) before adding new ones")
    if not alpha > 0:
        raise UserError(f"LoRA alpha must be positive, got {alpha}")
    plan = _plan(cfg, targets)
    new = {}
    for module, part_names in plan.items():
        parts = [p for p in lora_parts(cfg, module) if p[0] in part_names]
        for name in _instances(cfg, module):
            base = require_plain_linear(m, name, "apply it")
            new[name] = LoRALinear(base, rank=rank, alpha=alpha, dropout=dropout, parts=parts)
    new = {name: new[name] for name, _ in m.named_modules() if name in new}  # module order, as lora_modules lists
    return install_lora(m, new)


def _reference_tensor(base: nn.Module) -> torch.Tensor:
    """The tensor that says where a base layer lives: its float weight, or (a base whose weight stays in
    packed bytes, as QLoRA trains on) its first buffer. The adapter is float32 then."""
    w = getattr(base, "weight", None)
    if isinstance(w, torch.Tensor):
        return w
    ref = next(base.buffers())
    return torch.empty(0, dtype=torch.float32, device=ref.device)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, W[rows] += (alpha / r) B A, and put the base modules back.

    In place; returns the model, now a plain GPT whose parameters all have requires_grad True again (as a
    freshly built or loaded model's). The sum is formed in float32 and rounded once into the weight's dtype.
    An adapter on a base held in packed (quantized) bytes stays beside it, unmerged: folding the update into
    4-bit blocks would re-quantize the base and lose most of what the adapter learned.
    """
    m = unwrap(model)
    for name, lora in list(lora_modules(m)):
        base = lora.base
        if not isinstance(getattr(base, "weight", None), torch.Tensor):
            continue
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
    of a few weight matrices (the embedding, the first and the last block's projections; the last block's first
    expert in a mixture of experts, which has no mlp.proj).

    Samples rather than a hash of the bytes, so that the same weights loaded in bf16 or fp16 still match
    (compared with a relative tolerance); a different model differs in practically every sampled value.
    """
    m = unwrap(model)
    cfg = m.config
    last = f"blocks.{cfg.n_layers - 1}"
    names = ["tok_emb", "blocks.0.attn.qkv", f"{last}.mlp.experts.0.proj" if cfg.n_experts else f"{last}.mlp.proj"]
    samples = {n: _sample(w) for n in names if (w := _base_weight(m, n)) is not None}
    conf = {k: v for k, v in cfg.to_dict().items() if k not in TRAINING_ONLY_FIELDS}
    return {"fingerprint_version": FINGERPRINT_VERSION, "base_config": conf, "weight_samples": samples}
