"""GGML block decoding against gguf-py's reference: bit-for-bit, for every supported type.

Types gguf-py can quantize are checked on real quantized random weights; every block type is also checked
on random packed bytes (random codes and scales, with the fp16 scale fields set to finite values), which
reach code combinations a quantizer never writes. Exactness: `torch.equal`, no tolerance, for all of them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from lmforge.errors import UserError
from lmforge.quant import SUPPORTED, block_sizes, dequantize, packed_nbytes, qtype_name, quantize

QUANTIZABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # what gguf-py can quantize
# byte offsets of the fp16 scale fields in one block, set to finite values in the random-bytes test
FP16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
               "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
ROWS = [1, 3, 33]


def reference(packed: torch.Tensor, name: str, shape: tuple[int, int]) -> torch.Tensor:
    """gguf-py's dequantization of the same bytes."""
    out = quants.dequantize(packed.numpy().reshape(shape[0], -1), GGMLQuantizationType[name])
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


def random_blocks(name: str, rows: int, blocks_per_row: int, gen: torch.Generator) -> torch.Tensor:
    _, size = block_sizes(name)
    raw = torch.randint(0, 256, (rows * blocks_per_row, size), dtype=torch.uint8, generator=gen)
    for off in FP16_FIELDS[name]:
        scale = (torch.randn(raw.shape[0], 1, generator=gen) * 0.05).half()
        raw[:, off:off + 2] = scale.view(torch.uint8)
    return raw.reshape(-1)


def test_supported_types_and_sizes_come_from_gguf():
    assert set(SUPPORTED) == set(QUANTIZABLE) | {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    for name in SUPPORTED:
        assert block_sizes(name) == GGML_QUANT_SIZES[GGMLQuantizationType[name]]
        assert qtype_name(int(GGMLQuantizationType[name])) == name == qtype_name(name.lower())
        assert qtype_name(GGMLQuantizationType[name]) == name


@pytest.mark.parametrize("name", QUANTIZABLE)
@pytest.mark.parametrize("rows", ROWS)
def test_quantized_weights_decode_exactly(name, rows):
    gen = torch.Generator().manual_seed(rows)
    block, _ = block_sizes(name)
    for width in (32, 64, 96, 256):
        w = torch.randn(rows, width, generator=gen)
        packed = quantize(w, name)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(name, (rows, width))
        got = dequantize(packed, name, (rows, width))
        assert got.dtype == torch.float32 and got.shape == (rows, width)
        assert torch.equal(got, reference(packed, name, (rows, width))), (name, rows, width)
        assert (got - w).abs().max() <= w.abs().max() / 8  # still the weight: within one 4-bit step


@pytest.mark.parametrize("name", sorted(FP16_FIELDS))
@pytest.mark.parametrize("rows", ROWS)
def test_random_blocks_decode_exactly(name, rows):
    gen = torch.Generator().manual_seed(1000 + rows)
    block, _ = block_sizes(name)
    for blocks_per_row in (1, 2, 3):
        shape = (rows, block * blocks_per_row)
        packed = random_blocks(name, rows, blocks_per_row, gen)
        got = dequantize(packed, name, shape)
        assert torch.isfinite(got).all()
        assert torch.equal(got, reference(packed, name, shape)), (name, shape)


def test_any_leading_shape_and_byte_layout():
    w = torch.randn(2, 3, 64)
    packed = quantize(w, "Q8_0")
    flat = dequantize(packed, "Q8_0", (6, 64))
    assert torch.equal(dequantize(packed.reshape(6, -1), 8, (2, 3, 64)), flat.reshape(2, 3, 64))


def one_line_user_error(fn, *match):
    with pytest.raises(UserError) as err:
        fn()
    text = str(err.value)
    assert "\n" not in text and all(m in text for m in match), text
    return text


def test_unsupported_type_is_one_line_naming_it_and_the_supported_ones():
    packed = torch.zeros(36, dtype=torch.uint8)
    one_line_user_error(lambda: dequantize(packed, "Q8_1", (1, 32)), "Q8_1", "Q4_0", "Q6_K")
    one_line_user_error(lambda: dequantize(packed, int(GGMLQuantizationType.IQ2_XXS), (1, 256)), "IQ2_XXS", "Q8_0")
    one_line_user_error(lambda: dequantize(packed, "Q9_9", (1, 32)), "Q9_9", "supported")
    one_line_user_error(lambda: dequantize(packed, 999, (1, 32)), "999", "supported")


def test_bad_sizes_are_one_line():
    packed = quantize(torch.randn(3, 64), "Q4_0")
    one_line_user_error(lambda: dequantize(packed, "Q4_0", (3, 48)), "48", "32")  # rows not whole blocks
    one_line_user_error(lambda: dequantize(packed[:-1], "Q4_0", (3, 64)), str(packed.numel() - 1))
    one_line_user_error(lambda: dequantize(packed, "Q4_0", (4, 64)), "(4, 64)")
    one_line_user_error(lambda: dequantize(packed.view(torch.int8), "Q4_0", (3, 64)), "uint8")
    one_line_user_error(lambda: quantize(torch.randn(2, 256), "Q3_K"), "Q3_K")  # K-quants but Q3_K: lmforge.quant.kquant


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(FP16_FIELDS))
def test_decodes_the_same_on_cuda(name):
    gen = torch.Generator().manual_seed(7)
    block, _ = block_sizes(name)
    packed = random_blocks(name, 3, 2, gen)
    cpu = dequantize(packed, name, (3, 2 * block))
    assert torch.equal(dequantize(packed.cuda(), name, (3, 2 * block)).cpu(), cpu)
