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
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.checkpoint import MARKER, STAGING, recover
from lmforge.loaders.model_dir import is_model_dir
from lmforge.modelfile import FILE as MODELFILE
from lmforge.errors import UserError
from lmforge.io import fsync_dir
from lmforge.paths import home

DEFAULT_TAG = "latest"
NAME_RULE = ("model names are NAME or NAME:TAG, NAME 1-64 and TAG 1-32 characters of a-z 0-9 . _ -, "
             "each starting with a letter or digit")
NAME_RE = re.compile(r"(?P<name>[a-z0-9][a-z0-9._-]{0,63})(?::(?P<tag>[a-z0-9][a-z0-9._-]{0,31}))?")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
GGUF_IN_STORE = "model.gguf"  # an imported GGUF file is kept as it is, quantized, under this name


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
    dtype: str | None  # config.json "torch_dtype" (transformers 4.x) or "dtype" (5.x); a GGUF's file type
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
    if not cfg_file.is_file() and (path / GGUF_IN_STORE).is_file():
        return _gguf_entry(entry, path / GGUF_IN_STORE)
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


def _gguf_entry(entry: StoreEntry, file: Path) -> StoreEntry:
    from lmforge.loaders.gguf import describe_gguf

    try:
        d = describe_gguf(file, check_tokenizer=False)
    except Exception as e:  # noqa: BLE001 - a damaged entry is reported, never raised, by list
        entry.error = f"{file.name}: {e}"
        return entry
    entry.architecture, entry.parameters, entry.dtype = d["architecture"], d["parameters"], d["file_type"]
    return entry


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


def show(ref: str) -> dict[str, Any]:
    """Everything known about a model (a store name, a model directory or a .gguf file); works on a
    damaged store entry (see the "error" key)."""
    path = resolve(ref)
    root = models_root().resolve()
    real = path.resolve()
    if real.is_relative_to(root) and len(real.relative_to(root).parts) == 2:
        norm = ":".join(real.relative_to(root).parts)
    else:
        norm = str(path)
    if path.is_file():  # a .gguf file outside the store
        e = _gguf_entry(StoreEntry(norm, path, "?", None, None, path.stat().st_size, path.stat().st_mtime), path)
        config, template = _gguf_show(path)
        return {"name": norm, "path": str(path), "architecture": e.architecture, "parameters": e.parameters,
                "dtype": e.dtype, "size_bytes": e.size_bytes, "modified": e.modified, "error": e.error,
                "config": config, "chat_template": template, "system": None,
                "defaults": {}, "modelfile": {}, "lineage": {}, "lmforge": {}, "license": None, "readme": None}
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
    if (path / GGUF_IN_STORE).is_file() and info["config"] is None:
        info["config"], info["chat_template"] = _gguf_show(path / GGUF_IN_STORE)
    modelfile: dict[str, Any] = {}
    if (path / MODELFILE).is_file():
        try:
            m = _read_json(path / MODELFILE)
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
            m = _read_json(path / "lmforge.json")
            meta = m if isinstance(m, dict) else {}
        except UserError as err:
            info["error"] = info["error"] or str(err)
    info["lineage"] = meta.get("lineage") or {}  # parent model, data, recipe, step
    info["lmforge"] = meta  # all of lmforge.json
    info["license"] = modelfile.get("license") or _first_text(path, ("LICENSE", "LICENSE.txt", "LICENSE.md", "license.txt"))
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
    if not is_entry(src):
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
    dst = validate_name(dst_name)
    if model_path(dst).exists():
        raise UserError(f"model {dst} already exists (remove it first with lmforge rm)")
    return add(dst_name, src)


# ---------------------------------------------------------------------------------------------------
# What every command that takes MODEL calls
# ---------------------------------------------------------------------------------------------------
def _looks_like_path(ref: str) -> bool:
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(s in ref for s in seps) or ref.startswith((".", "~"))


def is_entry(path: Path) -> bool:
    """A model directory, or a directory holding an imported GGUF file."""
    return is_model_dir(path) or (path.is_dir() and (path / GGUF_IN_STORE).is_file())


def _as_local(path: Path) -> Path | None:
    if is_model_dir(path) or (path.is_dir() and (path / "adapter_config.json").is_file()):
        return path  # a model directory, or a LoRA run (base model + adapter)
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
            what = ("no such file or directory" if not path.exists() else
                    "not a model directory (it has no config.json)" if path.is_dir() else "not a model directory or a .gguf file")
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


# ---------------------------------------------------------------------------------------------------
# import / create / pull
# ---------------------------------------------------------------------------------------------------
# What an import copies from a model directory: the files transformers reads, our own, and the model's
# license and card. Pickles, `original/` consolidated checkpoints, ONNX or GGUF siblings stay behind.
_IMPORT_SUFFIXES = (".json", ".safetensors", ".jinja")
_IMPORT_PREFIXES = ("LICENSE", "README", "NOTICE", "USE_POLICY", "license", "readme")


def _wanted(name: str) -> bool:
    return name.endswith(_IMPORT_SUFFIXES) or name.startswith(_IMPORT_PREFIXES)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when possible (a `create` on top of a store model costs no space), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_lineage(directory: Path, **lineage: Any) -> None:
    """Add `lineage` to lmforge.json (kept: what the model's own training recorded there)."""
    from lmforge.io import atomic_write_json

    f = directory / "lmforge.json"
    meta: dict[str, Any] = {}
    if f.is_file():
        try:
            m = json.loads(f.read_text(encoding="utf-8"))
            meta = m if isinstance(m, dict) else {}
        except (OSError, ValueError):
            meta = {}
        f.unlink()  # it may be a hard link shared with the parent model: write a new file, never through it
    meta.setdefault("format_version", 1)
    meta["lineage"] = {**(meta.get("lineage") or {}), **lineage}
    atomic_write_json(f, meta)


def check_model_dir(src: Path, *, allow_pickle: bool = False) -> str:
    """Validate a Hugging Face model directory without loading its weights; returns its architecture.

    Reads config.json (unsupported architectures and remote code are refused here, before anything is
    copied), the tokenizer, and the names and shapes of the weights from the safetensors headers.
    """
    from lmforge.loaders.model_dir import WeightFiles, expected_weight_shapes, load_config
    from lmforge.loaders.hf import hf_architecture
    from lmforge.tokenizer import load_hf_tokenizer

    cfg = load_config(src)
    load_hf_tokenizer(src)
    weights = WeightFiles(src, allow_pickle=allow_pickle)
    shapes = weights.shapes()
    for name, shape in expected_weight_shapes(cfg).items():
        if name not in shapes:
            raise UserError(f"{src}: tensor {name!r} is missing from the weights")
        if tuple(shapes[name]) != tuple(shape):
            raise UserError(f"{src}: tensor {name!r} has shape {tuple(shapes[name])}, config.json implies {tuple(shape)}")
    return hf_architecture(cfg)


def import_model(source: str | os.PathLike, name: str, *, allow_pickle: bool = False, overwrite: bool = False,
                 lineage: dict[str, Any] | None = None) -> Path:
    """Add a Hugging Face model directory or a .gguf file to the store as `name`; returns the entry path.

    The source is validated first (config, tokenizer, weight names and shapes; GGUF header and
    metadata), so a broken or unsupported model never enters the store. Pickled weights are converted to
    safetensors on the way in (only with `allow_pickle`), so the store itself never holds a pickle.
    """
    norm = validate_name(name)
    if model_path(norm).exists() and not overwrite:
        raise UserError(f"model {norm} already exists (remove it first with lmforge rm, or pass --overwrite)")
    src = Path(source).expanduser()
    if not src.exists():
        raise UserError(f"{source}: no such file or directory")
    tmp = _temp_dir("import")
    tmp.mkdir()
    try:
        if src.is_file():
            if src.suffix.lower() != ".gguf":
                raise UserError(f"{source}: not a model directory or a .gguf file")
            from lmforge.loaders.gguf import describe_gguf

            describe_gguf(src)  # header, metadata and tensor table checked before copying
            shutil.copy2(src, tmp / GGUF_IN_STORE)
            fmt = "gguf"
        else:
            recover(src)
            if not (src / "config.json").is_file():
                raise UserError(f"{source} is not a model directory: it has no config.json")
            check_model_dir(src, allow_pickle=allow_pickle)
            for f in sorted(src.iterdir()):
                if f.is_file() and not f.is_symlink() and _wanted(f.name):
                    shutil.copy2(f, tmp / f.name)
            if not any(tmp.glob("*.safetensors")):
                _convert_pickles(src, tmp)
            fmt = "hf"
        _write_lineage(tmp, imported_from=str(src.resolve()), imported_at=time.time(), source_format=fmt,
                       **(lineage or {}))
        return add(norm, tmp, move=True, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_pickles(src: Path, dst: Path) -> None:
    """Write the weights of a pickle-only directory (already allowed by the caller) as model.safetensors."""
    from safetensors.torch import save_file

    from lmforge.loaders.model_dir import WEIGHTS, WeightFiles

    weights = WeightFiles(src, allow_pickle=True)
    tensors = {k: weights[k].contiguous() for k in weights}
    save_file(tensors, str(dst / WEIGHTS), metadata={"format": "pt"})
    for stale in ("pytorch_model.bin.index.json",):
        (dst / stale).unlink(missing_ok=True)


def create(name: str, modelfile_path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """`lmforge create NAME -f Modelfile`: a new store entry = FROM's weights + this Modelfile's settings.

    FROM may be a store name, a model directory or a .gguf file (paths relative to the Modelfile). Files of
    a store model are hard-linked where the file system allows, so a derived model costs no extra space.
    Settings of a FROM model that was itself created from a Modelfile are inherited and overridden.
    """
    from lmforge.io import atomic_write_json
    from lmforge.modelfile import parse

    norm = validate_name(name)
    mf_file = Path(modelfile_path).expanduser()
    if not mf_file.is_file():
        raise UserError(f"{modelfile_path}: no such Modelfile")
    try:
        text = mf_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{modelfile_path}: unreadable ({e})") from None
    mf = parse(text, source=str(modelfile_path))
    if model_path(norm).exists() and not overwrite:
        raise UserError(f"model {norm} already exists (remove it first with lmforge rm, or pass --overwrite)")
    base_ref = mf.base
    if _looks_like_path(base_ref) and not Path(base_ref).expanduser().is_absolute():
        base_ref = str(mf_file.parent / base_ref)
    base = resolve(base_ref)
    tmp = _temp_dir("create")
    tmp.mkdir()
    try:
        if base.is_file():  # a .gguf path
            from lmforge.loaders.gguf import describe_gguf

            describe_gguf(base)
            shutil.copy2(base, tmp / GGUF_IN_STORE)
            parent = None
        else:
            for f in sorted(base.iterdir()):
                if f.is_file() and not f.is_symlink() and (_wanted(f.name) or f.name == GGUF_IN_STORE):
                    _link_or_copy(f, tmp / f.name)
            parent = _read_modelfile(base)
        if parent is not None:
            from lmforge.modelfile import Modelfile

            mf = mf.merged_over(Modelfile.from_json(parent))
        if mf.adapter:
            adapter = Path(mf.adapter).expanduser()
            if not adapter.is_absolute():
                adapter = mf_file.parent / adapter
            if not (adapter / "adapter_config.json").is_file():
                raise UserError(f"{modelfile_path}: ADAPTER {mf.adapter} is not an adapter directory "
                                f"(it needs adapter_config.json and adapter_model.safetensors)")
            shutil.copytree(adapter, tmp / "adapter")
            mf.adapter = "adapter"
        (tmp / MODELFILE).unlink(missing_ok=True)  # possibly a hard link to the parent's
        atomic_write_json(tmp / MODELFILE, mf.to_json())
        _write_lineage(tmp, parent=mf.base, created_from_modelfile=str(mf_file.resolve()), created_at=time.time())
        return add(norm, tmp, move=True, overwrite=overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_modelfile(directory: Path) -> dict[str, Any] | None:
    f = directory / MODELFILE
    if not f.is_file():
        return None
    m = _read_json(f)
    return m if isinstance(m, dict) else None


def default_name(repo_id: str) -> str:
    """The store name `pull` uses for a Hub repo: its last component, lower-cased (`SmolLM2-135M` -> `smollm2-135m`)."""
    base = repo_id.rstrip("/").rsplit("/", 1)[-1].lower()
    base = re.sub(r"[^a-z0-9._-]", "-", base).lstrip("._-")[:64]
    return validate_name(base or "model")


_PULL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "LICENSE*", "README*", "NOTICE*", "USE_POLICY*"]


def pull(repo_id: str, *, name: str | None = None, filename: str | None = None, revision: str | None = None,
         overwrite: bool = False) -> Path:
    """Download a model from the Hugging Face Hub (through `huggingface_hub`) and import it.

    A safetensors repo is fetched without its pickles; a GGUF repo needs `filename` (which quantization).
    Offline, or when the Hub refuses, the error says so and points to `lmforge import`.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?", repo_id or "") or ".." in repo_id:
        raise UserError(f"{repo_id!r} is not a Hugging Face repo id (OWNER/NAME)")
    name = validate_name(name) if name else default_name(repo_id)
    if model_path(name).exists() and not overwrite:
        raise UserError(f"model {name} already exists (remove it first with lmforge rm, pass --name, or --overwrite)")
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - a declared dependency
        raise UserError("lmforge pull needs the huggingface_hub package (pip install huggingface_hub)") from None
    hint = (f"download it another way (for example `huggingface-cli download {repo_id}` on a machine with "
            f"internet) and add it with `lmforge import PATH --name {name}`")
    try:
        if filename is not None:
            if not filename.endswith(".gguf") or ".." in filename or filename.startswith(("/", "\\")):
                raise UserError(f"--file {filename!r}: give the name of a .gguf file in the repo")
            path = huggingface_hub.hf_hub_download(repo_id, filename, revision=revision,
                                                   cache_dir=str(home() / "cache" / "hub"))
            return import_model(path, name, overwrite=overwrite, lineage={"pulled_from": f"hf://{repo_id}/{filename}",
                                                                         "revision": revision})
        local = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=_PULL_PATTERNS,
                                                  cache_dir=str(home() / "cache" / "hub"))
    except UserError:
        raise
    except (hf_errors.OfflineModeIsEnabled, hf_errors.LocalEntryNotFoundError) as e:
        raise UserError(f"cannot reach the Hugging Face Hub ({type(e).__name__}); {hint}") from None
    except hf_errors.RepositoryNotFoundError:
        raise UserError(f"no model {repo_id!r} on the Hugging Face Hub (or it is private/gated: log in with "
                        f"`huggingface-cli login`)") from None
    except hf_errors.GatedRepoError:
        raise UserError(f"{repo_id} is gated: accept its license on huggingface.co and log in with "
                        f"`huggingface-cli login`") from None
    except hf_errors.EntryNotFoundError:
        raise UserError(f"{repo_id} has no file {filename!r}") from None
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
        raise UserError(f"download of {repo_id} failed ({' '.join(str(e).split())[:200]}); {hint}") from None
    if not (Path(local) / "config.json").is_file():
        try:
            ggufs = sorted(f for f in huggingface_hub.list_repo_files(repo_id, revision=revision) if f.endswith(".gguf"))
        except Exception:  # noqa: BLE001 - only used to make the message more helpful
            ggufs = []
        raise UserError(f"{repo_id} has no config.json; if it is a GGUF repo, choose a file with --file"
                        + (f" ({', '.join(ggufs[:5])})" if ggufs else ""))
    return import_model(local, name, overwrite=overwrite, lineage={"pulled_from": f"hf://{repo_id}", "revision": revision})
