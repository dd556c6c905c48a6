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
from collections.abc import Mapping
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
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    atomic_write_json(directory / "config.json", config_to_hf(cfg, bos_token_id=bos, eos_token_id=eos_main, dtype=dtype))
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


PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def _shard_names(index_file: Path) -> list[str]:
    """The shard files an index names: plain file names in the same directory, nothing else.

    The index is input like any other: a weight_map value of "../../x" must not make us open a file
    outside the model directory.
    """
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{index_file}: not a valid weight index ({e})") from None
    names = sorted(set(weight_map.values()))
    for n in names:
        if not isinstance(n, str) or not n or n in (".", "..") or "/" in n or "\\" in n or "\x00" in n:
            raise UserError(f"{index_file}: shard name {n!r} is not a plain file name in the model directory")
    return names


class WeightFiles(Mapping):
    """The tensors of a model directory by checkpoint name, read one at a time from memory-mapped files.

    Why lazy: building our fused q|k|v and gate|up weights needs the source tensors only until they are
    concatenated. Reading each tensor when it is asked for (and letting it go right after) keeps the peak
    memory of a load at about one copy of the weights, instead of the file's copy plus ours.

    `dtype` casts each tensor as it is read, so a bf16 checkpoint loaded in fp32 never holds both.
    Pickled weights (`pytorch_model.bin`) are refused unless `allow_pickle`, and then go only through
    `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
    """

    def __init__(self, directory: Path, *, dtype: torch.dtype | None = None, allow_pickle: bool = False) -> None:
        from safetensors import safe_open

        self.directory, self.dtype = directory, dtype
        self._where: dict[str, Any] = {}  # tensor name -> open safetensors handle, or the tensor (pickles)
        self._handles: list[Any] = []
        files = self._safetensors_files()
        if files is None:
            self._load_pickles(allow_pickle)
            return
        for f in files:
            if not f.is_file():
                raise UserError(f"{directory} is not a complete model directory: {f.name} is missing")
            try:
                handle = safe_open(str(f), framework="pt")
                names = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(f"{f}: not a readable safetensors file ({_one_line(e)})") from None
            self._handles.append(handle)
            for n in names:
                if n in self._where:
                    raise UserError(f"{f}: tensor {n!r} also appears in another shard")
                self._where[n] = (handle, f)

    def _safetensors_files(self) -> list[Path] | None:
        d = self.directory
        if (d / WEIGHTS).is_file():
            return [d / WEIGHTS]
        if (d / WEIGHTS_INDEX).is_file():
            return [d / n for n in _shard_names(d / WEIGHTS_INDEX)]
        return None

    def _load_pickles(self, allow_pickle: bool) -> None:
        d = self.directory
        if (d / PICKLE_WEIGHTS).is_file():
            files = [d / PICKLE_WEIGHTS]
        elif (d / PICKLE_INDEX).is_file():
            files = [d / n for n in _shard_names(d / PICKLE_INDEX)]
        else:
            raise UserError(f"{d} is not a model directory: it has no {WEIGHTS} (or {WEIGHTS_INDEX})")
        if not allow_pickle:
            raise UserError(f"{d} holds only pickled weights ({files[0].name}); loading a pickle can run code. "
                            f"Pass --allow-pickle to load it with torch.load(weights_only=True), "
                            f"or use a safetensors copy of the model")
        for f in files:
            try:
                obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError...: never fall back
                raise UserError(f"{f}: refused or unreadable as a weights-only pickle ({_one_line(e)})") from None
            if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
                raise UserError(f"{f}: expected a dict of named tensors")
            for n, t in obj.items():
                self._where[n] = (t, f)

    def __getitem__(self, name: str) -> torch.Tensor:
        source, f = self._where[name]
        if torch.is_tensor(source):
            t = source
        else:
            try:
                t = source.get_tensor(name)
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(f"{f}: tensor {name!r} is unreadable ({_one_line(e)})") from None
        return t if self.dtype is None or not t.is_floating_point() else t.to(self.dtype)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the file headers alone (nothing is read)."""
        out = {}
        for name, (source, f) in self._where.items():
            try:
                out[name] = tuple(source.shape) if torch.is_tensor(source) else tuple(source.get_slice(name).get_shape())
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(f"{f}: tensor {name!r} is unreadable ({_one_line(e)})") from None
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def expected_weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape for `cfg`, computed on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = GPT(cfg)
    return {k: tuple(v.shape) for k, v in state_dict_to_hf(cfg, model.state_dict()).items()}


def has_weights(path: str | os.PathLike) -> bool:
    p = Path(path)
    return any((p / n).is_file() for n in (WEIGHTS, WEIGHTS_INDEX, PICKLE_WEIGHTS, PICKLE_INDEX))


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               allow_pickle: bool = False) -> GPT:
    """Build the model described by `path/config.json` and load its weights (strictly: no silent zeros).

    The weights are read tensor by tensor from memory-mapped files and *assigned* to a model built on the
    meta device, so loading holds about one copy of the weights (plus one layer's worth in flight).
    `dtype=None` loads floating-point weights as float32, whatever the file stores.
    """
    p = _require_model_dir(path)
    cfg = load_config(p)
    weights = WeightFiles(p, dtype=dtype or torch.float32, allow_pickle=allow_pickle)
    return build_model(cfg, state_dict_from_hf(cfg, weights, source=str(p)), source=str(p), device=device)


def build_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], *, source: str, device: str | torch.device = "cpu") -> GPT:
    """A GPT for `cfg` whose parameters *are* the tensors of `sd` (our names): no second copy is made.

    Every parameter must be present with the shape the config implies; a mismatch names the tensor.
    """
    with torch.device("meta"):
        model = GPT(cfg)
    want = model.state_dict()
    missing, unexpected = set(want) - set(sd), set(sd) - set(want)
    if missing or unexpected:
        raise UserError(f"{source}: weights do not match the config (missing: {sorted(missing)[:5]}, "
                        f"unexpected: {sorted(unexpected)[:5]})")
    for name, t in sd.items():
        if tuple(t.shape) != tuple(want[name].shape):
            raise UserError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the config implies {tuple(want[name].shape)}")
    model.load_state_dict(sd, strict=True, assign=True)
    for name, table in model.position_tables().items():  # derived from the config, never stored
        setattr(model, name, table)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.to(device).eval()


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
                 generation: dict | None = None, base_model: str | None = None) -> None:
        self.directory = Path(directory)
        self.tokenizer = tokenizer
        self.lineage = dict(lineage or {})
        self.generation = generation
        self.base_model = base_model  # for LoRA runs: what adapter_config.json names as the base

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, param_names: list[str],
             state: dict[str, Any]) -> None:
        lineage = {**self.lineage, "step": state.get("step"), "tokens_seen": state.get("tokens_seen")}
        from lmforge.model.lora import has_lora, save_adapter

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
