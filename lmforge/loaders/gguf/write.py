"""Export: `write_gguf` writes a llama.cpp-loadable GGUF (f32/f16/q8_0/q4_0) from our config, state dict and
tokenizer, atomically, after checking everything.

A module of its own because export runs the other way from loading (ours -> HF -> GGUF names, q/k rows
permuted, tensors quantized with `gguf.quants`) and only `lmforge export` needs it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.io import atomic_write
from lmforge.loaders.gguf.config import add_hparams, export_arch, llama3_rope_factors
from lmforge.loaders.gguf.names import ROPE_FREQS, expected_shapes, gguf_to_hf, hf_to_gguf, permute_heads, rope_permute
from lmforge.loaders.gguf.reader import gguf_package, short
from lmforge.loaders.gguf.vocab import add_tokenizer, export_vocab
from lmforge.loaders.hf import state_dict_from_hf, state_dict_to_hf
from lmforge.tokenizer import Tokenizer


GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")  # what write_gguf accepts


def _export_tensors(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], arch: str) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array, q/k permuted for `llama`, rope_freqs added for Llama-3 scaling."""
    want = expected_shapes(cfg)
    _check_our_keys(cfg, want, state_dict)
    hf = state_dict_to_hf(cfg, state_dict)
    out: dict[str, np.ndarray] = {}
    if ROPE_FREQS in want:
        out[ROPE_FREQS] = llama3_rope_factors(cfg)
    for hf_name, t in hf.items():
        name = hf_to_gguf(hf_name)
        arr = t.detach().to("cpu", torch.float32).numpy()
        if tuple(arr.shape) != want.get(name):
            raise UserError(f"GGUF export: {hf_name} has shape {list(arr.shape)}, expected {list(want.get(name, ()))}")
        heads = permute_heads(cfg, name) if arch == "llama" else None
        out[name] = rope_permute(arr, heads) if heads is not None else arr
    missing = sorted(set(want) - set(out))
    if missing:
        raise UserError(f"GGUF export: the state dict has no tensor for {missing[0]}")
    return out


def _check_our_keys(cfg: ModelConfig, want: dict[str, tuple[int, ...]], state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse a state dict with missing or extra parameters (extra ones, e.g. unmerged LoRA or quantized
    weights, would otherwise be silently dropped). The expected names come from mapping the expected GGUF
    tensors back through `state_dict_from_hf` on the meta device: nothing is allocated."""
    hf = {gguf_to_hf(n): torch.empty(shape, device="meta") for n, shape in want.items() if n != ROPE_FREQS}
    expected = set(state_dict_from_hf(cfg, hf))
    missing = sorted(expected - set(state_dict))
    if missing:
        raise UserError(f"GGUF export: the state dict has no tensor {missing[0]!r}")
    extra = sorted(set(state_dict) - expected)
    if extra:
        raise UserError(f"GGUF export: unexpected tensor {extra[0]!r} in the state dict (merge LoRA adapters and "
                        f"undo quantization before exporting)")


def _storage_type(name: str, arr: np.ndarray, qtype: str, tied: bool) -> Any:
    """The ggml type one tensor is written as. Vectors (norms, biases, rope_freqs) stay F32 as in
    llama.cpp; for q4_0 the output projection (token_embd when tied) keeps Q8_0, as llama.cpp keeps it at
    a higher precision than the rest; rows that don't split into blocks fall back to F16."""
    T = gguf_package().GGMLQuantizationType
    if arr.ndim == 1 or qtype == "f32":
        return T.F32
    if qtype == "f16":
        return T.F16
    output = name == "output.weight" or (tied and name == "token_embd.weight")
    want = T.Q8_0 if qtype == "q8_0" or output else T.Q4_0
    return want if arr.shape[-1] % gguf_package().GGML_QUANT_SIZES[want][0] == 0 else T.F16


def _encode_tensor(arr: np.ndarray, t: Any) -> np.ndarray:
    gguf = gguf_package()
    if t == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if t == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), t)


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def write_gguf(path: str | os.PathLike, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], tokenizer: Tokenizer,
               *, qtype: str = "f16", name: str | None = None, eos_token_ids: list[int] | None = None) -> None:
    """Write a llama.cpp-loadable GGUF (arch `llama`, or `qwen2` for q/k/v biases), atomically.

    `qtype` is one of GGUF_TYPES: f32; f16 (matrices F16); q8_0 (matrices Q8_0); q4_0 (matrices Q4_0, the
    output projection Q8_0). Vectors stay F32, and matrices whose rows don't split into 32-value blocks
    are written F16. `name` defaults to `cfg.name`. GGUF has one EOS id and one end-of-turn id:
    `eos_token_ids[0]` (default: the tokenizer's EOS) and the tokenizer's end-of-turn token (default:
    the next of `eos_token_ids`); llama.cpp stops on both. Everything is checked (architecture,
    tokenizer, tensor names and shapes) before the temp file is created, so a refused export leaves
    nothing behind.
    """
    gguf = gguf_package()
    qtype = str(qtype).lower()
    if qtype not in GGUF_TYPES:
        raise UserError(f"GGUF type {short(qtype)} is not supported for export; choose one of {', '.join(GGUF_TYPES)}")
    arch = export_arch(cfg)
    vocab = export_vocab(cfg, tokenizer)
    tensors = _export_tensors(cfg, state_dict, arch)
    encoded = {}
    for tname, arr in tensors.items():
        t = _storage_type(tname, arr, qtype, cfg.tie_embeddings)
        encoded[tname] = (_encode_tensor(arr, t), t)
    quantized = any(t not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) for _, t in encoded.values())

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        add_hparams(w, cfg, name or cfg.name)
        w.add_file_type(gguf.LlamaFileType[_FILE_TYPES[qtype]])
        if quantized:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(w, tokenizer, vocab, eos_token_ids)
        for tname in _write_order(encoded):
            data, t = encoded[tname]
            w.add_tensor(tname, data, raw_dtype=t if data.dtype == np.uint8 else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)


def _write_order(encoded: dict[str, Any]) -> list[str]:
    """token_embd, rope_freqs, blocks in order, output_norm, output: the order llama.cpp's converter uses."""
    def key(n: str) -> tuple[int, int, str]:
        if n.startswith("blk."):
            return (1, int(n.split(".")[1]), n)
        return ({"token_embd.weight": 0, ROPE_FREQS: 0}.get(n, 2), 0, n)

    return sorted(encoded, key=key)
