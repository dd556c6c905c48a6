"""Four CPU processes with gloo: tensor parallelism on a 2-D (dp, tp) mesh, with replicas (`tp=2,dp=2`) and with
FSDP2 (`tp=2,fsdp=2`), and plain DDP and FSDP2 over all four, each give one process's per-step losses and final
weights on the same global batch; checkpoints of the 2-D runs resume on one process and the other way round."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from conftest import free_port
from tests.train.tiny_runs import fit_tiny
from lmforge.loaders.model_dir import load_model
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import Dist, setup

WORLD = 4
# batch 4: one row per rank under ddp/fsdp, two per data slice under the 2-D meshes; grad_accum 2 exercises the
# skipped gradient syncs of the first micro-step
RUNS = {"ddp": ("ddp", 1), "fsdp": ("fsdp", 1), "tp2-dp2": ("tp", 2), "tp2-fsdp2": ("tp+fsdp", 2)}  # name: strategy, tp
RESUMED = ("tp2-dp2", "tp2-fsdp2")  # the single-process checkpoint continued on the 2-D meshes


def _fit(out: Path, tokenizer, data_args, dist: Dist, *, resume_to: int | None = None) -> list[float]:
    """20 steps of the tiny model (4 heads, 2 key/value heads: tp=2 splits both), or with `resume_to` the run in
    `out` continued to that step; returns the per-step losses (the global mean, the same on every rank)."""
    return fit_tiny(out, tokenizer, data_args, dist, resume_to=resume_to, eval_tokens=64)


def _worker(rank: int, port: int, root: str, data_args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # four processes on a small machine: no oversubscription
    tokenizer = Tokenizer.load(Path(root) / "tok")
    dist, _ = setup("ddp", torch.device("cpu"))
    try:
        for name, (strategy, tp) in RUNS.items():  # one process group for every run: spawning costs more than training
            losses = _fit(Path(root) / name, tokenizer, data_args, dataclasses.replace(dist, strategy=strategy, tp=tp))
            (Path(root) / f"{name}.{rank}.json").write_text(json.dumps(losses))
        for name in RESUMED:
            strategy, tp = RUNS[name]
            losses = _fit(Path(root) / f"resumed-{name}", tokenizer, data_args,
                          dataclasses.replace(dist, strategy=strategy, tp=tp), resume_to=24)
            (Path(root) / f"resumed-{name}.{rank}.json").write_text(json.dumps(losses))
    finally:
        dist.close()


def test_2d_mesh_and_four_process_runs_match_one_process(tmp_path, tiny_tokenizer, corpus_file):
    import torch.multiprocessing as mp

    tiny_tokenizer.save(tmp_path / "tok")
    data_args = (str(corpus_file), tiny_tokenizer, tmp_path / "cache")
    single = _fit(tmp_path / "single", tiny_tokenizer, data_args, Dist())
    assert len(single) == 20
    for name in RESUMED:
        shutil.copytree(tmp_path / "single", tmp_path / f"resumed-{name}")
    mp.spawn(_worker, args=(free_port(), str(tmp_path), data_args), nprocs=WORLD, join=True)

    reference = load_model(tmp_path / "single").state_dict()
    for name in RUNS:
        for rank in range(WORLD):
            losses = json.loads((tmp_path / f"{name}.{rank}.json").read_text())
            assert len(losses) == 20
            worst = max(abs(a - b) for a, b in zip(single, losses))
            assert worst <= 1e-5, (name, rank, worst)
        weights = load_model(tmp_path / name).state_dict()  # the whole model rank 0 wrote
        for key, w in reference.items():
            torch.testing.assert_close(weights[key], w, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")

    # The checkpoints are whole (weights and optimizer state): a 2-D run continues on one process, and the
    # single-process run continues on the 2-D meshes, both on the single-process loss curve.
    after_single = _fit(tmp_path / "single", tiny_tokenizer, data_args, Dist(), resume_to=24)[20:]
    for name in RESUMED:
        after_mesh = _fit(tmp_path / name, tiny_tokenizer, data_args, Dist(), resume_to=24)[20:]
        on_mesh = json.loads((tmp_path / f"resumed-{name}.0.json").read_text())[20:]
        assert len(after_mesh) == len(on_mesh) == 4
        assert max(abs(a - b) for a, b in zip(after_single, after_mesh)) <= 1e-5, name
        assert max(abs(a - b) for a, b in zip(after_single, on_mesh)) <= 1e-5, name
