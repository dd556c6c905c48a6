"""Building a CPU kernel library safely (`lmforge.native`, here through the fastpath gemv that uses it): a
lock that a killed process can't leave behind, a live build elsewhere that can't hang us, a cache key that is
the same in every process, and no half-written library ever loaded.

Bounded in time: no test here waits on a lock for more than a few seconds, and the tests of the lock and the
files replace the compiler and the importer by fakes (`_compile` writes a small file ending in END;
`_import_library` refuses a file that doesn't end so, the way a real import refuses a truncated library). Only
the last test compiles for real, in fresh processes, where a compiler is installed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge import native, paths
from lmforge.engine import fastpath

pytest.importorskip("fcntl")  # the build lock is an flock (POSIX)

REPO = Path(__file__).resolve().parents[1]
WHOLE = b" END"  # how every fake library ends; a truncated one does not


@pytest.fixture
def fresh(monkeypatch):
    """This process as if it had loaded no kernel yet (the real one is back after the test), with an empty
    kernel directory of its own (not the session's shared one, which conftest links into every home)."""
    shared = paths.cache_dir("kernels")
    if shared.is_symlink():
        shared.unlink()
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_noticed", False)
    fastpath._KERNEL.forget()
    yield
    fastpath._KERNEL.forget()


@pytest.fixture
def fake(monkeypatch, fresh):
    """Compile and import without a compiler; records what was compiled and which files were imported."""
    calls = SimpleNamespace(compiled=[], imported=[])

    def compile_(name, source, cflags, ldflags, build_dir):
        calls.compiled.append(name)
        out = build_dir / f"{name}.so"
        out.write_bytes(b"fake library " + name.encode() + WHOLE)
        return out

    def import_(name, path):
        if not Path(path).read_bytes().endswith(WHOLE):
            raise ImportError(f"{path}: file too short")
        calls.imported.append(Path(path))
        return SimpleNamespace(__name__=name, __file__=str(path))

    monkeypatch.delenv("LMFORGE_NO_KERNELS", raising=False)  # the machinery is tested with the kernels on
    monkeypatch.setattr(native, "_toolchain_problem", lambda: None)
    monkeypatch.setattr(native, "_compile", compile_)
    monkeypatch.setattr(native, "_import_library", import_)
    monkeypatch.setattr(native, "_LOCK_TIMEOUT_S", 5.0)  # whatever goes wrong, no test waits longer
    return calls


def kernel_dir() -> Path:
    return paths.cache_dir("kernels")


def kernel_name() -> str:
    """The name the first build attempt (with OpenMP) caches the kernel under."""
    return fastpath._KERNEL.name(native._read_source(fastpath._SOURCE_PATH), *fastpath._flags())


def python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), **kw.pop("env", {})}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kw)


# Takes the build lock the way a building lmforge does, says so, then holds it for argv[2] seconds; with
# argv[3], it then "finishes its build": the library appears at that path, whole, before the lock is released.
HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.pwrite(fd, f"{os.getpid()} {time.time():.0f}\\n".encode(), 0)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
if len(sys.argv) > 3:
    with open(sys.argv[3] + ".tmp", "wb") as f:
        f.write(b"built elsewhere END")
    os.replace(sys.argv[3] + ".tmp", sys.argv[3])
"""


def hold_lock(seconds: float, *then: str) -> subprocess.Popen:
    kernel_dir().mkdir(parents=True, exist_ok=True)
    holder = python(HOLDER, str(kernel_dir() / "build.lock"), str(seconds), *then)
    assert holder.stdout.readline() == "locked\n", holder.stderr.read()
    return holder


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    for stream in (proc.stdout, proc.stderr):
        stream.close()


# --------------------------------------------------------------------------------------------------- the lock
def test_a_load_killed_mid_compile_does_not_block_later_loads(fake, capfd):
    """The reported hang: the first load is killed while compiling. Before: torch's lock file stayed in
    ~/.cache/torch_extensions and every later load waited for it forever. Now the killed process's flock died
    with it, and what it had half written is never loaded."""
    child = python(
        "import time\n"
        "from lmforge import native as n\n"
        "from lmforge.engine import fastpath as f\n"
        "def compile_(name, source, cflags, ldflags, build_dir):\n"
        "    (build_dir / f'{name}.so').write_bytes(b'half a libr')\n"
        "    print('compiling', flush=True)\n"
        "    time.sleep(60)\n"
        "n._toolchain_problem = lambda: None\n"
        "n._compile = compile_\n"
        "f.available()\n")
    try:
        assert child.stdout.readline() == "compiling\n", child.stderr.read()
        child.send_signal(signal.SIGKILL)  # killed mid-compile: no finally, no atexit
        child.wait(timeout=10)
        leftovers = list(kernel_dir().glob("build-*/*.so"))
        assert [p.read_bytes() for p in leftovers] == [b"half a libr"]
        assert (kernel_dir() / "build.lock").read_text().split()[0] == str(child.pid)  # names a dead process
    finally:
        stop(child)

    assert fastpath.available(), fastpath.unavailable_reason()
    target = kernel_dir() / f"{kernel_name()}.so"
    assert fake.compiled == [kernel_name()] and fake.imported == [target]  # never the half file
    assert not list(kernel_dir().glob("build-*"))  # the killed build's directory is gone
    assert (kernel_dir() / "build.lock").read_text().split()[0] == str(os.getpid())
    assert "waiting" not in capfd.readouterr().err  # nothing to wait for


def test_a_lock_file_naming_a_dead_process_is_no_obstacle(fake, capfd):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    kernel_dir().mkdir(parents=True)
    (kernel_dir() / "build.lock").write_text(f"{dead.stdout.strip()} 0\n")
    assert fastpath.available(), fastpath.unavailable_reason()
    assert len(fake.compiled) == 1
    assert "waiting" not in capfd.readouterr().err  # the lock was free at once: nothing to wait for


def test_a_live_build_elsewhere_makes_the_loader_fall_back_not_hang(fake, monkeypatch, capfd):
    """A process that holds the lock and never lets go (stopped, stuck on a network disk ...): after the
    timeout this one runs on PyTorch, says so in one line, and names the holder."""
    monkeypatch.setattr(native, "_LOCK_TIMEOUT_S", 0.5)
    holder = hold_lock(60)
    try:
        assert not fastpath.available()  # after waiting out the timeout (the "waiting" line below)
        reason = fastpath.unavailable_reason()
        assert f"process {holder.pid}" in reason and "build lock" in reason
        W, x = torch.randn(5, 7), torch.randn(7)
        torch.testing.assert_close(fastpath.gemv(W, x), W @ x)  # the PyTorch path
    finally:
        stop(holder)
    err = capfd.readouterr().err.splitlines()
    assert [ln for ln in err if "waiting for" in ln] == [
        f"lmforge: waiting for process {holder.pid}, which is compiling lmforge's CPU kernels (at most 0.5 s)"]
    warning = [ln for ln in err if "running on PyTorch" in ln]
    assert len(warning) == 1 and f"process {holder.pid}" in warning[0]
    assert fake.compiled == [] and fake.imported == []


def test_a_kernel_built_elsewhere_while_waiting_is_loaded_not_rebuilt(fake, capfd):
    target = kernel_dir() / f"{kernel_name()}.so"
    holder = hold_lock(0.3, str(target))
    try:
        assert fastpath.available(), fastpath.unavailable_reason()
    finally:
        stop(holder)
    assert fake.compiled == [] and fake.imported == [target]
    assert target.read_bytes() == b"built elsewhere END"
    assert "compiling lmforge's CPU kernels, once" not in capfd.readouterr().err


# --------------------------------------------------------------------------------------------------- the key
def test_the_cache_key_is_the_same_in_fresh_processes(tmp_path):
    """Computed in two new processes that differ in everything the key must not depend on (working directory,
    compiler variable, torch's extension directory, hash seed): one key, the same as here."""
    code = ("from lmforge import native as n\n"
            "from lmforge.engine import fastpath as f\n"
            "print(f._KERNEL.name(n._read_source(f._SOURCE_PATH), *f._flags()))\n")
    envs = [{"PYTHONHASHSEED": "1", "MAX_JOBS": "1"},
            {"PYTHONHASHSEED": "2", "CXX": "g++", "TORCH_EXTENSIONS_DIR": str(tmp_path), "MAX_JOBS": "7"}]
    procs = [python(code, env=env, cwd=cwd) for env, cwd in zip(envs, (REPO, tmp_path))]
    outs = [p.communicate(timeout=120) for p in procs]
    keys = [out.strip() for out, _ in outs]
    assert keys[0] == keys[1] == kernel_name(), outs


def test_the_cache_key_changes_with_what_it_documents_and_nothing_else(monkeypatch):
    source, (cflags, ldflags) = "int x;", fastpath._flags()
    key = native._cache_key(source, cflags, ldflags)
    assert native._cache_key(source, cflags, ldflags) == key
    assert native._cache_key(source + " ", cflags, ldflags) != key
    assert native._cache_key(source, cflags[:-1], ldflags) != key
    assert native._cache_key(source, cflags, []) != key
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert native._cache_key(source, cflags, ldflags) != key
    monkeypatch.undo()
    monkeypatch.setattr(native, "_cpu_tag", lambda: "another cpu")
    assert native._cache_key(source, cflags, ldflags) != key
    monkeypatch.undo()
    # Where this install lives (its virtualenv, torch's directory) is not in it: the rebuilds that were seen
    # came from two virtualenvs sharing one key but not one build command.
    for var in ("CXX", "TORCH_EXTENSIONS_DIR", "VIRTUAL_ENV", "LMFORGE_HOME"):
        monkeypatch.setenv(var, "/somewhere/else")
    monkeypatch.chdir("/")
    assert native._cache_key(source, cflags, ldflags) == key


# --------------------------------------------------------------------------------------------------- the file
def test_a_truncated_library_under_the_final_name_is_rebuilt_not_trusted(fake):
    """The final name only ever receives a whole library (os.replace), but a damaged one (a disk that filled
    up, a power cut) fails to import and is rebuilt under the lock."""
    target = kernel_dir() / f"{kernel_name()}.so"
    kernel_dir().mkdir(parents=True)
    target.write_bytes(b"fake library, trunc")
    assert fastpath.available(), fastpath.unavailable_reason()
    assert fake.compiled == [kernel_name()] and fake.imported == [target]
    assert target.read_bytes().endswith(WHOLE)


def test_the_real_import_refuses_a_truncated_library(tmp_path):
    """What the damaged-file case above relies on: importing a cut-off shared library raises ImportError."""
    cut = tmp_path / "lmforge_gemv_cut.so"
    cut.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(20))
    with pytest.raises(ImportError):
        native._import_library("lmforge_gemv_cut", cut)


def test_a_failed_build_leaves_nothing_behind(fake, monkeypatch):
    def failing(name, source, cflags, ldflags, build_dir):
        (build_dir / f"{name}.so").write_bytes(b"half")
        raise RuntimeError("Error building extension: c++ exited with status 1")

    monkeypatch.setattr(native, "_compile", failing)
    assert not fastpath.available()
    assert "Error building extension" in fastpath.unavailable_reason()
    assert sorted(p.name for p in kernel_dir().iterdir()) == ["build.lock"]


# --------------------------------------------------------------------------------------------------- the notice
def test_the_compile_notice_is_one_line_once_per_process(fake, monkeypatch, capfd):
    real_compile = native._compile

    def first_attempt_fails(name, *args):  # the OpenMP build fails, the one without it works: one notice
        if len(fake.compiled) == 0:
            fake.compiled.append(name)
            raise RuntimeError("-fopenmp: unsupported option")
        return real_compile(name, *args)

    monkeypatch.setattr(native, "_compile", first_attempt_fails)
    assert fastpath.available(), fastpath.unavailable_reason()
    assert len(fake.compiled) == 2
    err = capfd.readouterr().err
    notice = f"compiling lmforge's CPU kernels, once, ~{native._COMPILE_ESTIMATE_S} s (into {kernel_dir()})"
    assert err == f"lmforge: {notice}\n"

    fastpath._KERNEL.forget()  # a later load of the cached kernel: silent
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_noticed", False)
    assert fastpath.available()
    assert len(fake.compiled) == 2 and capfd.readouterr().err == ""


# --------------------------------------------------------------------------------------------------- for real
@pytest.mark.skipif(native.disabled() or native._toolchain_problem() is not None,
                    reason="kernels disabled by LMFORGE_NO_KERNELS, or no compiler or ninja here")
def test_a_real_build_in_a_fresh_home_compiles_once_then_loads(tmp_path):
    """End to end, in new processes: the first compiles (with the notice) into $LMFORGE_HOME/cache/kernels and
    leaves only the library and the lock file; the second loads it silently."""
    code = ("import torch\n"
            "from lmforge.engine import fastpath as f\n"
            "W, x = torch.randn(70, 33), torch.randn(33)\n"
            "print(f.available(), f.unavailable_reason(), bool(torch.allclose(f.gemv(W, x), W @ x, atol=1e-4)))\n")
    env = {"LMFORGE_HOME": str(tmp_path)}
    first = python(code, env=env)
    out, err = first.communicate(timeout=300)
    assert out == "True None True\n", err
    assert err.count("compiling lmforge's CPU kernels, once") == 1
    kernels = tmp_path / "cache" / "kernels"
    names = sorted(p.name for p in kernels.iterdir())
    assert names[0] == "build.lock" and len(names) == 2 and names[1].startswith("lmforge_gemv_")
    second = python(code, env=env)
    out, err = second.communicate(timeout=120)
    assert out == "True None True\n" and "compiling" not in err, err


def test_a_library_without_march_native_has_one_key_for_every_cpu(monkeypatch):
    """The quantized kernels pick their ISA at run time, so one build serves every x86-64 CPU sharing a cache."""
    key = native._cache_key("int x;", ["-O3"], [], cpu_specific=False)
    monkeypatch.setattr(native, "_cpu_tag", lambda: "another cpu")
    assert native._cache_key("int x;", ["-O3"], [], cpu_specific=False) == key
    assert native._cache_key("int x;", ["-O3"], [], cpu_specific=True) != key


def test_an_include_of_a_file_beside_the_source_is_spliced_in_so_the_key_covers_it(tmp_path):
    (tmp_path / "a.cpp").write_text('#include <cstdint>\n#include "b.h"\nint a;\n#include "b.h"\n')
    (tmp_path / "b.h").write_text("int b;\n")
    text = native._read_source(tmp_path / "a.cpp")
    assert text.count("int b;") == 2 and "#include <cstdint>" in text and '"b.h"' not in text
    (tmp_path / "b.h").write_text("int b2;\n")
    assert native._read_source(tmp_path / "a.cpp") != text
