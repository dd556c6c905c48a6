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
from typing import Any

import torch

from lmforge.checkpoint import transaction, write_trainer_state
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
             state: dict[str, Any]) -> None:
        lineage = {**self.lineage, "step": state.get("step"), "tokens_seen": state.get("tokens_seen")}
        with transaction(self.directory) as staging:
            if has_lora(model):  # a LoRA run saves its adapter (PEFT layout), not a copy of the frozen base
                save_adapter(model, staging, base_model_name_or_path=self.base_model)
                if self.tokenizer is not None:
                    self.tokenizer.save(staging)
                atomic_write_json(staging / "lmforge.json", {"format_version": 1, "lineage": lineage,
                                                             "saved_at": time.time()})
            else:
                write_model_files(staging, model, tokenizer=self.tokenizer, lineage=lineage, generation=self.generation)
            if optimizer is not None:
                write_trainer_state(staging, optimizer, param_names, state)
