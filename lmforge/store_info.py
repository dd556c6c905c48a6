"""What is in the local model store: `list_models` (one line per entry) and `show` (everything known about one
model), read-only.

Separate from `lmforge.store` (which re-exports both), because reading entries is a job of its own: it
never writes (not even the roll-forward of an interrupted checkpoint save that loading does), and it must
describe a damaged entry instead of refusing it, where the store's operations refuse. The shape a model
is shown with (context length, embedding length, layers) is the `ModelConfig` the loaders read from
config.json or the GGUF header, so every format is described in one vocabulary.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import ModelConfig
from lmforge.errors import UserError, one_line
from lmforge.io import read_json as read_json_file
from lmforge.modelfile import FILE as MODELFILE
from lmforge.paths import GGUF_IN_STORE, models_root, resolve, split_name


@dataclass
class StoreEntry:
    name: str  # normalised, "tiny:latest"
    path: Path
    architecture: str  # config.json "architectures"[0], or "?"
    parameters: int | None
    dtype: str | None  # config.json "torch_dtype" (transformers 4.x) or "dtype" (5.x); a GGUF's file type
    size_bytes: int  # all files, trainer state included
    modified: float  # mtime of the entry directory: when it was added to the store
    error: str | None = None  # set when the entry is damaged; the other fields are then best effort
    config: ModelConfig | None = None  # what the loaders read from config.json or the GGUF header
    quantization: str | None = None  # "Q4_K_M": lmforge.json's record of `lmforge quantize`, or a GGUF's file type
    embedding: bool = False  # an encoder (BERT family): embeds text for retrieval, cannot generate
    shape: dict[str, int] | None = None  # an encoder's context, width and layers (it has no ModelConfig)


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):  # does not follow symlinked directories
        for f in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def read_json(path: Path) -> Any:
    """Parsed JSON, or raises UserError naming the file (`loaders.model_dir.read_json`: bounded in size and
    depth, so a damaged file is an error, never a RecursionError or MemoryError)."""
    return read_json_file(path, label=path.name)


def _damage(e: Exception) -> str:
    """The one line `lmforge list` shows after DAMAGED: our own message, or the name of anything else."""
    return one_line(e) if isinstance(e, UserError) else f"{type(e).__name__}: {one_line(e, 200)}"


def _entry(name: str, path: Path) -> StoreEntry:
    try:
        modified = path.stat().st_mtime
    except OSError:
        modified = 0.0
    entry = StoreEntry(name, path, "?", None, None, _dir_size(path), modified)
    try:
        _describe(entry)
    except Exception as e:  # noqa: BLE001 - one damaged entry is its own DAMAGED line, never the listing's failure
        entry.error = _damage(e)
    entry.quantization = _quantization_type(path) or entry.quantization
    return entry


def _quantization_record(path: Path) -> dict[str, Any] | None:
    """The `quantization` object `lmforge quantize --name` writes into lmforge.json, or None (also when the
    file is unreadable: listing never fails on it)."""
    f = path / "lmforge.json"
    if not f.is_file():
        return None
    try:
        meta = read_json(f)
    except UserError:
        return None
    q = meta.get("quantization") if isinstance(meta, dict) else None
    return q if isinstance(q, dict) else None


def _quantization_type(path: Path) -> str | None:
    q = _quantization_record(path)
    t = q.get("type") if q else None
    return t if isinstance(t, str) else None


def _describe(entry: StoreEntry) -> None:
    """Fill in `entry` from its files, raising at the first sign of damage.

    Parses config.json itself (load_config() would run recover(), a write, from a mere listing), and checks
    it against the weights' header (`check_weights`: names and shapes, no tensor data), so a config that
    no longer matches its weights is listed as damaged rather than with a made-up parameter count."""
    from lmforge.loaders.hf_read import config_from_hf
    from lmforge.loaders.model_dir import WEIGHTS, WEIGHTS_INDEX, WeightFiles, check_weights

    path = entry.path
    cfg_file = path / "config.json"
    if not cfg_file.is_file() and (path / GGUF_IN_STORE).is_file():
        _describe_gguf(entry, path / GGUF_IN_STORE)
        return
    if not cfg_file.is_file():
        raise UserError("config.json is missing")
    cfg = read_json(cfg_file)
    if not isinstance(cfg, dict):
        raise UserError("config.json: not a JSON object")
    archs = cfg.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        entry.architecture = archs[0]
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    entry.dtype = dtype if isinstance(dtype, str) else None
    if cfg.get("model_type") == "bert":
        _describe_encoder(entry, cfg)
        return
    entry.config = config_from_hf(cfg, source="config.json")
    entry.parameters = entry.config.num_params()
    if (path / WEIGHTS).is_file() or (path / WEIGHTS_INDEX).is_file():
        check_weights(entry.config, WeightFiles(path).shapes(), source="weights")


def _describe_encoder(entry: StoreEntry, cfg: dict[str, Any]) -> None:
    """An embedding model (BERT encoder): its own config keys, and the parameters counted from the weights'
    header (`check_encoder_dir` is what an import ran; it reads headers only and never writes)."""
    from lmforge.loaders.model_dir import WeightFiles, check_encoder_dir

    entry.embedding = True
    entry.architecture = check_encoder_dir(entry.path)
    shapes = WeightFiles(entry.path).shapes()
    entry.parameters = sum(math.prod(s) for s in shapes.values())
    entry.shape = {"context_length": cfg.get("max_position_embeddings"), "embedding_length": cfg.get("hidden_size"),
                   "layers": cfg.get("num_hidden_layers")}


def _describe_gguf(entry: StoreEntry, file: Path) -> None:
    from lmforge.loaders.gguf import describe_gguf

    try:
        d = describe_gguf(file, check_tokenizer=False)
    except Exception as e:  # noqa: BLE001 - the file's name leads whatever is wrong with it
        raise UserError(f"{file.name}: {_damage(e)}") from None
    entry.architecture, entry.parameters, entry.dtype = d["architecture"], d["parameters"], d["file_type"]
    entry.quantization = d["file_type"] if d["file_type"] not in ("F32", "F16", "BF16") else None
    entry.config = d["config"]


def _gguf_show(file: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(config as a dict, chat template) of a GGUF file from one header read; (None, None) if unreadable."""
    from lmforge.loaders.gguf import describe_gguf

    try:
        d = describe_gguf(file, check_tokenizer=False)
    except Exception:  # noqa: BLE001 - show what can be shown
        return None, None
    return d["config"].to_dict(), d["chat_template"]


def _valid(part: str, *, tag: bool) -> bool:
    try:
        split_name(f"x:{part}" if tag else part)
    except UserError:
        return False
    return True


def list_models() -> list[StoreEntry]:
    """Every model in the store, sorted by name. Damaged entries are listed with `error` set."""
    root = models_root()
    if not root.is_dir():
        return []
    entries = []
    try:
        bases = list(root.iterdir())
    except OSError as e:
        raise UserError(f"cannot read the model store {root}: {e.strerror or e}") from None
    for base_dir in bases:
        if not _valid(base_dir.name, tag=False) or not base_dir.is_dir() or base_dir.is_symlink():
            continue  # temp dirs (".tmp-*") and strays
        try:
            tags = list(base_dir.iterdir())
        except OSError:  # unreadable: nothing in it can be named, let alone loaded
            continue
        for tag_dir in tags:
            if not _valid(tag_dir.name, tag=True) or not tag_dir.is_dir() or tag_dir.is_symlink():
                continue
            entries.append(_entry(f"{base_dir.name}:{tag_dir.name}", tag_dir))
    return sorted(entries, key=lambda e: e.name)


def _chat_template(path: Path) -> str | None:
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.is_file():
        try:
            t = read_json(tok_cfg).get("chat_template")
        except (UserError, AttributeError):
            t = None
        if isinstance(t, list):  # transformers' named templates: [{"name": ..., "template": ...}]
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict) and isinstance(d.get("name"), str)}
            t = named.get("default", next(iter(named.values()), None))
        if isinstance(t, str):
            return t
    return _first_text(path, ("chat_template.jinja",))


def _first_text(path: Path, names: tuple[str, ...]) -> str | None:
    for n in names:
        if (path / n).is_file():
            try:
                return (path / n).read_text(encoding="utf-8", errors="replace")
            except OSError:
                return None
    return None


def _shape(cfg: ModelConfig | None) -> dict[str, int | None]:
    """The sizes `lmforge show` prints, None where the config could not be read."""
    window = experts = None
    if cfg and cfg.sliding_window is not None:
        sliding = sum(cfg.slides(i) for i in range(cfg.n_layers))
        window = f"{cfg.sliding_window}" + ("" if sliding == cfg.n_layers else f" ({sliding} of {cfg.n_layers} layers)")
    if cfg and cfg.n_experts:
        experts = f"{cfg.n_experts}, {cfg.experts_per_token} per token" + (" + 1 shared" if cfg.shared_expert_d_ff else "")
    return {"context_length": cfg.context_length if cfg else None,
            "embedding_length": cfg.d_model if cfg else None,
            "layers": cfg.n_layers if cfg else None,
            "sliding_window": window, "experts": experts}


def show(ref: str) -> dict[str, Any]:
    """Everything known about a model (a store name, a model directory or a .gguf file); works on a
    damaged store entry (see the "error" key).

    "context_length", "embedding_length", "layers", "sliding_window" (and which layers slide) and "experts"
    come from the `ModelConfig` the loaders read; "config" is the file's own config.json (or, for GGUF, the
    `ModelConfig` as a dict)."""
    path = resolve(ref)
    root = models_root().resolve()
    real = path.resolve()
    if real.is_relative_to(root) and len(real.relative_to(root).parts) == 2:
        norm = ":".join(real.relative_to(root).parts)
    else:
        norm = str(path)
    if path.is_file():  # a .gguf file outside the store
        e = StoreEntry(norm, path, "?", None, None, path.stat().st_size, path.stat().st_mtime)
        try:
            _describe_gguf(e, path)
        except UserError as err:
            e.error = str(err)
        config, template = _gguf_show(path)
        return {"name": norm, "path": str(path), "architecture": e.architecture, "parameters": e.parameters,
                "dtype": e.dtype, "size_bytes": e.size_bytes, "modified": e.modified, "error": e.error,
                **_shape(e.config), "config": config, "chat_template": template, "system": None,
                "defaults": {}, "modelfile": {}, "lineage": {}, "lmforge": {}, "license": None, "readme": None,
                "quantization": {"type": e.quantization} if e.quantization else None}
    e = _entry(norm, path)
    info: dict[str, Any] = {
        "name": norm, "path": str(path), "architecture": e.architecture, "parameters": e.parameters,
        "dtype": e.dtype, "size_bytes": e.size_bytes, "modified": e.modified, "error": e.error, **_shape(e.config),
        "kind": "embedding" if e.embedding else "generate",
    }
    if e.shape:
        info.update(e.shape)
    try:
        info["config"] = read_json(path / "config.json") if (path / "config.json").is_file() else None
    except UserError:
        info["config"] = None
    info["chat_template"] = _chat_template(path)
    if (path / GGUF_IN_STORE).is_file() and info["config"] is None:
        info["config"], info["chat_template"] = _gguf_show(path / GGUF_IN_STORE)
    modelfile: dict[str, Any] = {}
    if (path / MODELFILE).is_file():
        try:
            m = read_json(path / MODELFILE)
            modelfile = m if isinstance(m, dict) else {}
        except UserError as err:
            info["error"] = info["error"] or str(err)
    if isinstance(modelfile.get("template"), str):
        info["chat_template"] = modelfile["template"]  # a Modelfile TEMPLATE replaces the tokenizer's
    info["system"] = modelfile.get("system")  # system prompt
    info["defaults"] = modelfile.get("parameters") or modelfile.get("defaults") or {}  # sampling defaults
    info["modelfile"] = modelfile
    meta: dict[str, Any] = {}
    if (path / "lmforge.json").is_file():
        try:
            m = read_json(path / "lmforge.json")
            meta = m if isinstance(m, dict) else {}
        except UserError as err:
            info["error"] = info["error"] or str(err)
    info["lineage"] = meta.get("lineage") or {}  # parent model, data, recipe, step
    # what `lmforge quantize` recorded (type, per-tensor type counts, source, quality report); for an imported
    # GGUF, its file type
    info["quantization"] = _quantization_record(path) or ({"type": e.quantization} if e.quantization else None)
    info["lmforge"] = meta  # all of lmforge.json
    info["license"] = modelfile.get("license") or _first_text(path, ("LICENSE", "LICENSE.txt", "LICENSE.md", "license.txt"))
    info["readme"] = _first_text(path, ("README.md", "README.txt", "README"))
    return info
