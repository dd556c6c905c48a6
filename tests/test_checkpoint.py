"""Atomic directory transactions and trainer state (lmforge/checkpoint.py), through the training run's
Checkpointer: crash-safe saves rolled back or forward, no pickles, trainer state beside the weights."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import lmforge.checkpoint as ckpt
import lmforge.train.checkpointer as checkpointer
from lmforge.checkpoint import read_trainer_state, recover, transaction
from lmforge.errors import UserError
from lmforge.loaders.model_dir import load_model
from lmforge.model.gpt import GPT
from lmforge.presets import get_preset
from lmforge.train.checkpointer import Checkpointer
from lmforge.train.optim import make_optimizer
from tests.forked import fork_until_ready, kill


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(get_preset("tiny", vocab_size=320, **kw))


def _save(directory, model, tokenizer, step=1):
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    names = [n for n, _ in model.named_parameters()]
    Checkpointer(directory, tokenizer=tokenizer, lineage={"data": "test"}).save(model, opt, names, {"step": step, "tokens_seen": 0})


def test_no_pickles_in_checkpoint(tmp_path, tiny_tokenizer):
    _save(tmp_path / "m", _model(), tiny_tokenizer)
    files = sorted(p.name for p in (tmp_path / "m").rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert "model.safetensors" in files and "optimizer.safetensors" in files and "state.json" in files
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "lmforge.json"} <= set(files)


def test_crash_while_staging_keeps_previous_checkpoint(tmp_path, tiny_tokenizer, monkeypatch):
    old, new = _model(seed=0).eval(), _model(seed=1).eval()
    _save(tmp_path / "m", old, tiny_tokenizer, step=1)

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpointer, "write_trainer_state", crash)  # weights of `new` are already staged by then
    with pytest.raises(OSError):
        _save(tmp_path / "m", new, tiny_tokenizer, step=2)
    monkeypatch.undo()
    idx = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m")(idx), old(idx))
    assert read_trainer_state(tmp_path / "m")[0]["step"] == 1
    assert not (tmp_path / "m" / ckpt.STAGING).exists()


def test_killed_process_leftovers_are_rolled_back_or_forward(tmp_path, tiny_tokenizer, monkeypatch):
    old, new = _model(seed=0).eval(), _model(seed=1).eval()
    _save(tmp_path / "m", old, tiny_tokenizer, step=1)
    idx = torch.randint(0, 320, (1, 8))

    # 1. killed before the commit marker: staging left behind, nothing moved -> rolled back.
    staging = tmp_path / "m" / ckpt.STAGING
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half a file")
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m")(idx), old(idx))
    assert not staging.exists()

    # 2. killed after the marker, half the files moved -> rolled forward to the complete new checkpoint.
    real_replace = ckpt.os.replace
    calls = {"n": 0}

    def dying_replace(src, dst):
        if str(src).startswith(str(staging)) and not str(dst).startswith(str(staging)):  # a commit move
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("killed (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path / "m", new, tiny_tokenizer, step=2)
    monkeypatch.undo()
    assert (tmp_path / "m" / ckpt.MARKER).exists()
    recover(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m")(idx), new(idx))
    assert read_trainer_state(tmp_path / "m")[0]["step"] == 2


def test_transaction_discards_staging_on_error(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with transaction(tmp_path / "d") as staging:
            (staging / "keep.txt").write_text("new")
            raise RuntimeError("boom")
    assert (tmp_path / "d" / "keep.txt").read_text() == "old"


# ---------------------------------------------------------------------------------------------------
# Concurrency: a reader never destroys what a live writer owns; a dead writer's leftovers are recovered
# ---------------------------------------------------------------------------------------------------
posix_only = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32",
                                reason="the writer's lock is an fcntl.flock (POSIX); a forked child plays the writer")


def _files(directory):
    return {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file() and not p.name.startswith(".")}


def _stage_copy(staging, source, *, pause=None):
    """Write the files of checkpoint `source` into `staging`, one by one; `pause()` between the first and the rest."""
    names = sorted(_files(source))
    for i, name in enumerate(names):
        if i == 1 and pause is not None:
            pause()
        (staging / name).write_bytes((Path(source) / name).read_bytes())


@posix_only
def test_reader_leaves_a_live_writers_staging_alone(tmp_path, tiny_tokenizer):
    """Issue 13 #7: a load during a save (pretrain --save-interval 1 while `generate` reads the run) used to
    delete the writer's staging directory, and the save crashed with FileNotFoundError."""
    old, new = _model(seed=0).eval(), _model(seed=1).eval()
    _save(tmp_path / "m", old, tiny_tokenizer, step=1)
    _save(tmp_path / "n", new, tiny_tokenizer, step=2)
    staged, go_on = threading.Event(), threading.Event()
    errors = []

    def writer():
        try:
            with transaction(tmp_path / "m") as staging:
                _stage_copy(staging, tmp_path / "n", pause=lambda: (staged.set(), go_on.wait(10)))
        except BaseException as e:  # noqa: BLE001 - reported to the test below
            errors.append(e)
        staged.set()

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert staged.wait(10) and not errors
        idx = torch.randint(0, 320, (1, 8))
        with torch.no_grad():
            assert torch.equal(load_model(tmp_path / "m")(idx), old(idx))  # the reader sees the old checkpoint
        recover(tmp_path / "m")
        assert (tmp_path / "m" / ckpt.STAGING).is_dir()  # ... and leaves the writer's staging alone
    finally:
        go_on.set()
        t.join(10)
    assert not errors, errors
    assert _files(tmp_path / "m") == _files(tmp_path / "n")  # the writer committed the whole new checkpoint
    assert not (tmp_path / "m" / ckpt.STAGING).exists() and not (tmp_path / "m" / ckpt.MARKER).exists()
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m")(idx), new(idx))


@posix_only
def test_second_writer_waits_for_the_first(tmp_path):
    """Two transactions on one directory: the second used to discard the first one's staging (its recover());
    now it waits for the first to commit, then commits its own."""
    d = tmp_path / "d"
    staged, go_on = threading.Event(), threading.Event()
    errors = []

    def first():
        try:
            with transaction(d) as staging:
                (staging / "a.txt").write_text("first")
                staged.set()
                go_on.wait(10)
                (staging / "b.txt").write_text("first")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        staged.set()

    def second():
        try:
            with transaction(d) as staging:
                (staging / "a.txt").write_text("second")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t1 = threading.Thread(target=first)
    t1.start()
    assert staged.wait(10)
    t2 = threading.Thread(target=second)
    t2.start()
    go_on.set()
    t1.join(10)
    t2.join(10)
    assert not errors, errors
    assert (d / "b.txt").read_text() == "first"  # the first save committed whole
    assert (d / "a.txt").read_text() == "second"  # and the second after it
    assert sorted(p.name for p in d.iterdir()) == ["a.txt", "b.txt"]  # no staging, marker or lock left


def _killed_writer(directory, source, *, die_in_commit):
    """Fork a child that saves checkpoint `source` into `directory` and SIGKILL it mid-save: while staging,
    or in the commit after the marker and one moved file."""

    def child(ready, _done):
        if die_in_commit:
            real_replace, moves = os.replace, []

            def replace(src, dst):
                if ckpt.STAGING in str(src) and ckpt.STAGING not in str(dst):
                    moves.append(dst)
                    if len(moves) == 2:
                        ready.set()
                        time.sleep(60)
                return real_replace(src, dst)

            ckpt.os.replace = replace
        with transaction(directory) as staging:
            _stage_copy(staging, source, pause=None if die_in_commit else lambda: (ready.set(), time.sleep(60)))

    kill(fork_until_ready(child)[0])


@posix_only
@pytest.mark.parametrize("die_in_commit", [False, True], ids=["killed-while-staging", "killed-in-commit"])
def test_killed_writer_is_rolled_back_or_forward_by_the_next_reader(tmp_path, tiny_tokenizer, die_in_commit):
    old, new = _model(seed=0).eval(), _model(seed=1).eval()
    _save(tmp_path / "m", old, tiny_tokenizer, step=1)
    _save(tmp_path / "n", new, tiny_tokenizer, step=2)
    before = _files(tmp_path / "m")
    _killed_writer(tmp_path / "m", tmp_path / "n", die_in_commit=die_in_commit)
    assert (tmp_path / "m" / ckpt.STAGING).is_dir()
    assert (tmp_path / "m" / ckpt.MARKER).exists() == die_in_commit
    idx = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m")(idx), (new if die_in_commit else old)(idx))
    assert _files(tmp_path / "m") == (_files(tmp_path / "n") if die_in_commit else before)
    assert sorted(p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("key, value", [("tensors_file", "../../model.safetensors"), ("tensors_file", "/etc/passwd"),
                                        ("optimizer_shards", "../optimizer"), ("optimizer_shards", "/tmp")])
def test_state_json_names_only_lmforges_files(tmp_path, tiny_tokenizer, key, value):
    """state.json's file names become paths: a value lmforge does not write is refused in one line, never
    followed out of the checkpoint."""
    import json

    _save(tmp_path / "m", _model(), tiny_tokenizer)
    path = tmp_path / "m" / "trainer_state" / "state.json"
    state = json.loads(path.read_text())
    read_trainer_state(tmp_path / "m")  # as written: fine
    path.write_text(json.dumps({**state, key: value}))
    with pytest.raises(UserError, match="not a checkpoint lmforge wrote"):
        read_trainer_state(tmp_path / "m")


def test_whole_optimizer_state_stands_in_for_the_optimizer(tmp_path, tiny_tokenizer):
    """What TP and PP saves write from (`state_dict`) and their resumes read into (`load_state_dict`)."""
    model = _model()
    _save(tmp_path / "m", model, tiny_tokenizer)
    state, tensors = read_trainer_state(tmp_path / "m")
    whole = ckpt.WholeOptimizerState()
    ckpt.restore_optimizer(whole, state, tensors)
    assert whole.state_dict()["param_groups"] == state["param_groups"]
    ckpt.write_trainer_state(tmp_path / "again", whole, state["param_names"], {"step": 1})
    assert read_trainer_state(tmp_path / "again")[0]["param_groups"] == state["param_groups"]
