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

Whose leftovers. A staging directory is a crashed save's only while its writer is dead: `pretrain
--save-interval 1` is staging most of the time, and a `generate` or `import` of the same run must not
discard that. So a writer holds an exclusive `fcntl.flock` on `.lock` in the directory for its whole
transaction, and `recover()` acts only when it can take that lock without waiting. The kernel drops a
flock when its holder dies (kill -9 included), so "lock free" means "no writer alive" without trusting
pids, which are reused and differ between containers sharing a directory. A reader that finds a live
writer staging leaves it alone and reads the previous checkpoint; one that finds the writer in its commit
(the marker exists: a few renames) waits for it and reads the new one. A second writer waits for the first
instead of discarding its staging. `locked()` holds the same lock around a copy of the whole directory
(the store's import), so no save commits halfway through it. The lock file is removed on release: a
model directory keeps no trace of its writer. Where `fcntl` is missing (Windows) nothing is locked and
recovery works as it did before the lock existed: a reader can still discard a live writer's staging there.
"""

from __future__ import annotations

import errno
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

try:
    import fcntl
except ImportError:  # Windows: no flock; see the module docstring
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK",
    "MARKER",
    "OPTIMIZER_FILE",
    "RNG_FILE",
    "SHARDS_DIR",
    "STAGING",
    "TRAINER_STATE",
    "FileLock",
    "WholeOptimizerState",
    "locked",
    "read_trainer_state",
    "recover",
    "restore_optimizer",
    "restore_rng",
    "rng_state_tensors",
    "save_tensors",
    "transaction",
    "write_trainer_state",
]

STAGING = ".staging"
MARKER = ".commit.json"
LOCK = ".lock"  # held (flock) by the directory's writer for a whole transaction
TRAINER_STATE = "trainer_state"
# The only names a trainer state's files have: state.json's "tensors_file" and "optimizer_shards" must be
# these (a reader joins them as paths, so any other value is refused, not followed).
OPTIMIZER_FILE = "optimizer.safetensors"  # the whole layout: moments and RNG states in one file
RNG_FILE = "rng.safetensors"  # the sharded layout (lmforge.train.sharded_state): rank 0's RNG states
SHARDS_DIR = "optimizer"  # the sharded layout: trainer_state/optimizer/, the ranks' safetensors files


# ---------------------------------------------------------------------------------------------------
# The writer's lock
# ---------------------------------------------------------------------------------------------------
# flock errors that mean "this file system cannot lock", not "someone holds the lock"
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class FileLock:
    """An exclusive `fcntl.flock` on the file `path` (created if missing), dropped by the kernel if the
    holder dies.

    Two opens of the file conflict even within one process, so threads exclude each other too (a thread
    must not take a lock it already holds: it would wait for itself). With `remove=True` the holder deletes
    the file on release; a waiter that then gets the lock of the deleted file sees that the name now
    points elsewhere and locks again. `acquire()` raises OSError when the file cannot be created (a
    read-only directory). Where nothing can be locked (no `fcntl`, or a file system without flock)
    `acquire()` succeeds without a lock and `real` says so.
    """

    def __init__(self, path: str | os.PathLike, *, remove: bool = False) -> None:
        self.path = Path(path)
        self.remove = remove
        self.real = False
        self._fd: int | None = None

    def acquire(self, *, wait: bool = True) -> bool:
        """Take the lock; False only when `wait` is False and another holder has it."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this FileLock")
        if fcntl is None:
            self.real = False
            return True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError as e:
                os.close(fd)
                if e.errno in _NO_LOCKING:
                    self.real = False
                    return True
                raise
            except BaseException:
                os.close(fd)
                raise
            try:
                st = os.stat(self.path)
                same = (st.st_ino, st.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
            except FileNotFoundError:
                same = False
            if same:
                self._fd, self.real = fd, True
                return True
            os.close(fd)  # the holder we waited for removed the file: lock the one there now

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self.remove:
                self.path.unlink(missing_ok=True)  # before unlocking: a waiter must find the name gone
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------------
# The transaction
# ---------------------------------------------------------------------------------------------------
def _apply_commit(directory: Path) -> None:
    staging = directory / STAGING
    marker = json.loads((directory / MARKER).read_text())
    files = marker["files"]
    for rel in files:
        src, dst = staging / rel, directory / rel
        if src.exists():  # absent: moved before an earlier crash
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            fsync_dir(dst.parent)
    kept = set(files)
    for sub in marker.get("replace", []):  # what the previous save left there and this one did not write
        if not (directory / sub).is_dir():
            continue
        for old in sorted((directory / sub).rglob("*"), reverse=True):  # files before their directories
            rel = str(old.relative_to(directory))
            if old.is_file() and rel not in kept:
                old.unlink()
            elif old.is_dir() and not any(old.iterdir()):
                old.rmdir()
    (directory / MARKER).unlink()
    fsync_dir(directory)
    shutil.rmtree(staging, ignore_errors=True)


def _recover_locked(directory: Path) -> None:
    """recover() for a caller holding the directory's lock: whatever is there is a dead writer's."""
    if (directory / MARKER).exists():
        _apply_commit(directory)
    elif (directory / STAGING).exists():
        shutil.rmtree(directory / STAGING, ignore_errors=True)


def recover(directory: str | os.PathLike) -> None:
    """Finish a committed-but-interrupted save, or discard an uncommitted one, unless its writer is alive.

    Writes nothing when there is nothing to recover (a read-only model directory loads). A live writer's
    staging is left alone; a live writer's commit is waited for (renames only), so the caller then reads
    the new checkpoint whole.
    """
    directory = Path(directory)
    if not (directory / MARKER).exists() and not (directory / STAGING).exists():
        return
    lock = FileLock(directory / LOCK, remove=True)
    try:
        if not lock.acquire(wait=False):
            if not (directory / MARKER).exists():
                return  # a save in progress: its staging directory is its writer's, not a leftover
            lock.acquire()
    except OSError as e:  # the lock file cannot be created: nor could anything here be moved or removed
        if (directory / MARKER).exists():
            raise UserError(f"{directory} holds an interrupted save ({MARKER}) that cannot be finished: "
                            f"{e.strerror or e}") from None
        return  # a stale staging directory alone is harmless: readers never look into it
    try:
        _recover_locked(directory)
    finally:
        lock.release()


@contextmanager
def locked(directory: str | os.PathLike) -> Iterator[None]:
    """Hold `directory`'s writer lock while the caller reads it as a whole (the store copying a checkpoint).

    A save in progress is waited for and an interrupted one recovered first; no save starts or commits
    until the block ends. Where the lock file cannot be created (a read-only directory, which no save can be
    writing either) the block runs unlocked after a plain `recover()`. Not re-entrant: a thread holding it
    must not open a `transaction` on the same directory.
    """
    directory = Path(directory)
    lock = FileLock(directory / LOCK, remove=True)
    try:
        held = lock.acquire()
    except OSError:
        held = False
    try:
        if held:
            _recover_locked(directory)
        else:
            recover(directory)
        yield
    finally:
        lock.release()


@contextmanager
def transaction(directory: str | os.PathLike, *, replace: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a staging directory; on a clean exit its files replace their namesakes in `directory`.

    `replace` names subdirectories that each save writes as a whole (`trainer_state`): on commit, files
    there that this save did not write are removed too, so no file of an older layout (another process
    count's optimizer shards, say) stays beside the new one for a reader to mix in. The removal is part of
    the commit, so an interrupted one is finished by `recover()` like the renames.

    The directory's lock is held throughout, so readers leave the staging directory alone, and another
    writer of the same directory waits until this one has committed or given up.
    """
    directory = Path(directory)
    lock = FileLock(directory / LOCK, remove=True)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        _recover_locked(directory)  # a dead writer's leftovers: we hold the lock, so no writer is alive
        staging = directory / STAGING
        staging.mkdir()
    except OSError as e:
        lock.release()
        raise UserError(f"cannot write to {directory}: {e.strerror or e}") from None
    try:
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        for rel in files:  # files written by libraries may not be synced yet
            with open(staging / rel, "rb") as f:
                os.fsync(f.fileno())
        atomic_write_json(directory / MARKER, {"files": files, "replace": list(replace), "time": time.time()})
        _apply_commit(directory)
    finally:
        lock.release()


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
    tensors = rng_state_tensors()
    for idx, st in osd["state"].items():
        for key, val in st.items():
            tensors[f"optim.{idx}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    save_tensors(d / OPTIMIZER_FILE, tensors)
    atomic_write_json(d / "state.json", {**state, "param_names": param_names, "param_groups": osd["param_groups"]})


def rng_state_tensors() -> dict[str, torch.Tensor]:
    """This process's RNG states, as `restore_rng` reads them."""
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


def read_trainer_state(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """state.json and the tensors file beside it: `optimizer.safetensors` (moments and RNG) in the whole
    layout, or the file state.json names (`tensors_file`: the RNG states) when ranks wrote the moments as
    shards (`lmforge.train.sharded_state` reads those). The names state.json gives must be the ones lmforge
    writes: they become paths, and a state.json from elsewhere must not lead the reader out of the checkpoint."""
    d = Path(directory) / TRAINER_STATE
    state = json.loads((d / "state.json").read_text()) if (d / "state.json").is_file() else None
    if state is not None:
        sharded = state.get("optimizer_shards")
        name = state.get("tensors_file", OPTIMIZER_FILE)
        for key, value, known in (("optimizer_shards", sharded, (None, "", SHARDS_DIR)),
                                  ("tensors_file", name, (RNG_FILE,) if sharded else (OPTIMIZER_FILE,))):
            if value not in known:
                raise UserError(f"{d / 'state.json'} names {key} {value!r}: not a checkpoint lmforge wrote")
    tensors_file = d / (state or {}).get("tensors_file", OPTIMIZER_FILE)
    if state is None or not tensors_file.is_file():
        raise UserError(f"{directory} has no trainer state to resume from (no {TRAINER_STATE}/state.json)")
    return state, load_file(tensors_file)


class WholeOptimizerState:
    """A whole optimizer state dict (`optimizer.state_dict()`'s layout) posing as the optimizer, for runs whose
    ranks each hold a part of it (tensor and pipeline parallelism, and FSDP2 when its ranks cannot write
    shards to one place): a save gathers the state on rank 0 and `write_trainer_state` reads it from here
    through `state_dict()`; a resume has `restore_optimizer` leave the state it assembled here
    (`load_state_dict`), for `Dist` to split among the ranks."""

    def __init__(self, state: dict | None = None) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


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
