"""LoRA adapters in PEFT's format, and LoRA targets in PEFT's vocabulary.

`lmforge.model.lora` is the module swap, in our own names (projections attn.qkv, attn.proj, mlp.fc, mlp.proj and
their row slices q, k, v, o, gate, up, down; a mixture of experts' mlp.router and mlp.experts.{}.fc /
mlp.experts.{}.proj). This module is everything Hugging Face / PEFT *names*: target names as users and recipes say
them (q_proj, c_attn, all-linear), `adapter_config.json` and `adapter_model.safetensors`. Every name comes from
the one tensor-name table of the model's family in `lmforge.loaders.hf_tensors` (`tensor_names(cfg)`, decided by
`family(cfg)`), so an adapter's tensors are always modules of the model directory `state_dict_to_hf` writes for
the same config. Kept out of the model layer, which never imports the loaders.

Target names. A family's own module names work as PEFT matches them, as a suffix of the module's name:
`c_proj` means GPT-2's attn.c_proj and mlp.c_proj, `attn.c_proj` only the first. Llama's names of the
parts a model has (q_proj .. down_proj) work for every family, because that is what recipes say:

    Llama-like (LlamaForCausalLM, Qwen2, Mistral)   q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
    Mixtral (MixtralForCausalLM)                     q_proj .. o_proj  w1 w3 w2 (every expert's gate, up, down;
                                                     also as gate_proj up_proj down_proj)  gate (the router)
    Qwen3-MoE (Qwen3MoeForCausalLM)                  q_proj .. o_proj  gate_proj up_proj down_proj (every
                                                     expert's)  gate (the router: mlp.gate)
    GPT-2 (GPT2LMHeadModel)                          c_attn (= q, k, v)  c_proj  attn.c_proj  mlp.c_proj  c_fc
                                                     + q_proj .. o_proj, up_proj (= c_fc), down_proj (= mlp.c_proj)
    our own (LmforgeForCausalLM: sinusoidal, ...)    qkv  proj  attn.proj  mlp.proj  fc  + the Llama names
    any                                              all-linear (every projection of every block and every
                                                     expert; not lm_head, and not a router, which PEFT's
                                                     all-linear includes: a router is adapted only when named)
    any, our module names                            attn.qkv attn.proj mlp.fc mlp.proj mlp.router
                                                     mlp.experts.{}.fc mlp.experts.{}.proj, each alone or with
                                                     a part (attn.qkv.q, mlp.experts.{}.fc.up); "{}" may be left out

A target on an expert projection adapts it in every expert of every layer, each expert with its own A and B.

Files. Names such as `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (Llama-like) or
`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight` (GPT-2, where c_attn is one fused module in
transformers too: parts left out are saved as zero rows of B), so `peft.PeftModel.from_pretrained` (and vLLM,
llama.cpp's convert_lora_to_gguf, ...) accept them. Experts are saved one module per expert, as their model files
name them and as PEFT wrote them while transformers kept each expert an nn.Linear
(`base_model.model.model.layers.0.block_sparse_moe.experts.3.w1.lora_A.weight`, Qwen3-MoE's
`...mlp.experts.3.gate_proj...`): peft on transformers 5, whose experts are fused 3-D tensors, converts exactly
these names on load (it needs both of gate and up targeted, which it fuses; it refuses one alone). The fused form
peft writes on transformers 5 (`target_parameters`; `...mlp.experts[.base_layer].lora_A.weight`, experts stacked
in A's rows and B's columns) is read too (`lmforge.loaders.peft_experts`), never written. A model no transformers
class describes is saved under our own module names (`base_model.model.blocks.0.attn.qkv...`), which are its model
directory's names. A shared-A adapter is saved as per-projection tensors with A repeated. Loading goes the other
way and also accepts adapters made by peft, whose q, k and v have different A's: they are combined exactly by
stacking the A's and making B block-diagonal,

    A = [A_q; A_k; A_v]  (r_q + r_k + r_v, in)     B = diag(B_q, B_k, B_v)  (rows_q + rows_k + rows_v, r_q + r_k + r_v)

so the module's rank grows to the sum (B A = the three updates, nothing else). While B's off-diagonal blocks are
still zero (no further training), saving writes the original per-projection tensors back; after training
they generally are not, and each projection is saved with the full stacked A (ranks recorded in PEFT's
`rank_pattern` / `alpha_pattern`). Differing scales (alpha_pattern, rslora) are folded into B.

The base model's fingerprint (`model.lora.base_fingerprint`) goes into adapter_config.json under "lmforge",
and loading refuses an adapter made for a different base model. PEFT ignores the unknown key (with a warning).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from lmforge.errors import UserError
from lmforge.io import atomic_write, atomic_write_json, read_json_object
from lmforge.loaders.hf_tensors import LLAMA_FAMILY, TENSOR_NAMES, tensor_names
from lmforge.loaders.peft_experts import fused_expert_adapters, is_fused_expert_key, transformers5_settings
from lmforge.model.gpt import unwrap
from lmforge.model.lora import (
    EXPERT_FC,
    EXPERT_PROJ,
    ROUTER,
    LoRAInfo,
    LoRALinear,
    adapted_parts,
    apply_lora as apply_lora_to_projections,
    base_fingerprint,
    has_lora,
    install_lora,
    lora_modules,
    lora_parts,
    lora_projections,
    module_template,
    require_plain_linear,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "ALL_LINEAR",
    "adapter_base",
    "apply_lora",
    "available_targets",
    "is_adapter_dir",
    "load_adapter",
    "resolve_targets",
    "save_adapter",
    "target_names",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"
PEFT_PREFIX = "base_model.model."  # PeftModel's own prefix in front of the base model's module names
# Largest relative difference of a sampled base weight still taken for "the same weights": a bf16 copy rounds
# each value by at most 2^-9 (0.2%), fp16 by 2^-12; twice bf16's bound also covers a rounding of a rounding.
_SAMPLE_RTOL = 4e-3


# ---------------------------------------------------------------------------------------------------
# Adapter directories
# ---------------------------------------------------------------------------------------------------
def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A LoRA run or adapter directory (PEFT layout) without full weights of its own."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def adapter_base(directory: Path) -> str:
    """The base model an adapter directory names (`base_model_name_or_path`), as a path or store name."""
    try:
        d = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        base = d.get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{directory / ADAPTER_CONFIG}: unreadable") from None
    if not isinstance(base, str) or not base:
        raise UserError(f"{directory / ADAPTER_CONFIG} names no base model (base_model_name_or_path); "
                        f"load the base model and the adapter together instead")
    return base


# ---------------------------------------------------------------------------------------------------
# Target names
# ---------------------------------------------------------------------------------------------------
def _their_modules(cfg) -> dict[str, tuple[str, list[str]]]:
    """Their module name under a layer ("{}" for an expert's number, as in the table) -> (our module in
    `lora_projections` terms, its parts there), in table order. (`hf_tensors.hf_modules` answers this for the
    dense projections only; an expert's parts and the router's are `lora_parts`'.)"""
    block = tensor_names(cfg).block
    out: dict[str, tuple[str, list[str]]] = {}
    for mine in lora_projections(cfg):
        theirs, parts = block[mine], [p for p, _, _ in lora_parts(cfg, mine)]
        out.update({theirs[p]: (mine, [p]) for p in parts} if isinstance(theirs, dict) else {theirs: (mine, parts)})
    return out


def _last(name: str) -> str:
    return name.rsplit(".", 1)[-1]


_EXPERT_NUMBER = re.compile(r"\.(\d+)\.")


def _split_expert(theirs: str) -> tuple[str, int | None]:
    """Their module under a layer -> (the table's name, "{}" for the expert's number; the number or None)."""
    m = _EXPERT_NUMBER.search(theirs)
    if not m:
        return theirs, None
    return theirs[:m.start()] + ".{}." + theirs[m.end():], int(m[1])


# The Llama names of an expert's projections are those of the dense MLP's (gate_proj, up_proj, down_proj).
_DENSE = {EXPERT_FC: "mlp.fc", EXPERT_PROJ: "mlp.proj"}


def _vocabulary(cfg) -> dict[str, list[tuple[str, str]]]:
    """Target name -> the (our projection, part) pairs it adapts, in the order `available_targets` lists them."""
    modules = _their_modules(cfg)
    sharing: dict[str, list[str]] = {}  # last name component -> the modules ending in it
    for theirs in modules:
        sharing.setdefault(_last(theirs), []).append(theirs)
    vocab: dict[str, list[tuple[str, str]]] = {}
    for theirs in modules:
        last = _last(theirs)
        if last in vocab:
            continue
        group = sharing[last]
        vocab[last] = [(modules[t][0], p) for t in group for p in modules[t][1]]
        if len(group) > 1:  # the full names pick one of the modules a suffix shares
            vocab.update({t: [(modules[t][0], p) for p in modules[t][1]] for t in group})
    llama = TENSOR_NAMES[LLAMA_FAMILY].block
    for mine in lora_projections(cfg):  # Llama's names of the parts this model has (a router has none)
        dense = _DENSE.get(mine, mine)
        if dense not in llama:
            continue
        for part, _, _ in lora_parts(cfg, mine):
            theirs = llama[dense][part] if isinstance(llama[dense], dict) else llama[dense]
            vocab.setdefault(_last(theirs), [(mine, part)])
    return vocab


def _our_name(cfg, name: str) -> list[tuple[str, str]] | None:
    """One of our module names, alone or with a part ("attn.qkv", "mlp.experts.{}.fc.up"; an expert's may leave
    "{}" out: "mlp.experts.fc"), -> the (module, part) pairs it adapts; None if it is not one."""
    name = re.sub(r"^mlp\.experts\.(?=(fc|proj)(\.|$))", "mlp.experts.{}.", name)
    for mine in lora_projections(cfg):
        parts = [p for p, _, _ in lora_parts(cfg, mine)]
        if name == mine:
            return [(mine, p) for p in parts]
        if name.startswith(mine + ".") and name[len(mine) + 1:] in parts:
            return [(mine, name[len(mine) + 1:])]
    return None


def available_targets(model_or_config) -> list[str]:
    """The target names this model accepts (PEFT vocabulary of its family), `all-linear` last. (Our own module
    names, `lora_projections`, are accepted too, and named in the error for an unknown target.)"""
    cfg = getattr(unwrap(model_or_config), "config", model_or_config)
    return [*_vocabulary(cfg), ALL_LINEAR]


def _family_title(cfg) -> str:
    return f"{tensor_names(cfg).title} ({'SwiGLU' if cfg.mlp == 'swiglu' else 'GELU'})"


def resolve_targets(cfg, targets: str | Iterable[str]) -> dict[str, list[str]]:
    """Target names (a list or a comma-separated string) -> {our projection: adapted parts in row order}."""
    if isinstance(targets, str):
        targets = targets.split(",")
    names = list(dict.fromkeys(t.strip() for t in targets if t and t.strip()))
    if not names:
        raise UserError(f"no LoRA targets given; available: {', '.join(available_targets(cfg))}")
    vocab = _vocabulary(cfg)
    chosen: set[tuple[str, str]] = set()
    for name in names:
        if name == ALL_LINEAR:  # every projection and expert, never the router (PEFT's would include it)
            chosen |= {(m, p) for m in lora_projections(cfg) if m != ROUTER for p, _, _ in lora_parts(cfg, m)}
        elif name in vocab:
            chosen |= set(vocab[name])
        elif (ours := _our_name(cfg, name)) is not None:
            chosen |= set(ours)
        else:
            raise UserError(f"LoRA target {name!r} matches no module of this {_family_title(cfg)} model; available: "
                            f"{', '.join(available_targets(cfg))} (or our names: {', '.join(lora_projections(cfg))})")
    plan = {m: [p for p, _, _ in lora_parts(cfg, m) if (m, p) in chosen] for m in lora_projections(cfg)}
    return {m: parts for m, parts in plan.items() if parts}


def target_names(model: nn.Module) -> list[str]:
    """target_modules for adapter_config.json: the modules (theirs) the adapters are saved under, each by its
    last name component where that names no module left out (`c_proj` for both of GPT-2's), else in full
    (an expert's module once per expert: PEFT matches names, not patterns)."""
    m = unwrap(model)
    cfg = m.config
    adapted, modules = adapted_parts(m), _their_modules(cfg)
    saved = [t for t, (mine, parts) in modules.items() if any((mine, p) in adapted for p in parts)]
    sharing: dict[str, list[str]] = {}
    for theirs in modules:
        sharing.setdefault(_last(theirs), []).append(theirs)
    unique = [_last(t) for t in saved if len(sharing[_last(t)]) == 1]
    shared: list[str] = []
    for last, group in sharing.items():
        if len(group) > 1 and any(t in saved for t in group):
            shared += [last] if all(t in saved for t in group) else [
                t.format(e) for t in group if t in saved for e in (range(cfg.n_experts) if "{}" in t else [0])]
    return unique + shared


def apply_lora(model: nn.Module, *, targets: str | Iterable[str], rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0) -> LoRAInfo:
    """`lmforge.model.lora.apply_lora` with the targets named in PEFT's vocabulary (a list or a comma-separated
    string, see the module docstring); the returned info names them as adapter_config.json will."""
    m = unwrap(model)
    info = apply_lora_to_projections(m, targets=resolve_targets(m.config, targets), rank=rank, alpha=alpha,
                                     dropout=dropout)
    info.targets = target_names(m)
    return info


# ---------------------------------------------------------------------------------------------------
# Saving in PEFT's layout
# ---------------------------------------------------------------------------------------------------
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
    cfg = model.config
    names = tensor_names(cfg)
    tensors, scalings = {}, {}
    for name, lora in lora_modules(model):
        _, layer, module = name.split(".", 2)
        prefix = names.body + names.layer.format(layer)
        theirs = names.block[module_template(name)]
        if "{}" in module_template(name):  # an expert's module: its number in their name
            expert = int(_EXPERT_NUMBER.search(module)[1])
            theirs = ({p: t.format(expert) for p, t in theirs.items()} if isinstance(theirs, dict)
                      else theirs.format(expert))
        if isinstance(theirs, dict):  # one module per part there: each part's rows of B, its A
            for i, (part, _, n, offset) in enumerate(lora.part_rows()):
                key = prefix + theirs[part]
                A, B = _compact(lora, i, offset, n)
                tensors[f"{PEFT_PREFIX}{key}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{key}.lora_B.weight"] = A, B
                scalings[key] = lora.scaling
        else:  # one module there (GPT-2's c_attn): one A, B over every row (zero where not adapted)
            key = prefix + theirs
            B = lora.lora_B.detach()
            if lora.row_index is not None:
                B = torch.zeros(lora.out_features, B.shape[1], dtype=B.dtype, device=B.device).index_copy(
                    0, lora.row_index, B)
            tensors[f"{PEFT_PREFIX}{key}.lora_A.weight"] = lora.lora_A.detach()
            tensors[f"{PEFT_PREFIX}{key}.lora_B.weight"] = B
            scalings[key] = lora.scaling
    return tensors, scalings


def save_adapter(model: nn.Module, directory: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapters as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

    Each file is written atomically. Ranks or scales that differ from the first adapter's (only after loading a
    PEFT adapter with per-projection A's, see the module docstring) go into `rank_pattern` / `alpha_pattern`
    under the full module name, which PEFT matches as a suffix.
    """
    from safetensors.torch import save_file

    m = unwrap(model)
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
    ranks = {key: (tensors[f"{PEFT_PREFIX}{key}.lora_A.weight"].shape[0], s) for key, s in scalings.items()}
    pattern, theirs_to_ours = _key_pattern(cfg), _their_modules(cfg)
    owners = {}  # key -> (layer, our module as lora_projections names it)
    for key in ranks:
        match = pattern.match(f"{key}.lora_A.weight")
        owners[key] = (int(match[2]), theirs_to_ours[_split_expert(match[3])[0]][0])
    # peft on transformers 5 fuses the experts' gate and up and then needs r and alpha to be theirs (see there)
    r, alpha, rank_pattern, alpha_pattern = transformers5_settings(
        cfg, {key: (*owners[key], *ranks[key]) for key in ranks}, first.rank, first.alpha)
    for key, (r_key, s) in ranks.items():
        if r_key != r:
            rank_pattern[key] = r_key
        a_key = s * r_key
        if not math.isclose(a_key, alpha, rel_tol=1e-9):
            alpha_pattern[key] = a_key
    layers = sorted({int(name.split(".")[1]) for name, _ in mods})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path if base_model_name_or_path is not None else cfg.name,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": first.dropout_p,
        "target_modules": target_names(m),
        "bias": "none",
        # transformers' GPT-2 keeps its weights as Conv1D (in, out); PEFT sets this for it anyway.
        "fan_in_fan_out": bool(tensor_names(cfg).transposed),
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
_REFUSED_SETTINGS = {
    "use_dora": "DoRA adapters (use_dora) are not supported",
    "modules_to_save": "adapters that also save whole modules (modules_to_save) are not supported",
    "trainable_token_indices": "adapters with trainable tokens are not supported",
}


def _key_pattern(cfg) -> re.Pattern:
    """PEFT tensor names of this family: group 1 the module (PEFT's key for rank/alpha patterns), 2 the
    layer, 3 their module under the layer, 4 A or B (an adapter name before ".weight", as in files saved
    with one, is allowed)."""
    names = tensor_names(cfg)
    body = f"(?:{re.escape(names.body)})?" if names.body_optional else re.escape(names.body)
    before, after = names.layer.split("{}")
    # an expert's module ("{}" in the table) with any expert's number
    modules = "|".join(re.escape(t).replace(r"\{\}", r"\d+")
                       for t in sorted(_their_modules(cfg), key=len, reverse=True))
    return re.compile(rf"^(?:{re.escape(PEFT_PREFIX)})?({body}{re.escape(before)}(\d+){re.escape(after)}({modules}))"
                      rf"\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def _pattern(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern that matches the end of `key`."""
    for pat, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """adapter_config.json of a LoRA adapter we can load; UserError naming what is not supported."""
    f = directory / ADAPTER_CONFIG
    if not directory.is_dir():
        raise UserError(f"{directory}: no such adapter directory")
    if not f.is_file():
        raise UserError(f"{directory} is not a LoRA adapter directory: it has no {ADAPTER_CONFIG}")
    conf = read_json_object(f)
    if conf.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{f}: a {conf.get('peft_type')} adapter; only LoRA adapters are supported")
    for key, msg in _REFUSED_SETTINGS.items():
        if conf.get(key):
            raise UserError(f"{f}: {msg}")
    if conf.get("bias", "none") != "none":
        raise UserError(f"{f}: adapters that train biases (bias={conf.get('bias')!r}) are not supported")
    return conf


def _check_fingerprint(model: nn.Module, stored: Any, source: str) -> None:
    if not isinstance(stored, dict) or "base_config" not in stored:
        return  # not made here (or by a future format): the tensor shapes are still checked on load
    mine = base_fingerprint(model)
    theirs_conf, my_conf = stored.get("base_config") or {}, mine["base_config"]
    # Fields only one side knows (another lmforge version's ModelConfig) are not compared; training-only
    # settings are not in the fingerprint.
    diffs = [f"{k}: {theirs_conf[k]!r} in the adapter's base, {v!r} here" for k, v in my_conf.items()
             if k in theirs_conf and theirs_conf[k] != v]
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

    m = unwrap(model)
    cfg = m.config
    directory = Path(directory)
    conf = read_adapter_config(directory)
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

    names = tensor_names(cfg)
    pattern = _key_pattern(cfg)
    theirs_to_ours = _their_modules(cfg)
    r_default, alpha_default = conf.get("r", 8), conf.get("lora_alpha", 8)
    rslora = bool(conf.get("use_rslora"))

    def rank_and_scaling(key: str) -> tuple[int, float]:
        """The rank and update scale PEFT gives the module `key` (rank_pattern / alpha_pattern, rslora)."""
        r = _pattern(conf.get("rank_pattern"), key, r_default)
        alpha = _pattern(conf.get("alpha_pattern"), key, alpha_default)
        return r, alpha / math.sqrt(r) if rslora else alpha / r

    found: dict[tuple[int, str], dict[str, Any]] = {}  # (layer, their module) -> {"key": ..., "A": ..., "B": ...}
    fused: dict[str, torch.Tensor] = {}  # transformers 5's fused experts, as peft writes them there
    for key, t in tensors.items():
        match = pattern.match(key)
        if not match:
            if is_fused_expert_key(cfg, key):
                fused[key] = t
                continue
            raise UserError(f"{wfile}: tensor {key!r} is not a LoRA weight of a {names.title} model's projections "
                            f"(this model accepts {', '.join(available_targets(cfg)[:-1])})")
        module_key, layer, theirs, ab = match.group(1), int(match.group(2)), match.group(3), match.group(4)
        if layer >= cfg.n_layers:
            raise UserError(f"{wfile}: tensor {key!r} is for layer {layer}, but this model has {cfg.n_layers} layers")
        found.setdefault((layer, theirs), {"key": module_key})[ab] = t

    # our module -> entries (parts [(name, start, stop)], A, B, scaling)
    per_module: dict[str, list[tuple[list[tuple[str, int, int]], torch.Tensor, torch.Tensor, float]]] = {}
    for (layer, theirs), entry in sorted(found.items()):
        if "A" not in entry or "B" not in entry:
            raise UserError(f"{wfile}: {entry['key']} has lora_{'A' if 'A' not in entry else 'B'} missing")
        A, B = entry["A"], entry["B"]
        key = names.body + entry["key"].removeprefix(names.body)  # as PEFT names it (GPT-2: with transformer.)
        template, expert = _split_expert(theirs)
        module, part_names = theirs_to_ours[template]
        if expert is not None and expert >= cfg.n_experts:
            raise UserError(f"{wfile}: {key} is for expert {expert}, but this model has {cfg.n_experts} experts "
                            "per layer")
        parts = [p for p in lora_parts(cfg, module) if p[0] in part_names]
        name = f"blocks.{layer}.{module.format(expert) if expert is not None else module}"
        rows = sum(stop - start for _, start, stop in parts)
        in_features = m.get_submodule(name).in_features
        r, scaling = rank_and_scaling(key)
        if A.dim() != 2 or B.dim() != 2 or A.shape != (r, in_features) or B.shape != (rows, r):
            raise UserError(f"{wfile}: {key} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; this model "
                            f"needs ({r}, {in_features}) and ({rows}, {r}) (r={r}): the adapter is for another model")
        per_module.setdefault(name, []).append((parts, A.float(), B.float(), scaling))

    drop = float(conf.get("lora_dropout", 0.0) if dropout is None else dropout)
    new = {}

    def install(name: str, parts, A: torch.Tensor, B: torch.Tensor, scaling: float, blocks) -> None:
        base = require_plain_linear(m, name, "load the adapter")
        lora = LoRALinear(base, rank=A.shape[0], alpha=scaling * A.shape[0], dropout=drop, parts=parts, scaling=scaling)
        lora.rank, lora.alpha = int(r_default), float(alpha_default)  # the adapter's nominal settings, saved back
        lora.rank_blocks = blocks
        with torch.no_grad():
            lora.lora_A.copy_(A)
            lora.lora_B.copy_(B)
        new[name] = lora

    for name, entries in per_module.items():
        entries.sort(key=lambda e: e[0][0][1])  # by first row
        parts = [p for e in entries for p in e[0]]
        s0 = entries[0][3]
        shared = all(torch.equal(e[1], entries[0][1]) and e[3] == s0 for e in entries)
        if shared:  # one A (ours, saved per projection): B's rows side by side
            install(name, parts, entries[0][1], torch.cat([e[2] for e in entries]), s0, None)
        else:  # separate A's (PEFT's q, k, v): A stacked, B block-diagonal, scales folded into B
            blocks, lo = [], 0
            for e in entries:
                blocks += [(lo, lo + e[1].shape[0])] * len(e[0])
                lo += e[1].shape[0]
            install(name, parts, torch.cat([e[1] for e in entries]),
                    torch.block_diag(*[e[2] * (e[3] / s0) for e in entries]), s0, blocks)
    for name, (parts, A, B, scaling, blocks) in fused_expert_adapters(cfg, fused, rank_and_scaling, str(wfile)).items():
        if name in new:
            raise UserError(f"{wfile}: {name} has LoRA weights twice (per expert and fused)")
        install(name, parts, A, B, scaling, blocks)
    if not new:
        raise UserError(f"{wfile}: no LoRA weights in the file")
    info = install_lora(m, {name: new[name] for name, _ in m.named_modules() if name in new})
    info.targets = target_names(m)
    return info
