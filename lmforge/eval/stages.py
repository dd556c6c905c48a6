"""The quickstart's evaluation of each stage (base / SFT / DPO) on held-out modules, and its table.

Everything is measured on the held-out split of the built-in assistant data (modules SFT and DPO never
saw; `lmforge.data.pydocs_qa`), with the model's own chat template:

* **retrieval recall@K** -- share of held-out questions whose answer is in the K retrieved sources (a
  property of the index, the same for every stage; it caps what open-book answering can reach);
* **open-book** answers: greedy, to the grounded prompts of `builtin:pydocs-qa-open:heldout`, scored by
  `lmforge.eval.grounded` (token F1 on answerable questions and overall, citation accuracy, "not in the
  sources" precision/recall);
* **closed-book** token F1: the same questions without sources (`builtin:pydocs-qa:heldout`): what the
  model knows by itself;
* **preference accuracy** on `builtin:pydocs-prefs-open:heldout`: by summed and per-token likelihood, and
  by DPO's implicit reward against the stage before (SFT against base, DPO against SFT), split by the kind
  of rejected reply.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["evaluate_stage", "print_report", "spread"]

SAMPLES = 4  # sample answers kept per stage, shown side by side


def spread(items: list, n: int) -> list:
    """`n` items spread evenly over `items` (all when fewer): held-out questions come sorted by module, so
    the first n would all be about a few modules."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def evaluate_stage(path: Path, device, questions: int) -> dict[str, Any]:
    """The held-out scores of the model at `path` (see the module docstring). Keeps the raw preference
    margins (`margins`) so that the implicit reward of the next stage can be computed against this one."""
    from lmforge.data.preferences import encode_preference
    from lmforge.data.pydocs_open import K, open_conversations, open_preference_pairs, retrieval_recall
    from lmforge.data.pydocs_qa import qa_conversations
    from lmforge.data.records import Preference
    from lmforge.engine.generate import Engine
    from lmforge.eval.assistant import preference_scores, qa_f1
    from lmforge.eval.grounded import score_grounded
    from lmforge.loaders.auto import load

    loaded = load(path, device=device)
    engine = Engine(loaded.model, loaded.tokenizer, fast=False)
    ctx = loaded.model.config.context_length

    open_qa = spread(open_conversations("heldout"), questions)
    opened = qa_f1(engine, [q.prompt_messages for q in open_qa], [q.answer for q in open_qa], max_new_tokens=64)
    grounded = score_grounded(opened.answers, [q.answer_source for q in open_qa], [q.summary for q in open_qa],
                              [len(q.sources) for q in open_qa])
    closed_qa = spread(qa_conversations("heldout"), questions)
    closed = qa_f1(engine, [q.prompt_messages for q in closed_qa], [q.answer for q in closed_qa])

    pairs = open_preference_pairs("heldout")
    encoded = [(p.rejected_kind, encode_preference(loaded.tokenizer, Preference(p.prompt, p.chosen, p.rejected), ctx))
               for p in pairs]
    kinds = [k for k, e in encoded if e is not None]
    scores = preference_scores(loaded.model, loaded.tokenizer, [e for _, e in encoded if e is not None])
    return {
        "recall_at_k": retrieval_recall("heldout"), "k": K,
        "open": grounded.as_dict(), "closed_f1": closed.f1, "n_questions": len(open_qa),
        "pref_kinds": kinds, "margins": [s.margin for s in scores],
        "pref_sum": [s.chosen_sum > s.rejected_sum for s in scores],
        "pref_mean": [s.chosen_mean > s.rejected_mean for s in scores],
        "samples": [{"question": q.question, "reference": q.answer, "answer": a}
                    for q, a in list(zip(open_qa, opened.answers))[:SAMPLES]],
        "closed_samples": closed.answers[:SAMPLES],
    }


def _share(flags: list[bool], kinds: list[str], kind: str | None = None) -> float:
    picked = [f for f, k in zip(flags, kinds) if kind is None or k == kind]
    return sum(picked) / len(picked) if picked else float("nan")


def _implicit(ev: dict, stage: str, before: str | None) -> list[bool] | None:
    if before is None or before not in ev or len(ev[before]["margins"]) != len(ev[stage]["margins"]):
        return None
    return [p > r for p, r in zip(ev[stage]["margins"], ev[before]["margins"])]


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def print_report(state: dict[str, Any]) -> None:
    """The quickstart's table: wall time and every score per stage, preference accuracy by kind of
    rejected reply, and sample answers side by side."""
    st, ev = state["stages"], state["eval"]["results"]
    order = [("base", "pretrain", None), ("sft", "sft", "base"), ("dpo", "dpo", "sft")]
    head = ("stage", "wall", "open F1", "open F1 all", "cite acc", "NIS P/R", "closed F1",
            "pref sum/tok/implicit")
    rows = [head]
    for name, stage, before in order:
        e = ev[name]
        o = e["open"]
        implicit = _implicit(ev, name, before)
        rows.append((name, f"{st[stage]['seconds']:.0f}s", _fmt(o["f1_answerable"]), _fmt(o["f1_all"]),
                     _fmt(o["citation_accuracy"]), f"{_fmt(o['nis_precision'])}/{_fmt(o['nis_recall'])}",
                     _fmt(e["closed_f1"]),
                     f"{_fmt(_share(e['pref_sum'], e['pref_kinds']))}/{_fmt(_share(e['pref_mean'], e['pref_kinds']))}/"
                     f"{_fmt(_share(implicit, e['pref_kinds'])) if implicit else '-'}"))
    rows.append(("evaluation", f"{state['eval']['seconds']:.0f}s", "", "", "", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    base = ev["base"]
    print(f"\nheld-out modules: {base['n_questions']} questions ({base['open']['n_answerable']} answerable from their "
          f"sources), {len(base['pref_kinds'])} preference pairs; retrieval recall@{base['k']} "
          f"{base['recall_at_k']:.3f}; pretrain val ppl {st['pretrain'].get('val_ppl', float('nan')):.1f}")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print("\npreference accuracy by kind of rejected reply (sum / per token / implicit reward):")
    for kind in sorted(set(base["pref_kinds"])):
        cells = []
        for name, _, before in order:
            e = ev[name]
            implicit = _implicit(ev, name, before)
            cells.append(f"{name} {_fmt(_share(e['pref_sum'], e['pref_kinds'], kind))}/"
                         f"{_fmt(_share(e['pref_mean'], e['pref_kinds'], kind))}/"
                         f"{_fmt(_share(implicit, e['pref_kinds'], kind)) if implicit else '-'}")
        print(f"  {kind:<10} (n={base['pref_kinds'].count(kind)}): " + "   ".join(cells))
    print("\nsample open-book answers to held-out questions:")
    for i, s in enumerate(base["samples"]):
        print(f"\nQ: {s['question']}\n   reference: {s['reference']}")
        for name, _, _ in order:
            a = " ".join(ev[name]["samples"][i]["answer"].split())[:160]
            print(f"   {name:<4} {a}")
