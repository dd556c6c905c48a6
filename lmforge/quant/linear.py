"""A linear layer whose weight stays in its GGML-packed bytes, swapped into a model from outside it.

Why: a 4-bit 7B GGUF is ~4 GB on disk, ~28 GB once dequantized to fp32. `GGMLLinear` keeps the stored bytes
(a uint8 buffer, so `.to(device)` moves them and `.to(dtype)` leaves them alone) and decodes the weight a
tile of output rows at a time inside `forward`, so the extra memory of a call is one tile in fp32, never the
whole matrix. What this step buys is memory; speed (decoding inside the matmul, no fp32 tile at all) comes
from the kernels of a later step, which can replace `forward` without changing how a model holds weights.

The model never learns about any of this (DESIGN.md practice 7): `swap_in` replaces an `nn.Linear` found
by its dotted name, the way gpt-fast's quantize handlers do, and `lmforge/model/gpt.py` stays unaware.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import UserError
from lmforge.quant.ggml import dequantize, packed_nbytes, qtype_name

TILE_ROWS = 512  # output rows decoded per step: 512 x 4096 fp32 = 8 MB of scratch for a 7B projection


class GGMLLinear(nn.Module):
    """`y = x @ W.T + b` with W held as GGML blocks (`packed`, uint8) of type `qtype`.

    `packed` holds `out_features` rows of `in_features` values, row-major as in a GGUF file (GGUF's ne[0] is
    `in_features`). The bias, when there is one, is an ordinary float parameter."""

    def __init__(self, packed: torch.Tensor, qtype: int | str, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, tile_rows: int = TILE_ROWS) -> None:
        super().__init__()
        self.qtype = qtype_name(qtype)
        self.in_features, self.out_features = int(in_features), int(out_features)
        want = packed_nbytes(self.qtype, (self.out_features, self.in_features))
        if packed.dtype != torch.uint8 or packed.numel() != want:
            raise UserError(f"a {self.qtype} weight of {self.out_features}x{self.in_features} takes {want} "
                            f"bytes (torch.uint8), got {packed.numel()} ({packed.dtype})")
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise UserError(f"a bias for {self.out_features} outputs has shape ({self.out_features},), "
                            f"got {tuple(bias.shape)}")
        self.tile_rows = max(1, int(tile_rows))
        self.register_buffer("packed", packed.detach().reshape(self.out_features, -1).contiguous())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def nbytes(self) -> int:
        """Bytes the weight takes as stored (the bias not counted): the memory this layer exists to save."""
        return self.packed.numel()

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        """Output rows [start, stop) of the weight in fp32."""
        return dequantize(self.packed[start:stop], self.qtype, (stop - start, self.in_features))

    def dequantized(self) -> torch.Tensor:
        """The whole weight (out_features, in_features) in fp32, for tests and export (not for forward)."""
        return self._rows(0, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, self.tile_rows):
            stop = min(start + self.tile_rows, self.out_features)
            w = self._rows(start, stop).to(x.dtype)
            b = self.bias[start:stop].to(x.dtype) if self.bias is not None else None
            out[..., start:stop] = F.linear(x, w, b)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, "
                f"bias={self.bias is not None}, nbytes={self.nbytes}")


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
