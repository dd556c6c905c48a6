"""Batch-1 decode fast path: a hand-written CPU matrix-vector kernel and a drop-in `nn.Linear` that uses it.

Decoding one token at a time multiplies every weight matrix by a single activation row, so the step is bound
by how fast the weights stream from memory, not by arithmetic. PyTorch's `F.linear` with one row reads
matrices at well under the machine's bandwidth (on a 2-core Zen 3: 8-16 GB/s against ~25 GB/s), while the
loop here (AVX2/FMA; bf16 widened with a shift, fp16 with F16C, accumulated in fp32) streams each row once,
at 80-95% of what a plain sum over the same bytes reaches. `bench/matvec.py` measures both.

    from lmforge.engine import fastpath
    fastpath.accelerate(model, dtype=torch.bfloat16)   # every nn.Linear -> FastLinear (bf16 weights)
    y = fastpath.gemv(W, x)                              # W (out, in) fp32/bf16/fp16, x (in,) -> fp32 (out,)

The kernel (`fastpath.cpp`, beside this file) is compiled on first use and cached by `lmforge.native` (a few
seconds, once per machine and install, with a one-line notice on stderr; how it is keyed, locked and loaded is
described there). It is built with -march=native, so its cache key includes the CPU. Rows are split over
threads with `at::parallel_for`, so `torch.set_num_threads` applies. Where it can't be built (no compiler or
ninja, the .cpp missing, or LMFORGE_NO_KERNELS=1) `available()` is False, `unavailable_reason()` says why, and
everything falls back to ordinary PyTorch.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import native

__all__ = ["available", "unavailable_reason", "gemv", "FastLinear", "accelerate"]

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# The kernel: C++ in fastpath.cpp beside this file (shipped as package data), read when first built.
_SOURCE_PATH = Path(__file__).with_name("fastpath.cpp")

# Tuning, measured on a 2-core Zen 3 (AVX2) with weights coming from DRAM: one row at a time (a single
# sequential stream per thread) with 4 accumulators and a software prefetch 512 B (fp32) / 1 KB (bf16, fp16)
# ahead reaches about what a plain sum over the same bytes does; 2 or 4 rows sharing each x load measured the
# same or up to ~15% slower (more concurrent streams per core). A chunk below ~64 KB of weights is not worth
# waking a second thread for.
_TUNING = {"LMF_ROWS": 1, "LMF_ACC": 4, "LMF_PF_F32": 512, "LMF_PF_16": 1024, "LMF_GRAIN_BYTES": 64 * 1024}


def _flags() -> tuple[list[str], list[str]]:
    cflags = ["-O3", "-fopenmp"] + [f"-D{k}={v}" for k, v in _TUNING.items()]
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "i386"):
        cflags.append("-march=native")
    elif machine in ("aarch64", "arm64"):
        cflags.append("-mcpu=native")
    # No -ffast-math: the intrinsics don't need it, and linking with it (gcc < 13) would add crtfastmath.o,
    # which flips flush-to-zero on for the whole process when the library loads.
    return cflags, ["-fopenmp"]


_KERNEL = native.Kernel("lmforge_gemv", _SOURCE_PATH, _flags, cpu_specific=True)


def _kernel():
    """The compiled module, or None (disabled, or it can't be built here)."""
    return _KERNEL.module()


def available() -> bool:
    """True if the compiled kernel can be used (building it on the first call, a few seconds once per cache)."""
    return _KERNEL.available()


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True)."""
    return _KERNEL.unavailable_reason()


_F32 = torch.float32


def _gemv_into(k, w: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """The kernel call: y = w @ x (+ bias). w: contiguous CPU (out, in) fp32/bf16/fp16; x: contiguous fp32 with
    `in` elements; bias: None or contiguous (out,) fp32/bf16/fp16; y: contiguous fp32 with `out` elements.
    Nothing is checked here (a wrong pointer crashes the process): callers check."""
    out_f, in_f = w.shape
    if bias is None:
        k.gemv(w.data_ptr(), x.data_ptr(), y.data_ptr(), 0, out_f, in_f, _DTYPE_CODES[w.dtype], 0)
    else:
        k.gemv(w.data_ptr(), x.data_ptr(), y.data_ptr(), bias.data_ptr(), out_f, in_f, _DTYPE_CODES[w.dtype],
               _DTYPE_CODES[bias.dtype])
    return y


def gemv(W: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = W @ x (+ bias) in float32. W: (out, in) float32/bfloat16/float16; x: (in,) or (1, in) (any float
    dtype, converted to float32). Returns (out,) or (1, out), i.e. x's shape with `in` replaced by `out`.
    Not differentiable (inference only).

    Accumulates in float32 with the weights upcast exactly, so it matches `W.float() @ x.float()` up to
    summation order. Falls back to exactly that when the kernel is unavailable or W is not on the CPU.
    """
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (out, in), got shape {tuple(W.shape)}")
    out_f, in_f = W.shape
    if x.shape[-1] != in_f or x.numel() != in_f:
        raise ValueError(f"x must hold one row of {in_f} elements, got shape {tuple(x.shape)}")
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
    k = _kernel()
    if (k is None or W.dtype not in _DTYPE_CODES or not (W.is_cpu and x.is_cpu)
            or (bias is not None and (bias.dtype not in _DTYPE_CODES or not bias.is_cpu))):
        y = W.float() @ x.reshape(in_f).float()
        if bias is not None:
            y = y + bias.float()
        return y.reshape(*x.shape[:-1], out_f).detach()
    y = torch.empty(*x.shape[:-1], out_f, dtype=_F32)
    if not W.is_contiguous():
        W = W.contiguous()
    if x.dtype is not _F32 or not x.is_contiguous():
        x = x.reshape(in_f).float().contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    return _gemv_into(k, W, x, bias, y)


_UPCAST_ROWS = 64  # rows from which an fp32 GEMM on upcast weights beats a bf16/fp16 one (measured)
_LOOP_ROWS = 4  # up to this many rows, a matrix of at least _LOOP_BYTES goes through the kernel row by row
_LOOP_BYTES = 8 << 20  # (smaller matrices stay in cache, where BLAS's small GEMM wins; measured on 2 cores)


class FastLinear(nn.Module):
    """`nn.Linear` for inference whose one-row case (batch-1 decode) runs the streaming kernel.

    Holds `weight` (out, in) and optional `bias` in one dtype (fp32, bf16 or fp16); state-dict keys are those
    of `nn.Linear`. Input of any float dtype; output in the input's dtype. A single row goes through `gemv`
    (fp32 accumulation); several rows, autograd, or a non-CPU weight go through `F.linear` in the weight's
    dtype, i.e. PyTorch's BLAS path.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype | None = None,
                 device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype | None = None) -> "FastLinear":
        """Wrap `linear`. With `dtype` None or unchanged the very same parameters are reused (no copy; tied
        weights stay tied); otherwise the weights are converted (a copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        w = linear.weight
        if (dtype is None or dtype == w.dtype) and w.is_contiguous():
            new.weight = w
        else:
            new.weight = nn.Parameter(w.detach().to(dtype or w.dtype).contiguous(), requires_grad=False)
        b = linear.bias
        if b is None:
            new.register_parameter("bias", None)
        elif dtype is None or dtype == b.dtype:
            new.bias = b
        else:
            new.bias = nn.Parameter(b.detach().to(dtype), requires_grad=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        # The kernel path: one row, CPU, no autograd. Checks ordered cheapest-first (this runs ~120 times a
        # decode step of a 30-layer model, so every microsecond here is ~1% of a 135M model's token time).
        if x.numel() == self.in_features and x.shape[-1] == self.in_features and w.is_cpu and not (
            torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))
        ):
            k = _kernel()
            if (k is not None and x.is_cpu and w.dtype in _DTYPE_CODES and w.is_contiguous()
                    and (b is None or (b.dtype in _DTYPE_CODES and b.is_cpu and b.is_contiguous()))):
                xf = x if x.dtype is _F32 and x.is_contiguous() else x.reshape(-1).float().contiguous()
                y = _gemv_into(k, w, xf, b, torch.empty(*x.shape[:-1], self.out_features, dtype=_F32))
                return y if x.dtype is _F32 else y.to(x.dtype)
        rows = x.numel() // self.in_features
        if (1 < rows <= _LOOP_ROWS and w.is_cpu and w.numel() * w.element_size() >= _LOOP_BYTES
                and not torch.is_grad_enabled() and _kernel() is not None):
            # A few rows (a small continuous batch) against a matrix far larger than the caches: BLAS runs a
            # 2-4 row GEMM at barely better than a full GEMM's cost, several times slower than streaming the
            # weight once per row through the kernel above (measured: a 32000x288 fp32 head, 3 rows, 9.5 ms
            # with F.linear, 2.9 ms row by row).
            flat = x.reshape(rows, 1, self.in_features)
            return torch.cat([self.forward(flat[r]) for r in range(rows)]).reshape(*x.shape[:-1], self.out_features)
        if w.is_cpu and w.dtype is not _F32 and x.dtype is _F32 and x.numel() >= _UPCAST_ROWS * self.in_features:
            # Many rows (a prefill): CPUs without native bf16/fp16 matmuls run them several times slower than
            # fp32, so converting the weight once per call is cheaper than a low-precision GEMM.
            return F.linear(x, w.float(), None if b is None else b.float())
        return F.linear(x.to(w.dtype), w, b).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.weight.dtype}")


def _plain_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def accelerate(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `nn.Linear` in `model` by a `FastLinear` (in place) and return `model`.

    Subclasses of `nn.Linear` that override `forward` (LoRA, quantized layers, ...) are left alone: swapping them
    would silently drop what they add.

    `dtype` None keeps each layer's weight dtype and shares its parameters (no memory is copied); otherwise
    weights are converted to `dtype`. A weight used by several modules (a tied lm_head and embedding, or two
    Linears sharing one matrix) is converted once and stays shared among the Linears; when the dtype is
    unchanged it also stays the embedding's very tensor.
    """
    converted: dict[int, nn.Parameter] = {}

    def convert(p: nn.Parameter | None) -> nn.Parameter | None:
        if p is None or (dtype is None or dtype == p.dtype) and p.is_contiguous():
            return p
        if id(p) not in converted:
            converted[id(p)] = nn.Parameter(p.detach().to(dtype or p.dtype).contiguous(), requires_grad=False)
        return converted[id(p)]

    replaced: dict[int, FastLinear] = {}  # a Linear registered in two places becomes one FastLinear
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if _plain_linear(child)]
    for parent, name, linear in targets:
        if id(linear) not in replaced:
            fast = FastLinear.from_linear(linear)  # shares the parameters ...
            fast.weight = convert(linear.weight)  # ... then converts each shared tensor once
            if linear.bias is not None:
                fast.bias = convert(linear.bias)
            replaced[id(linear)] = fast
        setattr(parent, name, replaced[id(linear)])
    if _plain_linear(model):  # the model itself is a Linear: nothing to set it on, so return a new one
        return FastLinear.from_linear(model, dtype)
    return model
