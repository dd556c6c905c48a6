"""The training loop: learning, exact resume, divergence guard, signals, schedule and parameter groups."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from lmforge.checkpoint import read_trainer_state
from lmforge.loaders.model_dir import load_model
from lmforge.train.checkpointer import Checkpointer
from lmforge.data.shards import prepare_data
from lmforge.model.gpt import GPT
from lmforge.presets import get_preset
from lmforge.train import objectives
from lmforge.train.loop import TrainConfig, TrainingDiverged, fit
from lmforge.train.optim import lr_at, param_groups
from lmforge.train.pretrain import WindowBatches

DROPOUT = 0.1


@pytest.fixture(scope="module")
def token_data(tmp_path_factory, tiny_tokenizer, corpus_file):
    return prepare_data(str(corpus_file), tiny_tokenizer, tmp_path_factory.mktemp("cache"), show_progress=False)


def _run(tmp_path, tiny_tokenizer, token_data, *, name="run", resume=False, objective=objectives.pretrain, **recipe):
    cfg = get_preset("tiny", vocab_size=tiny_tokenizer.vocab_size, context_length=32, dropout=DROPOUT)
    recipe = {"max_steps": 12, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_interval": 4, "log_interval": 1,
              "save_interval": 4, "seed": 7, **recipe}
    tc = TrainConfig(**recipe)
    if resume:
        model = load_model(tmp_path / name).train()
    else:
        torch.manual_seed(tc.seed)
        model = GPT(cfg)
    data = WindowBatches(token_data, batch_size=tc.batch_size, block_size=32, grad_accum=tc.grad_accum, seed=tc.seed,
                         eval_tokens=2048, device=torch.device("cpu"))
    result = fit(model, objective, data, tc, Checkpointer(tmp_path / name, tokenizer=tiny_tokenizer), resume=resume,
                 progress=False)
    return result


def _train_losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


def test_loss_falls(tmp_path, tiny_tokenizer, token_data):
    result = _run(tmp_path, tiny_tokenizer, token_data, max_steps=40, eval_interval=40, lr=1e-2)
    losses = _train_losses(tmp_path / "run" / "metrics.jsonl")
    assert losses[1] > math.log(tiny_tokenizer.vocab_size) - 0.5  # starts near uniform
    assert result.val_loss < losses[1] - 2.0  # and learns the corpus' structure
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_resume_is_exact(tmp_path, tiny_tokenizer, token_data):
    _run(tmp_path, tiny_tokenizer, token_data, name="full", max_steps=12, lr_decay_steps=12)
    _run(tmp_path, tiny_tokenizer, token_data, name="split", max_steps=6, lr_decay_steps=12)
    assert read_trainer_state(tmp_path / "split")[0]["step"] == 6
    _run(tmp_path, tiny_tokenizer, token_data, name="split", resume=True, max_steps=12, lr_decay_steps=12)
    full, split = _train_losses(tmp_path / "full" / "metrics.jsonl"), _train_losses(tmp_path / "split" / "metrics.jsonl")
    assert sorted(split) == list(range(1, 13))  # history continues without gaps or repeats
    for step in range(7, 13):
        assert abs(full[step] - split[step]) <= 1e-6, (step, full[step], split[step])
    a, b = load_model(tmp_path / "full"), load_model(tmp_path / "split")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_nan_stops_training_and_keeps_last_good_checkpoint(tmp_path, tiny_tokenizer, token_data):
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, m = objectives.pretrain(model, batch)
        return (loss * float("nan") if calls["n"] == 6 else loss), m

    with pytest.raises(TrainingDiverged) as err:
        _run(tmp_path, tiny_tokenizer, token_data, objective=poisoned, eval_interval=100)
    msg = str(err.value)
    assert "step 6" in msg and "nan" in msg and "lr " in msg and "step 4" in msg
    assert read_trainer_state(tmp_path / "run")[0]["step"] == 4
    assert torch.isfinite(next(load_model(tmp_path / "run").parameters())).all()


def test_sigint_saves_at_step_boundary(tmp_path, tiny_tokenizer, token_data):
    calls = {"n": 0}

    def interrupting(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return objectives.pretrain(model, batch)

    result = _run(tmp_path, tiny_tokenizer, token_data, objective=interrupting, eval_interval=100, save_interval=0)
    assert result.interrupted and result.step == 3
    assert read_trainer_state(tmp_path / "run")[0]["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_lr_schedule():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110)
    assert lr_at(0, **kw) == pytest.approx(1e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(5.5e-4)
    assert lr_at(110, **kw) == lr_at(500, **kw) == pytest.approx(1e-4)
    assert all(lr_at(s, **kw) >= lr_at(s + 1, **kw) for s in range(10, 200))


def test_no_weight_decay_on_norms_biases_embeddings():
    model = GPT(get_preset("tiny", norm="layernorm", attention_bias=True, positions="learned"))
    decay, no_decay = param_groups(model, 0.1)
    ids = lambda ps: {id(p) for p in ps}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 and "emb" not in names[id(p)] for p in decay["params"])
    assert ids([model.tok_emb.weight, model.pos_emb.weight, model.norm.weight, model.blocks[0].attn.qkv.bias]) <= ids(no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
