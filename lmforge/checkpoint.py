"""Atomic directory transactions and trainer state on disk: safetensors + JSON, nothing pickled.

What a checkpoint *is* (a Hugging Face model directory: config.json, model.safetensors, tokenizer files,
lmforge.json) is the loaders' business (`lmforge.loaders.model_dir`), and when a training run saves one is
the trainer's (`lmforge.train.checkpointer`). This module is the layer under both: how several files
replace their namesakes at once, and how optimizer moments, step and RNG states are stored beside the
weights in `trainer_state/`. It imports neither the loaders nor the model.

Why a transaction and not just atomic files: a checkpoint is several files that must agree (weights of
step 300 with optimizer moments of step 300). Each save writes the complete new checkpoint into
`.staging/`, then writes the marker `.commit.json` (atomically), then moves the files into place, then
removes the marker. A crash before the marker leaves the previous checkpoint untouched (the staging
directory is discarded on the next open); a crash after it is rolled forward by `recover()`, which every
load calls first. Either way a reader sees one whole checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import UserError
from lmforge.io import atomic_write, atomic_write_json, fsync_dir

__all__ = [
    "MARKER",
    "STAGING",
    "TRAINER_STATE",
    "read_trainer_state",
    "recover",
    "restore_optimizer",
    "restore_rng",
    "save_tensors",
    "transaction",
    "write_trainer_state",
]

STAGING = ".staging"
MARKER = ".commit.json"
TRAINER_STATE = "trainer_state"


# ---------------------------------------------------------------------------------------------------
# The transaction
# ---------------------------------------------------------------------------------------------------
def _apply_commit(directory: Path) -> None:
    staging = directory / STAGING
    files = json.loads((directory / MARKER).read_text())["files"]
    for rel in files:
        src, dst = staging / rel, directory / rel
        if src.exists():  # absent: moved before an earlier crash
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            fsync_dir(dst.parent)
    (directory / MARKER).unlink()
    fsync_dir(directory)
    shutil.rmtree(staging, ignore_errors=True)


def recover(directory: str | os.PathLike) -> None:
    """Finish a committed-but-interrupted save, or discard an uncommitted one."""
    directory = Path(directory)
    if (directory / MARKER).exists():
        _apply_commit(directory)
    elif (directory / STAGING).exists():
        shutil.rmtree(directory / STAGING, ignore_errors=True)


@contextmanager
def transaction(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging directory; on a clean exit its files replace their namesakes in `directory`."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        recover(directory)
        staging = directory / STAGING
        staging.mkdir()
    except OSError as e:
        raise UserError(f"cannot write to {directory}: {e.strerror or e}") from None
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    for rel in files:  # files written by libraries may not be synced yet
        with open(staging / rel, "rb") as f:
            os.fsync(f.fileno())
    atomic_write_json(directory / MARKER, {"files": files, "time": time.time()})
    _apply_commit(directory)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (detached, contiguous, on the CPU) to one safetensors file, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}))


# ---------------------------------------------------------------------------------------------------
# Trainer state
# ---------------------------------------------------------------------------------------------------
def write_trainer_state(directory: Path, optimizer: torch.optim.Optimizer, param_names: list[str], state: dict[str, Any]) -> None:
    """Optimizer moments and RNG states as safetensors; step, data position and recipe as JSON."""
    d = directory / TRAINER_STATE
    d.mkdir(parents=True, exist_ok=True)
    osd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for idx, st in osd["state"].items():
        for key, val in st.items():
            tensors[f"optim.{idx}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    save_tensors(d / "optimizer.safetensors", tensors)
    atomic_write_json(d / "state.json", {**state, "param_names": param_names, "param_groups": osd["param_groups"]})


def read_trainer_state(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    d = Path(directory) / TRAINER_STATE
    if not (d / "state.json").is_file() or not (d / "optimizer.safetensors").is_file():
        raise UserError(f"{directory} has no trainer state to resume from (no {TRAINER_STATE}/state.json)")
    return json.loads((d / "state.json").read_text()), load_file(d / "optimizer.safetensors")


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            per_param.setdefault(int(idx), {})[key] = t
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
