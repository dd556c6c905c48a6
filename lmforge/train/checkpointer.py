"""The training run's saver: each save of model + trainer state is one transaction in the run directory.

Separate from `lmforge.checkpoint` (transactions and trainer state, which know nothing of models) and
from `lmforge.loaders.model_dir` (the model directory format), because deciding *what* a run saves is the
trainer's: the full model directory for a full fine-tune or pretraining, only the adapter (PEFT layout)
for a LoRA run, and the tokenizer and lineage with every save, so any checkpoint of a run is complete on
its own.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from lmforge.checkpoint import TRAINER_STATE, transaction, write_trainer_state
from lmforge.io import atomic_write_json
from lmforge.loaders.model_dir import write_model_files
from lmforge.loaders.peft import save_adapter
from lmforge.model.lora import has_lora

__all__ = ["Checkpointer"]


class Checkpointer:
    """Saves model + trainer state of a run into one directory, each save one transaction.

    The tokenizer and lineage (data, parent model, recipe) travel with every save, so any checkpoint of a
    run is a complete model directory on its own.
    """

    def __init__(self, directory: str | os.PathLike, *, tokenizer=None, lineage: dict | None = None,
                 generation: dict | None = None, base_model: str | None = None) -> None:
        self.directory = Path(directory)
        self.tokenizer = tokenizer
        self.lineage = dict(lineage or {})
        self.generation = generation
        self.base_model = base_model  # for LoRA runs: what adapter_config.json names as the base

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, param_names: list[str],
             state: dict[str, Any], *, trainer_state: Callable[[Path], None] | None = None) -> None:
        """One transaction: the model (or adapter) files, then the trainer state: the whole optimizer state
        of `optimizer`, or, given `trainer_state`, whatever it writes into the staging directory (the
        sharded save, which the other ranks join: `lmforge.train.sharded_state`)."""
        lineage = {**self.lineage, "step": state.get("step"), "tokens_seen": state.get("tokens_seen")}
        writes_state = trainer_state is not None or optimizer is not None
        # the trainer state is written whole each time: nothing of an earlier save's layout may stay in it
        with transaction(self.directory, replace=(TRAINER_STATE,) if writes_state else ()) as staging:
            if has_lora(model):  # a LoRA run saves its adapter (PEFT layout), not a copy of the frozen base
                save_adapter(model, staging, base_model_name_or_path=self.base_model)
                if self.tokenizer is not None:
                    self.tokenizer.save(staging)
                atomic_write_json(staging / "lmforge.json", {"format_version": 1, "lineage": lineage,
                                                             "saved_at": time.time()})
            else:
                write_model_files(staging, model, tokenizer=self.tokenizer, lineage=lineage, generation=self.generation)
            if trainer_state is not None:
                trainer_state(staging)
            elif optimizer is not None:
                write_trainer_state(staging, optimizer, param_names, state)
