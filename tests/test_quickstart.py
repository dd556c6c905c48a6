"""`lmforge quickstart` end to end at the smallest budget: every stage runs on the real built-in data,
the report and the store are complete, progress shows without a terminal, and a re-run skips what is done.

The smallest budget trains each stage for a handful of steps, so the figures are meaningless; what is
tested is the plumbing (the figures of a full run are in the issue notes and the README).
"""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main
from lmforge.quickstart import Plan


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One quickstart at the smallest budget (about a minute: tokenizer, shards and three short runs)."""
    import contextlib
    import io

    home = tmp_path_factory.mktemp("qs_home")
    out = tmp_path_factory.mktemp("qs") / "run"
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setenv("LMFORGE_HOME", str(home))
        code = main(["quickstart", "--out", str(out), "--budget", "0.05", "--no-chat", "--no-progress"])
    return code, buf.getvalue(), out, home


def test_every_stage_runs_and_the_report_is_complete(first_run):
    code, text, out, _ = first_run
    assert code == 0, text
    state = json.loads((out / "quickstart.json").read_text())
    assert set(state["stages"]) == {"pretrain", "sft", "dpo"}
    plan = Plan.for_budget(0.05)
    assert [state["stages"][s]["steps"] for s in ("pretrain", "sft", "dpo")] == [plan.pretrain_steps, plan.sft_steps, plan.dpo_steps]
    for name in ("base", "sft", "dpo"):
        ev = state["eval"]["results"][name]
        assert 0.0 <= ev["qa_f1"] <= 1.0 and ev["qa_n"] == plan.eval_questions
        assert ev["pref_n"] > 100 and 0.0 <= ev["pref_accuracy"] <= 1.0 and 0.0 <= ev["pref_accuracy_norm"] <= 1.0
        assert set(ev["pref_by_kind"]) == {"other", "truncated"}
        assert sum(k["n"] for k in ev["pref_by_kind"].values()) == ev["pref_n"]
        assert (out / name / "model.safetensors").is_file()
    # the table, the per-kind lines and the sample answers
    assert "held-out pref acc (sum / per token)" in text and "rejected = the right summary cut short" in text
    assert text.count("   reference: ") == 4
    # no terminal, no progress bar: a line per evaluation of every stage instead
    assert f"step {plan.pretrain_steps}: val loss" in text and "(ppl " in text
    assert "rewards_accuracy" in text  # DPO's evaluation lines carry its metrics


def test_models_are_registered_with_their_lineage(first_run, monkeypatch):
    _, text, _, home = first_run
    monkeypatch.setenv("LMFORGE_HOME", str(home))
    from lmforge.store import list_models

    names = {e.name for e in list_models()}
    assert {"quickstart-base", "quickstart-sft", "quickstart-dpo"} <= {n.split(":")[0] for n in names}
    assert "lmforge run quickstart-dpo" in text


def test_a_rerun_skips_finished_stages(first_run, monkeypatch, capsys):
    _, _, out, home = first_run
    monkeypatch.setenv("LMFORGE_HOME", str(home))
    before = json.loads((out / "quickstart.json").read_text())
    assert main(["quickstart", "--out", str(out), "--budget", "0.05", "--no-chat", "--no-progress", "--no-store"]) == 0
    text = capsys.readouterr().out
    assert "1/4 pretrain: done" in text and "2/4 sft: done" in text and "3/4 dpo: done" in text
    assert "4/4 evaluate: done" in text and "step " not in text  # nothing trained again
    after = json.loads((out / "quickstart.json").read_text())
    assert after["stages"] == before["stages"] and after["eval"] == before["eval"]


def test_a_bigger_budget_trains_the_stages_again(first_run):
    """A different budget is a different plan: finished stages of the old plan do not count as done."""
    from lmforge.quickstart import _stage_done

    _, _, out, _ = first_run
    state = json.loads((out / "quickstart.json").read_text())
    assert _stage_done(state, "pretrain", Plan.for_budget(0.05).pretrain_steps)
    assert not _stage_done(state, "pretrain", Plan.for_budget(5).pretrain_steps)


def test_a_bad_budget_is_one_line(capsys, tmp_path):
    assert main(["quickstart", "--out", str(tmp_path / "x"), "--budget", "0", "--no-chat"]) == 2
    err = capsys.readouterr().err
    assert "--budget" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
