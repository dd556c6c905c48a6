"""Four CPU processes with gloo: pipeline parallelism on a 2-D (dp, pp) mesh, with replicas of the pipeline
(`pp=2,dp=2`) and with FSDP2 over dp on every stage (`pp=2,fsdp=2`), each give one process's per-step losses,
validation losses and final weights on the same global batch (tied embeddings: the matrix's gradient is
summed within each pipeline, then averaged across pipelines); their checkpoints resume on one process and
the other way round."""

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

WORLD, PP = 4, 2
# batch 4: two rows per pipeline; grad_accum 2 = pp: the 1F1B schedule, whose first micro-step's backward
# runs without a data-parallel sync
RUNS = {"pp2-dp2": "pp", "pp2-fsdp2": "pp+fsdp"}  # name: strategy


def _fit(out: Path, tokenizer, data_args, dist: Dist, *, resume_to: int | None = None) -> list[float]:
    """20 steps of the tiny model (2 blocks, tied embeddings), or with `resume_to` the run in `out` continued to
    that step; returns the per-step losses, then the validation losses, then the per-step gradient norms (the
    same on every rank: no stage or replica counted twice)."""
    return fit_tiny(out, tokenizer, data_args, dist, resume_to=resume_to, eval_tokens=128, eval_interval=10,
                    record=("loss", "val_loss", "grad_norm"))


def _worker(rank: int, port: int, root: str, data_args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # four processes on a small machine: no oversubscription
    tokenizer = Tokenizer.load(Path(root) / "tok")
    dist, _ = setup("pp=2,dp=2", torch.device("cpu"))
    assert (dist.strategy, dist.data_world, dist.data_rank) == ("pp", 2, rank // PP)
    try:
        for name, strategy in RUNS.items():  # one process group for every run: spawning costs more than training
            run = dataclasses.replace(dist, strategy=strategy)
            losses = _fit(Path(root) / name, tokenizer, data_args, run)
            (Path(root) / f"{name}.{rank}.json").write_text(json.dumps(losses))
            losses = _fit(Path(root) / f"resumed-{name}", tokenizer, data_args, run, resume_to=24)
            (Path(root) / f"resumed-{name}.{rank}.json").write_text(json.dumps(losses))
    finally:
        dist.close()


def test_pp_on_a_2d_mesh_matches_one_process_and_resumes_across(tmp_path, tiny_tokenizer, corpus_file):
    import torch.multiprocessing as mp

    tiny_tokenizer.save(tmp_path / "tok")
    data_args = (str(corpus_file), tiny_tokenizer, tmp_path / "cache")
    single = _fit(tmp_path / "single", tiny_tokenizer, data_args, Dist())
    assert len(single) == 42  # 20 steps, evaluations at 10 and 20, 20 gradient norms
    for name in RUNS:
        shutil.copytree(tmp_path / "single", tmp_path / f"resumed-{name}")
    mp.spawn(_worker, args=(free_port(), str(tmp_path), data_args), nprocs=WORLD, join=True)

    reference = load_model(tmp_path / "single").state_dict()
    for name in RUNS:
        for rank in range(WORLD):  # every rank of every pipeline reports the global mean
            losses = json.loads((tmp_path / f"{name}.{rank}.json").read_text())
            assert len(losses) == 42
            worst = max(abs(a - b) for a, b in zip(single, losses))
            assert worst <= 1e-5, (name, rank, worst)
        weights = load_model(tmp_path / name).state_dict()  # the whole model rank 0 wrote
        assert weights.keys() == reference.keys()
        for key, w in reference.items():
            torch.testing.assert_close(weights[key], w, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")

    # The checkpoints are whole (weights and optimizer state): a 2-D pipeline run continues on one process, and
    # the single-process run continues on the 2-D pipeline meshes, both on the single-process loss curve.
    after_single = _fit(tmp_path / "single", tiny_tokenizer, data_args, Dist(), resume_to=24)[20:]
    assert len(after_single) == 4 + 3 + 24  # 4 steps; evaluations at 10, 20 (from the history) and 24; the norms
    for name in RUNS:
        after_mesh = _fit(tmp_path / name, tiny_tokenizer, data_args, Dist(), resume_to=24)[20:]
        on_mesh = json.loads((tmp_path / f"resumed-{name}.0.json").read_text())[20:]
        assert len(after_mesh) == len(on_mesh) == len(after_single)
        assert max(abs(a - b) for a, b in zip(after_single, after_mesh)) <= 1e-5, name
        assert max(abs(a - b) for a, b in zip(after_single, on_mesh)) <= 1e-5, name
