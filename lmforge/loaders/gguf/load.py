"""Loading a GGUF file into our model: `read_gguf` (config, state dict, tokenizer) and `describe_gguf` (the
same checks from the header alone, for `lmforge list/show/import`).

Tensors are checked against the config before any data is read. Then, by default, the matrices stay in
their GGML type: `packed_tensors` hands each one over as a view of the memory-mapped file (the q and k rows
of a `llama` file, whose rows must be un-permuted, are read into a packed copy of their own), so a 4 GB
Q4_K_M file takes about 4 GB of memory, not the ~28 GB of its fp32 form. A mixture of experts' stacked 3-D
tensors are no exception: each expert's matrix is a contiguous slice of its tensor's bytes
(`GGUFTensorInfo.slice`), so every expert stays packed in the file's type as a view of its own. With an explicit `dtype` every
tensor is dequantized to float instead, one at a time as `state_dict_from_hf` asks for them, un-permuted for
`llama` and renamed GGUF -> HF -> ours. A module of its own because it is where the reader, names, config
and vocab modules meet.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.loaders.gguf.config import FUSED_ARCHS, ROPE_TENSORS, base_config, check_architecture, with_rope_tensors
from lmforge.loaders.gguf.names import (
    expected_shapes,
    hf_sources,
    is_offset_norm,
    per_expert_layout,
    permute_heads,
    rope_unpermute,
)
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
from lmforge.loaders.hf import hf_architecture
from lmforge.loaders.hf_tensors import hf_tensor_names, state_dict_from_hf
from lmforge.loaders.model_dir import check_tokenizer as check_tokenizer_fits
from lmforge.loaders.packed import build_packed_model
from lmforge.model.gpt import GPT
from lmforge.quant.ggml import SUPPORTED as GGML_SUPPORTED
from lmforge.quant.linear import Part
from lmforge.tokenizer import Tokenizer


@dataclass
class GGUFModel:
    """What `read_gguf` returns: everything needed to build `GPT(config)` and run it."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]  # our parameter names, lm_head.weight included even when tied (float)
    tokenizer: Tokenizer
    metadata: dict[str, Any]  # the KV metadata, without the vocabulary arrays (tokens, merges, ...)
    file_type: str  # "F32", "F16", "Q8_0", "Q4_K_M", "mixed (Q4_K, Q6_K)", ...


def _check_tensor_set(path: str, cfg: ModelConfig, tensors: dict[str, GGUFTensorInfo], arch: str) -> None:
    """Refuse a missing, unexpected or wrongly shaped tensor before any data is read."""
    per_expert = per_expert_layout(tensors)
    if per_expert and cfg.n_layers * cfg.n_experts * 3 > len(tensors):  # before looping over the experts
        raise UserError(f"{path}: {cfg.n_layers} layers of {cfg.n_experts} experts but only {len(tensors)} tensors")
    want = expected_shapes(cfg, per_expert=per_expert, fused=arch in FUSED_ARCHS)
    for name, shape in want.items():
        if name not in tensors:
            raise UserError(f"{path}: tensor {name!r} is missing")
        if tensors[name].shape != shape:
            raise UserError(f"{path}: tensor {name!r} has shape {list(tensors[name].shape)}, expected {list(shape)}")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise UserError(f"{path}: tensor {extra[0]!r} is not part of a {hf_architecture(cfg)}-shaped model "
                        f"({len(extra)} unexpected tensors)")


def _source_infos(cfg: ModelConfig, header: GGUFHeader, arch: str) -> dict[str, GGUFTensorInfo]:
    """Hugging Face name -> the GGUF tensor holding it: the file's own tensor, one expert's slice of a
    stacked one, or a row range of a fused one (a checked tensor set is assumed)."""
    tensors = {t.name: t for t in header.tensors}
    sources = hf_sources(cfg, per_expert=per_expert_layout(tensors), fused=arch in FUSED_ARCHS)

    def info(name: str, part: Any) -> GGUFTensorInfo:
        t = tensors[name]
        return t if part is None else t.slice(part) if isinstance(part, int) else t.rows(*part)

    return {hf: info(name, part) for hf, (name, part) in sources.items()}


class _LazyTensors(Mapping):
    """HF-named tensors of a GGUF file, dequantized (and un-permuted) only when asked for.

    `state_dict_from_hf` concatenates q|k|v and gate|up as it goes; reading each source when it is needed
    lets it be freed right after, so a load holds about one float copy of the weights, not two.
    """

    def __init__(self, path: str, cfg: ModelConfig, arch: str, header: GGUFHeader, data: np.ndarray,
                 dtype: torch.dtype) -> None:
        self.path, self.cfg, self.arch, self.data, self.dtype = path, cfg, arch, data, dtype
        self.infos = _source_infos(cfg, header, arch)

    def __getitem__(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        arr = dequantize(self.path, self.data, info)
        heads = permute_heads(self.cfg, info.name) if self.arch == "llama" else None
        if heads is not None:
            arr = rope_unpermute(arr, heads)
        elif is_offset_norm(self.cfg, info.name):  # Gemma's norms are stored as 1 + w
            arr = arr - 1
        return torch.from_numpy(np.ascontiguousarray(arr)).to(self.dtype)

    def __iter__(self):
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)


def _read_tensors(path: str, cfg: ModelConfig, arch: str, header: GGUFHeader, data: np.ndarray,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our state dict: dequantize each tensor, undo the llama rope permutation, rename GGUF -> HF -> ours."""
    return state_dict_from_hf(cfg, _LazyTensors(path, cfg, arch, header, data, dtype), source=path)


def _view(data: np.ndarray, info: GGUFTensorInfo) -> torch.Tensor:
    """The bytes of one tensor as a uint8 tensor (rows, row bytes) sharing the memory map (read-only: the
    model never writes its weights, so torch's warning about a non-writable array does not apply)."""
    raw = data[info.offset:info.offset + info.n_bytes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(raw)
    rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
    return t.reshape(rows, -1)


def _read_rows(path: str, info: GGUFTensorInfo) -> np.ndarray:
    """One tensor's bytes read into memory of its own (rows, row bytes), not through the map: for tensors
    that must be rearranged, so the file's pages of them are never mapped in beside the copy."""
    rows = int(np.prod(info.shape[:-1]))
    with open(path, "rb") as f:
        buf = os.pread(f.fileno(), info.n_bytes, info.offset)
    if len(buf) != info.n_bytes:
        raise UserError(f"{path}: the file changed while it was being read")
    return np.frombuffer(buf, dtype=np.uint8).reshape(rows, -1)


def packed_tensors(path: str, cfg: ModelConfig, arch: str, header: GGUFHeader,
                   data: np.ndarray) -> dict[str, torch.Tensor | list[Part]]:
    """Our tensor names -> `Part`s in their GGML type for the matrices (q|k|v and gate|up as several parts,
    each in its own type), float32 tensors for the rest (norms, biases). For `build_packed_model`."""
    with torch.device("meta"):
        names = list(GPT(cfg).state_dict())
    lazy = _LazyTensors(path, cfg, arch, header, data, torch.float32)
    infos = lazy.infos
    out: dict[str, torch.Tensor | list[Part]] = {}
    for ours in names:
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue  # build_packed_model points the head at the embedding's bytes
        theirs = hf_tensor_names(cfg, ours)
        first = infos[theirs[0]]
        if len(first.shape) != 2:
            out[ours] = lazy[theirs[0]] if len(theirs) == 1 else torch.cat([lazy[t] for t in theirs])
            continue
        parts = []
        for t in theirs:
            info = infos[t]
            qtype = info.type_name
            if qtype not in GGML_SUPPORTED and qtype not in ("F32", "F16", "BF16"):
                raise UserError(f"{path}: tensor {info.name!r} has GGML type {qtype}, which lmforge cannot run "
                                f"(supported: F32, F16, BF16, {', '.join(GGML_SUPPORTED)})")
            heads = permute_heads(cfg, info.name) if arch == "llama" else None
            if heads is not None:
                rows = torch.from_numpy(np.ascontiguousarray(rope_unpermute(_read_rows(path, info), heads)))
            else:
                rows = _view(data, info)
            parts.append(Part(rows, qtype, info.shape[0]))
        out[ours] = parts
    return out


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
    # the file's data is mapped only for the (tiny) rope tensors, when there are some
    data = open_data(path_str, header.size) if any(name in tensors for name in ROPE_TENSORS) else None
    try:
        cfg = with_rope_tensors(path_str, cfg, arch, header.metadata, data, tensors)
    finally:
        del data
    _check_tensor_set(path_str, cfg, tensors, arch)
    if check_tokenizer:
        tokenizer = tokenizer_from_metadata(path_str, header.metadata)
        check_tokenizer_fits(cfg, tokenizer, source=path_str)
        tokenizer.check_chat_template()
    template = header.metadata.get("tokenizer.chat_template")
    return {"architecture": arch, "config": cfg, "file_type": describe_file_type(header.metadata, header.tensors),
            "parameters": sum(t.n_elements for t in header.tensors if t.name not in ROPE_TENSORS),
            "chat_template": template if isinstance(template, str) else None}


def load_gguf_packed(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[GPT, GGUFModel]:
    """A GGUF file as a ready model whose matrices stay in their GGML types (views of the mapped file),
    plus what `read_gguf` describes (its `state_dict` left empty: the model holds the weights)."""
    path_str, header, tensors, arch, cfg = _header_and_config(path)
    data = open_data(path_str, header.size)  # the views keep the map alive for as long as the model lives
    cfg = with_rope_tensors(path_str, cfg, arch, header.metadata, data, tensors)
    _check_tensor_set(path_str, cfg, tensors, arch)
    tokenizer = tokenizer_from_metadata(path_str, header.metadata)
    check_tokenizer_fits(cfg, tokenizer, source=path_str)
    model = build_packed_model(cfg, packed_tensors(path_str, cfg, arch, header, data), source=path_str,
                               device=device)
    return model, GGUFModel(cfg, {}, tokenizer, public_metadata(header.metadata),
                            describe_file_type(header.metadata, header.tensors))


def read_gguf(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> GGUFModel:
    """Load a llama (Mixtral too) / qwen2 / qwen3 / qwen3moe / gemma2 / gemma3 / phi3 GGUF file: config, our
    state dict (float32 unless `dtype`), tokenizer.

    Every structural problem, unsupported feature or inconsistency is a one-line `UserError` naming the
    file; nothing is allocated from a count the file has not been shown to back with bytes.
    """
    path_str, header, tensors, arch, cfg = _header_and_config(path)
    data = open_data(path_str, header.size)
    try:
        cfg = with_rope_tensors(path_str, cfg, arch, header.metadata, data, tensors)
        _check_tensor_set(path_str, cfg, tensors, arch)
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
