"""Export: `write_gguf` writes a llama.cpp-loadable GGUF (f32/f16/q8_0/q4_0/q4_k_m/q5_k_m/q6_k) from our config,
state dict and tokenizer, atomically, after checking everything.

A module of its own because export runs the other way from loading (ours -> HF -> GGUF names, q/k rows
permuted, a mixture of experts' matrices stacked per layer as llama.cpp's `ffn_*_exps`, tensors quantized by
`lmforge.quant` -- a stacked tensor row by row, as a 2-D one --, types chosen by `lmforge.quant.mix`) and
only `lmforge export` needs it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.io import atomic_write
from lmforge.loaders.gguf.config import FUSED_ARCHS, add_hparams, export_arch, llama3_rope_factors
from lmforge.loaders.gguf.names import (
    ROPE_FACTORS_LONG,
    ROPE_FACTORS_SHORT,
    ROPE_FREQS,
    Part,
    expected_shapes,
    hf_sources,
    is_offset_norm,
    permute_heads,
    rope_permute,
)
from lmforge.loaders.gguf.reader import gguf_package, short
from lmforge.loaders.gguf.vocab import add_tokenizer, export_vocab
from lmforge.loaders.hf_tensors import state_dict_from_hf, state_dict_to_hf
from lmforge.quant.ggml import block_sizes, qtype_name, quantize
from lmforge.quant.mix import FTYPES, file_type_name, tensor_types
from lmforge.tokenizer import Tokenizer


GGUF_TYPES = FTYPES  # what write_gguf accepts: f32, f16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k


def _part_shape(want: dict[str, tuple[int, ...]], name: str, part: Part) -> tuple[int, ...] | None:
    """The shape of one HF tensor's part of GGUF tensor `name` (see `names.Part`)."""
    if name not in want:
        return None
    if part is None:
        return want[name]
    return want[name][1:] if isinstance(part, int) else (part[1] - part[0], *want[name][1:])


def _export_tensors(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], arch: str) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array, q/k permuted for `llama`, experts stacked, `phi3`'s projections fused,
    rope_freqs added for Llama-3 scaling and LongRoPE's factors for Phi-3's, Gemma's norms stored as 1 + w (as
    llama.cpp's converter stores them)."""
    fused = arch in FUSED_ARCHS
    want = expected_shapes(cfg, fused=fused)
    _check_our_keys(cfg, want, state_dict, fused)
    hf = state_dict_to_hf(cfg, state_dict)
    sources = hf_sources(cfg, fused=fused)
    out: dict[str, np.ndarray] = {}
    pieces: dict[str, dict[Any, np.ndarray]] = {}
    if ROPE_FREQS in want:
        out[ROPE_FREQS] = llama3_rope_factors(cfg)
    if ROPE_FACTORS_LONG in want:
        out[ROPE_FACTORS_LONG] = np.asarray(cfg.rope_scaling["long_factor"], dtype=np.float32)
        out[ROPE_FACTORS_SHORT] = np.asarray(cfg.rope_scaling["short_factor"], dtype=np.float32)
    for hf_name, t in hf.items():
        name, part = sources[hf_name]
        arr = t.detach().to("cpu", torch.float32).numpy()
        shape = _part_shape(want, name, part)
        if tuple(arr.shape) != shape:
            raise UserError(f"GGUF export: {hf_name} has shape {list(arr.shape)}, expected {list(shape or ())}")
        if part is not None:  # one expert's matrix of a stacked tensor, or rows of a fused one
            pieces.setdefault(name, {})[part] = arr
            continue
        heads = permute_heads(cfg, name) if arch == "llama" else None
        out[name] = rope_permute(arr, heads) if heads is not None else arr + 1 if is_offset_norm(cfg, name) else arr
    for name, parts in pieces.items():  # every part is there: state_dict_to_hf names each of them
        ordered = [parts[k] for k in sorted(parts, key=lambda k: k if isinstance(k, int) else k[0])]
        out[name] = np.stack(ordered) if isinstance(next(iter(parts)), int) else np.concatenate(ordered)
    missing = sorted(set(want) - set(out))
    if missing:
        raise UserError(f"GGUF export: the state dict has no tensor for {missing[0]}")
    return out


def _check_our_keys(cfg: ModelConfig, want: dict[str, tuple[int, ...]], state_dict: dict[str, torch.Tensor],
                    fused: bool) -> None:
    """Refuse a state dict with missing or extra parameters (extra ones, e.g. unmerged LoRA or quantized
    weights, would otherwise be silently dropped). The expected names come from mapping the expected GGUF
    tensors back through `state_dict_from_hf` on the meta device: nothing is allocated."""
    hf = {theirs: torch.empty(_part_shape(want, name, part), device="meta")
          for theirs, (name, part) in hf_sources(cfg, fused=fused).items()}
    expected = set(state_dict_from_hf(cfg, hf))
    missing = sorted(expected - set(state_dict))
    if missing:
        raise UserError(f"GGUF export: the state dict has no tensor {missing[0]!r}")
    extra = sorted(set(state_dict) - expected)
    if extra:
        raise UserError(f"GGUF export: unexpected tensor {extra[0]!r} in the state dict (merge LoRA adapters and "
                        f"undo quantization before exporting)")


def _encode_tensor(arr: np.ndarray, qtype: str) -> np.ndarray:
    """float32 array -> what GGUFWriter.add_tensor takes: F32/F16 as such, anything else the raw bytes of
    `lmforge.quant.ggml.quantize` (gguf-py's quantizers, or ours for the K-quants)."""
    if qtype == "F32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == "F16":
        return np.ascontiguousarray(arr, dtype=np.float16)
    packed = quantize(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), qtype).numpy()
    return packed.reshape(*arr.shape[:-1], -1)


def write_gguf(path: str | os.PathLike, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], tokenizer: Tokenizer,
               *, qtype: str = "f16", name: str | None = None, eos_token_ids: list[int] | None = None,
               types: Mapping[str, str] | None = None, progress: bool = False) -> dict[str, str]:
    """Write a llama.cpp-loadable GGUF (arch `llama`, `qwen2` for q/k/v biases, `qwen3` for q/k norms; a mixture of
    experts as `llama` (Mixtral) or `qwen3moe`; `gemma2` / `gemma3`; `phi3` for a partial rotation or LongRoPE),
    atomically; returns {tensor name: GGML type written}.

    `qtype` is the file type, one of GGUF_TYPES (f32, f16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k): it sets
    general.file_type and, unless `types` gives every tensor's GGML type explicitly, the per-tensor
    types by llama.cpp's rules (`lmforge.quant.mix.tensor_types`: vectors F32, the output projection
    Q6_K in the 4/5/6-bit mixes, attn_v/ffn_down Q6_K in some layers of the _M mixes, rows that don't
    split into blocks falling back as llama.cpp does). `name` defaults to `cfg.name`. GGUF has one EOS id
    and one end-of-turn id: `eos_token_ids[0]` (default: the tokenizer's EOS) and the tokenizer's
    end-of-turn token (default: the next of `eos_token_ids`); llama.cpp stops on both. `progress` shows
    a bar while tensors are quantized. Everything is checked (architecture, tokenizer, tensor names and
    shapes, types) before the temp file is created, so a refused export leaves nothing behind; an
    error or Ctrl-C while quantizing leaves nothing either.
    """
    gguf = gguf_package()
    ftype = str(qtype).lower()
    if ftype not in GGUF_TYPES:
        raise UserError(f"GGUF type {short(qtype)} is not supported for export; choose one of {', '.join(GGUF_TYPES)}")
    arch = export_arch(cfg)
    vocab = export_vocab(cfg, tokenizer)
    tensors = _export_tensors(cfg, state_dict, arch)
    chosen = tensor_types({n: a.shape for n, a in tensors.items()}, ftype)
    if types is not None:
        chosen = _checked_types(types, tensors)
    encoded = {}
    total = sum(a.size for a in tensors.values())
    with tqdm(total=total, unit="w", unit_scale=True, desc=f"quantizing ({ftype})", disable=not progress,
              leave=False) as bar:
        for tname in _write_order(tensors):
            arr = tensors[tname]
            encoded[tname] = (_encode_tensor(arr, chosen[tname]), chosen[tname])
            bar.update(arr.size)
    quantized = any(t not in ("F32", "F16") for _, t in encoded.values())

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        add_hparams(w, cfg, _loadable_name(name or cfg.name, vocab))
        w.add_file_type(gguf.LlamaFileType[file_type_name(ftype)])
        if quantized:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(w, tokenizer, vocab, eos_token_ids)
        for tname in _write_order(encoded):
            data, t = encoded[tname]
            raw = gguf.GGMLQuantizationType[t] if data.dtype == np.uint8 else None
            w.add_tensor(tname, data, raw_dtype=raw)  # a (rows, bytes) shape: gguf-py derives the values' shape
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)
    return chosen


# llama.cpp (llama-vocab.cpp) sets token attributes for a model whose general.name contains "phi-3" or "phi3"
# by looking these tokens up, and fails to load the file when one is missing (as in Phi-4-mini's vocabulary)
_PHI3_NAMED_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _loadable_name(name: str, vocab: dict[str, Any]) -> str:
    """`name`, unless llama.cpp would then refuse the file (see _PHI3_NAMED_TOKENS): then with "phi3" / "phi-3"
    spelled "phi 3", which names the same model and which llama.cpp leaves alone."""
    if not any(t in name.lower() for t in ("phi3", "phi-3")) or set(_PHI3_NAMED_TOKENS) <= set(vocab["tokens"]):
        return name
    return re.sub("phi-?3", "phi 3", name, flags=re.IGNORECASE)


def _checked_types(types: Mapping[str, str], tensors: dict[str, np.ndarray]) -> dict[str, str]:
    """Explicit per-tensor types: one for every tensor, each a type we can write whose blocks split the row."""
    missing = sorted(set(tensors) - set(types))
    if missing:
        raise UserError(f"GGUF export: no type given for tensor {missing[0]}")
    out = {}
    for n, arr in tensors.items():
        t = qtype_name(types[n])
        block, _ = block_sizes(t)
        if arr.shape[-1] % block:
            raise UserError(f"GGUF export: {n} has rows of {arr.shape[-1]} values, not whole {t} blocks of {block}")
        out[n] = t
    return out


def _write_order(encoded: dict[str, Any]) -> list[str]:
    """token_embd, rope_freqs (or LongRoPE's factors), blocks in order, output_norm, output: the order
    llama.cpp's converter uses."""
    def key(n: str) -> tuple[int, int, str]:
        if n.startswith("blk."):
            return (1, int(n.split(".")[1]), n)
        return ({"token_embd.weight": 0, ROPE_FREQS: 0, ROPE_FACTORS_LONG: 0, ROPE_FACTORS_SHORT: 0}.get(n, 2), 0, n)

    return sorted(encoded, key=key)
