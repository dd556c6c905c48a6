"""The local model store, like Ollama's: named model directories under `$LMFORGE_HOME/models`.

Names. `NAME[:TAG]`, checked before any file-system call; the rules, `validate_name`, `model_path` and
`resolve` (MODEL -> a path) live in `lmforge.paths`, the bottom layer, so the loaders can find a base
model by name without importing the store. They are re-exported here for callers of the store.

Layout. `tiny:latest` lives in `models/tiny/latest/`, a plain model directory (config.json,
model.safetensors, tokenizer files, lmforge.json, optionally `modelfile.json` with a system prompt and
sampling defaults). The tag is a sub-directory rather than part of the folder name because `:` is not
allowed in Windows file names. Temporary directories of unfinished imports start with `.` and are never
listed.

Listing and showing (read-only) live in `lmforge.store_info`, also re-exported here.

Atomicity. `add` copies into a temp directory inside `models/`, fsyncs, then `os.replace`s it into place,
so a reader sees no model or the whole model. Overwriting first renames the old entry aside (a directory
cannot be `os.replace`d over a non-empty one), so for an instant the name is absent, never half-written.

Concurrency. Changes to the store (add, import, create, cp, rm, pull) hold the store lock, an
`fcntl.flock` on `models/.lock`, for their check-then-rename step only: "is the name free?" and the rename
into place happen under it, so of two imports to one name without overwrite exactly one wins and the other
gets "already exists". The long part (validating and copying) runs outside it. Readers (list, show, load)
take no lock. A copied source model directory is read under its own writer lock
(`lmforge.checkpoint.locked`), so a training run saving into it never commits halfway through the copy.

Leftovers. Working directories in `models/` are named `.{kind}-{pid}-{uuid}` (kind: import, create, tmp,
trash) and flock'ed by their owner for their whole life. A killed owner's lock is dropped by the kernel,
so every store change first claims (locks) and removes working directories nobody holds; a live owner's
are left alone. The pid in the name is for people; the lock decides, since pids are reused and differ
between containers that share a store. Names without a pid, from older versions, are removed once they
have not changed for a day. Without `fcntl` (Windows) nothing is locked or cleaned, as before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lmforge.checkpoint import LOCK, MARKER, STAGING, FileLock, locked, recover
from lmforge.errors import UserError
from lmforge.io import fsync_dir
from lmforge.loaders.hf import hf_architecture
from lmforge.loaders.model_dir import (
    WEIGHTS,
    WeightFiles,
    check_encoder_dir,
    expected_weight_shapes,
    is_encoder_dir,
    is_model_dir,
    load_config,
)
from lmforge.modelfile import FILE as MODELFILE
from lmforge.paths import (  # noqa: F401 - re-exported: the store's names are the paths module's
    DEFAULT_TAG,
    GGUF_IN_STORE,
    NAME_RE,
    NAME_RULE,
    home,
    looks_like_path,
    model_path,
    models_root,
    resolve,
    validate_name,
)
from lmforge.store_info import StoreEntry, list_models, read_json, show  # noqa: F401 - re-exported
from lmforge.tokenizer import load_hf_tokenizer

try:
    import fcntl
except ImportError:  # Windows: the store is neither locked nor cleaned (see the module docstring)
    fcntl = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------------
# The store lock and working directories
# ---------------------------------------------------------------------------------------------------
STORE_LOCK = ".lock"  # models/.lock
_WORK_RE = re.compile(r"\.(?:import|create|tmp|trash)-(?:(?P<pid>[0-9]+)-)?[0-9a-f]{32}")
_OLD_STYLE_STALE_S = 86400.0  # a pid-less working directory of an older version untouched this long is a leftover


def _work_path(kind: str) -> Path:
    return models_root() / f".{kind}-{os.getpid()}-{uuid.uuid4().hex}"


def _own(path: Path) -> int | None:
    """Lock working directory `path` for as long as the returned descriptor stays open (None: not locked).

    Call under the store lock, right after the directory appears, so no cleaner can claim it in between. A
    directory already held (the `.import-` directory an import hands to `add(move=True)` keeps its owner's
    lock through the rename) needs no second lock."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _discard(path: Path | None, fd: int | None) -> None:
    """Remove working directory `path` (if still there), then drop its lock."""
    try:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
    finally:
        if fd is not None:
            os.close(fd)


def _claim_leftovers(root: Path) -> list[tuple[Path, int | None]]:
    """Working directories whose owner is gone, each now locked by us (under the store lock)."""
    if fcntl is None:
        return []
    claimed: list[tuple[Path, int | None]] = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    for entry in entries:
        m = _WORK_RE.fullmatch(entry.name)
        try:
            if m is None or not entry.is_dir(follow_symlinks=False):
                continue
            if m["pid"] is None:  # an older version's name: no lock to test, so only once long untouched
                if time.time() - entry.stat(follow_symlinks=False).st_mtime > _OLD_STYLE_STALE_S:
                    claimed.append((Path(entry.path), None))
                continue
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its owner is alive (or this file system cannot lock: then leave it too)
            os.close(fd)
            continue
        claimed.append((Path(entry.path), fd))
    return claimed


@contextmanager
def _store_lock() -> Iterator[Path]:
    """Hold the store lock for a check-then-rename; yields the store root. Leftovers of killed operations are
    claimed under the lock and deleted after it is released (deleting a big one takes a while)."""
    root = models_root()
    root.mkdir(parents=True, exist_ok=True)
    claimed: list[tuple[Path, int | None]] = []
    try:
        with FileLock(root / STORE_LOCK, remove=True):  # removed on release: the store keeps no trace
            claimed = _claim_leftovers(root)
            yield root
    finally:
        for path, fd in claimed:
            _discard(path, fd)


@contextmanager
def _working_dir(kind: str) -> Iterator[Path]:
    """A new empty working directory in the store, owned (locked) by this process, removed at the end."""
    with _store_lock():
        path = _work_path(kind)
        path.mkdir()
        fd = _own(path)
    try:
        yield path
    finally:
        _discard(path, fd)


# ---------------------------------------------------------------------------------------------------
# Changing the store
# ---------------------------------------------------------------------------------------------------
def _fsync_tree(path: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(path):
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(dirpath)


def _exists_error(norm: str, hint: str) -> UserError:
    return UserError(f"model {norm} already exists ({hint})")


_ADD_HINT = "remove it first with lmforge rm, or overwrite it"
_CLI_HINT = "remove it first with lmforge rm, or pass --overwrite"


def add(name: str, source_dir: str | os.PathLike, *, move: bool = False, overwrite: bool = False) -> Path:
    """Copy (or move) model directory `source_dir` into the store as `name`; returns its new path.

    Without `overwrite`, an existing `name` is refused, also when another process adds it while this one
    copies (checked again under the store lock, at the rename). `move` is for directories nobody else is
    writing (the store's own working directories); a copied source is read under its writer lock.
    """
    return _add(name, source_dir, move=move, overwrite=overwrite, hint=_ADD_HINT)


def _add(name: str, source_dir: str | os.PathLike, *, move: bool, overwrite: bool, hint: str) -> Path:
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
    if dst.exists() and not overwrite:  # early, before copying; _commit checks again under the lock
        raise _exists_error(norm, hint)
    tmp, fd, moved = None, None, False
    try:
        if move:
            recover(src)  # finish (or discard) an interrupted checkpoint save, as every load does
            with _store_lock():
                tmp = _work_path("tmp")
                try:
                    os.rename(src, tmp)  # same file system: instant, and nothing to copy
                except OSError:
                    tmp = None
                else:
                    moved = True
                    fd = _own(tmp)
        if not moved:
            with _store_lock():
                tmp = _work_path("tmp")
                tmp.mkdir()
                fd = _own(tmp)
            try:
                with locked(src):  # a save in progress there commits first; none commits during the copy
                    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(STAGING, MARKER, LOCK), dirs_exist_ok=True)
            except (OSError, shutil.Error):
                if not src.is_dir():
                    raise UserError(f"{src} was removed while it was being copied") from None
                raise
        _fsync_tree(tmp)
        _commit(tmp, dst, norm, overwrite=overwrite, hint=hint)
    except BaseException:
        if moved and not src.exists() and tmp is not None and tmp.exists():  # the rename worked, a later step
            os.rename(tmp, src)  # failed: undo it
        _discard(tmp, fd)
        raise
    _discard(None, fd)
    if move and not moved:
        shutil.rmtree(src)
    return dst


def _commit(tmp: Path, dst: Path, norm: str, *, overwrite: bool, hint: str) -> None:
    """Rename the finished `tmp` into place as `dst`: under the store lock, so "is the name free?" and the
    rename are one step for every other change to the store."""
    trash, trash_fd = None, None
    try:
        with _store_lock():
            if (dst.exists() or dst.is_symlink()) and not overwrite:
                raise _exists_error(norm, hint)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists():  # overwrite: a directory cannot be os.replace()d over a non-empty one
                trash = _work_path("trash")
                os.rename(dst, trash)
                trash_fd = _own(trash)
            try:
                os.replace(tmp, dst)
            except BaseException:
                if trash is not None:  # put the old entry back
                    os.rename(trash, dst)
                    trash = None
                raise
            fsync_dir(dst.parent)
    finally:
        _discard(trash, trash_fd)


def _existing(name: str) -> tuple[str, Path]:
    norm = validate_name(name)
    path = model_path(norm)
    if not path.is_dir():
        raise UserError(f"no model named {norm} (see lmforge list)")
    return norm, path


def remove(name: str) -> None:
    """Delete model `name`, damaged or not; UserError if there is no such model."""
    _existing(name)  # early: a refused rm touches nothing
    trash, fd = None, None
    try:
        with _store_lock():
            _norm, path = _existing(name)  # again under the lock: another rm may have been first
            trash = _work_path("trash")
            os.rename(path, trash)  # the name disappears at once; deleting the files may take a while
            fd = _own(trash)
            fsync_dir(path.parent)
            try:  # the NAME directory, once its last tag is gone; under the lock, as an add may rename into it
                path.parent.rmdir()
            except OSError:
                pass
    finally:
        _discard(trash, fd)


def copy(src_name: str, dst_name: str) -> Path:
    """Copy model `src_name` to the new name `dst_name` (refused if it exists); returns the new path."""
    _norm, src = _existing(src_name)
    dst = validate_name(dst_name)
    hint = "remove it first with lmforge rm"
    if model_path(dst).exists():
        raise _exists_error(dst, hint)
    return _add(dst_name, src, move=False, overwrite=False, hint=hint)


def is_entry(path: Path) -> bool:
    """A model directory, or a directory holding an imported GGUF file."""
    return is_model_dir(path) or (path.is_dir() and (path / GGUF_IN_STORE).is_file())


# ---------------------------------------------------------------------------------------------------
# import / create / pull
# ---------------------------------------------------------------------------------------------------
# What an import copies from a model directory: the files transformers reads, our own, and the model's
# license and card. Pickles, `original/` consolidated checkpoints, ONNX or GGUF siblings stay behind.
_IMPORT_SUFFIXES = (".json", ".safetensors", ".jinja")
_IMPORT_PREFIXES = ("LICENSE", "README", "NOTICE", "USE_POLICY", "license", "readme")


def _wanted(name: str) -> bool:
    return name.endswith(_IMPORT_SUFFIXES) or name.startswith(_IMPORT_PREFIXES)


# sentence-transformers keeps a module's settings in a numbered folder ("1_Pooling/config.json"): how an
# embedding model pools its tokens, which its vectors depend on
_ST_MODULE_DIR = re.compile(r"[0-9]+_[A-Za-z]+")


def _copy_module_configs(src: Path, dst: Path) -> None:
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.is_symlink() and f.name.endswith(".json"):
            dst.mkdir(exist_ok=True)
            shutil.copy2(f, dst / f.name)


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
    copied), the tokenizer, and the names and shapes of the weights from the safetensors headers. An
    encoder (BERT family, an embedding model) is checked as one (`check_encoder_dir`).
    """
    if is_encoder_dir(src):
        return check_encoder_dir(src)
    cfg = load_config(src)
    load_hf_tokenizer(src).check_chat_template()  # a template that hangs or fails never enters the store
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
    if model_path(norm).exists() and not overwrite:  # early; checked again at the rename, under the store lock
        raise _exists_error(norm, _CLI_HINT)
    src = Path(source).expanduser()
    if not src.exists():
        raise UserError(f"{source}: no such file or directory")
    with _working_dir("import") as tmp:
        if src.is_file():
            if src.suffix.lower() != ".gguf":
                raise UserError(f"{source}: not a model directory or a .gguf file")
            from lmforge.loaders.gguf import describe_gguf

            describe_gguf(src)  # header, metadata and tensor table checked before copying
            shutil.copy2(src, tmp / GGUF_IN_STORE)
            fmt = "gguf"
        else:
            with locked(src):  # a run saving into `src` commits before, or after, the whole copy
                if not (src / "config.json").is_file():
                    raise UserError(f"{source} is not a model directory: it has no config.json")
                check_model_dir(src, allow_pickle=allow_pickle)
                for f in sorted(src.iterdir()):
                    if f.is_file() and not f.is_symlink() and _wanted(f.name):
                        shutil.copy2(f, tmp / f.name)
                    elif f.is_dir() and not f.is_symlink() and _ST_MODULE_DIR.fullmatch(f.name):
                        _copy_module_configs(f, tmp / f.name)
                if not any(tmp.glob("*.safetensors")):
                    _convert_pickles(src, tmp)
            fmt = "hf"
        _write_lineage(tmp, imported_from=str(src.resolve()), imported_at=time.time(), source_format=fmt,
                       **(lineage or {}))
        return _add(norm, tmp, move=True, overwrite=overwrite, hint=_CLI_HINT)


@contextmanager
def new_entry(name: str, *, overwrite: bool = False) -> Iterator[Path]:
    """A fresh working directory in the store that becomes model `name` when the `with` block ends without an
    exception (checked like any entry, then renamed into place under the store lock, as `import_model`
    does); on an error or Ctrl-C it is removed and the store is as before. For commands that write an
    entry's files themselves (`lmforge quantize --name` writes model.gguf and lmforge.json into it). The
    name is checked early, before the caller's slow work, and again at the rename."""
    norm = validate_name(name)
    if model_path(norm).exists() and not overwrite:
        raise _exists_error(norm, _CLI_HINT)
    with _working_dir("import") as tmp:
        yield tmp
        _add(norm, tmp, move=True, overwrite=overwrite, hint=_CLI_HINT)


def _convert_pickles(src: Path, dst: Path) -> None:
    """Write the weights of a pickle-only directory (already allowed by the caller) as model.safetensors."""
    from safetensors.torch import save_file

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
    if model_path(norm).exists() and not overwrite:  # early; checked again at the rename, under the store lock
        raise _exists_error(norm, _CLI_HINT)
    base_ref = mf.base
    if looks_like_path(base_ref) and not Path(base_ref).expanduser().is_absolute():
        base_ref = str(mf_file.parent / base_ref)
    base = resolve(base_ref)
    with _working_dir("create") as tmp:
        if base.is_file():  # a .gguf path
            from lmforge.loaders.gguf import describe_gguf

            describe_gguf(base)
            shutil.copy2(base, tmp / GGUF_IN_STORE)
            parent = None
        else:
            with locked(base):  # a run saving into `base` commits before, or after, these links
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
            with locked(adapter):
                shutil.copytree(adapter, tmp / "adapter", ignore=shutil.ignore_patterns(STAGING, MARKER, LOCK))
            mf.adapter = "adapter"
        (tmp / MODELFILE).unlink(missing_ok=True)  # possibly a hard link to the parent's
        atomic_write_json(tmp / MODELFILE, mf.to_json())
        _write_lineage(tmp, parent=mf.base, created_from_modelfile=str(mf_file.resolve()), created_at=time.time())
        return _add(norm, tmp, move=True, overwrite=overwrite, hint=_CLI_HINT)


def _read_modelfile(directory: Path) -> dict[str, Any] | None:
    f = directory / MODELFILE
    if not f.is_file():
        return None
    m = read_json(f)
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
    name = validate_name(name) if name is not None else default_name(repo_id)  # "" is refused, not defaulted
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
