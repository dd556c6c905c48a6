"""Compiling lmforge's C++ CPU kernels on first use, safely, once per machine and install.

Two libraries use this: the fp32/bf16/fp16 decode gemv (`engine/fastpath.py` + `fastpath.cpp`) and the GGML
quantized matmuls (`quant/kernels.py` + `quant/kernels*.cpp|h`). Each is a `Kernel`: a C++ source compiled with
`torch.utils.cpp_extension.load_inline` (it includes only Python.h and ATen/Parallel.h, not torch/extension.h,
so a build takes seconds), with a one-line notice on stderr the first time. Threads come from `at::parallel_for`,
so `torch.set_num_threads` applies (torch's CPU builds use OpenMP, whose `parallel_for` is an inline
`#pragma omp parallel`: hence -fopenmp, which links the libgomp torch has already loaded: one thread pool for
both). Where a library can't be built (no compiler or ninja, the source missing, or LMFORGE_NO_KERNELS=1) its
`module()` is None, `unavailable_reason()` says why, and its callers fall back to ordinary PyTorch.

A source may `#include "name"` a file beside it: the text is spliced in here before compiling (as often as it
is included), so the cache key below covers every file a library is made of and no include path (which would
name a directory of this install) reaches the build command.

Where a compiled library lives. `$LMFORGE_HOME/cache/kernels/<prefix>_<key>.so` (`paths.cache_dir`), the only
file a load trusts. `<key>` is the first 16 hex digits of a SHA-256 over exactly these, in this order:

    the (spliced) source text            any edit rebuilds
    the compiler and linker flags        incl. -march=native / -fopenmp / tuning -D values
    torch.__version__                    the ATen headers and libraries it is compiled and linked against
    the Python extension suffix          e.g. .cpython-311-x86_64-linux-gnu.so: the interpreter's version and ABI
    platform.machine()                   and, for a library built with -march=native (`cpu_specific`), the
                                         CPU's model name and flags (from /proc/cpuinfo): it runs only there

and nothing else: no path (of the virtualenv, of torch, of a build directory), no environment variable, no time.
So the key is the same in every process of one install, and two virtualenvs with the same torch share one
build. (torch's own cache keyed its directory on a key like this one, but its build command holds the
virtualenv's include paths: two virtualenvs on one machine took turns recompiling the same directory.) The
compiler is not in the key either (a library built by an older gcc still runs): to force a rebuild, delete the
directory. A library with runtime ISA dispatch (the quantized kernels) is not `cpu_specific`: one build serves
every x86-64 CPU, which picks its own code path when it runs.

How it is built, safely with concurrent and killed processes. A process that finds no compiled library takes an
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
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from lmforge import paths
from lmforge.io import fsync_dir

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["Kernel", "disabled", "say"]

# A build in progress elsewhere is waited for this long; then this process runs on PyTorch (and says so).
_LOCK_TIMEOUT_S = 60.0
_LOCK_POLL_S = 0.05
_COMPILE_ESTIMATE_S = 5  # for the notice (measured 2.5-4 s for the gemv on a busy 2-core Zen 3)
_LIB_SUFFIX = ".pyd" if sys.platform == "win32" else ".so"  # what torch names the library it links

_loaded: dict[str, object] = {}  # module name -> module: an extension module is loaded once per process
_noticed = False  # the compile notice is printed once per process
_thread_lock = threading.Lock()  # two threads' first calls build once


class _LockTimeout(Exception):
    pass


def disabled() -> bool:
    """True when the user turned every compiled kernel off (LMFORGE_NO_KERNELS set to anything but 0/false/no)."""
    value = os.environ.get("LMFORGE_NO_KERNELS")  # read per call (tests flip it), so kept cheap when unset
    return value is not None and value.strip().lower() not in ("", "0", "false", "no")


def say(line: str) -> None:
    """One line on stderr, prefixed like every lmforge notice."""
    print(f"lmforge: {line}", file=sys.stderr, flush=True)


def _cpu_tag() -> str:
    """What `-march=native` depends on, so a cache shared between machines never serves a foreign binary."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_key(source: str, cflags: list[str], ldflags: list[str], cpu_specific: bool = True) -> str:
    """The name under which a library built from `source` with these flags is cached (see the module docstring
    for what goes in, and why nothing else does)."""
    parts = [source, *cflags, "|", *ldflags, torch.__version__, sysconfig.get_config_var("EXT_SUFFIX") or "",
             platform.machine()]
    if cpu_specific:
        parts.append(_cpu_tag())
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"/\\]+)"\s*$')


def _read_source(path: Path, depth: int = 0) -> str:
    """`path`'s text with every `#include "x"` of a file beside it replaced by that file's (spliced) text."""
    if depth > 8:
        raise OSError(f"{path.name}: includes nested too deeply")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        m = _INCLUDE.match(line)
        if m and (path.parent / m.group(1)).is_file():
            out.append(_read_source(path.parent / m.group(1), depth + 1))
            out.append("\n")
        else:
            out.append(line)
    return "".join(out)


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
                    say(f"waiting for {holder}, which is compiling lmforge's CPU kernels (at most {timeout:g} s)")
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
    """The module `name` if this process has it or lmforge's cache holds it, whole; else None."""
    if name not in _loaded:
        target = _library_path(name)
        if not target.is_file():
            return None
        try:
            _loaded[name] = _import_library(name, target)
        except ImportError:  # damaged (say, by a full disk): to be rebuilt
            return None
    return _loaded[name]


def _build_into_cache(name: str, source: str, cflags: list[str], ldflags: list[str],
                      estimate_s: float = _COMPILE_ESTIMATE_S):
    """Compile the module `name` into lmforge's cache, under the build lock, and load it."""
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
                say(f"compiling lmforge's CPU kernels, once, ~{estimate_s:g} s (into {directory})")
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
    """Why nothing can be compiled here (None: ninja and a C++ compiler are installed)."""
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        return f"no C++ compiler ({cxx!r} not found)"
    return None


_UNBUILT = object()


class Kernel:
    """One compiled library: `prefix` names it in the cache, `source` is its .cpp (read when first built),
    `flags()` gives (cflags, ldflags). Built or loaded once per process, on the first `module()` call.

    The build is tried with the flags as given and, if that fails, once more without OpenMP (Apple clang has
    none); where the first attempt failed before, a later process loads the second's library rather than spend
    seconds failing again (delete the cache to retry)."""

    def __init__(self, prefix: str, source: Path, flags: Callable[[], tuple[list[str], list[str]]], *,
                 cpu_specific: bool, estimate_s: float | None = None) -> None:
        self.prefix, self.source, self.flags, self.cpu_specific = prefix, Path(source), flags, cpu_specific
        self.estimate_s = estimate_s  # for the notice (None: _COMPILE_ESTIMATE_S)
        self._module = _UNBUILT
        self._reason: str | None = None

    def attempts(self) -> list[tuple[list[str], list[str]]]:
        cflags, ldflags = self.flags()
        return [(cflags, ldflags), ([f for f in cflags if f != "-fopenmp"], [])]

    def name(self, source: str, cflags: list[str], ldflags: list[str]) -> str:
        """The module (and library file) name for this source text and these flags."""
        return f"{self.prefix}_{_cache_key(source, cflags, ldflags, self.cpu_specific)}"

    def forget(self) -> None:
        """Forget this process's build result (the next `module()` loads from the cache or builds again)."""
        self._module = _UNBUILT
        self._reason = None

    def _build(self):
        try:
            source = _read_source(self.source)
        except OSError as e:  # an install without the package data
            self._reason = f"kernel source {self.source.name} unreadable: {e.strerror or e}"
            return None
        attempts = self.attempts()
        names = [self.name(source, cf, lf) for cf, lf in attempts]
        for name in names:
            if (mod := _cached(name)) is not None:
                return mod
        errors = []
        for name, (cf, lf) in zip(names, attempts):
            try:
                return _build_into_cache(name, source, cf, lf, self.estimate_s or _COMPILE_ESTIMATE_S)
            except _LockTimeout as e:
                self._reason = (f"{e} held the kernel build lock for over {_LOCK_TIMEOUT_S:g} s "
                                f"({paths.cache_dir('kernels') / 'build.lock'})")
                say(f"{self._reason}; running on PyTorch without the CPU kernels this time")
                return None
            except Exception as e:  # noqa: BLE001 - any build failure means "use the fallback"
                errors.append(f"{type(e).__name__}: {str(e).strip()[-500:]}")
        self._reason = "kernel build failed: " + " | ".join(errors)
        return None

    def built(self):
        """The module, loaded from lmforge's cache or compiled into it, once per process; None on failure
        (LMFORGE_NO_KERNELS is not consulted here: see `module`)."""
        if self._module is _UNBUILT:
            with _thread_lock:
                if self._module is _UNBUILT:
                    self._reason = _toolchain_problem()
                    self._module = None if self._reason is not None else self._build()
                    if self._module is not None:
                        self._reason = None
        return self._module

    def module(self):
        """The module, or None when kernels are disabled or it can't be built (building it on first call)."""
        if disabled():
            return None
        return self.built()

    def available(self) -> bool:
        return self.module() is not None

    def unavailable_reason(self) -> str | None:
        """Why `module()` is None (None when it is not)."""
        if disabled():
            return "disabled by LMFORGE_NO_KERNELS"
        if self.built() is None:
            return self._reason or "kernel unavailable"
        return None
