"""`lmforge sweep`: the Chinchilla fit recovers a known law, the grid fits its budget, a tiny sweep runs end to end
and a second invocation retrains nothing, and bad input is one line with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from lmforge.errors import UserError
from lmforge.train import scaling_fit
from lmforge.train.scaling_fit import LossFit, bootstrap_fits, fit_scaling_law, predict_with_uncertainty
from lmforge.train.sweep import MIN_STEPS, RUNG, plan_token_counts

CHINCHILLA = LossFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, objective=0.0, n_runs=0)  # Hoffmann et al. eq. 10


def _grid(law: LossFit, noise: float, seed: int = 0):
    N, D = (x.ravel() for x in np.meshgrid([5e4, 2e5, 8e5, 3e6], [1e6, 4e6, 16e6, 64e6]))
    L = law.predict(N, D) * np.exp(np.random.default_rng(seed).normal(0, noise, N.size))
    return N, D, L


def test_fit_recovers_known_coefficients_exactly_without_noise():
    fit = fit_scaling_law(*_grid(CHINCHILLA, 0.0))
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit, name) == pytest.approx(getattr(CHINCHILLA, name), rel=1e-3), name
    n, d = fit.compute_optimal(1e21)
    assert (n, d) == pytest.approx(CHINCHILLA.compute_optimal(1e21), rel=1e-2)


def test_fit_with_noise_and_its_bootstrap_interval_cover_the_truth():
    N, D, L = _grid(CHINCHILLA, 0.002, seed=1)
    fit = fit_scaling_law(N, D, L)
    assert fit.alpha == pytest.approx(0.34, abs=0.03) and fit.beta == pytest.approx(0.28, abs=0.03)
    assert fit.E == pytest.approx(1.69, abs=0.15)
    pred = predict_with_uncertainty(fit, bootstrap_fits(N, D, L, fit, samples=10), 1e18)
    true_n, _ = CHINCHILLA.compute_optimal(1e18)
    assert pred["n_opt"] == pytest.approx(true_n, rel=0.2)
    assert pred["n_lo"] <= pred["n_opt"] <= pred["n_hi"] and pred["bootstrap_usable"] == 10
    assert pred["n_opt"] * pred["d_opt"] == pytest.approx(1e18 / 6)


def test_compute_optimal_matches_a_brute_force_minimum_along_the_iso_flop_line():
    C = 1e20
    n = np.logspace(6, 12, 20001)
    brute = n[np.argmin(CHINCHILLA.predict(n, C / (6 * n)))]
    assert CHINCHILLA.compute_optimal(C)[0] == pytest.approx(brute, rel=2e-3)


def test_objective_gradient_is_that_of_the_loss():
    N, D, L = _grid(CHINCHILLA, 0.01)
    logs = (np.log(N), np.log(D), np.log(L))
    theta = np.array([5.0, 6.0, 0.3, 0.4, 0.3])
    _, grad = scaling_fit._objective(theta, *logs, 1e-3)
    eps = 1e-6
    numeric = [(scaling_fit._objective(theta + eps * e, *logs, 1e-3)[0] - scaling_fit._objective(theta - eps * e, *logs, 1e-3)[0])
               / (2 * eps) for e in np.eye(5)]
    assert grad == pytest.approx(numeric, rel=1e-4, abs=1e-8)


def test_grid_is_sized_to_the_budget_from_measured_speeds():
    tps, overhead = [40_000.0, 10_000.0], [1.0, 2.0]
    steps = plan_token_counts(600.0, tps, overhead, levels=3, tokens_per_step=1000, max_tokens=10**9)
    assert steps[1] == pytest.approx(steps[0] * RUNG, abs=1) and steps[2] == pytest.approx(steps[0] * RUNG**2, abs=2)
    spent = sum(s * 1000 / t + o for t, o in zip(tps, overhead) for s in steps)
    assert 0.97 * 600 <= spent <= 600
    capped = plan_token_counts(600.0, tps, overhead, levels=3, tokens_per_step=1000, max_tokens=40_000)
    assert capped == [10, 20, 40]  # the data caps the largest run; the budget is then not all spent
    with pytest.raises(UserError, match="budget is too small"):
        plan_token_counts(12.0, tps, overhead, levels=3, tokens_per_step=1000, max_tokens=10**9)
    assert MIN_STEPS >= 2


TINY_SWEEP = ["--sizes", "16x1,32x1", "--tokens", "256,512", "--batch-size", "2", "--context-length", "32",
              "--vocab-size", "320", "--eval-tokens", "256", "--bootstrap", "5", "--no-progress"]


def test_tiny_sweep_end_to_end_then_reused(capsys, tmp_path, corpus_file, monkeypatch):
    out = tmp_path / "sweep"
    code, stdout, err = run_cli(capsys, "sweep", "--data", corpus_file, "--out", out, *TINY_SWEEP)
    assert code == 0, err
    summary = json.loads((out / "sweep.json").read_text())
    assert len(summary["runs"]) == 4 and summary["reused"] == 0
    assert {(r["d_model"], r["tokens"]) for r in summary["runs"]} == {(16, 256), (16, 512), (32, 256), (32, 512)}
    assert all(np.isfinite(r["val_loss"]) and r["flops"] == 6 * r["non_embedding_params"] * r["tokens"]
               for r in summary["runs"])
    assert set(summary["fit"]) >= {"E", "A", "B", "alpha", "beta"} and summary["prediction"]["n_opt"] > 0
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "underdetermined" in stdout and "compute-optimal" in stdout

    import lmforge.train.sweep as sweep_mod

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(sweep_mod, "_train", no_training)
    code, stdout, err = run_cli(capsys, "sweep", "--data", corpus_file, "--out", out, *TINY_SWEEP)
    assert code == 0, err
    again = json.loads((out / "sweep.json").read_text())
    assert again["reused"] == 4 and stdout.count("(reused)") == 4
    assert [r["val_loss"] for r in again["runs"]] == [r["val_loss"] for r in summary["runs"]]


def test_budget_sized_grid_is_planned_once_and_kept(tmp_path, corpus_file, monkeypatch):
    """Sizing from the budget, with the timing replaced by fixed speeds (no test may depend on timing): speeds
    this fast leave the data (max_epochs) as the cap, so the grid is known; the plan is kept, not timed again.
    One size: the runs are made but no law is fitted (it needs two sizes)."""
    import lmforge.train.sweep as sweep_mod

    calls = []

    def fixed_speeds(cfgs, *a):
        calls.append(len(cfgs))
        return [1e9] * len(cfgs), [0.0] * len(cfgs)
    monkeypatch.setattr(sweep_mod, "_calibrate", fixed_speeds)
    opts = dict(out=tmp_path / "s", data=str(corpus_file), budget_minutes=5.0, sizes=[(16, 1)], levels=2,
                vocab_size=320, context_length=32, batch_size=2, eval_tokens=256, bootstrap=0, max_epochs=0.0375,
                progress=False, on_info=lambda line: None)
    first = sweep_mod.sweep(sweep_mod.SweepOptions(**opts))
    assert calls == [1] and len(first["runs"]) == 2 and first["reused"] == 0
    assert first["fit"] is None and "two sizes" in first["fit_note"]  # one size: no law in N to fit
    small, large = first["steps"]
    assert small >= sweep_mod.MIN_STEPS and abs(large - 2 * small) <= 1
    second = sweep_mod.sweep(sweep_mod.SweepOptions(**opts))
    assert calls == [1] and second["steps"] == first["steps"] and second["reused"] == 2


@pytest.mark.parametrize("flags, fragment", [
    (["--budget", "0"], "--budget must be a positive"),
    (["--budget", "-5"], "--budget must be a positive"),
    (["--data", "builtin:nope"], "nope"),
    (["--sizes", "64by2"], "WIDTHxDEPTH"),
    (["--sizes", "20x2"], "multiple of 16"),
    (["--predict-flops", "0"], "--predict-flops must be a positive"),
    (["--levels", "1"], "--levels must be at least 2"),
])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, corpus_file, flags, fragment):
    data = [] if "--data" in flags else ["--data", str(corpus_file)]
    code, out, err = run_cli(capsys, "sweep", "--out", tmp_path / "o", *data, *flags, "--no-progress")
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: ") and fragment in lines[0], err


def test_an_interrupted_sweep_continues_its_cut_run_exactly(capsys, tmp_path, corpus_file, monkeypatch):
    """SIGINT mid-run saves that run and stops (exit 0); the same command then resumes it from its checkpoint
    and ends at the validation loss an uninterrupted sweep reaches (resume is exact on CPU)."""
    import os
    import signal

    import lmforge.train.sweep as sweep_mod

    flags = ["--data", corpus_file, *TINY_SWEEP]
    flags[flags.index("16x1,32x1")] = "16x1"
    code, _, err = run_cli(capsys, "sweep", "--out", tmp_path / "whole", *flags)
    assert code == 0, err
    whole = json.loads((tmp_path / "whole" / "sweep.json").read_text())

    real_fit = sweep_mod.fit

    def fit_cut_at_step_5(*args, on_log=None, **kwargs):
        def log(rec):
            if rec.get("step") == 5 and "loss" in rec:
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would: fit saves after this step and stops
            if on_log:
                on_log(rec)
        return real_fit(*args, on_log=log, **kwargs)
    monkeypatch.setattr(sweep_mod, "fit", fit_cut_at_step_5)
    code, out, err = run_cli(capsys, "sweep", "--out", tmp_path / "cut", *flags)
    assert code == 0 and "stopped early" in out, err
    cut = json.loads((tmp_path / "cut" / "sweep.json").read_text())
    assert cut["interrupted"] and len(cut["runs"]) == 1  # the 4-step run finished; the 8-step one was cut at 5
    monkeypatch.setattr(sweep_mod, "fit", real_fit)
    code, out, err = run_cli(capsys, "sweep", "--out", tmp_path / "cut", *flags)
    assert code == 0, err
    resumed = json.loads((tmp_path / "cut" / "sweep.json").read_text())
    assert resumed["reused"] == 1 and not resumed["interrupted"]
    assert [r["val_loss"] for r in resumed["runs"]] == [r["val_loss"] for r in whole["runs"]]
