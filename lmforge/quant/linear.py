"""Linear and embedding layers whose weights stay in their stored bytes, swapped into a model from outside it.

Why: a 4-bit 7B GGUF is ~4 GB on disk and ~28 GB once dequantized to fp32; a bf16 checkpoint doubles in
fp32. `GGMLLinear` and `GGMLEmbedding` keep the bytes as stored (uint8 buffers, often views of the
memory-mapped file, so loading copies nothing) and compute from them:

- `GGMLLinear.forward` hands each part to the compiled kernels of `lmforge.quant.kernels` (integer dot
  products on the packed blocks for one or a few rows, dequantized tiles into a fast GEMM for many rows)
  and, where there is no compiler or no kernel for the type, decodes a tile of output rows at a time in
  PyTorch: slow but correct, and the extra memory of a call is one tile in fp32, never the whole matrix.
- `GGMLEmbedding` decodes only the rows of the tokens looked up.

A weight may come in *parts* of different types, stacked by rows: our fused projections (q|k|v, gate|up)
are separate tensors in a GGUF file, and llama.cpp's _M mixes store `attn_v` in Q6_K beside a Q4_K `attn_q`.
Each part keeps its own type; the output is their outputs side by side.

Gradients flow to the *input* (a LoRA adapter trained on a frozen quantized base, as QLoRA does) through
the same tile decoding; the packed bytes themselves never train.

The model never learns about any of this (DESIGN.md practice 7): `swap_in` replaces an `nn.Linear` found
by its dotted name, the way gpt-fast's quantize handlers do, and `lmforge/model/gpt.py` stays unaware.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import UserError
from lmforge.quant.ggml import dequantize, packed_nbytes, qtype_name

TILE_ROWS = 512  # output rows decoded per step of the fallback: 512 x 4096 fp32 = 8 MB of scratch


@functools.cache
def _kernels():
    """The compiled kernels module when it can be used here, else None (the PyTorch path then runs)."""
    try:
        from lmforge.quant import kernels
    except ImportError:  # pragma: no cover - a build of lmforge without the kernels
        return None
    return kernels if kernels.available() else None


class Part(NamedTuple):
    """`rows` output rows of a weight, packed as GGML type `qtype` in `packed` (uint8, rows x row bytes)."""

    packed: torch.Tensor
    qtype: str
    rows: int


def _decode(part: Part, start: int, stop: int, in_features: int) -> torch.Tensor:
    """Rows [start, stop) of one part in fp32: the compiled decoder where there is one, else PyTorch's."""
    rows = part.packed[start:stop]
    if part.qtype == "F32":
        return rows.view(torch.float32)
    k = _kernels()
    if k is not None and rows.device.type == "cpu" and part.qtype in k.SUPPORTED:
        return k.dequantize(rows, part.qtype, in_features)
    return dequantize(rows, part.qtype, (stop - start, in_features))


class _PackedMatmul(torch.autograd.Function):
    """x @ W.T for a packed W, differentiable in x only (the weight is frozen bytes)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "GGMLLinear") -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        layer = ctx.layer
        grad = grad.float()
        gx = grad.new_zeros(grad.shape[0], layer.in_features)
        for start, stop, w in layer._tiles():
            gx += grad[:, start:stop] @ w
        return gx, None


class GGMLLinear(nn.Module):
    """`y = x @ W.T + b` with W held as GGML blocks, in one or more parts of `Part` rows each.

    Each part's bytes are `out rows x row bytes`, row-major as in a GGUF file (GGUF's ne[0] is
    `in_features`). The bias, when there is one, is an ordinary float parameter. Computation is in fp32
    whatever `x`'s dtype; the result comes back in `x`'s dtype."""

    stays_packed = True  # for LoRA: a frozen base it may wrap (model/lora.py knows nothing else about us)

    def __init__(self, packed: torch.Tensor | list[tuple[torch.Tensor, str | int, int]], qtype: int | str | None,
                 in_features: int, out_features: int | None = None, bias: torch.Tensor | None = None,
                 tile_rows: int = TILE_ROWS) -> None:
        super().__init__()
        if isinstance(packed, torch.Tensor):
            packed = [(packed, qtype, out_features)]
        self.in_features = int(in_features)
        parts = []
        for i, (data, t, rows) in enumerate(packed):
            name, rows = qtype_name(t), int(rows)
            want = packed_nbytes(name, (rows, self.in_features))
            if data.dtype != torch.uint8 or data.numel() != want:
                raise UserError(f"a {name} weight of {rows}x{self.in_features} takes {want} bytes (torch.uint8), "
                                f"got {data.numel()} ({data.dtype})")
            self.register_buffer(f"part{i}", data.detach().reshape(rows, -1))
            parts.append((name, rows))
        self._part_types = parts
        self.out_features = sum(rows for _, rows in parts)
        if out_features is not None and int(out_features) != self.out_features:
            raise UserError(f"parts of {self.out_features} rows in all do not make {out_features} outputs")
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise UserError(f"a bias for {self.out_features} outputs has shape ({self.out_features},), "
                            f"got {tuple(bias.shape)}")
        self.tile_rows = max(1, int(tile_rows))
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    # ---- what it holds ------------------------------------------------------------------------------
    @property
    def parts(self) -> list[Part]:
        """The parts, built once and again only after `.to()`/`.cuda()` replace the buffers: a decode step
        calls ~200 layers, and rebuilding this list every call was a measurable share of a small model's step."""
        cached = self.__dict__.get("_parts_cache")
        if cached is None:
            cached = [Part(self._buffers[f"part{i}"], t, rows) for i, (t, rows) in enumerate(self._part_types)]
            self.__dict__["_parts_cache"] = cached
        return cached

    def _bound(self) -> list:
        """Per part, the compiled kernel bound to its bytes (`kernels.bind`), or None where there is none."""
        bound = self.__dict__.get("_bound_cache")
        if bound is None:
            k = _kernels()
            bound = [k.bind(p.packed, p.qtype, self.in_features)
                     if k is not None and p.packed.device.type == "cpu" and p.qtype in k.SUPPORTED else None
                     for p in self.parts]
            self.__dict__["_bound_cache"] = bound
        return bound

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_parts_cache", None)
        self.__dict__.pop("_bound_cache", None)
        return super()._apply(fn, recurse)

    @property
    def qtype(self) -> str:
        """The type name, or "mixed (A, B)" when the parts differ."""
        names = sorted({t for t, _ in self._part_types})
        return names[0] if len(names) == 1 else f"mixed ({', '.join(names)})"

    @property
    def packed(self) -> torch.Tensor:
        """The bytes of a one-part weight (tests, export of an unmixed layer)."""
        if len(self._part_types) != 1:
            raise ValueError("this weight has several parts; read .parts")
        return self.part0

    @property
    def nbytes(self) -> int:
        """Bytes the weight takes as stored (the bias not counted): the memory this layer exists to save."""
        return sum(p.packed.numel() for p in self.parts)

    @property
    def device(self) -> torch.device:
        return self.part0.device

    def _tiles(self):
        """(first row, stop row, fp32 rows) over the whole weight, a tile at a time."""
        offset = 0
        for part in self.parts:
            for start in range(0, part.rows, self.tile_rows):
                stop = min(start + self.tile_rows, part.rows)
                yield offset + start, offset + stop, _decode(part, start, stop, self.in_features)
            offset += part.rows

    def dequantized(self) -> torch.Tensor:
        """The whole weight (out_features, in_features) in fp32, for tests and export (not for forward)."""
        return torch.cat([w for _, _, w in self._tiles()]) if self.out_features else \
            torch.empty(0, self.in_features)

    # ---- computing -----------------------------------------------------------------------------------
    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(n, in) fp32 contiguous -> (n, out) fp32, no bias."""
        parts = self.parts
        bound = self._bound() if x.device.type == "cpu" else [None] * len(parts)
        if len(parts) == 1 and bound[0] is not None:
            return bound[0](x)  # the common case: the kernel's output as it is
        out = x.new_empty(x.shape[0], self.out_features)
        offset = 0
        for part, run in zip(parts, bound):
            y = run(x) if run is not None else None
            if y is not None:
                out[:, offset:offset + part.rows] = y
            elif part.qtype == "F32":
                out[:, offset:offset + part.rows] = F.linear(x, part.packed.view(torch.float32))
            else:
                for start in range(0, part.rows, self.tile_rows):
                    stop = min(start + self.tile_rows, part.rows)
                    w = _decode(part, start, stop, self.in_features)
                    out[:, offset + start:offset + stop] = F.linear(x, w)
            offset += part.rows
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        if torch.is_grad_enabled() and x.requires_grad:
            y = _PackedMatmul.apply(x2, self)
        else:
            y = self._matmul(x2)
        if self.bias is not None:
            y = y + self.bias.float()
        y = y.reshape(*lead, self.out_features)
        return y if y.dtype == dtype else y.to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, "
                f"bias={self.bias is not None}, nbytes={self.nbytes}")


class GGMLEmbedding(nn.Module):
    """A token embedding held as GGML rows: a lookup decodes only the rows of the ids asked for."""

    def __init__(self, packed: torch.Tensor, qtype: int | str, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.qtype = qtype_name(qtype)
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        want = packed_nbytes(self.qtype, (self.num_embeddings, self.embedding_dim))
        if packed.dtype != torch.uint8 or packed.numel() != want:
            raise UserError(f"a {self.qtype} embedding of {num_embeddings}x{embedding_dim} takes {want} bytes, "
                            f"got {packed.numel()} ({packed.dtype})")
        self.register_buffer("packed", packed.detach().reshape(self.num_embeddings, -1))

    @property
    def nbytes(self) -> int:
        return self.packed.numel()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)
        rows = self.packed.index_select(0, flat)
        w = _decode(Part(rows, self.qtype, rows.shape[0]), 0, rows.shape[0], self.embedding_dim)
        return w.reshape(*idx.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}, nbytes={self.nbytes}"


def swap_in(model: nn.Module, name: str, packed: torch.Tensor, qtype: int | str,
            shape: tuple[int, int] | None = None) -> GGMLLinear:
    """Replace the `nn.Linear` at dotted `name` in `model` (e.g. "blocks.0.attn.qkv") by a GGMLLinear
    holding `packed`, keep its bias, and return the new module.

    `shape` (out_features, in_features), when given, must be the linear's. The new module sits on the old
    weight's device. A weight tied to another module (lm_head and tok_emb with tie_embeddings) is untied:
    the other module keeps its own float copy."""
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
    except AttributeError:
        raise UserError(f"the model has no module {name!r} to quantize") from None
    if not isinstance(old, nn.Linear):
        raise UserError(f"{name!r} is a {type(old).__name__}, not an nn.Linear; only linear layers are swapped")
    if shape is not None and tuple(shape) != (old.out_features, old.in_features):
        raise UserError(f"{name!r} is {old.out_features}x{old.in_features}, the packed weight is "
                        f"{'x'.join(map(str, shape))}")
    new = GGMLLinear(packed.to(old.weight.device), qtype, old.in_features, old.out_features, bias=old.bias)
    setattr(parent, attr, new)
    return new


def stored_nbytes(model: nn.Module) -> int:
    """Bytes of all weights as the model holds them: packed bytes plus every float parameter and buffer
    (position tables included), tensors shared between modules counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
