"""Fast CPU kernels for GGML-packed weights: `y = x @ W.T` straight from the packed bytes, and a fast decoder.

Why: a decode step multiplies every weight matrix by one activation row (or the scheduler's few rows), so it
is bound by how fast the packed bytes stream from memory. Decoding W to fp32 first would read 4-8x the bytes;
these kernels read each packed row once, whatever the number of activation rows.

    from lmforge.quant import kernels
    y = kernels.matmul(x, packed, "Q4_K", in_features)   # x (n, in) fp32 -> y (n, out) fp32, or None: no kernel
    w = kernels.dequantize(packed, "Q4_K", in_features)  # (out, in) fp32, bit-identical to gguf-py

How (llama.cpp's known-good design, written here from the published block layouts):
- Integer types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), up to `SMALL_ROWS` activation rows: each
  activation row is quantized once per call to int8 blocks (32 values and an fp32 scale for the 32-value
  types; 256 values, a scale and the sums of each 16 for the K-quants), and every weight block is one integer
  dot product per activation row (AVX2 `maddubs`/`madd`, VNNI `vpdpbusd`) with its scales applied once per
  block. Quantizing x costs accuracy: each activation carries an error of at most half a step, d/2 with
  d = max|x_block| / 127, i.e. a relative error of the product of order 1/254 per block, far below the
  weights' own 4-8 bit error (tests/quant/test_kernels.py states the bound it checks).
  Unlike llama.cpp's Q8_0/Q8_1 activations, the block scale is kept in fp32 (not fp16): a little more
  accurate, so results agree with llama.cpp's to rounding, not bit for bit.
- F16 / BF16 weights: widened exactly and accumulated in fp32 (no activation quantization).
- Many rows (a prefill, n > SMALL_ROWS) and Q2_K/Q3_K at any n: a tile of weight rows is decoded by the C++
  decoder into fp32 scratch and multiplied by PyTorch's GEMM, in fp32 or in bf16 where the CPU multiplies
  bf16 natively (AVX512-BF16, or AMX through oneDNN: this is how an AMX machine's prefill uses AMX; no
  hand-written AMX kernel ships, since none could be tested here) and a quick measurement (once per process)
  finds bf16 at least twice as fast (`tile_dtype`).

Instruction sets. The library (kernels.cpp + kernels_body.h, built by `lmforge.native` on first use) is not
compiled for this machine's CPU: it holds one copy of every kernel per path -- `generic` (portable C++),
`avx2` (AVX2+FMA+F16C, the x86-64 baseline we support), `avxvnni`, `avx512` (F/BW/VL/DQ), `avx512vnni` -- and
at run time uses the best one the CPU implements (CPUID) and the OS enables (XCR0; for AMX also Linux's
arch_prctl permission). The x86 copies need GCC (`#pragma GCC target`); built by another compiler, or on
another architecture, the library holds `generic` only, which the compiler vectorises for the baseline ISA.
`isas()` lists the runnable paths, best first; `isa()` names the one in use; `info()` adds what was detected
(AMX included). `LMFORGE_ISA=<path>` caps the path (to turn a faulty one off):
that path or the best runnable one below it in `ORDER` is used; a name that is unknown or not runnable here is
one warning line on stderr (an unknown name falls to `generic`, the safe choice for someone turning things off).
The cap also bounds the GEMM tile dtype (bf16 only on the AVX-512 paths). `forced_isa(name)` switches paths
for a `with` block (tests). LMFORGE_NO_KERNELS=1, or no compiler: `available()` is False, `matmul` returns None
and `dequantize` runs lmforge.quant.ggml's PyTorch decoder.

The packed tensor is only ever read, so it may be a read-only view of an mmapped GGUF file.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from pathlib import Path

import torch

from lmforge import native
from lmforge.errors import UserError
from lmforge.quant import ggml

__all__ = ["ORDER", "SMALL_ROWS", "SUPPORTED", "available", "bind", "dequantize", "forced_isa", "info", "isa",
           "isas", "matmul", "tile_dtype", "unavailable_reason"]

_SOURCE = Path(__file__).with_name("kernels.cpp")


def _flags() -> tuple[list[str], list[str]]:
    # No -march: each path carries its own target attributes (runtime dispatch). -ffp-contract=off keeps the
    # decoders' a*b-c from being fused into one FMA, which would break bit-identity with gguf-py.
    return ["-O3", "-fopenmp", "-ffp-contract=off"], ["-fopenmp"]


# Five copies of every kernel (one per path): 14 s of CPU to compile, 25-50 s of wall time on a busy 2-core EPYC.
_KERNEL = native.Kernel("lmforge_qmatmul", _SOURCE, _flags, cpu_specific=False, estimate_s=40)

# The cap order of LMFORGE_ISA, best first ("amx" is not a kernel path: capping below it keeps bf16 GEMM tiles,
# which oneDNN would run on AMX, off an AMX machine).
ORDER = ("amx", "avx512vnni", "avx512", "avxvnni", "avx2", "generic")

# GGML type ids, as gguf.GGMLQuantizationType numbers them (the C++ switches on these).
_CODES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
          "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30}
# Types with a small-batch kernel; the others (and F32, which is PyTorch's own) go through GEMM tiles.
_DIRECT = frozenset({"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16"})
SUPPORTED = tuple(_CODES)

# Up to this many activation rows the integer kernels run (each weight row read once for all of them); above,
# decoded tiles and PyTorch's GEMM. The crossover measured on a 2048x4096 weight, one thread of a (busy)
# 2-core EPYC: at n=32, Q8_0 15 ms direct vs 13 ms tiled, Q4_K 22 vs 24 ms; at n=16 direct is 2-3x faster.
SMALL_ROWS = 32
# fp32 scratch per GEMM tile (512 rows of 4096). Each tile is two parallel regions (decode, GEMM); with 2 MiB
# tiles a 4096x4096 prefill of 512 rows took 1.5-3x longer on 2 threads than with 8 MiB (more regions, each a
# chance to wait for a descheduled thread), while one thread ran both alike.
_TILE_BYTES = 8 << 20

_lock = threading.Lock()
_configured: dict[str, object] = {}  # "module": the module whose path was set from LMFORGE_ISA


def _module():
    """The compiled module with its path chosen (from LMFORGE_ISA, once per process), or None."""
    k = _KERNEL.module()
    if k is not None and _configured.get("module") is not k:
        with _lock:
            if _configured.get("module") is not k:
                k.set_isa(_capped(_detect(k)[0], os.environ.get("LMFORGE_ISA", "")))
                _configured["module"] = k
    return k


def _detect(k) -> tuple[list[str], set[str]]:
    paths_, _, feats = k.detect().partition(";")
    return paths_.split(","), set(filter(None, feats.split(",")))


def _capped(runnable: list[str], cap: str) -> str:
    """The path to use: the best runnable one at or below `cap` in ORDER (warning once when `cap` is unknown
    or can't run here)."""
    cap = cap.strip().lower()
    if not cap:
        return runnable[0]
    if cap not in ORDER:
        native.say(f"LMFORGE_ISA={cap} is not a known kernel path (known: {', '.join(ORDER)}); using generic")
        return "generic"
    allowed = [p for p in runnable if ORDER.index(p) >= ORDER.index(cap)]
    choice = allowed[0] if allowed else "generic"
    if cap != "amx" and cap not in runnable:
        native.say(f"LMFORGE_ISA={cap}: this CPU or OS can't run that path; using {choice}")
    elif cap == "amx" and "amx_granted" not in _detect(_KERNEL.module())[1]:
        native.say(f"LMFORGE_ISA={cap}: this CPU or OS can't run AMX; using {choice}")
    return choice


def available() -> bool:
    """True when the compiled kernels can be used (building them on the first call, seconds, once per cache)."""
    return _module() is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True)."""
    return _KERNEL.unavailable_reason()


def isas() -> list[str]:
    """The kernel paths this CPU and OS can run, best first (empty when the kernels are unavailable)."""
    k = _module()
    return _detect(k)[0] if k is not None else []


def isa() -> str:
    """The path in use ("pytorch" when the kernels are unavailable)."""
    k = _module()
    return k.isa() if k is not None else "pytorch"


def info() -> dict:
    """What was detected and chosen: {"isa", "isas", "features" (CPUID/XCR0 findings, "amx_granted" when Linux
    let this process use AMX tiles), "amx" (usable), "tile_dtype"}; {"isa": "pytorch", "reason": ...} without
    the kernels."""
    k = _module()
    if k is None:
        return {"isa": "pytorch", "reason": unavailable_reason()}
    runnable, feats = _detect(k)
    return {"isa": k.isa(), "isas": runnable, "features": sorted(feats), "amx": "amx_granted" in feats,
            "tile_dtype": str(tile_dtype()).removeprefix("torch.")}


@contextlib.contextmanager
def forced_isa(name: str):
    """Run the `with` body on kernel path `name` (one of `isas()`); a UserError when it can't run here."""
    k = _module()
    if k is None:
        raise UserError(f"no compiled kernels to force a path on: {unavailable_reason()}")
    if name not in _detect(k)[0]:
        raise UserError(f"kernel path {name!r} can't run on this CPU (runnable: {', '.join(_detect(k)[0])})")
    before = k.isa()
    k.set_isa(name)
    try:
        yield
    finally:
        k.set_isa(before)


# ---- GEMM tiles: fp32 or bf16 -----------------------------------------------------------------------------


def _bf16_allowed(k) -> bool:
    runnable, feats = _detect(k)
    if k.isa() not in ("avx512vnni", "avx512"):
        return False  # capped or forced below AVX-512: no bf16 GEMM either
    # Only AMX multiplies bf16 fast enough to pay for the rounding: AVX512-BF16 measured 1.0-1.3x on a 2-core
    # EPYC, so a timing measurement there sometimes, under load, picked bf16 for one process and fp32 for
    # the next, and the same quality report came out different. Allowed unless LMFORGE_ISA caps below it.
    cap = os.environ.get("LMFORGE_ISA", "").strip().lower()
    return "amx_granted" in feats and cap in ("", "amx")


@functools.lru_cache(maxsize=None)
def _bf16_measured_faster() -> bool:
    """One quick measurement per process (~10 ms): a prefill-shaped GEMM with the weight tile converted to
    bf16 each time, against the same in fp32. bf16 rounds the weights, the activations and (PyTorch's CPU
    GEMM has no fp32 output for bf16 inputs) the outputs, 2^-9 relative each, so it must at least halve the
    time to be used: AMX does; AVX512-BF16 on a busy 2-core EPYC sped it up 1.0-1.3x, and stays on fp32."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(128, 1024, generator=g), torch.randn(512, 1024, generator=g)
    xb = x.to(torch.bfloat16)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    fp32 = best(lambda: torch.mm(w, x.t()))
    bf16 = best(lambda: torch.mm(w.to(torch.bfloat16), xb.t()))
    return bf16 < 0.5 * fp32


def tile_dtype() -> torch.dtype:
    """The dtype of the decoded weight tiles the prefill GEMM runs in: bfloat16 where this CPU multiplies it
    natively, the path in use allows it, and it measured faster; else float32."""
    k = _module()
    if k is None or not _bf16_allowed(k):
        return torch.float32
    return torch.bfloat16 if _bf16_measured_faster() else torch.float32


# ---- the public kernels -----------------------------------------------------------------------------------


_SPECS: dict[str, tuple[str, int, int]] = {}  # qtype as given (a str) -> (name, block values, block bytes)


def _spec(qtype: int | str) -> tuple[str, int, int]:
    """(name, values per block, bytes per block), looked up once per spelling: a decode step calls `matmul`
    ~200 times, and gguf's enum lookups cost more than the kernel on a small matrix."""
    spec = _SPECS.get(qtype) if isinstance(qtype, str) else None
    if spec is None:
        name = ggml.qtype_name(qtype)
        spec = (name, *ggml.block_sizes(name))
        if isinstance(qtype, str):
            _SPECS[qtype] = spec
    return spec


def _check_packed(packed: torch.Tensor, spec: tuple[str, int, int], in_features: int) -> tuple[torch.Tensor, int]:
    """`packed` as a contiguous (rows, row_bytes) uint8 CPU tensor of whole blocks, and row_bytes."""
    name, block, size = spec
    if in_features <= 0 or in_features % block:
        raise UserError(f"a {name} row of {in_features} values is not a whole number of {block}-value blocks")
    row_bytes = in_features // block * size
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != row_bytes:
        raise UserError(f"packed {name} weights of {in_features} columns must be uint8 (rows, {row_bytes}), "
                        f"got {packed.dtype} {tuple(packed.shape)}")
    if not packed.is_cpu:
        raise UserError(f"the quantized CPU kernels need the packed weights on the CPU, not {packed.device}")
    return (packed if packed.is_contiguous() else packed.contiguous()), row_bytes


def dequantize(packed: torch.Tensor, qtype: int | str, in_features: int) -> torch.Tensor:
    """The float32 (rows, in_features) that `packed` (uint8 (rows, row_bytes), CPU) encodes in `qtype`,
    bit-identical to `gguf.quants.dequantize`. Runs lmforge.quant.ggml's PyTorch decoder when the compiled
    kernels are unavailable."""
    spec = _spec(qtype)
    name, in_features = spec[0], int(in_features)
    packed, row_bytes = _check_packed(packed, spec, in_features)
    rows = packed.shape[0]
    k = _module()
    if k is None:
        return ggml.dequantize(packed, name, (rows, in_features))
    out = torch.empty(rows, in_features, dtype=torch.float32)
    if rows and not k.dequantize(_CODES[name], packed.data_ptr(), rows, row_bytes, in_features, out.data_ptr()):
        return ggml.dequantize(packed, name, (rows, in_features))
    return out


def matmul(x: torch.Tensor, packed: torch.Tensor, qtype: int | str, in_features: int) -> torch.Tensor | None:
    """y = x @ W.T in float32, W being `packed` (uint8 (out_features, row_bytes), CPU, possibly a read-only
    mmap view: never written) in GGML type `qtype`, and `x` float32 (n, in_features) (made contiguous if it
    is not). Returns (n, out_features), or None when there is no kernel (the kernels are unavailable, or
    `qtype` has none): the caller then falls back. Forward only (no autograd).

    Up to SMALL_ROWS rows of an integer type quantize x to int8 per block (see the module docstring for the
    accuracy this costs); F16/BF16 accumulate in fp32; more rows decode tiles for a GEMM in `tile_dtype()`."""
    spec = _spec(qtype)
    name = spec[0]
    packed, _ = _check_packed(packed, spec, in_features)
    if x.dim() != 2 or x.shape[1] != in_features:
        raise UserError(f"x must be (rows, {in_features}) for this {name} weight, got {tuple(x.shape)}")
    if not x.is_cpu:
        raise UserError(f"the quantized CPU kernels need x on the CPU, not {x.device}")
    if name == "F32":
        return None if _module() is None else x.float() @ packed.view(torch.float32).t()
    run = bind(packed, name, in_features)
    if run is None:
        return None
    if x.dtype != torch.float32 or not x.is_contiguous() or x.requires_grad:
        x = x.detach().float().contiguous()
    return run(x)


def bind(packed: torch.Tensor, qtype: int | str, in_features: int):
    """`matmul` for one weight with its checks and look-ups done once: a callable `x -> y` (x float32 (n,
    in_features), contiguous, on the CPU: the caller's promise, not checked again), or None when there is no
    kernel for this weight. A layer calls it every decode step: on a 576x576 Q8_0 weight the checks of
    `matmul` cost more than the 13 us the kernel itself takes."""
    spec = _spec(qtype)
    name = spec[0]
    packed, row_bytes = _check_packed(packed, spec, int(in_features))
    k = _module()
    if k is None or name not in _CODES or name == "F32":
        return None
    code, m, in_features = _CODES[name], packed.shape[0], int(in_features)
    direct = name in _DIRECT

    def run(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n == 0 or m == 0:
            return torch.zeros(n, m)
        if n <= SMALL_ROWS and direct:
            y = torch.empty(n, m, dtype=torch.float32)
            if k.matmul(code, x.data_ptr(), n, packed.data_ptr(), m, row_bytes, in_features, y.data_ptr()):
                return y
        return _tiled(k, x, packed, name, row_bytes, in_features)

    return run


def _tiled(k, x: torch.Tensor, packed: torch.Tensor, name: str, row_bytes: int, in_features: int) -> torch.Tensor:
    """Decode tiles of weight rows into scratch and multiply them with PyTorch's GEMM (the prefill path)."""
    n, m = x.shape[0], packed.shape[0]
    dtype = tile_dtype()
    xt = (x if dtype == torch.float32 else x.to(dtype)).t()
    rows = max(16, min(m, _TILE_BYTES // (4 * in_features)))
    scratch = torch.empty(rows, in_features, dtype=torch.float32)
    yt = torch.empty(m, n, dtype=torch.float32)
    for start in range(0, m, rows):
        stop = min(start + rows, m)
        tile = scratch[: stop - start]
        if not k.dequantize(_CODES[name], packed[start].data_ptr(), stop - start, row_bytes, in_features,
                            tile.data_ptr()):
            tile.copy_(ggml.dequantize(packed[start:stop], name, (stop - start, in_features)))
        if dtype == torch.float32:
            torch.mm(tile, xt, out=yt[start:stop])
        else:
            yt[start:stop] = torch.mm(tile.to(dtype), xt)
    return yt.t().contiguous()
