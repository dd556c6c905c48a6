"""How a training run uses the machine: precision, torch.compile and activation checkpointing, decided once
at the start of a run, said to the user, and recorded with the run.

`resolve_run` turns the recipe's `precision="auto"` and `compile="auto"` into concrete settings:
  - precision: `lmforge.train.precision.resolve_auto` (measured on a CPU, cached; bf16 on CUDA GPUs), or
    on a resume the precision the run was started in (recorded in its checkpoint), so a resumed run
    computes what the uninterrupted run would have;
  - compile: on for CUDA; on a CPU only where it pays (`compile_pays`), because compiling the model costs
    tens of seconds of CPU there and a short run never earns that back; off under `--parallel pp=N`, whose
    pipeline schedule runs the stages itself and never calls a compiled model (said, not silently ignored);
    on a resume, what the checkpoint's recipe says unless --compile is given again;
  - activation checkpointing: as asked (`lmforge.train.memory`; off by default: it costs a third more
    compute and only pays when memory is what limits the batch or context).

The compile rule (`compile_pays`, a pure function): compile when the time it saves, run_s * (1 - 1/speedup),
is at least `COMPILE_MARGIN` times what it costs, compile_s. With the speed-ups measured here that reads
"compile when the run, uncompiled, is at least 7x the compile time in fp32, 22x under bf16 autocast"
(margin x speedup / (speedup - 1); for `small`, compile ~48 s: from ~6 minutes of fp32 training, ~18 of bf16):
  - run_s: the remaining optimizer steps x micro-batches per step x seconds per forward+backward of one
    micro-batch at the run's shape and precision (the precision measurement's figure, or one timed step;
    both timed on a couple of rows and scaled to the micro-batch, `precision.MEASURE_ROWS`);
  - speedup: `CPU_COMPILE_SPEEDUP[precision]`;
  - compile_s: `estimate_compile_s`, seconds of a cold compile: `COMPILE_S_BASE + COMPILE_S_PER_LAYER *
    n_layers` (dynamo unrolls the loop over the blocks, but inductor's kernels for identical blocks are
    shared, so depth adds little).
A run too short to pay even on the slowest plausible CPU (`SLOWEST_CPU_FLOPS`) is settled without timing
anything, so tiny test runs resolve to off at once.

Measured on this project's machine (Intel Xeon with AMX and AVX-512-BF16, 2 threads, torch 2.13) while it
was SHARED and busy (load average 7-10 on 2 cores), so the figures are rough: a training step of `small`
(batch 8 x 256, fused AdamW) took 2.60 CPU-seconds eager and 1.78 compiled in fp32 (1.46x), 2.42 and 2.16
under bf16 autocast (1.12x); CPU-seconds (process time), because wall time on a busy machine measures the
neighbours. The first compiled step took 53-69 s of wall time (cold inductor cache) against 3-4 s for a
steady one; `tiny`'s (2 blocks) took as long, so the cost is mostly fixed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from lmforge.errors import UserError
from lmforge.train.precision import PrecisionChoice, pinned, resolve_auto, time_step

__all__ = ["COMPILE_MARGIN", "CPU_COMPILE_SPEEDUP", "RunHardware", "compile_mode", "compile_pays",
           "compile_in_fit", "decide_compile", "estimate_compile_s", "resolve_run"]

#: Compile must save at least this many times its own cost: the estimates are rough, and a compile that
#: only breaks even is not worth the wait before the first step.
COMPILE_MARGIN = 2.0
#: torch.compile speed-up of a training step on a CPU, by precision (measured, `small`: 1.46x and 1.12x;
#: a little under, since a busy machine flatters neither). fp16 autocast is not a CPU precision: never.
CPU_COMPILE_SPEEDUP = {"fp32": 1.4, "bf16": 1.1}
#: A cold compile (empty inductor cache) of forward + backward, seconds: a fixed part and a part per block
#: (measured 53-69 s for `small` on the busy machine; a quiet one takes about half).
COMPILE_S_BASE = 30.0
COMPILE_S_PER_LAYER = 3.0
#: No CPU trains slower than this (FLOP/s of training, plus a fixed cost per micro-batch for the Python,
#: dispatch and optimizer): the cheap upper bound on a run's length that settles "too short to pay" untimed.
SLOWEST_CPU_FLOPS = 1e9
SLOWEST_MICRO_S = 0.1

_PRECISIONS = ("fp32", "bf16", "fp16")


def compile_mode(value: Any) -> str:
    """auto | on | off, from a recipe value (older checkpoints stored a bool). Anything else is a UserError."""
    if value is True or value is False:
        return "on" if value else "off"
    text = str(value).strip().lower()
    if text not in ("auto", "on", "off"):
        raise UserError(f"--compile must be auto, on or off, got {value!r}")
    return text


def compile_in_fit(value: Any, device: torch.device) -> bool:
    """`fit`'s reading of the recipe's compile setting. An "auto" that reaches `fit` unresolved (fine-tuning,
    benchmarks: no measurement was made) is on for CUDA and off on a CPU, where compiling pays only for
    long runs (`resolve_run` decides those for pretraining)."""
    mode = compile_mode(value)
    return mode == "on" or (mode == "auto" and torch.device(device).type == "cuda")


def estimate_compile_s(n_layers: int) -> float:
    return COMPILE_S_BASE + COMPILE_S_PER_LAYER * n_layers


def compile_pays(run_s: float, compile_s: float, speedup: float, margin: float = COMPILE_MARGIN) -> bool:
    """Whether compiling saves at least `margin` times its cost over a run of `run_s` seconds (uncompiled).
    Example: speedup 1.25 saves a fifth of the run; with compile_s 50 and margin 2 it pays from run_s 500.
    Whatever its speed-up, a run faster than its compile (`run_s < margin * compile_s`) never pays."""
    if speedup <= 1.0:
        return False
    return run_s * (1.0 - 1.0 / speedup) >= margin * compile_s


def decide_compile(mode: str, device: torch.device, *, config, precision: str, steps: int, micro_batches: int,
                   tokens_per_micro: int, step_s: Callable[[], float | None]) -> tuple[bool, str]:
    """(compile?, the reason, one line). `steps` is the optimizer steps this process will still take,
    `micro_batches` per step, `tokens_per_micro` tokens of one process's micro-batch; `step_s()` gives the
    seconds of one forward+backward of that micro-batch (it may time one), called only when needed."""
    mode = compile_mode(mode)
    if mode != "auto":
        return mode == "on", f"compile {mode} (asked)"
    if device.type == "cuda":
        return True, "compile on: auto on a CUDA GPU"
    if device.type != "cpu":
        return False, f"compile off: auto on {device.type}"
    compile_s = estimate_compile_s(config.n_layers)
    speedup = CPU_COMPILE_SPEEDUP.get(precision, 1.0)
    micro = max(0, steps) * micro_batches
    slowest = micro * (tokens_per_micro * config.flops_per_token() / SLOWEST_CPU_FLOPS + SLOWEST_MICRO_S)
    if not compile_pays(slowest, compile_s, speedup):  # too short even on the slowest CPU
        return False, (f"compile off: {steps} steps are too short to repay a CPU compile (~{compile_s:.0f} s for "
                       f"{config.n_layers} layers)")
    per = step_s()
    if per is None:
        return False, "compile off: the step time could not be measured"
    run_s = micro * per
    on = compile_pays(run_s, compile_s, speedup)
    return on, (f"compile {'on' if on else 'off'}: the run is ~{run_s:.0f} s uncompiled ({micro} x {per * 1e3:.0f} ms), "
                f"compile ~{compile_s:.0f} s, {precision} speed-up ~{speedup}x: "
                f"{'pays' if on else 'does not pay'} (rule: saves >= {COMPILE_MARGIN:g}x its cost)")


@dataclass
class RunHardware:
    """What a run decided, for the log line and the run's lmforge.json."""

    precision: PrecisionChoice
    compile: bool
    compile_why: str
    activation_checkpointing: bool

    def lines(self) -> list[str]:
        ac = "on (each block recomputed in the backward)" if self.activation_checkpointing else "off"
        return [self.precision.describe(), self.compile_why, f"activation checkpointing {ac}"]

    def record(self) -> dict:
        p = self.precision
        return {"precision": p.precision, "precision_source": p.source, "precision_why": p.describe(),
                "fp32_step_s": p.fp32_s, "bf16_step_s": p.bf16_s, "precision_timed_rows": p.rows, "compile": self.compile,
                "compile_why": self.compile_why, "activation_checkpointing": self.activation_checkpointing}


def _same_mode(saved, mode: str) -> bool:
    try:
        return compile_mode(saved) == mode
    except UserError:  # a damaged recipe: not the checkpoint's word
        return False


def _saved_state(resume_dir) -> dict:
    """The trainer state's JSON of the run being resumed (step, recorded precision); {} when unreadable."""
    from lmforge.checkpoint import TRAINER_STATE

    try:
        return json.loads((Path(resume_dir) / TRAINER_STATE / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def resolve_run(recipe, config, device: torch.device, *, dist=None, resume_dir=None,
                on_info: Callable[[str], None] | None = None):
    """(recipe with precision and compile resolved, RunHardware). `recipe` is a resolved `TrainConfig`,
    `config` the model's `ModelConfig`, `dist` the process's `Dist` (every rank takes rank 0's decisions, so
    all train alike; only rank 0 measures, in seconds, while the others wait in a collective), `resume_dir`
    the run being resumed (None: a new run). Every user mistake (a bad --precision, a bad
    LMFORGE_PRECISION_AUTO) is raised on every rank before that collective, so none is left waiting."""
    main = dist is None or dist.is_main
    saved_state = _saved_state(resume_dir) if resume_dir is not None else {}
    steps_done = int(saved_state.get("step") or 0)
    device = torch.device(device)
    per_rank = max(1, recipe.batch_size // (dist.data_world if dist is not None else 1))
    mode = compile_mode(recipe.compile)

    choice = None
    recorded = saved_state.get("precision")
    if recipe.precision not in ("auto", *_PRECISIONS):
        raise UserError(f"--precision must be auto, fp32, bf16 or fp16, got {recipe.precision!r}")
    kept = recorded in _PRECISIONS and recipe.precision in ("auto", recorded)
    if recipe.precision == "auto" and not kept:
        pinned()  # on every rank: a bad pin is a UserError on each, not on rank 0 alone while the others wait
    if kept:  # a resume keeps its precision
        choice = PrecisionChoice(recorded, None, None, source="checkpoint")
    elif recipe.precision in _PRECISIONS:
        choice = PrecisionChoice(recipe.precision, None, None, source="asked")
    elif main:
        choice = resolve_auto(config, per_rank, device)

    def measured_step() -> float | None:
        if choice.step_s is None and choice.precision in ("fp32", "bf16"):
            return time_step(config, per_rank, choice.precision)
        return choice.step_s

    saved_mode = (saved_state.get("train_config") or {}).get("compile")
    from_checkpoint = resume_dir is not None and saved_mode is not None and _same_mode(saved_mode, mode)
    stages = getattr(dist, "pp", 1) if dist is not None else 1
    compiled, why = False, ""
    if main and stages > 1 and mode != "off":  # fit() runs a pipeline's schedule, never the compiled forward
        said = " from the checkpoint" if from_checkpoint else " asked" if mode == "on" else ""
        why = (f"compile off: --parallel pp={stages} runs the model through its pipeline schedule, which does not "
               f"use a compiled model (compile {mode}{said})")
    elif main and mode != "auto" and from_checkpoint:  # the user asked nothing: the recipe the run started with
        compiled, why = mode == "on", f"compile {mode} (from the checkpoint; --compile auto decides again)"
    elif main:
        compiled, why = decide_compile(mode, device, config=config, precision=choice.precision,
                                       steps=recipe.max_steps - steps_done,
                                       micro_batches=recipe.grad_accum, tokens_per_micro=per_rank * config.context_length,
                                       step_s=measured_step)
    if dist is not None and dist.active:  # rank 0's decisions, for every rank
        code = [float(_PRECISIONS.index(choice.precision)) if main else 0.0, float(compiled) if main else 0.0]
        p, c = dist.sum(code)
        if not main:
            choice = PrecisionChoice(_PRECISIONS[int(p)], None, None, source="rank 0")
            compiled, why = bool(c), f"compile {'on' if c else 'off'} (rank 0's decision)"
    hw = RunHardware(choice, compiled, why, bool(recipe.activation_checkpointing))
    if main and on_info is not None:
        for line in hw.lines():
            on_info(line)
    return replace(recipe, precision=choice.precision, compile="on" if compiled else "off"), hw
