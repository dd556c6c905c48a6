"""The quantized CPU kernels (lmforge.quant.kernels) against gguf-py's decoder and float64 matmuls, on every
instruction-set path this machine can run, each forced in turn (plus `generic`, always).

Weights: the 32-value types are quantized from random floats by gguf-py; the K-quants (which gguf-py can't
quantize) are random bytes with finite, small fp16 scales, reaching code combinations a quantizer never
writes; F16/BF16 are random normals.

What `matmul` is held to, and why:
- Integer paths (up to SMALL_ROWS rows): they quantize each activation row to int8 per block (32 values, or
  256 for the K-quants) with d = max|x| / 127 and q = round-half-even(x / d). `quantized_activations` below
  repeats those fp32 operations, so `dequant(W) @ dequant(q8(x))` in float64 is what the kernel computes up to
  fp32 summation: held to 2e-5 of sum(|w| |xq|) per output (fp32 has 2^-24 ~ 6e-8 per rounding; a few hundred
  terms summed in blocks stay far below 2e-5). Against the unquantized x, the bound is exact arithmetic: each
  |x - xq| <= d/2 = max|x_block| / 254, so |y - W x| <= sum over blocks of max|x_block| / 254 * sum|w_block|,
  checked with 1% slack plus the fp32 term.
- F16/BF16 and the GEMM-tile path (more rows, Q2_K/Q3_K): fp32 (or bf16 tiles where `tile_dtype()` picks
  them) against float64: 1e-5 (fp32) or 2^-7 (bf16 rounds W and x, 2^-9 each) of sum(|w| |x|).
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from lmforge.errors import UserError
from lmforge.quant import kernels
from lmforge.quant.ggml import block_sizes

REPO = Path(__file__).resolve().parents[2]
QUANTIZABLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
KQUANTS = ["Q4_K", "Q6_K", "Q5_K", "Q2_K", "Q3_K"]
TYPES = ["Q8_0", "Q4_0", "Q4_K", "Q6_K", "Q5_K", "F16", "BF16", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K"]
FP16_FIELDS = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
ROWS = [1, 2, 3, 7, 8, 9, 33, 65]
OUT = 37  # odd, more than one group of rows per thread, not a multiple of anything


@pytest.fixture
def k():  # per test, so a first build lands in the session's shared kernel cache (conftest), not elsewhere
    if not kernels.available():
        pytest.skip(f"kernels unavailable: {kernels.unavailable_reason()}")
    return kernels


# Every kernel path; those this CPU can't run are skipped (listed at collection without building anything).
PATHS = [p for p in kernels.ORDER if p != "amx"]


def runnable(path: str) -> None:
    if path not in kernels.isas():
        pytest.skip(f"this CPU or OS can't run the {path} path (runnable: {kernels.isas()})")


def widths(name: str) -> list[int]:
    block, _ = block_sizes(name)
    return [256, 768] if block == 256 else [32, 96, 320]


@lru_cache(maxsize=None)
def weights(name: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed (OUT, row_bytes) uint8, gguf-py's decode (OUT, k) float64) of random weights of type `name`."""
    gen = torch.Generator().manual_seed(hash((name, k)) % 1000)
    qt = GGMLQuantizationType[name]
    if name in QUANTIZABLE or name in ("F16", "BF16"):
        w = torch.randn(OUT, k, generator=gen)
        if name == "F16":
            packed = w.half().view(torch.uint8)
        elif name == "BF16":
            packed = w.bfloat16().view(torch.uint8)
        else:
            packed = torch.from_numpy(quants.quantize(w.numpy(), qt).copy()).view(torch.uint8)
    else:
        block, size = block_sizes(name)
        raw = torch.randint(0, 256, (OUT * (k // block), size), dtype=torch.uint8, generator=gen)
        for off in FP16_FIELDS[name]:
            raw[:, off:off + 2] = (torch.rand(raw.shape[0], 1, generator=gen) * 0.02).half().view(torch.uint8)
        packed = raw
    packed = packed.reshape(OUT, -1).contiguous()
    ref = quants.dequantize(packed.numpy(), qt)
    return packed, torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)).reshape(OUT, k).double()


def quantized_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq, amax per value's block): x as the kernels quantize it, in float64, with the same fp32 steps."""
    n, k = x.shape
    xb = x.reshape(n, k // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    d = amax / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.round(xb * inv)
    return (q.double() * d.double()).reshape(n, k), amax.expand_as(xb).reshape(n, k).double()


def check(name: str, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> None:
    assert y.dtype == torch.float32 and y.shape == (x.shape[0], w.shape[0]) and y.is_contiguous()
    n = x.shape[0]
    y, x64 = y.double(), x.double()
    exact = x64 @ w.T
    mass = x64.abs() @ w.abs().T
    integer = name not in ("F16", "BF16", "Q2_K", "Q3_K") and n <= kernels.SMALL_ROWS
    if integer:
        block = 256 if name.endswith("_K") else 32
        xq, amax = quantized_activations(x, block)
        qmass = xq.abs() @ w.abs().T
        assert ((y - xq @ w.T).abs() <= 2e-5 * qmass + 1e-30).all(), (y - xq @ w.T).abs().max()
        bound = (amax / 254) @ w.abs().T  # per output: sum over values of max|x_block| / 254 * |w|
        assert ((y - exact).abs() <= 1.01 * bound + 2e-5 * mass).all()
    else:
        tiled = n > kernels.SMALL_ROWS or name in ("Q2_K", "Q3_K")
        rel = 2 ** -7 if (tiled and kernels.tile_dtype() == torch.bfloat16) else 1e-5
        assert ((y - exact).abs() <= rel * mass + 1e-30).all(), (y - exact).abs().max()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", TYPES)
def test_matmul_matches_the_float64_reference_on_every_path(k, name, path):
    runnable(path)
    gen = torch.Generator().manual_seed(1)
    with kernels.forced_isa(path):
        assert kernels.isa() == path
        for width in widths(name):
            packed, w = weights(name, width)
            for n in ROWS:
                x = torch.randn(n, width, generator=gen)
                x[0, :5] = 0.0  # a zero stretch, and below a whole zero block: d = 0 must not divide by zero
                if n > 1:
                    x[1, :32] = 0.0
                y = kernels.matmul(x, packed, name, width)
                check(name, x, y, w)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", [*TYPES, "F32"])
def test_dequantize_is_bit_identical_to_gguf_py(k, name, path):
    runnable(path)
    with kernels.forced_isa(path):
        for width in widths(name if name != "F32" else "Q8_0"):
            if name == "F32":
                w = torch.randn(OUT, width)
                packed, ref = w.view(torch.uint8), w
            else:
                packed, ref = weights(name, width)
            got = kernels.dequantize(packed, name, width)
            assert got.dtype == torch.float32 and torch.equal(got, ref.float()), (name, width)
            assert torch.equal(kernels.dequantize(packed[3:5], name, width), ref[3:5].float())


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "F16"])
def test_output_rows_split_over_threads_give_the_same_result(k, name):
    """Enough rows that every path hands out several chunks to each of two threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        width = widths(name)[-1]
        packed, w = weights(name, width)
        big = packed.repeat(40, 1)  # 1480 rows
        ref = w.repeat(40, 1)
        for path in kernels.isas():
            with kernels.forced_isa(path):
                for n in (1, 5, 9):
                    x = torch.randn(n, width)
                    y = kernels.matmul(x, big, name, width)
                    check(name, x, y, ref)
                    assert torch.equal(y[:, :OUT], kernels.matmul(x, packed, name, width)), path  # same sums
    finally:
        torch.set_num_threads(before)


def test_many_rows_split_into_several_gemm_tiles(k, monkeypatch):
    monkeypatch.setattr(kernels, "_TILE_BYTES", 16 * 4 * 256)  # 16-row tiles: 37 rows take three
    packed, w = weights("Q4_K", 256)
    x = torch.randn(40, 256)
    check("Q4_K", x, kernels.matmul(x, packed, "Q4_K", 256), w)


def test_a_read_only_mmapped_weight_works(k, tmp_path):
    packed, w = weights("Q8_0", 96)
    path = tmp_path / "w.bin"
    path.write_bytes(packed.numpy().tobytes())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that the buffer is not writable: that is the point
            ro = torch.frombuffer(mm, dtype=torch.uint8).reshape(OUT, -1)
        for n in (1, 5, 40):
            x = torch.randn(n, 96)
            check("Q8_0", x, kernels.matmul(x, ro, "Q8_0", 96), w)
        assert torch.equal(kernels.dequantize(ro, "Q8_0", 96), w.float())
        del ro


def test_non_contiguous_x_is_accepted_and_bad_shapes_are_one_line_errors(k):
    packed, w = weights("Q4_0", 96)
    x = torch.randn(96, 3).t()
    check("Q4_0", x, kernels.matmul(x, packed, "Q4_0", 96), w)
    with pytest.raises(UserError, match="x must be"):
        kernels.matmul(torch.randn(2, 64), packed, "Q4_0", 96)
    with pytest.raises(UserError, match="whole number"):
        kernels.matmul(torch.randn(2, 95), packed, "Q4_0", 95)
    with pytest.raises(UserError, match="uint8"):
        kernels.matmul(torch.randn(2, 96), packed.reshape(-1), "Q4_0", 96)
    with pytest.raises(UserError, match="unknown GGML type"):
        kernels.matmul(torch.randn(2, 96), packed, "Q9_9", 96)
    with pytest.raises(UserError, match="can't run"):
        with kernels.forced_isa("no-such-path"):
            pass


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "BF16", "Q3_K"])  # integer, K-quant, float, tile-only
def test_a_bound_kernel_computes_what_matmul_does(k, name):
    """`bind` does the checks once; the callable a layer keeps must give `matmul`'s result for every row
    count (small-batch kernel and GEMM tiles alike), and no kernel for F32 (PyTorch's own)."""
    width = widths(name)[0]
    packed, _ = weights(name, width)
    run = kernels.bind(packed, name, width)
    for n in (1, 8, 33):
        x = torch.randn(n, width, generator=torch.Generator().manual_seed(n))
        torch.testing.assert_close(run(x), kernels.matmul(x, packed, name, width), rtol=0, atol=0)
    assert kernels.bind(torch.zeros(3, 4 * 32, dtype=torch.uint8), "F32", 32) is None
    with pytest.raises(UserError):
        kernels.bind(packed, name, width + 1)


def test_empty_inputs(k):
    packed, _ = weights("Q8_0", 32)
    assert kernels.matmul(torch.randn(0, 32), packed, "Q8_0", 32).shape == (0, OUT)


def test_the_isas_are_best_first_and_the_detection_reports_amx(k):
    runnable = kernels.isas()
    assert runnable[-1] == "generic" and runnable == sorted(runnable, key=kernels.ORDER.index)
    assert kernels.isa() == runnable[0] or os.environ.get("LMFORGE_ISA")
    info = kernels.info()
    assert info["isas"] == runnable and isinstance(info["amx"], bool)
    assert info["amx"] == ("amx_granted" in info["features"])
    if "avx2" in runnable:
        assert {"avx2", "fma", "f16c", "os_ymm"} <= set(info["features"])
    if "avx512" in runnable:
        assert {"avx512f", "avx512bw", "avx512vl", "os_zmm"} <= set(info["features"])


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh process (the session's compiled kernels, through the inherited LMFORGE_HOME)."""
    full = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


ISA = "from lmforge.quant import kernels as k; print(k.isa())"


def test_lmforge_isa_caps_the_path_in_a_fresh_process(k):
    out = run(ISA, LMFORGE_ISA="generic")
    assert out.stdout == "generic\n" and out.stderr == "", out.stderr


def test_the_cap_picks_that_path_or_the_best_one_below_it(k, capfd):
    runnable = ["avx512", "avx2", "generic"]  # say, a CPU without VNNI
    assert kernels._capped(runnable, "") == "avx512"
    assert kernels._capped(runnable, " AVX2 ") == "avx2"
    assert kernels._capped(runnable, "generic") == "generic"
    assert capfd.readouterr().err == ""


def test_an_unknown_or_unrunnable_lmforge_isa_is_one_warning_line_and_a_fallback(k, capfd):
    assert kernels._capped(["avx512", "avx2", "generic"], "sse9") == "generic"
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: LMFORGE_ISA=sse9 is not a known kernel path")
    assert kernels._capped(["avx512", "avx2", "generic"], "avx512vnni") == "avx512"
    assert kernels._capped(["avx2", "generic"], "avxvnni") == "avx2"
    assert capfd.readouterr().err == ("lmforge: LMFORGE_ISA=avx512vnni: this CPU or OS can't run that path; using "
                                      "avx512\nlmforge: LMFORGE_ISA=avxvnni: this CPU or OS can't run that path; "
                                      "using avx2\n")
    if not kernels.info()["amx"]:
        assert kernels._capped(["avx2", "generic"], "amx") == "avx2"
        assert capfd.readouterr().err == "lmforge: LMFORGE_ISA=amx: this CPU or OS can't run AMX; using avx2\n"


def test_without_kernels_matmul_returns_none_and_dequantize_still_works():
    code = ("import torch; from lmforge.quant import kernels as k\n"
            "p = torch.zeros(3, 34, dtype=torch.uint8)\n"
            "print(k.available(), k.unavailable_reason(), k.isa(), k.matmul(torch.ones(1, 32), p, 'Q8_0', 32),"
            " k.dequantize(p, 'Q8_0', 32).shape)\n")
    out = run(code, LMFORGE_NO_KERNELS="1")
    assert out.stdout == "False disabled by LMFORGE_NO_KERNELS pytorch None torch.Size([3, 32])\n", out.stderr


def test_the_sources_ship_as_package_data():
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lmforge"]
    for source in ("kernels.cpp", "kernels_body.h"):
        assert (REPO / "lmforge" / "quant" / source).is_file()
        assert any(fnmatch.fnmatch(f"quant/{source}", pat) for pat in patterns), source
