"""The hardware decisions of a training run: the precision rule on injected timings, the cache and the pin,
the compile rule, a resume that keeps its precision, fused AdamW, and activation checkpointing (same losses
and gradients, fewer bytes kept for the backward). Nothing here depends on a timing or compiles."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from lmforge.errors import UserError
from lmforge.model.gpt import GPT
from lmforge.presets import get_preset
from lmforge.train import precision
from lmforge.train.hardware import compile_mode, compile_pays, decide_compile
from lmforge.train.memory import apply_activation_checkpointing, is_checkpointed
from lmforge.train.optim import make_optimizer, use_fused
from lmforge.train.precision import PrecisionChoice, decide, resolve_auto


def _tiny(**kw):
    return get_preset("tiny", vocab_size=320, context_length=32, **kw)


# --- precision -----------------------------------------------------------------------------------------
def test_precision_rule_on_injected_timings():
    assert decide(0.300, 0.200) == "bf16"  # 1.5x
    assert decide(0.300, 0.280) == "fp32"  # 1.07x: not worth bf16's rounding
    assert decide(0.300, 0.300 / precision.MIN_SPEEDUP) == "bf16"  # the threshold itself
    assert decide(0.300, None) == "fp32"  # bf16 does not run here
    text = PrecisionChoice("bf16", 0.3, 0.2).describe()
    assert "fp32 300 ms" in text and "bf16 autocast 200 ms" in text and "1.50x" in text


def test_auto_is_measured_once_then_cached(monkeypatch):
    monkeypatch.delenv(precision.ENV_PIN)
    calls = []

    def fake_measure(config, batch_size, *, reps=2):
        calls.append((config.n_layers, batch_size))
        return PrecisionChoice("bf16", 0.3, 0.2)

    monkeypatch.setattr(precision, "measure_for_config", fake_measure)
    first = resolve_auto(_tiny(), 4, "cpu")
    again = resolve_auto(_tiny(), 4, "cpu")
    assert first.precision == again.precision == "bf16" and calls == [(2, 4)]  # the same command decides the same
    assert first.source == "measured" and again.source == "cached" and "cached" in again.describe()
    resolve_auto(_tiny(), 8, "cpu")  # another batch is another shape: measured
    assert calls == [(2, 4), (2, 8)]


def test_the_pin_decides_without_measuring(monkeypatch):
    monkeypatch.setattr(precision, "measure_for_config", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setenv(precision.ENV_PIN, "bf16")
    choice = resolve_auto(_tiny(), 4, "cpu")
    assert choice.precision == "bf16" and precision.ENV_PIN in choice.describe()
    monkeypatch.setenv(precision.ENV_PIN, "fast")
    with pytest.raises(UserError, match="fp32 or bf16"):
        resolve_auto(_tiny(), 4, "cpu")


# --- compile -------------------------------------------------------------------------------------------
def test_compile_rule():
    assert compile_pays(run_s=1000, compile_s=50, speedup=1.25)  # saves 200 s >= 2 x 50
    assert not compile_pays(run_s=300, compile_s=50, speedup=1.25)  # saves 60 s < 100
    assert not compile_pays(run_s=10**6, compile_s=50, speedup=0.9)  # slower compiled: never
    assert compile_mode(True) == "on" and compile_mode(False) == "off" and compile_mode("AUTO") == "auto"
    with pytest.raises(UserError, match="auto, on or off"):
        compile_mode("maybe")


def test_compile_auto_decisions():
    cfg = _tiny()
    never = lambda: pytest.fail("a tiny short run must be settled without timing anything")  # noqa: E731
    on, why = decide_compile("auto", torch.device("cpu"), config=cfg, precision="fp32", steps=20, micro_batches=1,
                             tokens_per_micro=128, step_s=never)
    assert not on and "too short" in why
    long = dict(config=get_preset("small"), precision="fp32", steps=100_000, micro_batches=1, tokens_per_micro=2048)
    assert decide_compile("auto", torch.device("cpu"), step_s=lambda: 0.5, **long)[0]  # 50,000 s of training
    assert not decide_compile("auto", torch.device("cpu"), step_s=lambda: 1e-4, **long)[0]  # 10 s of training
    # 600 s of training: pays where compiling speeds a step up 1.4x (fp32), not 1.1x (bf16)
    assert decide_compile("auto", torch.device("cpu"), step_s=lambda: 0.006, **long)[0]
    assert not decide_compile("auto", torch.device("cpu"), step_s=lambda: 0.006, **{**long, "precision": "bf16"})[0]
    assert decide_compile("auto", torch.device("cuda"), step_s=never, **long)[0]
    assert decide_compile("off", torch.device("cuda"), step_s=never, **long) == (False, "compile off (asked)")


def test_pretrain_records_the_resolved_precision_and_resume_keeps_it(capsys, tmp_path, corpus_file, monkeypatch):
    out = tmp_path / "m"
    argv = ["pretrain", "--data", corpus_file, "--preset", "tiny", "--vocab-size", "320", "--context-length", "32",
            "--batch-size", "2", "--eval-interval", "3", "--samples", "0", "--no-progress", "--eval-tokens", "256"]
    monkeypatch.setenv(precision.ENV_PIN, "bf16")  # what a measurement might have picked
    code, text, err = run_cli(capsys, *argv, "--out", out, "--max-steps", "3")
    assert code == 0, err
    assert "precision bf16" in text and "compile off" in text and "activation checkpointing off" in text
    state = json.loads((out / "trainer_state" / "state.json").read_text())
    assert state["train_config"]["precision"] == "bf16" and state["precision"] == "bf16"  # resolved, not "auto"
    assert state["train_config"]["compile"] == "off"
    hw = json.loads((out / "lmforge.json").read_text())["lineage"]["hardware"]
    assert hw["precision"] == "bf16" and hw["precision_source"] == "pinned" and hw["compile"] is False

    monkeypatch.setenv(precision.ENV_PIN, "fp32")  # a new measurement would say otherwise: the run keeps its own
    code, text, err = run_cli(capsys, "pretrain", "--resume", out, "--max-steps", "5", "--precision", "auto",
                              "--activation-checkpointing", "--no-progress", "--samples", "0")
    assert code == 0, err
    assert "precision bf16: the precision this run was started in" in text and "activation checkpointing on" in text
    state = json.loads((out / "trainer_state" / "state.json").read_text())
    assert state["step"] == 5 and state["precision"] == state["train_config"]["precision"] == "bf16"


def test_cli_flags(capsys):
    from lmforge.cli import build_parser

    p = build_parser()
    args = p.parse_args(["pretrain", "--out", "x", "--compile"])
    assert args.compile == "on" and args.activation_checkpointing is None
    assert p.parse_args(["pretrain", "--out", "x", "--compile", "off", "--activation-checkpointing"]).compile == "off"
    code, text, _ = run_cli(capsys, "pretrain", "--help")
    flat = " ".join(text.split())
    assert code == 0 and "LMFORGE_PRECISION_AUTO" in flat and "--activation-checkpointing" in flat
    assert "(default: auto)" in flat and "(default: off)" in flat
    code, _, err = run_cli(capsys, "pretrain", "--out", "x", "--compile", "maybe")
    assert code == 2 and "maybe" in err


# --- fused AdamW ---------------------------------------------------------------------------------------
def test_fused_adamw_on_cpu():
    model = GPT(_tiny())
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert use_fused(list(model.parameters())) and opt.defaults["fused"]


# --- activation checkpointing --------------------------------------------------------------------------
def _steps(checkpointed: bool, n: int = 3):
    """Losses and final gradients of `n` AdamW steps of the tiny model with dropout (so the recomputation
    must replay the same random masks)."""
    torch.manual_seed(0)
    model = GPT(_tiny(dropout=0.1)).train()
    if checkpointed:
        assert apply_activation_checkpointing(model) == 2 and apply_activation_checkpointing(model) == 2  # idempotent
        assert is_checkpointed(model)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(n):
        ids = torch.randint(0, 320, (4, 33), generator=g)
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, grads, model


def test_activation_checkpointing_gives_the_same_losses_and_gradients():
    plain_losses, plain_grads, plain = _steps(False)
    ckpt_losses, ckpt_grads, ckpt = _steps(True)
    assert max(abs(a - b) for a, b in zip(plain_losses, ckpt_losses)) <= 1e-6
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    assert list(plain.state_dict()) == list(ckpt.state_dict())  # same names: checkpoints do not change
    with torch.no_grad():  # inference (no graph) runs the blocks directly
        ids = torch.randint(0, 320, (1, 8))
        torch.testing.assert_close(ckpt.eval()(ids), plain.eval()(ids), atol=1e-5, rtol=1e-5)


def _saved_bytes(model: torch.nn.Module) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    ids = torch.randint(0, 320, (4, 33), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return total


def test_activation_checkpointing_keeps_fewer_bytes_for_the_backward():
    torch.manual_seed(0)
    model = GPT(_tiny()).train()
    plain = _saved_bytes(model)
    apply_activation_checkpointing(model)
    checkpointed = _saved_bytes(model)
    assert checkpointed < plain / 2, (checkpointed, plain)
