"""Model directories and trainer state on disk: safetensors + JSON, written as one atomic transaction.

A model directory is a Hugging Face directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) plus `lmforge.json` for what only we record (lineage,
training recipe). Trainer state (optimizer moments, step, RNG) lives in `trainer_state/` beside it.
Nothing here pickles: tensors go through safetensors, everything else through JSON.

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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.io import atomic_write, atomic_write_json, fsync_dir
from lmforge.loaders.hf import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf
from lmforge.model.gpt import GPT

STAGING = ".staging"
MARKER = ".commit.json"
TRAINER_STATE = "trainer_state"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


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


# ---------------------------------------------------------------------------------------------------
# Model directories
# ---------------------------------------------------------------------------------------------------
def unwrap(model: torch.nn.Module) -> GPT:
    """The bare model under torch.compile / DDP / FSDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}))


def write_model_files(directory: Path, model: torch.nn.Module, *, tokenizer=None, lineage: dict | None = None,
                      generation: dict | None = None) -> None:
    """Write the HF-layout files of `model` into `directory` (use inside a `transaction`)."""
    model = unwrap(model)
    cfg = model.config
    eos_ids = list(tokenizer.eos_ids) if tokenizer is not None else None
    bos = tokenizer.bos_id if tokenizer is not None else None
    eos_main = tokenizer.eos_id if tokenizer is not None else None
    atomic_write_json(directory / "config.json", config_to_hf(cfg, bos_token_id=bos, eos_token_id=eos_main))
    gen = {"bos_token_id": bos, "eos_token_id": eos_ids, "pad_token_id": getattr(tokenizer, "pad_id", None),
           **(generation or {})}
    atomic_write_json(directory / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    sd = state_dict_to_hf(cfg, model.state_dict())
    _save_tensors(directory / WEIGHTS, sd)
    atomic_write_json(directory / "lmforge.json", {"format_version": 1, "model_config": cfg.to_dict(),
                                                   "lineage": lineage or {}, "saved_at": time.time()})
    if tokenizer is not None:
        tokenizer.save(directory)


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def _require_model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise UserError(f"{p} is not a model directory (it is a file)")
    recover(p)
    if not (p / "config.json").is_file():
        raise UserError(f"{p} is not a model directory: it has no config.json")
    return p


def load_config(path: str | os.PathLike) -> ModelConfig:
    p = _require_model_dir(path)
    try:
        d = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p / 'config.json'}: not valid JSON ({e})") from None
    return config_from_hf(d, source=str(p / "config.json"))


def _read_weights(p: Path) -> dict[str, torch.Tensor]:
    files = [p / WEIGHTS]
    if (p / WEIGHTS_INDEX).is_file() and not (p / WEIGHTS).is_file():
        index = json.loads((p / WEIGHTS_INDEX).read_text())
        files = [p / name for name in sorted(set(index["weight_map"].values()))]
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise UserError(f"{p} is not a model directory: {f.name} is missing")
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{f}: not a readable safetensors file ({e})") from None
    return tensors


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Build the model described by `path/config.json` and load its weights (strictly: no silent zeros)."""
    p = _require_model_dir(path)
    cfg = load_config(p)
    with torch.device("meta"):
        model = GPT(cfg)
    sd = state_dict_from_hf(cfg, _read_weights(p), source=str(p))
    expected = set(model.state_dict())
    missing, unexpected = expected - set(sd), set(sd) - expected
    if missing or unexpected:
        raise UserError(f"{p}: weights do not match config.json (missing: {sorted(missing)[:5]}, unexpected: {sorted(unexpected)[:5]})")
    model = model.to_empty(device=device)
    model.load_state_dict(sd, strict=True, assign=False)
    # Buffers (RoPE / sinusoidal tables) are derived from the config, not stored: rebuild them for real.
    model.reset_position_tables()  # derived from the config, not stored
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def read_lmforge_meta(path: str | os.PathLike) -> dict[str, Any]:
    f = Path(path) / "lmforge.json"
    return json.loads(f.read_text()) if f.is_file() else {}


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
    _save_tensors(d / "optimizer.safetensors", tensors)
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


class Checkpointer:
    """Saves model + trainer state of a run into one directory, each save one transaction.

    The tokenizer and lineage (data, parent model, recipe) travel with every save, so any checkpoint of a
    run is a complete model directory on its own.
    """

    def __init__(self, directory: str | os.PathLike, *, tokenizer=None, lineage: dict | None = None,
                 generation: dict | None = None) -> None:
        self.directory = Path(directory)
        self.tokenizer = tokenizer
        self.lineage = dict(lineage or {})
        self.generation = generation

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, param_names: list[str],
             state: dict[str, Any]) -> None:
        lineage = {**self.lineage, "step": state.get("step"), "tokens_seen": state.get("tokens_seen")}
        with transaction(self.directory) as staging:
            write_model_files(staging, model, tokenizer=self.tokenizer, lineage=lineage, generation=self.generation)
            if optimizer is not None:
                write_trainer_state(staging, optimizer, param_names, state)
