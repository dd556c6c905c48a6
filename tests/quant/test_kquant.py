"""K-quant quantizers (Q4_K, Q5_K, Q6_K): the bytes decode through gguf-py's own dequantizer exactly as through
ours, and the error of quantize -> dequantize is within stated bounds and ranks as the bit budgets say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.errors import UserError
from lmforge.quant.ggml import block_sizes, dequantize, packed_nbytes, quantize
from lmforge.quant.kquant import KQUANTS, quantize_k

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402


def _data(rows: int = 48, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    x[1] = 0.0  # an all-zero row: d = dmin = 0
    x[2, :256] = -1.5  # a constant negative super-block: only the min carries it
    x[3, 256:] = 2.0  # a constant positive one: the min is clamped to 0
    x[4] *= 1000.0  # large values (fp16 scales still fine)
    x[5] *= 1e-4  # tiny values
    x[6, 7] = 40.0  # one outlier
    return x


def _gauss(rows: int = 64, cols: int = 1024, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).square().mean().sqrt())


@pytest.mark.parametrize("name", KQUANTS)
def test_bytes_decode_the_same_in_gguf_py_and_ours(name):
    x = _data()
    packed = quantize_k(x, name)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(name, tuple(x.shape))
    ref = quants.dequantize(packed.numpy().reshape(x.shape[0], -1), T[name])
    ours = dequantize(packed, name, tuple(x.shape))
    np.testing.assert_array_equal(ref, ours.numpy())
    # the special rows come back as they should
    assert torch.all(ours[1] == 0)
    assert torch.allclose(ours[2, :256], torch.full((256,), -1.5), atol=0.02)
    assert torch.allclose(ours[3, 256:], torch.full((256,), 2.0), atol=0.02)
    assert _rmse(ours[4], x[4]) / 1000.0 < 0.1 and _rmse(ours[5], x[5]) / 1e-4 < 0.1


@pytest.mark.parametrize("name, bound", [("Q4_K", 0.075), ("Q5_K", 0.038), ("Q6_K", 0.019)])
def test_gaussian_error_within_bound(name, bound):
    """Unit-variance Gaussian data: RMSE bounds a little above what llama.cpp's reference quantizers reach
    (about 0.071 / 0.036 / 0.0175 for Q4_K / Q5_K / Q6_K, see bench/kquant_error.py)."""
    x = _gauss()
    err = _rmse(dequantize(quantize_k(x, name), name, tuple(x.shape)), x)
    assert 0.0 < err < bound


def test_error_ranks_against_the_legacy_types():
    """Q4_K beats Q4_0 (same 4-bit codes, better scales); Q5_K beats Q5_0; Q6_K sits between Q5_K and Q8_0,
    within 4x of Q8_0 (two bits fewer: the step is 4x larger)."""
    x = _gauss()
    err = {}
    for name in ("Q4_0", "Q5_0", "Q8_0"):
        b = quants.quantize(x.numpy(), T[name])
        err[name] = _rmse(torch.from_numpy(quants.dequantize(b, T[name])), x)
    for name in KQUANTS:
        err[name] = _rmse(dequantize(quantize_k(x, name), name, tuple(x.shape)), x)
    assert err["Q4_K"] < 0.9 * err["Q4_0"]
    assert err["Q5_K"] < 0.9 * err["Q5_0"]
    assert err["Q5_K"] > err["Q6_K"] > err["Q8_0"]
    assert err["Q6_K"] < 4.0 * err["Q8_0"]


@pytest.mark.parametrize("name", KQUANTS)
def test_requantizing_the_decoded_values_is_nearly_a_fixed_point(name):
    """Quantizing values that are already on a K-quant grid finds (almost) the same grid again."""
    x = _gauss(8, 512)
    once = dequantize(quantize_k(x, name), name, tuple(x.shape))
    twice = dequantize(quantize_k(once, name), name, tuple(x.shape))
    assert _rmse(twice, once) < 0.25 * _rmse(once, x)


def test_ggml_quantize_dispatches_k_quants_here():
    x = _gauss(4, 256)
    for name in KQUANTS:
        assert torch.equal(quantize(x, name), quantize_k(x, name))
    assert block_sizes("Q4_K") == (256, 144)


def test_bad_input_is_one_line():
    with pytest.raises(UserError, match="whole number of 256-value super-blocks"):
        quantize_k(torch.zeros(4, 96), "Q4_K")
    with pytest.raises(UserError, match="NaN or infinite"):
        quantize_k(torch.full((1, 256), float("nan")), "Q6_K")
    with pytest.raises(UserError, match="no K-quant quantizer"):
        quantize_k(torch.zeros(1, 256), "Q3_K")
    with pytest.raises(UserError, match="not a whole number"):
        quantize(torch.zeros(2, 100), "Q6_K")


def test_chunks_do_not_change_the_result(monkeypatch):
    import lmforge.quant.kquant as kq

    x = _gauss(6, 512)
    whole = quantize_k(x, "Q5_K")
    monkeypatch.setattr(kq, "_CHUNK", 5)  # 12 super-blocks in chunks of 5, 5 and 2
    assert torch.equal(quantize_k(x, "Q5_K"), whole)


@pytest.mark.parametrize("name, least_same", [("Q4_K", 0.99), ("Q5_K", 0.97), ("Q6_K", 0.99)])
def test_bytes_agree_with_llama_cpp(name, least_same):
    """Where llama-cpp-python is installed: ggml's own reference quantizer (ggml_quantize_chunk, no importance
    matrix, as llama-quantize runs it) on the same data gives nearly the same bytes and the same error."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes
    from pathlib import Path

    lib_dir = Path(llama_cpp.llama_cpp._lib._name).parent
    found = sorted(lib_dir.glob("libggml-base.*"))
    if not found:
        pytest.skip(f"no libggml-base beside {lib_dir}")
    ggml = ctypes.CDLL(str(found[0]))
    ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    ggml.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    x = np.ascontiguousarray(_gauss(32, 1024, seed=3).numpy())
    theirs = np.zeros(packed_nbytes(name, x.shape), dtype=np.uint8)
    ggml.ggml_quantize_chunk(int(T[name]), x.ctypes.data, theirs.ctypes.data, 0, x.shape[0], x.shape[1], None)
    ours = quantize_k(torch.from_numpy(x), name).numpy()
    assert np.mean(ours == theirs) >= least_same
    err = [_rmse(torch.from_numpy(quants.dequantize(b.reshape(32, -1), T[name])), torch.from_numpy(x)) for b in (ours, theirs)]
    assert err[0] == pytest.approx(err[1], rel=2e-3)
