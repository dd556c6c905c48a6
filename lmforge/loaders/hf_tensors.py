"""Hugging Face tensor names: ONE table per architecture family, and the state-dict maps both ways.

Why explicit tables (see `lmforge.loaders.hf` for config.json): an importer that guesses tensor names
breaks silently - a transposed or unpermuted weight still loads, it just produces garbage. Each family is a
table of names (`TENSOR_NAMES`: Llama-like, which covers Mistral, Qwen2 and Qwen3; Mixtral's and
Qwen3-MoE's mixtures of experts; Gemma; Phi-3's fused projections; GPT-2; and our own), proved by a
logits-parity test against `transformers`.
`family(cfg)` is the one rule for which table applies, and everything that names a tensor asks it: import and
export (`lmforge.loaders.model_dir`), GGUF (through these names), and LoRA targets and adapter files
(`lmforge.loaders.peft`).

Our model fuses q/k/v into one projection (`attn.qkv`) and gate/up into one (`mlp.fc`) for speed; the maps
split and join them, so what lands on disk is the layout transformers, vLLM and llama.cpp's converter expect.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.loaders.hf import GEMMA, GPT2, MIXTRAL, NATIVE, PHI3, QWEN2_MOE, QWEN3_MOE, hf_architecture
from lmforge.model.gpt import GPT, PROJECTIONS, projection_parts

__all__ = ["GEMMA_FAMILY", "GPT2_FAMILY", "LLAMA_FAMILY", "MIXTRAL_FAMILY", "NATIVE_FAMILY", "PHI3_FAMILY", "QWEN2_MOE_FAMILY", "QWEN3_MOE_FAMILY",
           "TENSOR_NAMES", "TensorNames", "family", "hf_modules", "hf_tensor_names", "state_dict_from_hf",
           "state_dict_to_hf", "stored_names", "tensor_names", "text_model_name", "without_body"]

LLAMA_FAMILY, GPT2_FAMILY, NATIVE_FAMILY, MIXTRAL_FAMILY = "llama", "gpt2", "lmforge", "mixtral"
QWEN3_MOE_FAMILY, GEMMA_FAMILY, PHI3_FAMILY, QWEN2_MOE_FAMILY = "qwen3_moe", "gemma", "phi3", "qwen2_moe"


@dataclass(frozen=True)
class TensorNames:
    """How one architecture family names our modules, in its model files and in PEFT adapters for it.

    A module of ours is `tok_emb`, `norm`, `lm_head` (top level) or `blocks.N.<module>`; theirs is
    `body + top[...]`, `head`, or `body + layer.format(N) + block[<module>]`. A `block` entry that is a
    dict names each row slice of one of our fused projections (`lmforge.model.gpt.projection_parts`:
    q|k|v of attn.qkv, gate|up of a SwiGLU mlp.fc) as a module of its own, as Llama does; a string is one
    module holding all the rows, as GPT-2's c_attn holds q|k|v. In a mixture of experts' entries, "{}" is
    the expert's number (`mlp.experts.{}.fc`), whose parts are those of the dense mlp.fc.
    """

    family: str
    title: str  # how messages name the family
    body: str  # prefix of every module but the output head: "model." (Llama), "transformer." (GPT-2)
    layer: str  # block N under `body`, a format string
    top: dict[str, str]
    block: dict[str, str | dict[str, str]]
    transposed: frozenset[str] = frozenset()  # weights stored (in, out): GPT-2's Conv1D computes x @ W + b
    body_optional: bool = False  # files may leave `body` out (GPT-2 saved from the bare GPT2Model)
    head: str = "lm_head"


_OURS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc", "mlp.proj", "attn.q_norm", "attn.k_norm",
         "post_attn_norm", "post_mlp_norm")
# A mixture of experts' modules under blocks.N (`lmforge.model.gpt.MoE`); "{}" is the expert's number, and an
# expert's fc / proj split into parts as the dense mlp.fc / mlp.proj do.
_OURS_MOE = ("mlp.router", "mlp.experts.{}.fc", "mlp.experts.{}.proj", "mlp.shared.fc", "mlp.shared.proj", "mlp.shared_gate")
# Llama's attention block and norms, which Mixtral and Qwen3-MoE keep; Qwen3's per-head q/k norms (only
# models with `qk_norm` have them).
_LLAMA_ATTENTION: dict[str, str | dict[str, str]] = {
    "norm1": "input_layernorm",
    "attn.qkv": {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"},
    "attn.proj": "self_attn.o_proj",
    "norm2": "post_attention_layernorm",
}
_QK_NORMS = {"attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}
TENSOR_NAMES: dict[str, TensorNames] = {
    # Llama, Mistral, Qwen2 and Qwen3 name their tensors alike (Qwen2 adds q/k/v biases under the same modules;
    # Qwen3 its per-head q/k norms, which only models with `qk_norm` have).
    LLAMA_FAMILY: TensorNames(
        LLAMA_FAMILY, "Llama-style", "model.", "layers.{}.",
        top={"tok_emb": "embed_tokens", "norm": "norm"},
        block={**_LLAMA_ATTENTION, **_QK_NORMS,
               "mlp.fc": {"gate": "mlp.gate_proj", "up": "mlp.up_proj"},
               "mlp.proj": "mlp.down_proj"}),
    # Mixtral: Llama's attention; w1 = gate, w3 = up, w2 = down of each expert (in transformers 5 the
    # in-memory layout is fused 3-D tensors, but files are saved and read under these names).
    MIXTRAL_FAMILY: TensorNames(
        MIXTRAL_FAMILY, "Mixtral-style", "model.", "layers.{}.",
        top={"tok_emb": "embed_tokens", "norm": "norm"},
        block={**_LLAMA_ATTENTION,
               "mlp.router": "block_sparse_moe.gate",
               "mlp.experts.{}.fc": {"gate": "block_sparse_moe.experts.{}.w1", "up": "block_sparse_moe.experts.{}.w3"},
               "mlp.experts.{}.proj": "block_sparse_moe.experts.{}.w2"}),
    # Qwen3-MoE: Qwen3's attention (q/k norms); mlp.gate is the router, each expert named as Llama's MLP.
    QWEN3_MOE_FAMILY: TensorNames(
        QWEN3_MOE_FAMILY, "Qwen3-MoE-style", "model.", "layers.{}.",
        top={"tok_emb": "embed_tokens", "norm": "norm"},
        block={**_LLAMA_ATTENTION, **_QK_NORMS,
               "mlp.router": "mlp.gate",
               "mlp.experts.{}.fc": {"gate": "mlp.experts.{}.gate_proj", "up": "mlp.experts.{}.up_proj"},
               "mlp.experts.{}.proj": "mlp.experts.{}.down_proj"}),
    # Qwen2-MoE: Qwen2's attention (q/k/v biases), Qwen3-MoE's experts, and the shared expert with its gate.
    QWEN2_MOE_FAMILY: TensorNames(
        QWEN2_MOE_FAMILY, "Qwen2-MoE-style", "model.", "layers.{}.",
        top={"tok_emb": "embed_tokens", "norm": "norm"},
        block={**_LLAMA_ATTENTION,
               "mlp.router": "mlp.gate",
               "mlp.experts.{}.fc": {"gate": "mlp.experts.{}.gate_proj", "up": "mlp.experts.{}.up_proj"},
               "mlp.experts.{}.proj": "mlp.experts.{}.down_proj",
               "mlp.shared.fc": {"gate": "mlp.shared_expert.gate_proj", "up": "mlp.shared_expert.up_proj"},
               "mlp.shared.proj": "mlp.shared_expert.down_proj",
               "mlp.shared_gate": "mlp.shared_expert_gate"}),
    # Gemma 2/3: a norm before and after each sublayer. Beware the one name both families share for different
    # things: Gemma's post_attention_layernorm is the norm of the attention's *output* (Llama's is the norm
    # before the MLP, which Gemma calls pre_feedforward_layernorm). Gemma 3 adds q/k norms.
    GEMMA_FAMILY: TensorNames(
        GEMMA_FAMILY, "Gemma-style", "model.", "layers.{}.",
        top={"tok_emb": "embed_tokens", "norm": "norm"},
        block={**_LLAMA_ATTENTION, **_QK_NORMS,
               "post_attn_norm": "post_attention_layernorm",
               "norm2": "pre_feedforward_layernorm",
               "post_mlp_norm": "post_feedforward_layernorm",
               "mlp.fc": {"gate": "mlp.gate_proj", "up": "mlp.up_proj"},
               "mlp.proj": "mlp.down_proj"}),
    # Phi-3: Llama's names for the norms and the output projections, but q|k|v in one module (rows q, k, v,
    # heads contiguous in each: exactly our attn.qkv) and gate|up in another (rows gate then up: our mlp.fc).
    PHI3_FAMILY: TensorNames(
        PHI3_FAMILY, "Phi-3-style", "model.", "layers.{}.",
        top={"tok_emb": "embed_tokens", "norm": "norm"},
        block={"norm1": "input_layernorm", "attn.qkv": "self_attn.qkv_proj", "attn.proj": "self_attn.o_proj",
               "norm2": "post_attention_layernorm", "mlp.fc": "mlp.gate_up_proj", "mlp.proj": "mlp.down_proj"}),
    # GPT-2's c_attn output columns are q | k | v, heads contiguous inside each: exactly the rows of our
    # fused attn.qkv. (attn.bias / attn.masked_bias in older files are causal-mask buffers, never read.)
    GPT2_FAMILY: TensorNames(
        GPT2_FAMILY, "GPT-2-style", "transformer.", "h.{}.",
        top={"tok_emb": "wte", "pos_emb": "wpe", "norm": "ln_f"},
        block={"norm1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
               "norm2": "ln_2", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"},
        transposed=frozenset({"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"}), body_optional=True),
    # Shapes no transformers class describes are saved under our own names (architecture LmforgeForCausalLM).
    NATIVE_FAMILY: TensorNames(
        NATIVE_FAMILY, "lmforge-native", "", "blocks.{}.",
        top={"tok_emb": "tok_emb", "pos_emb": "pos_emb", "norm": "norm"},
        block={m: m for m in (*_OURS, *_OURS_MOE)}),
}


def family(cfg: ModelConfig) -> str:
    """THE rule for which table names a model's tensors: the family of the transformers class that
    computes exactly what `cfg` does (`hf_architecture`), else our own. Exporting, importing, LoRA target
    names and adapter files all ask this, so they cannot disagree."""
    arch = hf_architecture(cfg)
    if arch in GEMMA:
        return GEMMA_FAMILY
    if arch == MIXTRAL:
        return MIXTRAL_FAMILY
    if arch == QWEN3_MOE:
        return QWEN3_MOE_FAMILY
    if arch == QWEN2_MOE:
        return QWEN2_MOE_FAMILY
    if arch == PHI3:
        return PHI3_FAMILY
    return GPT2_FAMILY if arch == GPT2 else NATIVE_FAMILY if arch == NATIVE else LLAMA_FAMILY


# A multimodal checkpoint's language model, named as its text-only sibling would be: transformers 4.x saved
# Gemma3ForConditionalGeneration as language_model.model.* / language_model.lm_head, 5.x as
# model.language_model.* / lm_head. The vision tower and projector are not ours to load.
_TEXT_MODEL_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                        "language_model.lm_head.": "lm_head."}
_OTHER_MODALITIES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")


def text_model_name(name: str) -> str | None:
    """The name a text-only model gives checkpoint tensor `name`; None for another modality's tensor."""
    if name.startswith(_OTHER_MODALITIES):
        return None
    for prefix, text in _TEXT_MODEL_PREFIXES.items():
        if name.startswith(prefix):
            return text + name[len(prefix):]
    return name


def tensor_names(cfg: ModelConfig) -> TensorNames:
    return TENSOR_NAMES[family(cfg)]


def hf_modules(cfg: ModelConfig, module: str, names: TensorNames | None = None) -> dict[str, list[str]]:
    """Their module name (under the layer prefix) -> the parts of our per-block `module` it holds, in row
    order: {"self_attn.q_proj": ["q"], ...} where a family splits it, {"attn.c_attn": ["q", "k", "v"]} where not."""
    theirs = (names or tensor_names(cfg)).block[module]
    parts = [p for p, _, _ in projection_parts(cfg, module)]
    if isinstance(theirs, dict):
        return {theirs[p]: [p] for p in parts}
    return {theirs: parts}


def hf_tensor_names(cfg: ModelConfig, ours: str, names: TensorNames | None = None) -> list[str]:
    """Our tensor name -> the checkpoint's (several, in row order, for a fused projection a family splits),
    in the family's table or in `names`."""
    names = names or tensor_names(cfg)
    module, _, kind = ours.rpartition(".")
    if module == "lm_head":
        return [f"{names.head}.{kind}"]
    if module.startswith("blocks."):
        _, layer, mine = module.split(".", 2)
        prefix = names.body + names.layer.format(layer)
        expert = _EXPERT.fullmatch(mine)
        if expert:  # mlp.experts.E.fc -> the entry "mlp.experts.{}.fc", its parts those of the dense mlp.fc
            entry = names.block[f"mlp.experts.{{}}.{expert[2]}"]
            parts = [p for p, _, _ in projection_parts(cfg, _projection(mine))]
            theirs = [entry[p] for p in parts] if isinstance(entry, dict) else [entry]
            theirs = [t.format(expert[1]) for t in theirs]
        else:
            split = mine in PROJECTIONS or isinstance(names.block[mine], dict)  # (the shared expert's fc too)
            theirs = list(hf_modules(cfg, mine, names)) if split else [names.block[mine]]
        return [f"{prefix}{t}.{kind}" for t in theirs]
    return [f"{names.body}{names.top[module]}.{kind}"]


_EXPERT = re.compile(r"mlp\.experts\.([0-9]+)\.(fc|proj)")


def _projection(module: str) -> str:
    """The per-block projection whose row parts `module` has: an expert's fc / proj are shaped as mlp.fc / mlp.proj."""
    expert = _EXPERT.fullmatch(module)
    return f"mlp.{expert[2]}" if expert else module


def _our_names(cfg: ModelConfig) -> list[str]:
    """Our tensor names for `cfg`, from a model built on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return list(GPT(cfg).state_dict())


def _is_transposed(names: TensorNames, ours: str) -> bool:
    module, _, kind = ours.rpartition(".")
    return kind == "weight" and module.startswith("blocks.") and module.split(".", 2)[2] in names.transposed


def state_dict_to_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names -> the checkpoint's names (a new dict; tied lm_head left out)."""
    if family(cfg) == NATIVE_FAMILY:  # our own names: nothing to rename
        out = dict(sd)
        if cfg.tie_embeddings:
            out.pop("lm_head.weight", None)
        return out
    names = tensor_names(cfg)
    out = {}
    for ours in _our_names(cfg):
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        w, theirs = sd[ours], hf_tensor_names(cfg, ours)
        if len(theirs) > 1:  # q|k|v or gate|up: one tensor per part
            module = _projection(ours.rpartition(".")[0].split(".", 2)[2])
            out.update(zip(theirs, w.split([stop - start for _, start, stop in projection_parts(cfg, module)], dim=0)))
        else:
            out[theirs[0]] = w.t() if _is_transposed(names, ours) else w
    return {k: v.contiguous() for k, v in out.items()}


def stored_names(cfg: ModelConfig, tensors: Collection[str]) -> TensorNames:
    """The table a checkpoint's tensors follow: the family's, except that a model Llama (or Mistral) computes
    exactly may be stored as Phi-3 stores it, q|k|v and gate|up fused - Phi-4 (14B) and Phi-3-mini-4k are
    Phi3ForCausalLM files with neither a partial rotation nor LongRoPE. They are read as they are stored
    and written back as Llama / Mistral."""
    names = tensor_names(cfg)
    phi3 = TENSOR_NAMES[PHI3_FAMILY]
    if names.family == LLAMA_FAMILY and f"{phi3.body}{phi3.layer.format(0)}{phi3.block['attn.qkv']}.weight" in tensors:
        return phi3
    return names


def without_body(cfg: ModelConfig, tensors: Collection[str]) -> bool:
    """True when a checkpoint leaves out its family's optional `body` prefix: GPT2LMHeadModel saves under
    "transformer.", but files saved from the bare GPT2Model (the original openai-community/gpt2 upload
    among them) have no prefix."""
    names = tensor_names(cfg)
    first = f"{names.top['tok_emb']}.weight"
    return names.body_optional and names.body + first not in tensors and first in tensors


def state_dict_from_hf(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A checkpoint's tensors -> our parameter names. Missing tensors are a clear error, never zeros;
    tensors we have no use for (rotary inv_freq, GPT-2's attention-mask buffers) are ignored."""
    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise UserError(f"{source}: tensor {name!r} is missing")
        return tensors[name]

    if family(cfg) == NATIVE_FAMILY:
        out = dict(tensors)
        if cfg.tie_embeddings:
            out["lm_head.weight"] = take("tok_emb.weight")
        return out
    names = stored_names(cfg, tensors)
    bare = without_body(cfg, tensors)
    out = {}
    for ours in _our_names(cfg):
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied checkpoints sometimes still ship lm_head; the embedding is the one we keep
        theirs = [t.removeprefix(names.body) if bare else t for t in hf_tensor_names(cfg, ours, names)]
        if len(theirs) > 1:
            out[ours] = torch.cat([take(t) for t in theirs], dim=0)
        else:
            w = take(theirs[0])
            out[ours] = w.t() if _is_transposed(names, ours) else w
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out
