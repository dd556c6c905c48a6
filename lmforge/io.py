"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every checkpoint, tokenizer and config lmforge writes goes through here: write a temp file in the same
directory, flush + fsync it, `os.replace` it over the target (atomic on POSIX and Windows), then fsync the
directory so the rename itself survives a power cut. `check_writable` asks before the work, not after it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from lmforge.errors import UserError, one_line


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a directory entry (a rename or a new file). A no-op where directories can't be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to produce the file's content, then move it atomically onto `path`.

    `write` receives a path (not a handle) so that libraries that insist on a filename, such as
    `safetensors.torch.save_file`, can be used. On any failure the temp file is removed and the old
    `path`, if any, is left untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are meant to be shared like any other file
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


# A config.json is a few KB and a tokenizer_config.json with its chat templates a few MB; no config nests
# more than a handful of levels. Past these a file is damage, refused before it is read (size) or used
# (depth: anything walking it, a dataclass copy or a JSON dump, would recurse past Python's limit).
MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 64


def read_json(path: str | os.PathLike, *, label: str | None = None) -> Any:
    """The JSON value in `path`, or one UserError line naming the file (as `label`, default the path): not
    readable, not UTF-8, not JSON, over MAX_JSON_BYTES, or nested deeper than MAX_JSON_DEPTH (a file of
    200,000 '[' makes json.loads itself raise RecursionError)."""
    path = Path(path)
    label = label or str(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise UserError(f"{label}: larger than {MAX_JSON_BYTES >> 20} MiB, too large for a JSON config")
        value = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise UserError(f"{label}: not usable JSON (nested too deeply to parse)") from None
    except UserError:
        raise
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{label}: not readable JSON ({one_line(e, 120)})") from None
    stack = [(value, 1)]
    while stack:  # iterative: the point is to refuse what would make recursive code fail
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise UserError(f"{label}: not usable JSON (nested more than {MAX_JSON_DEPTH} levels deep)")
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return value


def read_json_object(path: str | os.PathLike, *, label: str | None = None) -> dict:
    """`read_json`, for a file that must hold a JSON object (a model directory's configs are user input)."""
    obj = read_json(path, label=label)
    if not isinstance(obj, dict):
        raise UserError(f"{label or path}: should hold a JSON object")
    return obj


def check_writable(out: Path) -> None:
    """Refuse an output directory we cannot write before spending minutes on data and training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output directory {out}: {e.strerror or e}") from None
