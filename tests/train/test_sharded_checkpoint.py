"""Sharded trainer state (lmforge.train.sharded_state) on 2 CPU processes with gloo: FSDP2 ranks write their
own optimizer slices through DCP as safetensors (no pickle); the checkpoint resumes on 2 processes, on 1,
and under tensor parallelism, continuing the single-process loss curve; a rank that fails or dies in the
middle of a save leaves the previous checkpoint as it was."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from conftest import free_port
from lmforge.checkpoint import read_trainer_state
from lmforge.data.shards import prepare_data
from lmforge.errors import UserError
from lmforge.loaders.model_dir import load_model
from lmforge.model.gpt import GPT
from lmforge.presets import get_preset
from lmforge.tokenizer import Tokenizer
from lmforge.train import objectives
from lmforge.train.checkpointer import Checkpointer
from lmforge.train.distributed import Dist, setup, wrap
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.pretrain import WindowBatches

# lr_decay_steps is fixed, so a run to step 10 and a run to step 20 follow the same schedule
RECIPE = dict(batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=2, lr_decay_steps=24, eval_interval=1000,
              log_interval=1, seed=7)


def _fit(out: Path, tokenizer, data_args, dist: Dist, *, max_steps: int, save_interval: int = 0,
         resume: bool = False, losses: list[float] | None = None) -> list[float]:
    """The tiny model trained (or, with `resume`, the run in `out` continued) to `max_steps`; returns the
    losses of the steps this call ran, also appended to `losses` as they are logged (so a caller keeps them
    when a save fails)."""
    token_data = prepare_data(*data_args, show_progress=False)
    tc = TrainConfig(**RECIPE, max_steps=max_steps, save_interval=save_interval)
    torch.manual_seed(tc.seed)
    if resume:
        model = load_model(out).train()
    else:
        model = GPT(get_preset("tiny", vocab_size=tokenizer.vocab_size, context_length=32, dropout=0.0))
    batches = WindowBatches(token_data, batch_size=tc.batch_size, block_size=32, grad_accum=tc.grad_accum,
                            seed=tc.seed, eval_tokens=256, device=torch.device("cpu"), rank=dist.data_rank,
                            world_size=dist.data_world)
    losses = [] if losses is None else losses
    fit(wrap(model, dist), objectives.pretrain, batches, tc, Checkpointer(out, tokenizer=tokenizer), progress=False,
        dist=dist, resume=resume, on_log=lambda rec: losses.append(rec["loss"]) if "loss" in rec else None)
    return losses


def _break_writer(on_call: int, action) -> None:
    """Make this process's `on_call`-th sharded write from now (counting from 1) leave a torn file and run
    `action`; on_call=0 puts the writer back as it was."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    original = HuggingFaceStorageWriter.__dict__.get("_original_write_data", HuggingFaceStorageWriter.write_data)
    HuggingFaceStorageWriter._original_write_data = original
    calls = [0]

    def write_data(self, plan, planner):
        calls[0] += 1
        if calls[0] == on_call:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            (Path(self.path) / "shard-00002-model-00001-of-00001.safetensors").write_bytes(b"\0" * 16)  # a torn file
            action()
        return original(self, plan, planner)

    HuggingFaceStorageWriter.write_data = write_data if on_call else original


def _fail():
    raise OSError("disk full (simulated)")


def _worker(rank: int, world: int, port: int, root: str, data_args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LMFORGE_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    root_p = Path(root)
    tokenizer = Tokenizer.load(root_p / "tok")
    dist, _ = setup("fsdp", torch.device("cpu"))
    report = {}

    # 1. FSDP2, 20 steps, a sharded save at step 10; rank 1 fails in the middle of the save at step 20.
    if rank == 1:
        _break_writer(2, _fail)
    report["losses"] = []
    try:
        _fit(root_p / "fsdp", tokenizer, data_args, dist, max_steps=20, save_interval=10, losses=report["losses"])
    except Exception as e:  # noqa: BLE001 - every rank must see the failure
        report["failed"] = f"{type(e).__name__}: {e}"
    if rank == 1:
        _break_writer(0, None)  # the count restarts; call 0 never comes
    dist.barrier()
    if rank == 0:
        for copy in ("on-one", "on-tp", "killed", "step-10"):
            shutil.copytree(root_p / "fsdp", root_p / copy)
    dist.barrier()

    # 2. the step-10 checkpoint continued on 2 processes: FSDP2 (writing shards again), and tensor parallelism
    report["resumed"] = _fit(root_p / "fsdp", tokenizer, data_args, dist, max_steps=20, resume=True)
    tp = dataclasses.replace(dist, strategy="tp", tp=world)
    report["resumed_tp"] = _fit(root_p / "on-tp", tokenizer, data_args, tp, max_steps=20, resume=True)
    (root_p / f"report.{rank}.json").write_text(json.dumps(report))

    # 3. rank 1 dies in the middle of a save: rank 0's collective fails, the previous checkpoint stays.
    if rank == 1:
        _break_writer(1, lambda: os._exit(0))  # exit code 0: mp.spawn must not take this for the test failing
    try:
        _fit(root_p / "killed", tokenizer, data_args, dist, max_steps=12, resume=True)
        outcome = "saved"
    except Exception as e:  # noqa: BLE001
        outcome = f"{type(e).__name__}: {e}"
    (root_p / f"killed.{rank}.txt").write_text(outcome)
    dist.close()


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in ("metrics.jsonl", "loss.png")}


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_a_transaction_replaces_a_whole_subdirectory(tmp_path):
    """`replace`: files of the old save that the new one did not write go, in the commit (another process
    count's optimizer shards must not stay beside the new ones); other files of the directory stay."""
    from lmforge.checkpoint import transaction

    d = tmp_path / "run"
    with transaction(d) as staging:
        for rel in ("model.safetensors", "trainer_state/optimizer/shard-3.safetensors", "trainer_state/old.json"):
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_text("old")
    with transaction(d, replace=("trainer_state",)) as staging:
        (staging / "trainer_state").mkdir()
        (staging / "trainer_state" / "state.json").write_text("new")
    assert _files(d) == ["model.safetensors", "trainer_state/state.json"]
    assert (d / "trainer_state" / "state.json").read_text() == "new"


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _assert_no_pickle(directory: Path) -> None:
    """Data files only (the trainer state: safetensors and JSON alone), and none starts like a pickle."""
    for p in directory.rglob("*"):
        if p.is_file():
            allowed = (".safetensors", ".json") if "trainer_state" in p.parts else \
                (".safetensors", ".json", ".jsonl", ".png", ".jinja")  # .jinja: the tokenizer's chat template
            assert p.suffix in allowed, p
            assert not p.read_bytes().startswith(b"\x80"), f"{p} looks like a pickle"


def _close(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a, (a, b)
    return max(abs(x - y) for x, y in zip(a, b))


def test_sharded_checkpoint_resumes_on_any_process_count(tmp_path, tiny_tokenizer, corpus_file):
    import torch.multiprocessing as mp

    tiny_tokenizer.save(tmp_path / "tok")
    data_args = (str(corpus_file), tiny_tokenizer, tmp_path / "cache")
    single = _fit(tmp_path / "single", tiny_tokenizer, data_args, Dist(), max_steps=20)
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), data_args), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"report.{r}.json").read_text()) for r in (0, 1)]

    # FSDP2 followed the single-process curve; the save at step 20 failed on every rank, not only on rank 1
    assert _close(single, reports[0]["losses"]) <= 1e-5
    assert "disk full (simulated)" in reports[0]["failed"] and "disk full" in reports[1]["failed"]

    # the failed save left the step-10 checkpoint, sharded: one slice file per rank, JSON and safetensors only
    state, _ = read_trainer_state(tmp_path / "on-one")
    assert state["step"] == 10 and state["optimizer_shards"] == "optimizer"
    assert not (tmp_path / "on-one" / ".staging").exists()
    _assert_no_pickle(tmp_path / "on-one")
    shards = sorted((tmp_path / "on-one" / "trainer_state" / "optimizer").iterdir())
    by_rank = [[p for p in shards if p.name.startswith(f"shard-0000{r + 1}-model-")] for r in (0, 1)]
    assert by_rank[0] and by_rank[1] and len(by_rank[0]) + len(by_rank[1]) == len(shards), shards
    # every first moment is split by rows between the two ranks' files (no rank wrote a whole one), and the
    # pieces with their offsets (in the safetensors headers, JSON) make up the parameters' shapes
    headers, offsets = [{}, {}], [{}, {}]
    for r in (0, 1):
        for p in by_rank[r]:
            h = _header(p)
            offsets[r].update(json.loads(h.pop("__metadata__")["DCP_SHARDING_INFO"]))
            headers[r].update(h)
    whole_shapes = []
    for key in sorted(k for k in headers[0] if k.endswith(".exp_avg")):
        rows = [h[key]["shape"][0] for h in headers]
        assert min(rows) > 0 and offsets[1][key]["saved_offsets"][0] == rows[0], key
        whole_shapes.append([sum(rows), *headers[0][key]["shape"][1:]])
    model = load_model(tmp_path / "on-one")  # the model directory is the usual consolidated one
    assert sorted(whole_shapes) == sorted(list(p.shape) for p in model.parameters())

    # resumed on 2 processes (FSDP2, and tensor parallelism) and on 1: the single-process curve goes on
    assert _close(single[10:], reports[0]["resumed"]) <= 1e-5
    assert _close(single[10:], reports[0]["resumed_tp"]) <= 1e-5
    on_one = _fit(tmp_path / "on-one", tiny_tokenizer, data_args, Dist(), max_steps=20, resume=True)
    assert _close(single[10:], on_one) <= 1e-5
    _assert_no_pickle(tmp_path / "fsdp")  # written again, sharded, at step 20 by the resumed FSDP2 run
    assert read_trainer_state(tmp_path / "fsdp")[0]["step"] == 20
    # a save in the other layout leaves nothing of the previous one beside it
    resaved = sorted(["optimizer/" + p.name for p in shards] + ["rng.safetensors", "state.json"])
    assert _files(tmp_path / "fsdp" / "trainer_state") == resaved
    for whole in ("on-one", "on-tp"):
        assert _files(tmp_path / whole / "trainer_state") == ["optimizer.safetensors", "state.json"], whole

    # a rank killed mid-save: rank 0 failed instead of hanging or committing; the checkpoint is step 10's, byte for byte
    assert (tmp_path / "killed.1.txt").exists() is False
    assert (tmp_path / "killed.0.txt").read_text() != "saved"
    assert not (tmp_path / "killed" / ".staging").exists()
    assert _digest(tmp_path / "killed") == _digest(tmp_path / "step-10")

    # a shard file lost after the fact (a copy made without it): one clear line, not moments silently zero
    next((tmp_path / "step-10" / "trainer_state" / "optimizer").glob("shard-00002-*")).unlink()
    with pytest.raises(UserError, match="incomplete"):
        _fit(tmp_path / "step-10", tiny_tokenizer, data_args, Dist(), max_steps=20, resume=True)


def _blind_worker(rank: int, world: int, port: int, root: str, data_args) -> None:
    """Two cases on 2 FSDP2 processes. 1: rank 1 cannot see rank 0's staging directory (as on another machine
    without a shared file system): the saves fall back to the whole layout, said once. 2: the probe is fooled
    (rank 1 sees the probe but writes its shards elsewhere): rank 0 refuses to commit, and rank 1, whose part
    succeeded, fails too instead of going on."""
    from lmforge.train import sharded_state

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LMFORGE_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    root_p = Path(root)
    tokenizer = Tokenizer.load(root_p / "tok")
    dist, _ = setup("fsdp", torch.device("cpu"))
    report: dict = {"notices": []}
    sharded_state._notice = report["notices"].append
    if rank == 1:
        sharded_state._sees = lambda staging, nonce: False
    report["losses"] = _fit(root_p / "blind", tokenizer, data_args, dist, max_steps=4, save_interval=2)

    if rank == 1:
        sharded_state._sees = lambda staging, nonce: True
        write_shards = sharded_state.write_shards
        sharded_state.write_shards = lambda directory, optimizer, d: write_shards(root_p / "elsewhere", optimizer, d)
    try:
        _fit(root_p / "fooled", tokenizer, data_args, dist, max_steps=2, save_interval=2)
        report["fooled"] = "saved"
    except Exception as e:  # noqa: BLE001 - every rank must fail
        report["fooled"] = f"{type(e).__name__}: {e}"
    (root_p / f"blind.{rank}.json").write_text(json.dumps(report))
    dist.close()


def test_without_a_shared_file_system_saves_fall_back_to_the_whole_layout(tmp_path, tiny_tokenizer, corpus_file):
    import torch.multiprocessing as mp

    tiny_tokenizer.save(tmp_path / "tok")
    data_args = (str(corpus_file), tiny_tokenizer, tmp_path / "cache")
    single = _fit(tmp_path / "single", tiny_tokenizer, data_args, Dist(), max_steps=6)
    mp.spawn(_blind_worker, args=(2, free_port(), str(tmp_path), data_args), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"blind.{r}.json").read_text()) for r in (0, 1)]

    # 1. both saves (steps 2 and 4) wrote the whole layout; rank 0 said why, once; the probe is not kept
    assert len(reports[0]["notices"]) == 1 and "no shared file system" in reports[0]["notices"][0]
    assert reports[1]["notices"] == []
    assert _files(tmp_path / "blind" / "trainer_state") == ["optimizer.safetensors", "state.json"]
    assert not any("probe" in f for f in _files(tmp_path / "blind"))
    assert read_trainer_state(tmp_path / "blind")[0]["step"] == 4
    _assert_no_pickle(tmp_path / "blind")
    # ... and it resumes: the single-process curve goes on
    assert _close(single[:4], reports[0]["losses"]) <= 1e-5
    assert _close(single[4:], _fit(tmp_path / "blind", tiny_tokenizer, data_args, Dist(), max_steps=6,
                                   resume=True)) <= 1e-5

    # 2. shards that did not reach rank 0's staging directory: no commit, and every rank fails with one line
    assert "UserError" in reports[0]["fooled"] and "incomplete" in reports[0]["fooled"], reports[0]["fooled"]
    assert "failed on 1 other process" in reports[1]["fooled"], reports[1]["fooled"]
    assert not (tmp_path / "fooled" / "model.safetensors").exists()
    assert not (tmp_path / "fooled" / ".staging").exists()
