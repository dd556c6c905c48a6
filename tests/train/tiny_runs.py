"""One tiny pretraining run through `fit()`, as every multi-process test runs it and the single-process run it is
held to: the same model, data and recipe, so only the way the processes share the work differs.

A module, not a conftest.py: test files import it by name (`from tests.train.tiny_runs import fit_tiny`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.data.shards import prepare_data
from lmforge.loaders.model_dir import load_model
from lmforge.model.gpt import GPT
from lmforge.presets import get_preset
from lmforge.train import objectives
from lmforge.train.checkpointer import Checkpointer
from lmforge.train.distributed import Dist, wrap
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.memory import apply_activation_checkpointing
from lmforge.train.pretrain import WindowBatches

# The global batch: 4 rows x 2 micro-batches of 32 tokens, whatever the number of processes.
RECIPE = dict(max_steps=20, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=2, lr_decay_steps=24, eval_interval=20,
              log_interval=1, save_interval=0, seed=7)


def fit_tiny(out: Path, tokenizer, data_args, dist: Dist, *, resume_to: int | None = None, eval_tokens: int = 256,
             recompute: bool = False, shape: dict | None = None, record: tuple[str, ...] = ("loss",),
             **recipe) -> list[float]:
    """Train the `tiny` preset (context 32, no dropout; `shape` changes it) from seed 7 into `out`, or with
    `resume_to` continue the run in `out` to that step; `recipe` overrides RECIPE. Returns the history's values
    of each key in `record`, key after key (every rank reports the same ones). `recompute`: activation
    checkpointing, applied before wrapping as `lmforge pretrain` does."""
    token_data = prepare_data(*data_args, show_progress=False)
    tc = TrainConfig(**{**RECIPE, **recipe, **({"max_steps": resume_to} if resume_to else {})})
    torch.manual_seed(tc.seed)
    if resume_to:
        model = load_model(out).train()
    else:
        model = GPT(get_preset("tiny", vocab_size=tokenizer.vocab_size, context_length=32, dropout=0.0, **(shape or {})))
    batches = WindowBatches(token_data, batch_size=tc.batch_size, block_size=32, grad_accum=tc.grad_accum, seed=tc.seed,
                            eval_tokens=eval_tokens, device=torch.device("cpu"), rank=dist.data_rank,
                            world_size=dist.data_world)
    if recompute:
        apply_activation_checkpointing(model)
    result = fit(wrap(model, dist), objectives.pretrain, batches, tc, Checkpointer(out, tokenizer=tokenizer),
                 progress=False, dist=dist, resume=bool(resume_to))
    return [h[k] for k in record for h in result.history if k in h]

