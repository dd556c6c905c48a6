"""`lmforge quickstart`: grow a Python-docs assistant that answers from the documentation, with sources,
offline, in about 15 minutes on a laptop.

    measure fp32 vs bf16 -> pretrain `small` (512-token context) on builtin:pydocs -> index builtin:pydocs
    -> open-book SFT on builtin:pydocs-qa-open -> DPO on builtin:pydocs-prefs-open
    -> evaluate every stage on held-out modules -> register quickstart-base/-sft/-dpo and the `pydocs` index
    -> lmforge run quickstart-dpo --docs pydocs

Why open-book: a model this size pretrained for minutes cannot *know* what each standard-library function
does (closed-book it answers in the right style with the wrong content); what fine-tuning can teach is the
behaviour -- read the retrieved sources, answer from the right one, cite it, and say so when none has the
answer (`lmforge.data.pydocs_open`). The knowledge stays in the index, as in every retrieval-augmented
assistant.

Each stage writes a run directory under `--out` (default runs/quickstart) and is recorded in
`quickstart.json` there when it finishes, so re-running skips what is done (a stage that was interrupted
resumes from its last checkpoint). `--budget MINUTES` scales the number of steps of every stage: the
default 15 is sized for a 2-core CPU; a GPU or a longer budget buys a better model with the same command.

Precision: on a CPU the quickstart first times a few training steps of the model in fp32 and under bf16
autocast (`lmforge.train.precision`) and trains every stage in the faster one (bf16 only when clearly
faster: AMX or AVX-512-BF16 machines); the figures are printed and kept in `quickstart.json`. The table is
`lmforge.eval.stages`.
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
EVAL_VERSION = 3  # bump when the evaluation changes, so a re-run re-evaluates finished stages


CONTEXT = 512  # tokens: three sources, the question and the answer fit (lmforge.data.pydocs_open)


@dataclass
class Plan:
    """Steps per stage for a budget; the 15-minute plan was measured on a 2-core CPU."""

    pretrain_steps: int
    sft_steps: int
    dpo_steps: int
    eval_questions: int
    pretrain_batch: int = 4
    sft_batch: int = 16
    dpo_batch: int = 8

    @classmethod
    def for_budget(cls, minutes: float) -> "Plan":
        scale = max(0.05, minutes / BASE_MINUTES)
        return cls(pretrain_steps=max(10, round(PLAN_15["pretrain"] * scale)),
                   sft_steps=max(5, round(PLAN_15["sft"] * scale)), dpo_steps=max(5, round(PLAN_15["dpo"] * scale)),
                   eval_questions=min(317, max(16, round(PLAN_15["questions"] * scale))))


#: Steps of the 15-minute plan.
PLAN_15 = {"pretrain": 300, "sft": 300, "dpo": 60, "questions": 120}


def _load_state(out: Path) -> dict[str, Any]:
    f = out / STATE
    if f.is_file():
        try:
            return json.loads(f.read_text())
        except ValueError:
            return {}
    return {}


def _stage_done(state: dict, name: str, key: dict) -> bool:
    """A stage is done when it finished with the same settings (steps, data, context): an older
    quickstart's closed-book stages are not this one's."""
    s = state.get("stages", {}).get(name)
    return bool(s) and all(s.get(k) == v for k, v in key.items())


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _precision(state: dict, dev, plan: Plan) -> str:
    """fp32 or bf16 for every stage: what `--precision auto` resolves to (`precision.resolve_auto`: measured
    once per machine and shape on a CPU, and cached; LMFORGE_PRECISION_AUTO pins it), kept in the state so a
    re-run finishes in the precision it started with; on a GPU, the training loop's own choice."""
    if dev.type != "cpu":
        return "auto"
    if state.get("precision") in ("fp32", "bf16"):
        print(f"precision {state['precision']} (measured on the first run: {state.get('precision_note', '')})")
        return state["precision"]
    from lmforge.presets import get_preset
    from lmforge.train.precision import resolve_auto

    choice = resolve_auto(get_preset("small", context_length=CONTEXT), max(1, plan.pretrain_batch // 2), dev)
    print(choice.describe(), flush=True)
    state["precision"], state["precision_note"] = choice.precision, choice.describe()
    return choice.precision


def quickstart(*, out: Path = Path("runs/quickstart"), budget: float = BASE_MINUTES, device: str = "auto",
               progress: bool = True, register: bool = True, chat: bool = True) -> dict[str, Any]:
    from lmforge.data.pydocs_open import pydocs_index
    from lmforge.device import resolve_device
    from lmforge.eval.stages import evaluate_stage, print_report
    from lmforge.train.finetune import FinetuneOptions, finetune
    from lmforge.train.loop import print_evaluations
    from lmforge.train.pretrain import PretrainOptions, pretrain

    if not (budget > 0 and math.isfinite(budget)):
        raise UserError(f"--budget must be a positive number of minutes, got {budget}")
    plan = Plan.for_budget(budget)
    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out)
    state.setdefault("stages", {})  # finished stages: name -> their settings and figures
    state.setdefault("started", {})  # name -> the settings a stage was started with (resume only those)
    state["plan"] = plan.__dict__
    t0 = time.perf_counter()
    on_log = None if progress else print_evaluations  # no progress bar: a line per evaluation instead
    precision = _precision(state, dev, plan)
    atomic_write_json(out / STATE, state)

    def record(name: str, **info: Any) -> None:
        state["stages"][name] = info
        atomic_write_json(out / STATE, state)

    # 1. pretrain
    base = out / "base"
    key = {"steps": plan.pretrain_steps, "context": CONTEXT, "batch": plan.pretrain_batch}
    if not _stage_done(state, "pretrain", key):
        _banner(f"1/4 pretrain `small` on builtin:pydocs ({plan.pretrain_steps} steps of {plan.pretrain_batch} x "
                f"{CONTEXT} tokens)")
        t = time.perf_counter()
        resume = (base / "trainer_state" / "state.json").is_file() and state["started"].get("pretrain") == key
        state["started"]["pretrain"] = key
        result, summary = pretrain(PretrainOptions(
            out=base, data="builtin:pydocs", preset="small", context_length=CONTEXT, resume=resume,
            overwrite=not resume, device=device, progress=progress, on_log=on_log, eval_tokens=65536,
            recipe={"max_steps": plan.pretrain_steps, "batch_size": plan.pretrain_batch, "lr": 3e-3,
                    "precision": precision, "eval_interval": max(1, plan.pretrain_steps // 3),
                    "save_interval": max(1, plan.pretrain_steps // 3)}))
        if result.interrupted:
            raise UserError("interrupted: run lmforge quickstart again to continue")
        record("pretrain", **key, seconds=time.perf_counter() - t, val_loss=result.val_loss,
               val_ppl=math.exp(result.val_loss), nats_per_char=summary.get("val_nats_per_char"))
    else:
        print(f"1/4 pretrain: done ({base})")

    # the index the open-book data retrieves from (built once, cached; seconds)
    print("indexing builtin:pydocs for retrieval (BM25) ...", flush=True)
    pydocs_index().close()

    # 2. open-book SFT, 3. DPO
    stages = [("sft", base, out / "sft", "builtin:pydocs-qa-open", plan.sft_steps, plan.sft_batch, 1e-3),
              ("dpo", out / "sft", out / "dpo", "builtin:pydocs-prefs-open", plan.dpo_steps, plan.dpo_batch, 1.5e-4)]
    for i, (method, src, dst, data, steps, batch, lr) in enumerate(stages, start=2):
        # "after": the wall time of the stage this one starts from, as a fingerprint of that run: when it
        # was trained again, this stage must be too
        key = {"steps": steps, "data": data, "batch": batch, "lr": lr, "after": state["stages"].get(
            "pretrain" if method == "sft" else "sft", {}).get("seconds")}
        if _stage_done(state, method, key):
            print(f"{i}/4 {method}: done ({dst})")
            continue
        _banner(f"{i}/4 {method.upper()} on {data} ({steps} steps of {batch})")
        t = time.perf_counter()
        resume = (dst / "trainer_state" / "state.json").is_file() and state["started"].get(method) == key
        state["started"][method] = key
        result, summary = finetune(FinetuneOptions(
            model=str(src), data=data, out=dst, method=method, resume=resume, overwrite=not resume, device=device,
            progress=progress, on_log=on_log, on_info=lambda line: print("  " + line, flush=True), beta=0.1,
            base_ref=f"quickstart-{'base' if method == 'sft' else 'sft'}",
            recipe={"lr": lr, "batch_size": batch, "max_steps": steps, "precision": precision,
                    "group_by_length": True, "eval_interval": steps,  # one validation, at the end: the
                    "warmup_steps": max(1, steps // 10)}))              # held-out evaluation below is the real one
        if result.interrupted:
            raise UserError("interrupted: run lmforge quickstart again to continue")
        record(method, **key, seconds=time.perf_counter() - t, val_loss=result.val_loss, val_metrics=result.val_metrics)

    # 4. evaluate every stage on held-out modules
    ev_key = {"plan": plan.__dict__, "version": EVAL_VERSION,
              "trained": [state["stages"][s]["seconds"] for s in ("pretrain", "sft", "dpo")]}
    if not state.get("eval") or any(state["eval"].get(k) != v for k, v in ev_key.items()):
        _banner("4/4 evaluate on held-out modules")
        t = time.perf_counter()
        ev = {name: evaluate_stage(out / name, dev, plan.eval_questions) for name in ("base", "sft", "dpo")}
        state["eval"] = {**ev_key, "results": ev, "seconds": time.perf_counter() - t}
        atomic_write_json(out / STATE, state)
    else:
        print("4/4 evaluate: done")

    print_report(state)
    if register:
        from lmforge.data.pydocs_open import K
        from lmforge.retrieval.index import index_path
        from lmforge.store import import_model

        for name in ("base", "sft", "dpo"):
            import_model(out / name, f"quickstart-{name}", overwrite=True)
        pydocs_index(index_path("pydocs")).close()
        print("registered in the store: quickstart-base, quickstart-sft, quickstart-dpo, and the index `pydocs`\n"
              f"chat in the terminal: lmforge run quickstart-dpo --docs pydocs -k {K}    "
              "in the browser: lmforge serve quickstart-dpo --docs pydocs")
    print(f"total wall time this run: {time.perf_counter() - t0:.0f}s")
    if chat and register and sys.stdin.isatty() and sys.stdout.isatty():
        from lmforge.chat import ChatSession, Documents, repl
        from lmforge.data.pydocs_open import K
        from lmforge.loaders.auto import load

        print(f"\nstarting `lmforge run quickstart-dpo --docs pydocs -k {K}` (type /bye to leave)")
        repl(ChatSession.from_loaded(load(out / "dpo", device=dev), docs=Documents("pydocs", K)))
    return state
