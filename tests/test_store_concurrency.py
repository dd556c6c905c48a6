"""The store under concurrency: two imports racing for one name, imports killed half-way, leftovers of dead
owners, and an overwrite that fails half-way (issue 13, finding 9). Processes are forked (tests/forked.py)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from lmforge import store
from lmforge.errors import UserError
from test_store import tiny_model_dir  # noqa: F401 - the fixture, shared with the store's other tests
from tests.forked import fork_until_ready, kill

posix_only = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32",
                                reason="the store lock and the temp directories' owners use fcntl.flock (POSIX)")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_tokenizer):
    """Two model directories that differ in every weight."""
    import torch

    from lmforge.model.gpt import GPT
    from lmforge.presets import get_preset
    from lmforge.train.checkpointer import Checkpointer

    dirs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        d = tmp_path_factory.mktemp("two") / f"model-{seed}"
        Checkpointer(d, tokenizer=tiny_tokenizer).save(GPT(get_preset("tiny", vocab_size=tiny_tokenizer.vocab_size)),
                                                       None, [], {})
        dirs.append(d)
    return dirs


def _whole_copy_of(entry, sources):
    """Which of `sources` the store entry is a complete copy of (every file equal, lineage naming it); None if none."""
    for src in sources:
        files = {p.name for p in src.iterdir() if p.is_file() and not p.name.startswith(".")} - {"lmforge.json"}
        if {p.name for p in entry.iterdir()} - {"lmforge.json"} == files and all(
                (entry / f).read_bytes() == (src / f).read_bytes() for f in files):
            if store.show(str(entry.parent.name) + ":" + entry.name)["lineage"]["imported_from"] == str(src.resolve()):
                return src
    return None


def _import_both(sources, name, *, overwrite, meet):
    """Import `sources` to one `name` from two threads at once; `meet` makes both pass the early "already
    exists" check (both copy) before either renames into place - the window the audit hit 2 times in 5."""
    barrier = threading.Barrier(len(sources), timeout=20)
    results = [None] * len(sources)
    real = store._fsync_tree

    def fsync_then_meet(path):
        real(path)
        if meet and Path(path).name.startswith(".tmp"):
            barrier.wait()

    def run(i):
        try:
            results[i] = store.import_model(sources[i], name, overwrite=overwrite)
        except BaseException as e:  # noqa: BLE001 - checked by the caller
            results[i] = e

    store._fsync_tree = fsync_then_meet
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sources))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        store._fsync_tree = real
    return results


@posix_only
@pytest.mark.parametrize("overwrite", [False, True], ids=["refused", "overwrite"])
@pytest.mark.parametrize("meet", [True, False], ids=["both-past-the-early-check", "free-race"])
def test_concurrent_imports_to_one_name(two_models, meet, overwrite):
    """Without overwrite exactly one import wins and the other is told "already exists" (both used to
    print "imported", one replaced); with it both succeed and the entry is one of the two, whole."""
    for attempt in range(3 if meet else 10):
        name = f"race{attempt}"
        results = _import_both(two_models, name, overwrite=overwrite, meet=meet)
        won = [src for src, r in zip(two_models, results) if isinstance(r, Path)]
        lost = [r for r in results if not isinstance(r, Path)]
        survivor = _whole_copy_of(store.model_path(name), two_models)
        if overwrite:
            assert not lost and survivor is not None, results
        else:
            assert len(won) == 1 and len(lost) == 1, results
            assert isinstance(lost[0], UserError) and "already exists" in str(lost[0])
            assert survivor == won[0]  # not replaced by the loser
    assert not [p for p in store.models_root().iterdir() if p.name.startswith((".tmp", ".import", ".trash"))]


def _import_in_child(source, name):
    """Fork a child that imports `source` as `name` and stops while it validates (its .import-… directory
    exists by then) until `done` is set: (that directory, done, the process)."""

    def child(ready, done):
        def stuck(*a, **k):
            ready.set()
            done.wait(60)
            raise SystemExit(0)

        store.check_model_dir = stuck
        store.import_model(source, name)

    p, done = fork_until_ready(child)
    left = [d for d in store.models_root().iterdir() if d.name.startswith(f".import-{p.pid}-")]
    assert len(left) == 1
    return left[0], done, p


@posix_only
def test_killed_imports_leftovers_are_cleaned_by_the_next_store_operation(two_models, tiny_model_dir):
    live, done, proc = _import_in_child(two_models[1], "alive")
    try:
        dead, _, killed = _import_in_child(two_models[0], "killed")  # starting it cleaned nothing: `live` is held
        kill(killed)
        (dead / "half.safetensors").write_bytes(b"half a file")
        assert dead.is_dir() and live.is_dir()
        store.add("next", tiny_model_dir)  # any change to the store
        assert not dead.exists()  # its owner is gone: removed
        assert live.is_dir()  # its owner is still importing: left alone
        store.remove("next")
        assert live.is_dir()
    finally:
        done.set()
        proc.join(10)
    assert not live.exists()  # the live import removed its own directory when it ended
    assert store.list_models() == []


@posix_only
def test_leftovers_of_unknown_or_dead_owners(tiny_model_dir):
    """Temp directories nobody holds (a dead owner; the pid-less names of older versions, once stale) are
    removed; other dot-files and the models themselves are not."""
    root = store.models_root()
    root.mkdir(parents=True)
    orphan = root / f".tmp-999999999-{'0' * 32}"
    (orphan / "sub").mkdir(parents=True)
    fresh_old_style = root / f".import-{'1' * 32}"
    stale_old_style = root / f".trash-{'2' * 32}"
    fresh_old_style.mkdir()
    stale_old_style.mkdir()
    os.utime(stale_old_style, (time.time() - 3 * 86400,) * 2)
    (root / ".keep").mkdir()
    store.add("m", tiny_model_dir)
    assert not orphan.exists() and not stale_old_style.exists()
    assert fresh_old_style.is_dir() and (root / ".keep").is_dir()
    assert (store.model_path("m") / "config.json").is_file()


def test_failed_overwrite_puts_the_old_entry_back(two_models, monkeypatch):
    """The old entry is renamed aside before the new one goes in; if that second rename fails, the old one
    returns (it used to be left in a .trash- directory, the name gone)."""
    store.import_model(two_models[0], "m")
    real = os.replace

    def failing(src, dst):
        if Path(dst) == store.model_path("m"):
            raise OSError(28, "No space left on device (simulated)")
        return real(src, dst)

    with monkeypatch.context() as mp, pytest.raises(OSError, match="simulated"):
        mp.setattr(store.os, "replace", failing)
        store.import_model(two_models[1], "m", overwrite=True)
    assert _whole_copy_of(store.model_path("m"), two_models) == two_models[0]
    assert not [p for p in store.models_root().iterdir() if p.name.startswith(".")]
