"""Loading a GGUF file into our model: `read_gguf` (config, state dict, tokenizer) and `describe_gguf` (the
same checks from the header alone, for `lmforge list/show/import`).

Tensors are checked against the config before any data is read, then dequantized to float (at `dtype`) one
at a time as `state_dict_from_hf` asks for them, un-permuted for `llama` and renamed GGUF -> HF -> ours.
A module of its own because it is where the reader, names, config and vocab modules meet.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.loaders.gguf.config import base_config, check_architecture, with_llama3_rope
from lmforge.loaders.gguf.names import ROPE_FREQS, expected_shapes, gguf_to_hf, permute_heads, rope_unpermute
from lmforge.loaders.gguf.reader import (
    GGUFHeader,
    GGUFTensorInfo,
    describe_file_type,
    dequantize,
    open_data,
    parse_file,
    public_metadata,
)
from lmforge.loaders.gguf.vocab import tokenizer_from_metadata
from lmforge.loaders.hf import hf_architecture, state_dict_from_hf
from lmforge.loaders.model_dir import check_tokenizer as check_tokenizer_fits
from lmforge.tokenizer import Tokenizer


@dataclass
class GGUFModel:
    """What `read_gguf` returns: everything needed to build `GPT(config)` and run it."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # our parameter names, lm_head.weight included even when tied
    tokenizer: Tokenizer
    metadata: dict[str, Any]  # the KV metadata, without the vocabulary arrays (tokens, merges, ...)
    file_type: str  # "F32", "F16", "Q8_0", "Q4_K_M", "mixed (Q4_K, Q6_K)", ...


def _check_tensor_set(path: str, cfg: ModelConfig, tensors: dict[str, GGUFTensorInfo]) -> None:
    """Refuse a missing, unexpected or wrongly shaped tensor before any data is read."""
    want = expected_shapes(cfg)
    for name, shape in want.items():
        if name not in tensors:
            raise UserError(f"{path}: tensor {name!r} is missing")
        if tensors[name].shape != shape:
            raise UserError(f"{path}: tensor {name!r} has shape {list(tensors[name].shape)}, expected {list(shape)}")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise UserError(f"{path}: tensor {extra[0]!r} is not part of a {hf_architecture(cfg)}-shaped model "
                        f"({len(extra)} unexpected tensors)")


class _LazyTensors(Mapping):
    """HF-named tensors of a GGUF file, dequantized (and un-permuted) only when asked for.

    `state_dict_from_hf` concatenates q|k|v and gate|up as it goes; reading each source when it is needed
    lets it be freed right after, so a load holds about one float copy of the weights, not two.
    """

    def __init__(self, path: str, cfg: ModelConfig, arch: str, header: GGUFHeader, data: np.ndarray,
                 dtype: torch.dtype) -> None:
        self.path, self.cfg, self.arch, self.data, self.dtype = path, cfg, arch, data, dtype
        self.infos = {gguf_to_hf(t.name): t for t in header.tensors if t.name != ROPE_FREQS}

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        arr = dequantize(self.path, self.data, info)
        heads = permute_heads(self.cfg, info.name) if self.arch == "llama" else None
        if heads is not None:
            arr = rope_unpermute(arr, heads)
        return torch.from_numpy(np.ascontiguousarray(arr)).to(self.dtype)

    def __iter__(self):
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)


def _read_tensors(path: str, cfg: ModelConfig, arch: str, header: GGUFHeader, data: np.ndarray,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our state dict: dequantize each tensor, undo the llama rope permutation, rename GGUF -> HF -> ours."""
    return state_dict_from_hf(cfg, _LazyTensors(path, cfg, arch, header, data, dtype), source=path)


def _header_and_config(path: str | os.PathLike) -> tuple[str, Any, dict[str, Any], str, Any]:
    """(path as text, parsed header, tensor table by name, architecture, config before llama-3 rope scaling):
    what describing a file and loading it both start from."""
    path_str = str(path)
    header = parse_file(path)
    tensors = {t.name: t for t in header.tensors}
    arch = check_architecture(path_str, header.metadata)
    return path_str, header, tensors, arch, base_config(path_str, header.metadata, tensors, arch)


def describe_gguf(path: str | os.PathLike, *, check_tokenizer: bool = True) -> dict[str, Any]:
    """What `lmforge list/show/import` need, from the header alone (no tensor is dequantized): the config,
    architecture, parameter count, file type and chat template. Validates the header, the tensor table
    against the config and (unless `check_tokenizer=False`) the tokenizer metadata."""
    path_str, header, tensors, arch, cfg = _header_and_config(path)
    if ROPE_FREQS in tensors:
        data = open_data(path_str, header.size)
        try:
            cfg = with_llama3_rope(path_str, cfg, arch, header.metadata, data, tensors[ROPE_FREQS])
        finally:
            del data
    _check_tensor_set(path_str, cfg, tensors)
    if check_tokenizer:
        tokenizer = tokenizer_from_metadata(path_str, header.metadata)
        check_tokenizer_fits(cfg, tokenizer, source=path_str)
        tokenizer.check_chat_template()
    template = header.metadata.get("tokenizer.chat_template")
    return {"architecture": arch, "config": cfg, "file_type": describe_file_type(header.metadata, header.tensors),
            "parameters": sum(t.n_elements for t in header.tensors if t.name != ROPE_FREQS),
            "chat_template": template if isinstance(template, str) else None}


def read_gguf(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> GGUFModel:
    """Load a llama / qwen2 GGUF file: config, our state dict (float32 unless `dtype`), tokenizer.

    Every structural problem, unsupported feature or inconsistency is a one-line `UserError` naming the
    file; nothing is allocated from a count the file has not been shown to back with bytes.
    """
    path_str, header, tensors, arch, cfg = _header_and_config(path)
    data = open_data(path_str, header.size)
    try:
        if ROPE_FREQS in tensors:
            cfg = with_llama3_rope(path_str, cfg, arch, header.metadata, data, tensors[ROPE_FREQS])
        _check_tensor_set(path_str, cfg, tensors)
        tokenizer = tokenizer_from_metadata(path_str, header.metadata)
        check_tokenizer_fits(cfg, tokenizer, source=path_str)
        state_dict = _read_tensors(path_str, cfg, arch, header, data, dtype or torch.float32)
    finally:
        mm = getattr(data, "_mmap", None)
        del data
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere; the GC closes it later
                pass
    return GGUFModel(cfg, state_dict, tokenizer, public_metadata(header.metadata),
                     describe_file_type(header.metadata, header.tensors))
