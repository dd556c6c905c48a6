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
from lmforge.train import optim
from lmforge.train.hardware import compile_mode, compile_pays, decide_compile, resolve_run
from lmforge.train.loop import TrainConfig
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

    def fake_measure(config, rows, *, reps=2):
        calls.append((config.n_layers, rows))
        return PrecisionChoice("bf16", 0.3, 0.2)

    monkeypatch.setattr(precision, "measure_for_config", fake_measure)
    first = resolve_auto(_tiny(), 4, "cpu")
    again = resolve_auto(_tiny(), 4, "cpu")
    # the same command decides the same; only MEASURE_ROWS rows of the batch are timed (in seconds, whatever the batch)
    assert first.precision == again.precision == "bf16" and calls == [(2, precision.MEASURE_ROWS)]
    assert first.source == "measured" and again.source == "cached" and "cached" in again.describe()
    assert first.step_s == again.step_s == pytest.approx(0.2 * 4 / precision.MEASURE_ROWS)  # scaled to the batch
    assert "on 2 of the micro-batch's 4 rows" in first.describe()
    bigger = resolve_auto(_tiny(), 32, "cpu")  # the same rows timed: the same measurement, scaled to 32 rows
    assert bigger.source == "cached" and bigger.step_s == pytest.approx(0.2 * 16) and len(calls) == 1
    one = resolve_auto(_tiny(), 1, "cpu")  # a batch of one row is timed whole
    assert calls[-1] == (2, 1) and one.step_s == pytest.approx(0.2) and "rows" not in one.describe()


R = precision.MEASURE_ROWS


@pytest.mark.parametrize("entry", [
    {"precision": "fast", "fp32_s": 0.3, "bf16_s": 0.2, "rows": R},  # not a precision
    {"precision": "bf16", "fp32_s": "0.3", "bf16_s": 0.2, "rows": R},  # not a number
    {"precision": "bf16", "fp32_s": 0.3, "bf16_s": None, "rows": R},  # bf16 chosen without its time
    {"precision": "fp32", "fp32_s": -1.0, "bf16_s": None, "rows": R},  # not a time
    {"precision": "fp32", "fp32_s": True, "bf16_s": None, "rows": R},
    {"precision": "fp32", "fp32_s": 0.3, "bf16_s": 0.2},  # no "rows": not an entry this version wrote
    ["fp32", 0.3],
])
def test_a_damaged_cache_entry_is_measured_again(monkeypatch, entry):
    monkeypatch.delenv(precision.ENV_PIN)
    monkeypatch.setattr(precision, "measure_for_config", lambda config, rows, reps=2: PrecisionChoice("fp32", 0.3, 0.4))
    path = precision.cache_dir("precision") / f"{precision._cache_key(_tiny(), R)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entry))
    choice = resolve_auto(_tiny(), 4, "cpu")
    assert choice.source == "measured" and choice.precision == "fp32"
    saved = json.loads(path.read_text())  # replaced by the new measurement
    assert saved["precision"] == "fp32" and saved["fp32_s"] == 0.3 and saved["rows"] == R
    assert resolve_auto(_tiny(), 4, "cpu").source == "cached"


def test_time_step_times_a_capped_batch_and_scales_it(monkeypatch):
    rows_timed = []

    def fake_model_and_loss(config, rows):
        rows_timed.append(rows)
        return torch.nn.Linear(1, 1), lambda: torch.zeros((), requires_grad=True)

    monkeypatch.setattr(precision, "_model_and_loss", fake_model_and_loss)
    monkeypatch.setattr(precision, "_time", lambda run, reps: 0.5)
    assert precision.time_step(_tiny(), 16, "fp32") == pytest.approx(0.5 * 16 / precision.MEASURE_ROWS)
    assert precision.time_step(_tiny(), 1, "bf16") == pytest.approx(0.5)
    assert rows_timed == [precision.MEASURE_ROWS, 1]
    assert precision.measure_rows(_tiny(), 16) == 2 and precision.measure_rows(_tiny(), 1) == 1
    long = get_preset("tiny", vocab_size=320, context_length=precision.MEASURE_TOKENS)
    assert precision.measure_rows(long, 16) == 1  # a long context: one row


def test_the_pin_decides_without_measuring(monkeypatch):
    monkeypatch.setattr(precision, "measure_for_config", lambda *a, **k: pytest.fail("measured"))
    monkeypatch.setenv(precision.ENV_PIN, "bf16")
    choice = resolve_auto(_tiny(), 4, "cpu")
    assert choice.precision == "bf16" and precision.ENV_PIN in choice.describe()
    monkeypatch.setenv(precision.ENV_PIN, "fast")
    with pytest.raises(UserError, match="fp32 or bf16"):
        resolve_auto(_tiny(), 4, "cpu")


class _Peer:
    """A rank of a job for `resolve_run`: `sums` are what the collective returns; None: it must not be reached."""

    def __init__(self, main: bool, sums=None, pp: int = 1) -> None:
        self.is_main, self.active, self.data_world, self.pp, self.sums = main, sums is not None, 1, pp, sums

    def sum(self, values):
        assert self.sums is not None, "no collective was expected"
        return self.sums


@pytest.mark.parametrize("main", [True, False])
def test_a_bad_pin_is_refused_on_every_rank_before_any_collective(monkeypatch, main):
    monkeypatch.setenv(precision.ENV_PIN, "fast")
    monkeypatch.setattr(precision, "measure_for_config", lambda *a, **k: pytest.fail("measured"))
    dist = _Peer(main, sums=None)  # with a real job the collective would wait for rank 0 until the timeout
    dist.active = True
    with pytest.raises(UserError, match="LMFORGE_PRECISION_AUTO must be fp32 or bf16"):
        resolve_run(TrainConfig(max_steps=3, batch_size=2, compile="off"), _tiny(), torch.device("cpu"), dist=dist)
    # a rank that is not rank 0 takes rank 0's decisions (here bf16, compile off) from the collective
    monkeypatch.setenv(precision.ENV_PIN, "bf16")
    recipe, hw = resolve_run(TrainConfig(max_steps=3, batch_size=2, compile="off"), _tiny(), torch.device("cpu"),
                             dist=_Peer(False, sums=[1.0, 0.0]))
    assert recipe.precision == "bf16" and recipe.compile == "off" and hw.precision.source == "rank 0"


def test_compile_is_off_under_a_pipeline_and_says_why():
    for asked in ("on", "auto"):
        recipe, hw = resolve_run(TrainConfig(max_steps=10**6, batch_size=2, precision="fp32", compile=asked), _tiny(),
                                 torch.device("cpu"), dist=_Peer(True, pp=2))
        assert recipe.compile == "off" and not hw.compile and "pp=2" in hw.compile_why and asked in hw.compile_why
        assert not hw.record()["compile"]


def test_a_resume_keeps_its_compile_and_says_so(tmp_path):
    from lmforge.checkpoint import TRAINER_STATE

    (tmp_path / TRAINER_STATE).mkdir()
    (tmp_path / TRAINER_STATE / "state.json").write_text(json.dumps(
        {"step": 3, "precision": "fp32", "train_config": {"compile": "off", "precision": "fp32"}}))
    lines = []
    recipe, hw = resolve_run(TrainConfig(max_steps=5, batch_size=2, precision="fp32", compile="off"), _tiny(),
                             torch.device("cpu"), resume_dir=tmp_path, on_info=lines.append)
    assert hw.compile_why == "compile off (from the checkpoint; --compile auto decides again)" and hw.compile_why in lines
    assert "precision fp32: the precision this run was started in" in lines[0]
    _, hw = resolve_run(TrainConfig(max_steps=5, batch_size=2, precision="fp32", compile="on"), _tiny(),
                        torch.device("cpu"), resume_dir=tmp_path)
    assert hw.compile and hw.compile_why == "compile on (asked)"  # another value than the checkpoint's: asked
    _, hw = resolve_run(TrainConfig(max_steps=5, batch_size=2, precision="fp32", compile="auto"), _tiny(),
                        torch.device("cpu"), resume_dir=tmp_path)
    assert not hw.compile and "too short" in hw.compile_why


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
    assert "compile off (from the checkpoint" in text  # the user asked nothing about compile
    state = json.loads((out / "trainer_state" / "state.json").read_text())
    assert state["step"] == 5 and state["precision"] == state["train_config"]["precision"] == "bf16"
    assert state["train_config"]["activation_checkpointing"] is True

    # switched off again on the next resume (the saved True does not win)
    code, text, err = run_cli(capsys, "pretrain", "--resume", out, "--max-steps", "6", "--no-activation-checkpointing",
                              "--no-progress", "--samples", "0")
    assert code == 0, err
    assert "activation checkpointing off" in text
    state = json.loads((out / "trainer_state" / "state.json").read_text())
    assert state["step"] == 6 and state["train_config"]["activation_checkpointing"] is False


def test_cli_flags(capsys):
    from lmforge.cli import build_parser

    p = build_parser()
    args = p.parse_args(["pretrain", "--out", "x", "--compile"])
    assert args.compile == "on" and args.activation_checkpointing is None
    assert p.parse_args(["pretrain", "--out", "x", "--compile", "off", "--activation-checkpointing"]).compile == "off"
    from lmforge.cli.train import _forwarded_argv

    for flag, value in (("--activation-checkpointing", True), ("--no-activation-checkpointing", False)):
        args = p.parse_args(["pretrain", "--out", "x", flag])
        assert args.activation_checkpointing is value
        assert _forwarded_argv(args.pretrain_parser, args) == ["pretrain", "--out", "x", flag]  # what torchrun workers get
    code, text, _ = run_cli(capsys, "pretrain", "--help")
    flat = " ".join(text.split())
    assert code == 0 and "LMFORGE_PRECISION_AUTO" in flat and "--activation-checkpointing" in flat
    assert "(default: auto)" in flat and "(default: off; on --resume, the checkpoint's)" in flat
    assert "--no-activation-checkpointing" in flat
    code, _, err = run_cli(capsys, "pretrain", "--out", "x", "--compile", "maybe")
    assert code == 2 and "maybe" in err


# --- fused AdamW ---------------------------------------------------------------------------------------
def test_fused_adamw_on_cpu():
    model = GPT(_tiny())
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert use_fused(list(model.parameters())) and opt.defaults["fused"]


def test_fused_adamw_on_a_pipeline_rank_whose_other_stages_are_meta():
    """A pipeline rank keeps the other stages' parameters on the meta device (lmforge.train.pipeline): they
    never get a gradient, so they must not send the optimizer to the plain loop."""
    model = GPT(_tiny())
    block = model.blocks[1]
    for module in list(block.modules()):
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(torch.empty_like(p, device="meta")))
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert opt.defaults["fused"] and any(p.is_meta for p in model.parameters())
    real = [p for p in model.parameters() if not p.is_meta]
    before = [p.detach().clone() for p in real]
    for p in real:
        p.grad = torch.ones_like(p)
    opt.step()  # updates the real parameters, never touches the meta ones
    assert all(not torch.equal(a, p) for a, p in zip(before, real))


def test_foreach_where_fused_cannot_run(monkeypatch):
    monkeypatch.setattr(optim, "use_fused", lambda params: False)
    opt = make_optimizer(GPT(_tiny()), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]  # not torch's CPU default, the plain loop


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
