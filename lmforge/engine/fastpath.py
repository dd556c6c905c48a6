"""Batch-1 decode fast path: a hand-written CPU matrix-vector kernel and a drop-in `nn.Linear` that uses it.

Decoding one token at a time multiplies every weight matrix by a single activation row, so the step is bound
by how fast the weights stream from memory, not by arithmetic. PyTorch's `F.linear` with one row reads
matrices at well under the machine's bandwidth (on a 2-core Zen 3: 8-16 GB/s against ~25 GB/s), while the
loop here (AVX2/FMA; bf16 widened with a shift, fp16 with F16C, accumulated in fp32) streams each row once,
at 80-95% of what a plain sum over the same bytes reaches. `bench/matvec.py` measures both.

    from lmforge.engine import fastpath
    fastpath.accelerate(model, dtype=torch.bfloat16)   # every nn.Linear -> FastLinear (bf16 weights)
    y = fastpath.gemv(W, x)                              # W (out, in) fp32/bf16/fp16, x (in,) -> fp32 (out,)

The kernel (`fastpath.cpp`, beside this file) is compiled on first use with
`torch.utils.cpp_extension.load_inline` (a few seconds: it includes only Python.h and ATen/Parallel.h, not
torch/extension.h), once per machine and install, with a one-line notice on stderr. Rows are split over threads
with `at::parallel_for`, so `torch.set_num_threads` applies (torch's CPU builds use OpenMP, whose `parallel_for`
is an inline `#pragma omp parallel`: hence -fopenmp, which links the libgomp torch has already loaded, one thread
pool for both). Where it can't be built (no compiler or ninja, the .cpp missing, or LMFORGE_NO_KERNELS=1)
`available()` is False, `unavailable_reason()` says why, and everything falls back to ordinary PyTorch.

Where the compiled kernel lives. `$LMFORGE_HOME/cache/kernels/lmforge_gemv_<key>.so` (`paths.cache_dir`), the
only file a load trusts. `<key>` is the first 16 hex digits of a SHA-256 over exactly these, in this order:

    the text of fastpath.cpp             any edit rebuilds
    the compiler and linker flags        incl. the _TUNING -D values and -march=native / -fopenmp
    torch.__version__                    the ATen headers and libraries it is compiled and linked against
    the Python extension suffix          e.g. .cpython-311-x86_64-linux-gnu.so: the interpreter's version and ABI
    platform.machine() + the CPU's model name and flags (from /proc/cpuinfo): -march=native code runs only there

and nothing else: no path (of the virtualenv, of torch, of a build directory), no environment variable, no time.
So the key is the same in every process of one install, and two virtualenvs with the same torch share one
build. (torch's own cache, used before, keyed its directory on a key like this one, but its build command holds
the virtualenv's include paths: two virtualenvs on one machine took turns recompiling the same directory.) The
compiler is not in the key either (a kernel built by an older gcc still runs): to force a rebuild, delete the
directory.

How it is built, safely with concurrent and killed processes. A process that finds no compiled kernel takes an
exclusive `fcntl.flock` on `kernels/build.lock`, waiting at most `_LOCK_TIMEOUT_S` (then it warns in one line
and runs on PyTorch rather than hang); looks again (another process may have built it meanwhile); compiles into
a fresh `kernels/build-*` directory; and `os.replace`s the library onto its final name. A build killed at any
point leaves only a temp directory (the next build removes it) and never a half-written file under the name a
load trusts; a final file that still fails to import (say, truncated by a full disk) is rebuilt. Why flock rather
than an O_EXCL lock file naming its holder's PID: the OS drops a flock when its holder dies, however it dies, so
there is no stale lock to detect, and no PID-reuse race (a dead holder's PID, recycled by a live process, would
look alive). The lock file itself is never deleted (deleting a locked file lets two processes lock two different
files); it holds the last holder's PID and start time, for the messages.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import paths
from lmforge.io import fsync_dir

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

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

_reason: str | None = None


def _disabled() -> bool:
    return os.environ.get("LMFORGE_NO_KERNELS", "").strip().lower() not in ("", "0", "false", "no")


def _cpu_tag() -> str:
    """What `-march=native` depends on, so a cache shared between machines never serves a foreign binary."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


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


def _cache_key(source: str, cflags: list[str], ldflags: list[str]) -> str:
    """The name under which a kernel built from `source` with these flags is cached (see the module docstring
    for what goes in, and why nothing else does)."""
    parts = [source, *cflags, "|", *ldflags, torch.__version__, sysconfig.get_config_var("EXT_SUFFIX") or "",
             platform.machine(), _cpu_tag()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


# A build in progress elsewhere is waited for this long; then this process runs on PyTorch (and says so).
_LOCK_TIMEOUT_S = 60.0
_LOCK_POLL_S = 0.05
_COMPILE_ESTIMATE_S = 5  # for the notice (measured 2.5-4 s on a busy 2-core Zen 3)
_LIB_SUFFIX = ".pyd" if sys.platform == "win32" else ".so"  # what torch names the library it links

_loaded: dict[str, object] = {}  # module name -> module: an extension module is loaded once per process
_noticed = False  # the compile notice is printed once per process
_thread_lock = threading.Lock()  # two threads' first calls build once


class _LockTimeout(Exception):
    pass


def _say(line: str) -> None:
    print(f"lmforge: {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _build_lock(path: Path, timeout: float):
    """Hold an exclusive flock on `path` (created if missing, never deleted) for the `with` body.

    Raises _LockTimeout after `timeout` seconds of another process holding it. A holder that dies, however it
    dies, releases it at once (the OS closes its files), so only a live holder can make us wait."""
    if fcntl is None:
        raise OSError("no fcntl.flock on this platform to serialise kernel builds")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _lock_holder(fd)
                if time.monotonic() >= deadline:
                    raise _LockTimeout(holder) from None
                if not waited:
                    _say(f"waiting for {holder}, which is compiling lmforge's CPU kernels (at most {timeout:g} s)")
                    waited = True
                time.sleep(_LOCK_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {time.time():.0f}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock_holder(fd: int) -> str:
    """'process PID' from the lock file, for messages (best effort: it is whatever the last holder wrote)."""
    try:
        pid = os.pread(fd, 64, 0).split()[0].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        return "another process"
    return f"process {pid}" if pid.isdigit() else "another process"


def _compile(name: str, source: str, cflags: list[str], ldflags: list[str], build_dir: Path) -> Path:
    """Compile and link `source` into `build_dir`, and return the library's path there. Replaceable in tests."""
    from torch.utils import cpp_extension

    kwargs = dict(extra_cflags=cflags, extra_ldflags=ldflags, build_directory=str(build_dir), verbose=False)
    try:
        mod = cpp_extension.load_inline(name, [source], no_implicit_headers=True, **kwargs)
    except TypeError:  # torch < 2.5: no `no_implicit_headers` (torch/extension.h gets prepended; slower)
        mod = cpp_extension.load_inline(name, [source], **kwargs)
    if mod.__name__ != name:  # torch appends _v1 when one process builds one name twice (_loaded prevents it)
        raise RuntimeError(f"torch built the kernel as {mod.__name__!r}, not {name!r}")
    return Path(mod.__file__)


def _import_library(name: str, path: Path):
    """Import the extension module `name` from the library file `path` (ImportError if it is not a whole one)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _library_path(name: str) -> Path:
    return paths.cache_dir("kernels") / f"{name}{_LIB_SUFFIX}"


def _cached(name: str):
    """The kernel module `name` if this process has it or lmforge's cache holds it, whole; else None."""
    if name not in _loaded:
        target = _library_path(name)
        if not target.is_file():
            return None
        try:
            _loaded[name] = _import_library(name, target)
        except ImportError:  # damaged (say, by a full disk): to be rebuilt
            return None
    return _loaded[name]


def _build_into_cache(name: str, source: str, cflags: list[str], ldflags: list[str]):
    """Compile the kernel module `name` into lmforge's cache, under the build lock, and load it."""
    global _noticed
    target = _library_path(name)
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    with _build_lock(directory / "build.lock", _LOCK_TIMEOUT_S):
        if (mod := _cached(name)) is not None:  # another process built it while we waited
            return mod
        for stale in directory.glob("build-*"):  # left by killed builds: nobody else builds while we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        build_dir = Path(tempfile.mkdtemp(prefix="build-", dir=directory))
        try:
            if not _noticed:
                _say(f"compiling lmforge's CPU kernels, once, ~{_COMPILE_ESTIMATE_S} s (into {directory})")
                _noticed = True
            built = _compile(name, source, cflags, ldflags, build_dir)
            with open(built, "rb") as f:
                os.fsync(f.fileno())
            os.replace(built, target)  # atomic: the final name holds a whole library or nothing
            fsync_dir(directory)
        finally:
            shutil.rmtree(build_dir, ignore_errors=True)
    _loaded[name] = _import_library(name, target)
    return _loaded[name]


def _toolchain_problem() -> str | None:
    """Why no kernel can be compiled here (None: ninja and a C++ compiler are installed)."""
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        return f"no C++ compiler ({cxx!r} not found)"
    return None


@functools.lru_cache(maxsize=None)
def _build():
    """The kernel module, loaded from lmforge's cache or compiled into it, once per process; None on failure."""
    global _reason
    _reason = _toolchain_problem()
    if _reason is not None:
        return None
    try:
        source = _SOURCE_PATH.read_text(encoding="utf-8")
    except OSError as e:  # an install without the package data
        _reason = f"kernel source {_SOURCE_PATH.name} unreadable: {e.strerror or e}"
        return None
    cflags, ldflags = _flags()
    attempts = [(cflags, ldflags), ([f for f in cflags if f != "-fopenmp"], [])]  # e.g. Apple clang: no OpenMP
    names = [f"lmforge_gemv_{_cache_key(source, cf, lf)}" for cf, lf in attempts]
    errors = []
    with _thread_lock:
        for name in names:  # built before by either attempt (where the first fails to compile, a later process
            # loads the second's library rather than spend seconds failing again; delete the cache to retry)
            if (mod := _cached(name)) is not None:
                _reason = None
                return mod
        for name, (cf, lf) in zip(names, attempts):
            try:
                mod = _build_into_cache(name, source, cf, lf)
            except _LockTimeout as e:
                _reason = (f"{e} held the kernel build lock for over {_LOCK_TIMEOUT_S:g} s "
                           f"({paths.cache_dir('kernels') / 'build.lock'})")
                _say(f"{_reason}; running on PyTorch without the CPU kernels this time")
                return None
            except Exception as e:  # noqa: BLE001 - any build failure means "use the fallback"
                errors.append(f"{type(e).__name__}: {str(e).strip()[-500:]}")
                continue
            _reason = None
            return mod
    _reason = "kernel build failed: " + " | ".join(errors)
    return None


def _kernel():
    if _disabled():
        return None
    return _build()


def available() -> bool:
    """True if the compiled kernel can be used (building it on the first call, a few seconds once per cache)."""
    return _kernel() is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True)."""
    if _disabled():
        return "disabled by LMFORGE_NO_KERNELS"
    if _build() is None:
        return _reason or "kernel unavailable"
    return None


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
