"""The local model store, like Ollama's: named model directories under `$LMFORGE_HOME/models`.

Names. A model name is `NAME[:TAG]`: NAME is 1-64 characters of `[a-z0-9._-]` starting with `[a-z0-9]`,
TAG is 1-32 characters of the same alphabet, also starting with `[a-z0-9]` (so `.` and `..` can never be
a path component). A missing tag means `latest`, so `tiny` and `tiny:latest` are the same model and
`validate_name` returns the normalised `tiny:latest`. Upper case is refused rather than folded, so that a
name means the same thing on case-sensitive and case-insensitive file systems; Windows device names
(`con`, `nul`, `com1`, ...) are refused for the same reason. Names are checked with a regular expression
*before* any file-system call, and `model_path` checks again that the resolved path stays inside the
store (defence in depth, e.g. against a symlink planted in the store).

Layout. `tiny:latest` lives in `models/tiny/latest/`, a plain model directory (config.json,
model.safetensors, tokenizer files, lmforge.json, optionally `modelfile.json` with a system prompt and
sampling defaults). The tag is a sub-directory rather than part of the folder name because `:` is not
allowed in Windows file names. Temporary directories of unfinished imports start with `.` and are never
listed.

Atomicity. `add` copies into a temp directory inside `models/`, fsyncs, then `os.replace`s it into place,
so a reader sees no model or the whole model. Overwriting first renames the old entry aside (a directory
cannot be `os.replace`d over a non-empty one), so for an instant the name is absent, never half-written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.checkpoint import MARKER, STAGING, is_model_dir, recover
from lmforge.errors import UserError
from lmforge.io import fsync_dir
from lmforge.paths import home

DEFAULT_TAG = "latest"
NAME_RULE = ("model names are NAME or NAME:TAG, NAME 1-64 and TAG 1-32 characters of a-z 0-9 . _ -, "
             "each starting with a letter or digit")
NAME_RE = re.compile(r"(?P<name>[a-z0-9][a-z0-9._-]{0,63})(?::(?P<tag>[a-z0-9][a-z0-9._-]{0,31}))?")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
MODELFILE = "modelfile.json"


# ---------------------------------------------------------------------------------------------------
# Names and paths
# ---------------------------------------------------------------------------------------------------
def _split(name: str) -> tuple[str, str]:
    """(name, tag) of a valid model name; UserError with the rule otherwise. Touches no file."""
    m = NAME_RE.fullmatch(name) if isinstance(name, str) else None  # fullmatch: "$" would allow a "\n"
    if m is None:
        raise UserError(f"invalid model name {name!r}: {NAME_RULE}")
    base, tag = m["name"], m["tag"] or DEFAULT_TAG
    if ".." in base or ".." in tag:
        raise UserError(f"invalid model name {name!r}: '..' is not allowed")
    if base.split(".")[0] in _WINDOWS_RESERVED or tag.split(".")[0] in _WINDOWS_RESERVED:
        raise UserError(f"invalid model name {name!r}: {base.split('.')[0]!r} is a reserved device name on Windows")
    return base, tag


def validate_name(name: str) -> str:
    """The normalised name (`tiny` -> `tiny:latest`); UserError stating the rule if `name` is invalid."""
    base, tag = _split(name)
    return f"{base}:{tag}"


def models_root() -> Path:
    return home() / "models"


def model_path(name: str) -> Path:
    """Where model `name` lives (whether or not it exists): an absolute path inside `models_root()`."""
    base, tag = _split(name)
    root = models_root().resolve()
    path = (root / base / tag).resolve()
    if not path.is_relative_to(root) or path == root:  # unreachable for a valid name, barring planted symlinks
        raise UserError(f"model name {name!r} resolves to {path}, outside the model store {root}")
    return path


# ---------------------------------------------------------------------------------------------------
# Listing and showing
# ---------------------------------------------------------------------------------------------------
@dataclass
class StoreEntry:
    name: str  # normalised, "tiny:latest"
    path: Path
    architecture: str  # config.json "architectures"[0], or "?"
    parameters: int | None
    dtype: str | None  # config.json "torch_dtype" (transformers 4.x) or "dtype" (5.x)
    size_bytes: int  # all files, trainer state included
    modified: float  # mtime of the entry directory: when it was added to the store
    error: str | None = None  # set when the entry is damaged; the other fields are then best effort


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):  # does not follow symlinked directories
        for f in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def _read_json(path: Path) -> Any:
    """Parsed JSON, or raises UserError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path.name}: not readable JSON ({e})") from None


def _entry(name: str, path: Path) -> StoreEntry:
    from lmforge.loaders.hf import config_from_hf

    try:
        modified = path.stat().st_mtime
    except OSError:
        modified = 0.0
    entry = StoreEntry(name, path, "?", None, None, _dir_size(path), modified)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        entry.error = "config.json is missing"
        return entry
    try:
        cfg = _read_json(cfg_file)
        if not isinstance(cfg, dict):
            raise UserError("config.json: not a JSON object")
    except UserError as e:
        entry.error = str(e)
        return entry
    archs = cfg.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        entry.architecture = archs[0]
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    entry.dtype = dtype if isinstance(dtype, str) else None
    try:  # parse the dict ourselves: load_config() would run recover(), a write, from a mere listing
        entry.parameters = config_from_hf(cfg, source=str(cfg_file)).num_params()
    except Exception as e:  # noqa: BLE001 - a damaged entry is reported, never raised, by list
        entry.error = f"config.json: {e}"
    return entry


def _valid(part: str, *, tag: bool) -> bool:
    try:
        _split(f"x:{part}" if tag else part)
    except UserError:
        return False
    return True


def list_models() -> list[StoreEntry]:
    """Every model in the store, sorted by name. Damaged entries are listed with `error` set."""
    root = models_root()
    if not root.is_dir():
        return []
    entries = []
    for base_dir in root.iterdir():
        if not _valid(base_dir.name, tag=False) or not base_dir.is_dir() or base_dir.is_symlink():
            continue  # temp dirs (".tmp-*") and strays
        for tag_dir in base_dir.iterdir():
            if not _valid(tag_dir.name, tag=True) or not tag_dir.is_dir() or tag_dir.is_symlink():
                continue
            entries.append(_entry(f"{base_dir.name}:{tag_dir.name}", tag_dir))
    return sorted(entries, key=lambda e: e.name)


def _existing(name: str) -> tuple[str, Path]:
    norm = validate_name(name)
    path = model_path(norm)
    if not path.is_dir():
        raise UserError(f"no model named {norm} (see lmforge list)")
    return norm, path


def _chat_template(path: Path) -> str | None:
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.is_file():
        try:
            t = _read_json(tok_cfg).get("chat_template")
        except (UserError, AttributeError):
            t = None
        if isinstance(t, list):  # transformers' named templates: [{"name": ..., "template": ...}]
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
            t = named.get("default", next(iter(named.values()), None))
        if isinstance(t, str):
            return t
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8", errors="replace")
    return None


def _first_text(path: Path, names: tuple[str, ...]) -> str | None:
    for n in names:
        if (path / n).is_file():
            return (path / n).read_text(encoding="utf-8", errors="replace")
    return None


def show(name: str) -> dict[str, Any]:
    """Everything known about one model; works on a damaged entry (see the "error" key)."""
    norm, path = _existing(name)
    e = _entry(norm, path)
    info: dict[str, Any] = {
        "name": norm, "path": str(path), "architecture": e.architecture, "parameters": e.parameters,
        "dtype": e.dtype, "size_bytes": e.size_bytes, "modified": e.modified, "error": e.error,
    }
    try:
        info["config"] = _read_json(path / "config.json") if (path / "config.json").is_file() else None
    except UserError:
        info["config"] = None
    info["chat_template"] = _chat_template(path)
    modelfile: dict[str, Any] = {}
    if (path / MODELFILE).is_file():
        try:
            m = _read_json(path / MODELFILE)
            modelfile = m if isinstance(m, dict) else {}
        except UserError as err:
            info["error"] = info["error"] or str(err)
    info["system"] = modelfile.get("system")  # system prompt
    info["defaults"] = modelfile.get("parameters") or modelfile.get("defaults") or {}  # sampling defaults
    info["modelfile"] = modelfile
    meta: dict[str, Any] = {}
    if (path / "lmforge.json").is_file():
        try:
            m = _read_json(path / "lmforge.json")
            meta = m if isinstance(m, dict) else {}
        except UserError as err:
            info["error"] = info["error"] or str(err)
    info["lineage"] = meta.get("lineage") or {}  # parent model, data, recipe, step
    info["lmforge"] = meta  # all of lmforge.json
    info["license"] = _first_text(path, ("LICENSE", "LICENSE.txt", "LICENSE.md", "license.txt"))
    info["readme"] = _first_text(path, ("README.md", "README.txt", "README"))
    return info


# ---------------------------------------------------------------------------------------------------
# Changing the store
# ---------------------------------------------------------------------------------------------------
def _temp_dir(kind: str) -> Path:
    root = models_root()
    root.mkdir(parents=True, exist_ok=True)
    return root / f".{kind}-{uuid.uuid4().hex}"


def _fsync_tree(path: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(path):
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(dirpath)


def add(name: str, source_dir: str | os.PathLike, *, move: bool = False, overwrite: bool = False) -> Path:
    """Copy (or move) model directory `source_dir` into the store as `name`; returns its new path."""
    norm = validate_name(name)
    dst = model_path(norm)
    src = Path(source_dir).expanduser()
    if not is_model_dir(src):
        raise UserError(f"{src} is not a model directory (it needs a config.json)")
    src = src.resolve()
    root = models_root().resolve()
    if src == dst:
        raise UserError(f"{src} is already model {norm} in the store")
    if root.is_relative_to(src) or dst.is_relative_to(src):
        raise UserError(f"{src} contains the model store; choose the model directory itself")
    if dst.exists() and not overwrite:
        raise UserError(f"model {norm} already exists (remove it first with lmforge rm, or overwrite it)")
    recover(src)  # finish (or discard) an interrupted checkpoint save, as every load does
    tmp = _temp_dir("tmp")
    try:
        moved = False
        if move:
            try:
                os.rename(src, tmp)  # same file system: instant, and nothing to copy
                moved = True
            except OSError:
                pass
        if not moved:
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(STAGING, MARKER))
        _fsync_tree(tmp)
        dst.parent.mkdir(parents=True, exist_ok=True)
        trash = None
        if dst.exists():  # overwrite: a directory cannot be os.replace()d over a non-empty one
            trash = _temp_dir("trash")
            os.rename(dst, trash)
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        if moved and not src.exists() and tmp.exists():  # the rename worked, a later step failed: undo it
            os.rename(tmp, src)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if move and not moved:
        shutil.rmtree(src)
    return dst


def remove(name: str) -> None:
    """Delete model `name`, damaged or not; UserError if there is no such model."""
    norm, path = _existing(name)
    trash = _temp_dir("trash")
    os.rename(path, trash)  # the name disappears at once; deleting the files may take a while
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)
    try:
        path.parent.rmdir()  # the NAME directory, once its last tag is gone
    except OSError:
        pass


def copy(src_name: str, dst_name: str) -> Path:
    """Copy model `src_name` to the new name `dst_name` (refused if it exists); returns the new path."""
    _norm, src = _existing(src_name)
    validate_name(dst_name)
    return add(dst_name, src)


# ---------------------------------------------------------------------------------------------------
# What every command that takes MODEL calls
# ---------------------------------------------------------------------------------------------------
def _looks_like_path(ref: str) -> bool:
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(s in ref for s in seps) or ref.startswith((".", "~"))


def _as_local(path: Path) -> Path | None:
    if is_model_dir(path):
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    return None


def resolve(ref: str) -> Path:
    """MODEL -> a path: an existing model directory, an existing .gguf file, else a store name.

    A `ref` with a path separator, or starting with "." or "~", is only ever a path. Otherwise a model
    directory or .gguf file of that name in the current directory wins over a store name of the same
    spelling.
    """
    if _looks_like_path(ref):
        path = Path(ref).expanduser()
        found = _as_local(path)
        if found is None:
            what = "no such file or directory" if not path.exists() else "not a model directory or a .gguf file"
            raise UserError(f"{ref}: {what}")
        return found
    if ref and "\x00" not in ref:
        found = _as_local(Path(ref))
        if found is not None:
            return found
    try:
        norm = validate_name(ref)
    except UserError:
        raise UserError(f"no model named {ref} (see lmforge list)") from None
    path = model_path(norm)
    if not path.is_dir():
        raise UserError(f"no model named {ref} (see lmforge list)")
    return path
