"""Quantized weights, swapped into a model from outside it (DESIGN.md practice 7).

`ggml`: decode GGML block types (the bytes of a GGUF tensor) in PyTorch. `linear`: `GGMLLinear`, a linear
layer that keeps those bytes and decodes a tile of rows at a time, and `swap_in` to put one in a model.
"""

from lmforge.quant.ggml import SUPPORTED, block_sizes, dequantize, packed_nbytes, qtype_name, quantize
from lmforge.quant.linear import GGMLLinear, swap_in

__all__ = ["SUPPORTED", "GGMLLinear", "block_sizes", "dequantize", "packed_nbytes", "qtype_name", "quantize",
           "swap_in"]
