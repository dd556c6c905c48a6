"""Sharded trainer state: every FSDP2 rank writes its own slice of the optimizer moments through
`torch.distributed.checkpoint` (DCP), and a resume on any number of processes reads back the slices it needs.

Why. Without this, a save gathers the whole optimizer state (two moments per weight, twice the model) onto
rank 0 and rank 0 writes it: that costs rank 0 the memory of the whole state at every save. Here each rank
writes only what it holds; the weights are still gathered on rank 0 and written as the usual consolidated
Hugging Face directory (config.json + model.safetensors), which everything else reads.

No pickles. DCP's default `FileSystemWriter` pickles its `.metadata` file and `torch.save`s every tensor.
`torch.distributed.checkpoint.HuggingFaceStorageWriter(save_distributed=True)` (torch 2.13, `hf_storage.py`)
instead writes safetensors files named by rank, `shard-<rank+1>-model-<i>-of-<n>.safetensors` (n files per
rank, see `_files_of`), each tensor slice under its full name, with its global offsets in the safetensors
header (`__metadata__["DCP_SHARDING_INFO"]`, JSON), and with `save_distributed` and no consolidation its
`finish()` writes no metadata file at all. `HuggingFaceStorageReader` rebuilds DCP's metadata from those
headers alone (each file's tensors, shapes and offsets become the chunks of one global tensor), so a load into
tensors of any sharding (DTensors of another world size, or plain whole tensors on one process) reads exactly
the overlapping pieces. A safetensors file without the sharding header is read as whole tensors at offset 0,
so the same reader also reads the whole layout one process writes (`trainer_state/optimizer.safetensors`). Two
things would bring a pickle back, and neither is passed here: non-tensor values (DCP `torch.save`s them into
BYTE_IO items, which the HF writer would also splice into the safetensors stream) and the default writer.
Every entry is a tensor; `step` is one (as `lmforge.checkpoint.write_trainer_state` stores it too).

Names: one for every layout. The moment `key` of the parameter numbered `idx` in `optimizer.state_dict()`'s
order (parameter groups in order, which every strategy shares because the optimizer is always built on the
bare model) is `optim.<idx>.<key>`, exactly as the whole layout names it. So the whole file and the shards
are two storages of the same tensors, and the reader does not care which it has.

Layout of a sharded save (inside the checkpoint's `trainer_state/`): `state.json` (step, tokens, recipe,
param names and groups, and `"optimizer_shards": "optimizer"`, `"tensors_file": "rng.safetensors"`,
`"optimizer_tensors"`: each tensor's name and whole shape, so a lost shard file is an error on resume, not a
silently zero slice), `rng.safetensors` (rank 0's RNG states, as in the whole layout), and
`optimizer/shard-*.safetensors`. Each save replaces `trainer_state/` whole (`transaction(replace=...)`), so
the shards of an earlier save with more processes never stay beside the new ones.

Memory (measured: preset `base`, 48.5M parameters, FSDP2 on 2 gloo CPU processes, peak RSS): a save adds
250-280 MB to rank 0 (the gathered weights, 185 MB, and one file of its slices being built) where gathering
and writing the whole optimizer state added 670-730 MB (peak 1.15-1.20 GB against 1.57 GB); rank 1's peak
does not move. The save took 3.8-4.1 s against 4.4-8.0 s (a busy 2-core machine: only the order is sure).

Atomic. Rank 0 holds the checkpoint's `transaction`; after it has opened the staging directory every rank
writes its shard into that same directory (one machine, or a shared file system), DCP's closing collective
returns only after every rank's write returned, and rank 0 writes state.json and commits after that. A rank
that fails mid-save makes DCP raise on every rank (the failure travels through its gather), a rank that dies
makes rank 0's next collective fail: either way rank 0 leaves the transaction by an exception, the staging
directory is discarded, and the previous checkpoint is the one on disk.

Several machines. The shards land in rank 0's staging directory only if every rank sees it: one machine, or
a file system the machines share. So every save checks first: rank 0 writes a probe file named by a random
nonce into its staging directory, the all-reduce that tells the ranks the directory is open carries the nonce,
and a second one collects whether each rank can read the probe. If one cannot, the ranks gather the optimizer
state on rank 0, which writes the whole layout (as tensor parallelism does), for this save and the run's later
ones, and rank 0 says why once. Without the check each rank would write its slices to its own disk and rank 0
would commit a checkpoint missing them. As a second guard rank 0 reads the staged shard headers before it
commits and fails the save if they do not cover every tensor (the check a resume makes too).

Which runs write shards: FSDP2 (its state is split by rank). DDP ranks each hold the whole state, so rank 0
writing it costs nothing extra; tensor parallelism permutes the rows of the fused projections per rank
(`lmforge.train.tensor_parallel`), so its slices are not contiguous pieces of the one-process tensor, and it
keeps the whole layout (gathered on rank 0). Every strategy resumes from either layout.
"""

from __future__ import annotations

import math
import secrets
import sys
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import (RNG_FILE, SHARDS_DIR, STAGING, TRAINER_STATE, WholeOptimizerState, restore_optimizer,
                                rng_state_tensors, save_tensors, write_trainer_state)
from lmforge.errors import UserError
from lmforge.io import atomic_write_json
from lmforge.model.gpt import GPT
from lmforge.train.checkpointer import Checkpointer
from lmforge.train.distributed import Dist

__all__ = ["RNG_FILE", "SHARDS_DIR", "is_sharded", "restore_optimizer_state", "save_sharded", "writes_sharded"]

# SHARDS_DIR (trainer_state/optimizer/: the ranks' safetensors files) and RNG_FILE live in lmforge.checkpoint,
# whose reader refuses any other name in a state.json.


def writes_sharded(dist: Dist) -> bool:
    """Whether this run's saves write the optimizer state by rank (see the module docstring for why FSDP2 only)."""
    return dist.strategy == "fsdp"


def is_sharded(state: dict[str, Any]) -> bool:
    """Whether the trainer state described by `state` (its state.json) was written by ranks."""
    return bool(state.get("optimizer_shards"))


def _ordered_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters in `optimizer.state_dict()`'s numbering: groups in order."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's optimizer state as `optim.<idx>.<key>` -> tensor (DTensors under FSDP2): tensors only, so
    nothing is pickled; a number (an optimizer keeping `step` as a float) becomes a 0-d tensor."""
    out: dict[str, torch.Tensor] = {}
    for idx, p in enumerate(_ordered_params(optimizer)):
        for key, val in optimizer.state.get(p, {}).items():
            out[f"optim.{idx}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    return out


def _agree(dist: Dist, ok: bool, what: str, nonce: int = 0) -> int:
    """Every rank learns whether every rank got past `what`, so a rank that failed alone does not leave the
    others waiting in the next collective until the group's timeout. The same all-reduce carries rank 0's
    `nonce` (the others pass 0) to every rank: the name of its shared-file-system probe. Returns it."""
    failed, total = dist.sum([0.0 if ok else 1.0, float(nonce)])  # float64: exact below 2**53
    if failed and ok:
        raise RuntimeError(f"sharded checkpoint: another rank failed to {what}; nothing was saved")
    return int(total)


def _dcp(call, what: str):
    """Run a DCP save or load. DCP reports a failure on any rank to every rank as a `CheckpointException`,
    which derives from BaseException (so `except Exception` and the CLI's error handling would miss it):
    it becomes one line naming the ranks and their errors, a `UserError` when they are all OSErrors (a full
    disk, a missing or unreadable file), a RuntimeError otherwise. The original stays chained."""
    import warnings

    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # said even when no_dist is asked for: one process is meant here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            return call()
    except CheckpointException as e:
        errors = {rank: exc for rank, (exc, _) in e.failures.items()}
        detail = "; ".join(f"rank {r}: {type(x).__name__}: {x}" for r, x in sorted(errors.items()))
        kind = UserError if all(isinstance(x, OSError) for x in errors.values()) else RuntimeError
        raise kind(f"cannot {what} ({detail})") from e


FILE_BYTES = 64 << 20  # about this much of a rank's share per file
MAX_FILES_PER_RANK = 64


def _files_of(tensors: dict[str, torch.Tensor], world: int) -> dict[str, int]:
    """Tensor name -> file number (1..n) for each rank's part, balanced by the tensors' whole sizes, which
    every rank knows alike (the writer takes rank 0's table for all). Why several files per rank: DCP's
    safetensors writer builds each file in memory before writing it (and may copy a slice first), so one
    file per rank would cost a rank up to twice its whole share at once (measured: +370 MB on rank 0 for
    preset `base` on 2 processes); files of ~64 MB bound that (to ~10 MB there, its tensors being smaller)."""
    size = {k: t.numel() * t.element_size() for k, t in tensors.items()}  # DTensors: the whole tensor's
    share = sum(size.values()) / max(world, 1)
    n = max(1, min(MAX_FILES_PER_RANK, len(size), math.ceil(share / FILE_BYTES)))
    load, out = [0] * n, {}
    for name in sorted(size, key=lambda k: (-size[k], k)):  # largest first, each into the emptiest file
        i = min(range(n), key=load.__getitem__)
        out[name] = i + 1
        load[i] += size[name]
    return out


def write_shards(directory: Path, optimizer: torch.optim.Optimizer, dist: Dist) -> None:
    """Every rank: write this rank's optimizer slices into `directory` (a collective)."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save

    tensors = _optimizer_tensors(optimizer)
    writer = HuggingFaceStorageWriter(str(directory), save_distributed=True,
                                      fqn_to_index_mapping=_files_of(tensors, dist.world_size))
    _dcp(lambda: save(tensors, storage_writer=writer, no_dist=not dist.active),
         f"write the sharded optimizer state in {directory.parent.parent.parent}")


PROBE = ".shared-fs-probe-{}"  # in the staging directory, removed before the commit
_NOT_SHARED: set[str] = set()  # checkpoint directories some rank could not see rank 0's staging in


def _sees(staging: Path, nonce: int) -> bool:
    """Whether this rank sees rank 0's probe file (so shards written here land where rank 0 commits them)."""
    try:
        return (staging / PROBE.format(nonce)).read_text() == str(nonce)
    except OSError:
        return False


def _notice(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _all_see(dist: Dist, staging: Path, nonce: int, key: str) -> bool:
    """Every rank: whether every rank sees rank 0's staging directory (one all-reduce). If one cannot (several
    machines without a shared file system), its shards would be written to its own disk and never committed:
    this save and the run's later ones gather the optimizer state on rank 0 instead (the whole layout)."""
    (blind,) = dist.sum([0.0 if _sees(staging, nonce) else 1.0])
    if blind:
        _NOT_SHARED.add(key)
        if dist.is_main:
            _notice(f"note: {int(blind)} of {dist.world_size} processes cannot see {staging.parent} (no shared file "
                    f"system), so rank 0 gathers and writes the whole optimizer state at every save")
    return not blind


def _gather_whole(optimizer: torch.optim.Optimizer, dist: Dist) -> WholeOptimizerState | None:
    """Every rank (a collective per tensor, in the same order everywhere): the whole optimizer state on rank 0,
    in `optimizer.state_dict()`'s layout, None on the others. Rank 0 then holds all of it, as TP's saves do."""
    from torch.distributed.tensor import DTensor

    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in _optimizer_tensors(optimizer).items():
        whole = t.full_tensor() if isinstance(t, DTensor) else t
        if dist.is_main:
            _, idx, key = name.split(".", 2)
            per_param.setdefault(int(idx), {})[key] = whole.detach().cpu()
    if not dist.is_main:
        return None
    return WholeOptimizerState({"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]})


def _check_cover(meta: dict, expected: dict[str, list[int]], what: str, directory: Path) -> None:
    """Every tensor of `expected` (name -> whole shape) is in `meta` (DCP metadata rebuilt from the safetensors
    headers) whole: its stored pieces add up to its shape. Else one line naming the first gap."""
    missing = sorted(set(expected) - set(meta))
    if missing:
        raise UserError(f"{what} is incomplete: {missing[0]} (and {len(missing) - 1} more) missing from {directory}")
    for name, size in expected.items():
        md = meta[name]
        stored = sum(math.prod(c.sizes) for c in md.chunks)  # chunks never overlap: each rank wrote its own
        if list(md.size) != list(size) or stored != math.prod(size):
            raise UserError(f"{what} is incomplete: {stored} of the {math.prod(size)} values of {name} are in "
                            f"{directory}")


def _staged_meta(directory: Path, what: str) -> dict:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    try:
        return HuggingFaceStorageReader(str(directory)).read_metadata().state_dict_metadata
    except (OSError, ValueError, RuntimeError) as e:  # an unreadable or torn file (safetensors says which)
        raise UserError(f"{what}: cannot read {directory}: {e}") from None


def save_sharded(checkpointer: Checkpointer, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 param_names: list[str], state: dict[str, Any], dist: Dist) -> None:
    """Every rank: one checkpoint, the weights gathered and written whole by rank 0, the optimizer state
    written by every rank into rank 0's staging directory; rank 0 commits after all have written.

    Before writing, the ranks check that they all see rank 0's staging directory (a probe file rank 0 writes
    there, named by a nonce the ranks learn in the same all-reduce that says the directory is open). Where
    one cannot, this save and the run's later ones write the whole layout instead (`_all_see`); and rank 0
    checks the staged shard headers cover every tensor before it commits, in case a probe was fooled."""
    key = str(Path(checkpointer.directory).resolve())
    if key in _NOT_SHARED:  # found before: gather on rank 0 as tensor parallelism does
        full, whole_optim = dist.full_state_dict(model), _gather_whole(optimizer, dist)
        if dist.is_main:
            with torch.device("meta"):
                whole = GPT(model.config)
            whole.load_state_dict(full, assign=True)
            checkpointer.save(whole, whole_optim, param_names, state)
        return
    full = dist.full_state_dict(model)  # a collective: the weights only, on rank 0
    if not dist.is_main:
        staging = Path(checkpointer.directory) / STAGING
        nonce = _agree(dist, True, "open the checkpoint")  # wait for rank 0's staging directory and probe
        if _all_see(dist, staging, nonce, key):
            write_shards(staging / TRAINER_STATE / SHARDS_DIR, optimizer, dist)
        else:
            _gather_whole(optimizer, dist)
        return
    groups = optimizer.state_dict()["param_groups"]  # hyperparameters and numbering only: JSON
    opened = False

    def write_state(staging: Path) -> None:
        nonlocal opened
        nonce = secrets.randbits(48) + 1
        probe = staging / PROBE.format(nonce)
        try:
            probe.write_text(str(nonce))
            problem = None
        except OSError as e:
            problem = e
        opened = True
        _agree(dist, problem is None, "open the checkpoint", nonce)
        if problem is not None:
            raise UserError(f"cannot write to {staging}: {problem.strerror or problem}")
        try:
            shared = _all_see(dist, staging, nonce, key)
        finally:
            try:
                probe.unlink(missing_ok=True)  # not part of the checkpoint
            except OSError:
                pass  # a stray file in the checkpoint is better than the other ranks left waiting
        if not shared:
            write_trainer_state(staging, _gather_whole(optimizer, dist), param_names, state)
            return
        d = staging / TRAINER_STATE
        write_shards(d / SHARDS_DIR, optimizer, dist)  # returns once every rank's write has returned
        expected = {k: list(v.shape) for k, v in sorted(_optimizer_tensors(optimizer).items())}
        what = (f"cannot save the checkpoint in {checkpointer.directory} (do all processes see it on one shared "
                f"file system?): the optimizer state the ranks staged")
        if expected:  # before the first step there are no moments, and so no files
            _check_cover(_staged_meta(d / SHARDS_DIR, what), expected, what, d / SHARDS_DIR)
        save_tensors(d / RNG_FILE, rng_state_tensors())
        atomic_write_json(d / "state.json", {**state, "param_names": param_names, "param_groups": groups,
                                             "optimizer_shards": SHARDS_DIR, "tensors_file": RNG_FILE,
                                             "optimizer_tensors": expected})

    try:
        with torch.device("meta"):  # no second copy of the weights: the module takes the gathered tensors as they are
            whole = GPT(model.config)
        whole.load_state_dict(full, assign=True)
        del full
        checkpointer.save(whole, None, param_names, state, trainer_state=write_state)
    except BaseException:
        if not opened:  # the others are waiting to hear that the staging directory exists
            _agree(dist, False, "open the checkpoint")
        raise


def _read_tensors(directory: Path, params: list[torch.Tensor], as_shards: bool, what: str,
                  expected: dict[str, list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Read every `optim.*` tensor stored in `directory` (shards, or one whole file): into DTensors shaped
    like their parameters when `as_shards` (each rank reads its own slice), into whole tensors otherwise.
    `expected`: name -> whole shape, as the save wrote them (state.json), so a lost file is an error, not a
    silent gap (the reader would take the slices it finds for the whole tensor)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load
    from torch.distributed.tensor import DTensor

    if expected == {}:  # saved before the first step: no moments yet (and so no files)
        return {}
    reader = HuggingFaceStorageReader(str(directory))
    try:
        meta = reader.read_metadata().state_dict_metadata
    except (OSError, ValueError, RuntimeError) as e:  # an unreadable or torn file (safetensors says which)
        raise UserError(f"{what}: cannot read {directory}: {e}") from None
    _check_cover(meta, expected or {}, what, directory)
    targets: dict[str, torch.Tensor] = {}
    for name, md in meta.items():
        if not name.startswith("optim."):
            continue  # the whole layout keeps the RNG states in the same file
        idx = int(name.split(".")[1])
        if idx >= len(params):
            raise UserError(f"{what}: {name} belongs to a parameter this model does not have")
        size = list(expected[name]) if expected else list(md.size)
        stored = sum(math.prod(c.sizes) for c in md.chunks)  # chunks never overlap: each rank wrote its own
        if list(md.size) != size or stored != math.prod(size):
            raise UserError(f"{what} is incomplete: {stored} of the {math.prod(size)} values of {name} are in "
                            f"{directory}")
        p = params[idx]
        dtype = md.properties.dtype
        if as_shards and isinstance(p, DTensor) and tuple(md.size) == tuple(p.shape):
            targets[name] = torch.zeros_like(p, dtype=dtype)
        else:
            targets[name] = torch.zeros(md.size, dtype=dtype)
    _dcp(lambda: load(targets, storage_reader=reader, no_dist=not as_shards), f"read {what}")
    return targets


def restore_optimizer_state(run_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            state: dict[str, Any], tensors: dict[str, torch.Tensor], dist: Dist) -> None:
    """Load the optimizer state of the checkpoint in `run_dir` (either layout) into `optimizer` (built on the
    bare `model`), for any strategy and process count. `state`, `tensors`: what `read_trainer_state` returned.

    FSDP2 reads its own slices of either layout through DCP (no rank holds the whole state). Other strategies
    need the whole tensors: from the whole file as read, or assembled from the shards."""
    d = Path(run_dir) / TRAINER_STATE
    source = d / SHARDS_DIR if is_sharded(state) else d  # read_trainer_state refused any other name
    what = f"the trainer state in {Path(run_dir)}"
    expected = state.get("optimizer_tensors")
    if dist.strategy == "fsdp":
        read = _read_tensors(source, _ordered_params(optimizer), dist.active, what, expected)
        restore_optimizer(optimizer, state, read)
        return
    if is_sharded(state):
        tensors = _read_tensors(source, _ordered_params(optimizer), False, what, expected)
    if dist.gathers:  # tensor parallelism: each rank keeps the slice of the whole state its weights have
        whole = WholeOptimizerState()
        restore_optimizer(whole, state, tensors)
        dist.load_full_optimizer_state(model, optimizer, whole.state)
    else:
        restore_optimizer(optimizer, state, tensors)
