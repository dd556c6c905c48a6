"""Atomic directory transactions and trainer state (lmforge/checkpoint.py), through the training run's
Checkpointer: crash-safe saves rolled back or forward, no pickles, trainer state beside the weights."""

from __future__ import annotations

import pytest
import torch

import lmforge.checkpoint as ckpt
import lmforge.train.checkpointer as checkpointer
from lmforge.checkpoint import read_trainer_state, recover, transaction
from lmforge.loaders.model_dir import load_model
from lmforge.model.gpt import GPT
from lmforge.presets import get_preset
from lmforge.train.checkpointer import Checkpointer
from lmforge.train.optim import make_optimizer


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
