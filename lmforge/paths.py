"""Where lmforge keeps things: `$LMFORGE_HOME` (default `~/.lmforge`) holds the model store and caches.

This is the bottom layer every other module may import, so it also holds the name -> path look-up of the
model store (`validate_name`, `model_path`, `resolve`): the loaders need it to find the base model an
adapter names, and the store's operations (`lmforge.store`, which re-exports these) need the loaders. Kept
here, neither imports the other.

Names. A model name is `NAME[:TAG]`: NAME is 1-64 characters of `[a-z0-9._-]` starting with `[a-z0-9]`,
TAG is 1-32 characters of the same alphabet, also starting with `[a-z0-9]` (so `.` and `..` can never be
a path component). A missing tag means `latest`, so `tiny` and `tiny:latest` are the same model and
`validate_name` returns the normalised `tiny:latest`. Upper case is refused rather than folded, so that a
name means the same thing on case-sensitive and case-insensitive file systems; Windows device names
(`con`, `nul`, `com1`, ...) are refused for the same reason. Names are checked with a regular expression
*before* any file-system call, and `model_path` checks again that the resolved path stays inside the
store (defence in depth, e.g. against a symlink planted in the store).

Layout. `tiny:latest` lives in `models/tiny/latest/`. The tag is a sub-directory rather than part of the
folder name because `:` is not allowed in Windows file names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lmforge.errors import UserError

DEFAULT_TAG = "latest"
NAME_RULE = ("model names are NAME or NAME:TAG, NAME 1-64 and TAG 1-32 characters of a-z 0-9 . _ -, "
             "each starting with a letter or digit")
NAME_RE = re.compile(r"(?P<name>[a-z0-9][a-z0-9._-]{0,63})(?::(?P<tag>[a-z0-9][a-z0-9._-]{0,31}))?")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
GGUF_IN_STORE = "model.gguf"  # an imported GGUF file is kept as it is, quantized, under this name


def home() -> Path:
    return Path(os.environ.get("LMFORGE_HOME") or Path.home() / ".lmforge").expanduser()


def cache_dir(kind: str) -> Path:
    """`$LMFORGE_HOME/cache/<kind>`: derived data (token shards, trained tokenizers) safe to delete."""
    return home() / "cache" / kind


def models_root() -> Path:
    return home() / "models"


# ---------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------
def split_name(name: str) -> tuple[str, str]:
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
    base, tag = split_name(name)
    return f"{base}:{tag}"


def model_path(name: str) -> Path:
    """Where model `name` lives (whether or not it exists): an absolute path inside `models_root()`."""
    base, tag = split_name(name)
    root = models_root().resolve()
    path = (root / base / tag).resolve()
    if not path.is_relative_to(root) or path == root:  # unreachable for a valid name, barring planted symlinks
        raise UserError(f"model name {name!r} resolves to {path}, outside the model store {root}")
    return path


# ---------------------------------------------------------------------------------------------------
# What every command that takes MODEL calls
# ---------------------------------------------------------------------------------------------------
def looks_like_path(ref: str) -> bool:
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(s in ref for s in seps) or ref.startswith((".", "~"))


def _as_local(path: Path) -> Path | None:
    # A model directory (config.json), or a LoRA run (adapter_config.json: base model + adapter).
    if path.is_dir() and ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
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
    if looks_like_path(ref):
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
