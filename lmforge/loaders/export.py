"""`lmforge export` and `lmforge merge`: write a model (ours, imported, or an adapter folded into its base)
in the formats other tools read.

`--format hf` writes a Hugging Face directory that transformers, vLLM and llama.cpp's converter read;
`--format gguf` writes one GGUF file for llama.cpp, Ollama and LM Studio. Either way the chat template and
the EOS tokens travel with the weights, and a Modelfile's sampling defaults become the exported
generation defaults (generation_config.json for HF). `merge_adapter` writes a LoRA run as a plain model
directory (its adapter folded into the base weights), with the lineage of both.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmforge.checkpoint import transaction
from lmforge.errors import UserError
from lmforge.loaders.auto import Loaded, load
from lmforge.loaders.hf import NATIVE, hf_architecture
from lmforge.loaders.model_dir import read_lmforge_meta, write_model_files
from lmforge.loaders.peft import adapter_base, is_adapter_dir
from lmforge.paths import resolve

# Modelfile parameter -> generation_config.json key (transformers' names).
_GENERATION_KEYS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                    "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_new_tokens"}


def _why_not_hf(cfg) -> str:
    reasons = []
    if cfg.positions == "sinusoidal":
        reasons.append("sinusoidal positions")
    if cfg.norm == "layernorm" and cfg.positions == "rope":
        reasons.append("LayerNorm with RoPE")
    if cfg.mlp == "gelu" and cfg.positions == "rope":
        reasons.append("a GELU MLP with RoPE")
    if cfg.positions == "learned" and not (cfg.attention_bias and cfg.mlp_bias and cfg.norm == "layernorm"):
        reasons.append("learned positions without GPT-2's LayerNorm and biases")
    return ", ".join(reasons) or "a combination of options no transformers architecture has"


def export_hf(loaded: Loaded, out: Path, *, dtype: torch.dtype = torch.float32) -> None:
    """Write `loaded` as a transformers-loadable directory (Llama, Qwen2, Qwen3 or GPT-2 architecture)."""
    cfg = loaded.model.config
    if hf_architecture(cfg) == NATIVE:
        raise UserError(f"--format hf needs a shape transformers has a class for; this model has {_why_not_hf(cfg)} "
                        f"(it stays loadable by lmforge in its own format)")
    params = loaded.modelfile.parameters
    generation = {v: params[k] for k, v in _GENERATION_KEYS.items() if k in params}
    if generation:
        generation["do_sample"] = params.get("temperature", 1.0) > 0
    model = loaded.model.to(dtype)
    try:
        with transaction(out) as staging:
            write_model_files(staging, model, tokenizer=loaded.tokenizer, generation=generation,
                              lineage={"exported_from": str(loaded.source), "source_format": loaded.format})
    finally:
        loaded.model.float()


def export_gguf(loaded: Loaded, out: Path, *, qtype: str = "f16") -> None:
    """Write `loaded` as one GGUF file (the llama.cpp architecture its family maps to: llama, qwen2, qwen3,
    qwen3moe, gemma2, gemma3, phi3) with its tokenizer and chat template."""
    from lmforge.loaders.gguf import write_gguf

    if out.is_dir():
        raise UserError(f"{out} is a directory; --format gguf writes one file (e.g. --out model.gguf)")
    model = loaded.model.float()
    name = loaded.model.config.name or loaded.source.name
    write_gguf(out, model.config, model.state_dict(), loaded.tokenizer, qtype=qtype, name=name,
               eos_token_ids=list(loaded.tokenizer.eos_ids))


def merge_adapter(adapter: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, str]:
    """Fold the LoRA adapter `adapter` (a path or store name of an adapter directory) into its base model and
    write the result as a model directory `out`, in one transaction; returns (the adapter's path, its base).

    The lineage the run recorded is kept, plus where the adapter and the base came from.
    """
    src = resolve(str(adapter))
    if not is_adapter_dir(src):
        raise UserError(f"{adapter} is not a LoRA adapter directory (it needs adapter_config.json and no config.json)")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    loaded = load(src, merge=True)
    base = adapter_base(src)
    lineage = {**read_lmforge_meta(src).get("lineage", {}), "merged_from_adapter": str(src), "base": base}
    with transaction(out) as staging:
        write_model_files(staging, loaded.model, tokenizer=loaded.tokenizer, lineage=lineage)
    return src, base
