"""Pipeline parallelism (`--parallel pp=N`, lmforge.train.pipeline): the stages chained on one process compute
GPT.forward's logits; PP=2 on 2 CPU processes with gloo trains as one process does on the same global batch
(losses within 1e-5, the same final weights), its checkpoints resume on one process and the other way round;
and a split the model cannot take is one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import free_port, run_cli
from tests.train.tiny_runs import fit_tiny
from lmforge.config import ModelConfig
from lmforge.loaders.model_dir import load_model
from lmforge.model.gpt import GPT
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import Dist, setup
from lmforge.train.pipeline import StageModule, stage_blocks

# grad_accum 2 = pp: the 1F1B schedule; the resumed runs (grad_accum 1 < pp) take GPipe's path
UNTIED = dict(n_layers=3, tie_embeddings=False)
SMALL = dict(vocab_size=96, context_length=16, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64)


def test_stage_blocks_split_evenly_spares_first():
    assert [list(stage_blocks(7, 3, s)) for s in range(3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [list(stage_blocks(2, 2, s)) for s in range(2)] == [[0], [1]]


@pytest.mark.parametrize("flavour", [
    dict(),  # Llama-like: RoPE, RMSNorm, SwiGLU, tied
    dict(norm="layernorm", mlp="gelu", positions="learned", attention_bias=True, mlp_bias=True, tie_embeddings=False),
    dict(positions="sinusoidal", mlp="geglu"),
    dict(sliding_window=4, sliding_layers=[0, 2], rope_local_theta=1000.0, final_softcap=30.0, attn_softcap=50.0,
         embed_scale=True, norm_offset=True, post_norms=True, qk_norm=True),
    dict(rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                       "original_max_position_embeddings": 8}, head_dim=8),
])
def test_stages_chained_compute_gpt_forward(flavour):
    """StageModule re-states GPT.forward's training path: chained, the stages give the same logits."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL, n_layers=4, **flavour)).eval()
    idx = torch.randint(0, SMALL["vocab_size"], (2, 16))
    with torch.no_grad():
        want = model(idx)
        for stages in (2, 3):
            h = idx
            for s in range(stages):
                h = StageModule(model, s, stages)(h)
            torch.testing.assert_close(h, want, rtol=0, atol=0)


def _fit(out: Path, tokenizer, data_args, dist: Dist, *, resume_to: int | None = None, steps: int = 20,
         **shape) -> list[float]:
    """`steps` steps of the tiny model (its `shape` changed), or with `resume_to` the run in `out` continued
    to that step, one micro-batch a step; returns the per-step losses, then the validation losses (every
    rank reports the same ones)."""
    more = dict(max_steps=resume_to, grad_accum=1, batch_size=8) if resume_to else dict(max_steps=steps)
    return fit_tiny(out, tokenizer, data_args, dist, resume_to=resume_to, shape=shape, eval_interval=10,
                    record=("loss", "val_loss"), **more)


def _worker(rank: int, world: int, port: int, root: str, data_args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on a small machine: no oversubscription
    tokenizer = Tokenizer.load(Path(root) / "tok")
    dist, _ = setup(f"pp={world}", torch.device("cpu"))
    try:
        losses = _fit(Path(root) / "pp", tokenizer, data_args, dist)
        (Path(root) / f"pp.{rank}.json").write_text(json.dumps(losses))
        # the single-process run's checkpoint, continued on two stages
        losses = _fit(Path(root) / "resumed-pp", tokenizer, data_args, dist, resume_to=24)
        (Path(root) / f"resumed-pp.{rank}.json").write_text(json.dumps(losses))
        # untied embeddings, and 3 blocks cut unevenly (2 + 1)
        losses = _fit(Path(root) / "untied-pp", tokenizer, data_args, dist, steps=4, **UNTIED)
        (Path(root) / f"untied-pp.{rank}.json").write_text(json.dumps(losses))
    finally:
        dist.close()


def test_pp2_matches_one_process_and_resumes_across(tmp_path, tiny_tokenizer, corpus_file):
    import torch.multiprocessing as mp

    tiny_tokenizer.save(tmp_path / "tok")
    data_args = (str(corpus_file), tiny_tokenizer, tmp_path / "cache")
    single = _fit(tmp_path / "single", tiny_tokenizer, data_args, Dist())
    assert len(single) == 22  # 20 steps, 2 evaluations
    shutil.copytree(tmp_path / "single", tmp_path / "resumed-pp")
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), data_args), nprocs=2, join=True)
    for rank in (0, 1):  # the reported losses are the last stage's, the same on every rank
        losses = json.loads((tmp_path / f"pp.{rank}.json").read_text())
        assert len(losses) == 22
        worst = max(abs(a - b) for a, b in zip(single, losses))
        assert worst <= 1e-5, (rank, worst)
    reference = load_model(tmp_path / "single").state_dict()
    weights = load_model(tmp_path / "pp").state_dict()  # the whole HF directory rank 0 wrote
    assert weights.keys() == reference.keys()
    for name, w in reference.items():
        torch.testing.assert_close(weights[name], w, atol=1e-5, rtol=1e-4, msg=name)
    # Checkpoints are whole: PP=2 -> one process and one process -> PP=2 both continue the one-process curve.
    after_single = _fit(tmp_path / "single", tiny_tokenizer, data_args, Dist(), resume_to=24)[20:]
    after_pp = _fit(tmp_path / "pp", tiny_tokenizer, data_args, Dist(), resume_to=24)[20:]
    on_pp = json.loads((tmp_path / "resumed-pp.0.json").read_text())[20:]
    assert len(after_single) == len(after_pp) == len(on_pp) == 4 + 3  # 4 steps; evaluations at 10, 20, 24
    assert max(abs(a - b) for a, b in zip(after_single, after_pp)) <= 1e-5
    assert max(abs(a - b) for a, b in zip(after_single, on_pp)) <= 1e-5
    untied = _fit(tmp_path / "untied", tiny_tokenizer, data_args, Dist(), steps=4, **UNTIED)
    untied_pp = json.loads((tmp_path / "untied-pp.1.json").read_text())
    assert len(untied) == len(untied_pp) == 5
    assert max(abs(a - b) for a, b in zip(untied, untied_pp)) <= 1e-5
    weights, reference = load_model(tmp_path / "untied-pp").state_dict(), load_model(tmp_path / "untied").state_dict()
    for name, w in reference.items():
        torch.testing.assert_close(weights[name], w, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("argv, says", [
    (["--parallel", "pp=4", "--nproc", "4"], "pp=4 stages need at least one block each, and the model has 2 layers"),
    (["--preset", "moe-small", "--parallel", "pp=2", "--nproc", "2"],
     "mixture-of-experts models are not split into pipeline stages"),
])
def test_bad_pipeline_splits_are_one_line(capsys, tmp_path, corpus_file, argv, says):
    code, _, err = run_cli(capsys, "pretrain", "--preset", "tiny", "--data", corpus_file, "--vocab-size", "320",
                           "--context-length", "32", "--out", tmp_path / "x", *argv)
    assert code == 2
    assert says in err and len(err.strip().splitlines()) == 1, err
