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
    assert state["precision"] in ("fp32", "bf16") and "precision " in text  # measured, and said
    for name in ("base", "sft", "dpo"):
        ev = state["eval"]["results"][name]
        assert ev["n_questions"] == plan.eval_questions and 0.9 < ev["recall_at_k"] <= 1.0
        o = ev["open"]
        assert 0.0 <= o["f1_answerable"] <= 1.0 and 0.0 <= o["f1_all"] <= 1.0 and 0.0 <= o["citation_accuracy"] <= 1.0
        assert 0.0 <= ev["closed_f1"] <= 1.0
        assert len(ev["pref_kinds"]) > 250 and set(ev["pref_kinds"]) == {"other", "uncited", "truncated", "confident"}
        assert len(ev["margins"]) == len(ev["pref_sum"]) == len(ev["pref_mean"]) == len(ev["pref_kinds"])
        assert (out / name / "model.safetensors").is_file()
    # the table (implicit reward only after a reference), the per-kind lines and the sample answers
    assert "open F1" in text and "cite acc" in text and "NIS P/R" in text and "closed F1" in text
    assert "retrieval recall@3" in text and "confident" in text
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
    assert "lmforge run quickstart-dpo --docs pydocs -k 3" in text
    from lmforge.retrieval.index import list_indexes, open_index

    assert "pydocs" in list_indexes() and open_index("pydocs").search("textwrap dedent")[0].heading == "textwrap.dedent"


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
    done = state["stages"]["pretrain"]
    assert _stage_done(state, "pretrain", {"steps": Plan.for_budget(0.05).pretrain_steps, "context": done["context"]})
    assert not _stage_done(state, "pretrain", {"steps": Plan.for_budget(5).pretrain_steps, "context": done["context"]})


def test_a_bad_budget_is_one_line(capsys, tmp_path):
    assert main(["quickstart", "--out", str(tmp_path / "x"), "--budget", "0", "--no-chat"]) == 2
    err = capsys.readouterr().err
    assert "--budget" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
