"""`lmforge quickstart`: grow a Python-docs assistant from nothing, offline, in about 15 minutes on a laptop.

    pretrain `small` on builtin:pydocs  ->  SFT on builtin:pydocs-qa  ->  DPO on builtin:pydocs-prefs
    -> evaluate every stage on held-out data -> register quickstart-base/-sft/-dpo -> lmforge run

Each stage writes a run directory under `--out` (default runs/quickstart) and is recorded in
`quickstart.json` there when it finishes, so re-running skips what is done (a stage that was interrupted
resumes from its last checkpoint). `--budget MINUTES` scales the number of steps of every stage: the
default 15 is sized for a 2-core CPU; a GPU or a longer budget buys a better model with the same command.

What the table measures, all on data the training never saw:
  * validation perplexity of the pretrained model on the held-out 5% of the corpus;
  * held-out QA token-F1: greedy answers to questions about Python modules excluded from SFT, scored
    against the docstring summaries (SQuAD token F1);
  * held-out preference accuracy: how often the model's own likelihood prefers the right summary to a
    plausible wrong one, for pairs about the held-out modules: by the likelihood of the whole reply (which
    always favours a reply cut short) and per token (fair to replies of different lengths), and split
    by the kind of wrong reply.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.io import atomic_write_json

STATE = "quickstart.json"
BASE_MINUTES = 15.0
EVAL_VERSION = 2  # bump when the evaluation changes, so a re-run re-evaluates finished stages


@dataclass
class Plan:
    """Steps per stage for a budget; the 15-minute plan was measured on a 2-core CPU."""

    pretrain_steps: int
    sft_steps: int
    dpo_steps: int
    eval_questions: int

    @classmethod
    def for_budget(cls, minutes: float) -> "Plan":
        scale = max(0.05, minutes / BASE_MINUTES)
        return cls(pretrain_steps=max(10, round(360 * scale)), sft_steps=max(5, round(300 * scale)),
                   dpo_steps=max(5, round(120 * scale)), eval_questions=min(317, max(16, round(160 * scale))))


def _load_state(out: Path) -> dict[str, Any]:
    f = out / STATE
    if f.is_file():
        try:
            return json.loads(f.read_text())
        except ValueError:
            return {}
    return {}


def _stage_done(state: dict, name: str, steps: int) -> bool:
    s = state.get("stages", {}).get(name)
    return bool(s) and s.get("steps") == steps


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _evaluate(path: Path, device, plan: Plan) -> dict[str, Any]:
    """Held-out QA token-F1 (with the answers) and preference accuracy of the model at `path`."""
    from lmforge.data.preferences import encode_preference
    from lmforge.data.pydocs_qa import preference_pairs, qa_conversations
    from lmforge.data.records import read_preferences
    from lmforge.engine.generate import Engine
    from lmforge.eval.assistant import preference_wins, qa_f1
    from lmforge.loaders.auto import load

    loaded = load(path, device=device)
    engine = Engine(loaded.model, loaded.tokenizer, fast=False)
    qa = qa_conversations("heldout")[: plan.eval_questions]
    res = qa_f1(engine, [q.prompt_messages for q in qa], [q.answer for q in qa])
    kinds = [p.rejected_kind for p in preference_pairs("heldout")]
    ctx = loaded.model.config.context_length
    encoded = [(k, encode_preference(loaded.tokenizer, p, ctx))
               for k, p in zip(kinds, read_preferences("builtin:pydocs-prefs:heldout").pairs)]
    encoded = [(k, e) for k, e in encoded if e is not None]
    wins = preference_wins(loaded.model, loaded.tokenizer, [e for _, e in encoded])

    def share(which: int, kind: str | None = None) -> float:
        picked = [w[which] for (k, _), w in zip(encoded, wins) if kind is None or k == kind]
        return sum(picked) / max(1, len(picked))

    return {"qa_f1": res.f1, "qa_n": res.n, "pref_accuracy": share(0), "pref_accuracy_norm": share(1),
            "pref_by_kind": {k: {"sum": share(0, k), "per_token": share(1, k), "n": kinds.count(k)}
                             for k in sorted(set(kinds))},
            "pref_n": len(encoded), "answers": res.answers[:4], "questions": [q.question for q in qa[:4]],
            "references": [q.answer for q in qa[:4]]}


def quickstart(*, out: Path = Path("runs/quickstart"), budget: float = BASE_MINUTES, device: str = "auto",
               progress: bool = True, register: bool = True, chat: bool = True) -> dict[str, Any]:
    from lmforge.train.finetune import FinetuneOptions, finetune
    from lmforge.train.loop import print_evaluations
    from lmforge.device import resolve_device
    from lmforge.train.pretrain import PretrainOptions, pretrain

    if not (budget > 0 and math.isfinite(budget)):
        raise UserError(f"--budget must be a positive number of minutes, got {budget}")
    plan = Plan.for_budget(budget)
    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out)
    state.setdefault("stages", {})
    state["plan"] = plan.__dict__
    t0 = time.perf_counter()
    on_log = None if progress else print_evaluations  # no progress bar: a line per evaluation instead

    def record(name: str, **info: Any) -> None:
        state["stages"][name] = info
        atomic_write_json(out / STATE, state)

    # 1. pretrain
    base = out / "base"
    if not _stage_done(state, "pretrain", plan.pretrain_steps):
        _banner(f"1/4 pretrain `small` on builtin:pydocs ({plan.pretrain_steps} steps)")
        t = time.perf_counter()
        resume = (base / "trainer_state" / "state.json").is_file()
        result, summary = pretrain(PretrainOptions(
            out=base, data="builtin:pydocs", preset="small", resume=resume, overwrite=not resume, device=device,
            progress=progress, on_log=on_log, eval_tokens=65536,
            recipe={"max_steps": plan.pretrain_steps, "batch_size": 8, "lr": 3e-3,
                    "eval_interval": max(1, plan.pretrain_steps // 3), "save_interval": max(1, plan.pretrain_steps // 3)}))
        if result.interrupted:
            raise UserError("interrupted: run lmforge quickstart again to continue")
        record("pretrain", steps=plan.pretrain_steps, seconds=time.perf_counter() - t, val_loss=result.val_loss,
               val_ppl=math.exp(result.val_loss), nats_per_char=summary.get("val_nats_per_char"))
    else:
        print(f"1/4 pretrain: done ({base})")

    # 2. SFT, 3. DPO
    stages = [("sft", base, out / "sft", "builtin:pydocs-qa", plan.sft_steps, {"lr": 1e-3, "batch_size": 16}),
              ("dpo", out / "sft", out / "dpo", "builtin:pydocs-prefs", plan.dpo_steps,
               {"lr": 5e-5, "batch_size": 16})]
    for i, (method, src, dst, data, steps, recipe) in enumerate(stages, start=2):
        if _stage_done(state, method, steps):
            print(f"{i}/4 {method}: done ({dst})")
            continue
        _banner(f"{i}/4 {method.upper()} on {data} ({steps} steps)")
        t = time.perf_counter()
        resume = (dst / "trainer_state" / "state.json").is_file()
        result, summary = finetune(FinetuneOptions(
            model=str(src), data=data, out=dst, method=method, resume=resume, overwrite=not resume, device=device,
            progress=progress, on_log=on_log, on_info=lambda line: print("  " + line, flush=True), beta=0.1, base_ref=f"quickstart-{'base' if method == 'sft' else 'sft'}",
            recipe={**recipe, "max_steps": steps, "eval_interval": max(1, steps // 3), "warmup_steps": max(1, steps // 10)}))
        if result.interrupted:
            raise UserError("interrupted: run lmforge quickstart again to continue")
        record(method, steps=steps, seconds=time.perf_counter() - t, val_loss=result.val_loss, val_metrics=result.val_metrics)

    # 4. evaluate every stage on held-out data
    if not state.get("eval") or state["eval"].get("plan") != plan.__dict__ or state["eval"].get("version") != EVAL_VERSION:
        _banner("4/4 evaluate on held-out modules")
        t = time.perf_counter()
        ev = {name: _evaluate(out / name, dev, plan) for name in ("base", "sft", "dpo")}
        state["eval"] = {"plan": plan.__dict__, "results": ev, "seconds": time.perf_counter() - t,
                         "version": EVAL_VERSION}
        atomic_write_json(out / STATE, state)
    else:
        print("4/4 evaluate: done")

    print_report(state)
    if register:
        from lmforge.store import import_model

        for name in ("base", "sft", "dpo"):
            import_model(out / name, f"quickstart-{name}", overwrite=True)
        print("registered in the store: quickstart-base, quickstart-sft, quickstart-dpo\n"
              "chat in the terminal: lmforge run quickstart-dpo    in the browser: lmforge serve quickstart-dpo")
    print(f"total wall time this run: {time.perf_counter() - t0:.0f}s")
    if chat and register and sys.stdin.isatty() and sys.stdout.isatty():
        from lmforge.chat import ChatSession, repl
        from lmforge.loaders.auto import load

        print("\nstarting `lmforge run quickstart-dpo` (type /bye to leave)")
        repl(ChatSession.from_loaded(load(out / "dpo", device=dev)))
    return state


def print_report(state: dict[str, Any]) -> None:
    st, ev = state["stages"], state["eval"]["results"]

    def pref(name: str) -> str:
        e = ev[name]
        return f"{e['pref_accuracy']:.3f} / {e.get('pref_accuracy_norm', float('nan')):.3f}"

    rows = [("stage", "wall time", "val ppl", "held-out QA F1", "held-out pref acc (sum / per token)")]
    rows.append(("pretrain (base)", f"{st['pretrain']['seconds']:.0f}s", f"{st['pretrain']['val_ppl']:.1f}",
                 f"{ev['base']['qa_f1']:.3f}", pref("base")))
    rows.append(("SFT", f"{st['sft']['seconds']:.0f}s", f"(QA loss {st['sft']['val_loss']:.3f})",
                 f"{ev['sft']['qa_f1']:.3f}", pref("sft")))
    rows.append(("DPO", f"{st['dpo']['seconds']:.0f}s", "", f"{ev['dpo']['qa_f1']:.3f}", pref("dpo")))
    rows.append(("evaluation", f"{state['eval']['seconds']:.0f}s", "", f"n={ev['base']['qa_n']}", f"n={ev['base']['pref_n']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print()
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    kinds = ev["dpo"].get("pref_by_kind") or {}
    for kind, label in (("other", "rejected = another object's summary"), ("truncated", "rejected = the right summary cut short")):
        if kind in kinds:
            cells = "   ".join(f"{name} {ev[name]['pref_by_kind'][kind]['sum']:.2f}/{ev[name]['pref_by_kind'][kind]['per_token']:.2f}"
                               for name in ("base", "sft", "dpo"))
            print(f"  pref acc, {label} (n={kinds[kind]['n']}): {cells}")
    print("\nsample answers to held-out questions:")
    for i, q in enumerate(ev["base"]["questions"]):
        print(f"\nQ: {q}\n   reference: {ev['base']['references'][i]}")
        for name in ("base", "sft", "dpo"):
            a = " ".join(ev[name]["answers"][i].split())[:160]
            print(f"   {name:<4} {a}")
