"""Data-parallel (DDP), sharded (FSDP2) and tensor-parallel (TP=2) training on 2 CPU processes with gloo:
the same losses and weights as one process on the same global batch; the CLI's --nproc; bad --parallel specs; a killed rank."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, pid_of_rank, run_cli, wait_until
from tests.train.tiny_runs import fit_tiny
from lmforge.loaders.model_dir import load_model
from lmforge.presets import get_preset
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import Dist, setup

def _fit(out: Path, tokenizer, data_args, dist: Dist, *, resume_to: int | None = None, recompute: bool = False) -> list[float]:
    """20 steps of the tiny model (or, with `resume_to`, the run in `out` continued to that step): the per-step losses."""
    return fit_tiny(out, tokenizer, data_args, dist, resume_to=resume_to, recompute=recompute)


def _worker(rank: int, world: int, port: int, root: str, data_args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on a small machine: no oversubscription
    tokenizer = Tokenizer.load(Path(root) / "tok")
    dist, _ = setup("ddp", torch.device("cpu"))
    try:
        for strategy in STRATEGIES:  # one process group, three runs: spawning costs more than training
            losses = _fit(Path(root) / strategy, tokenizer, data_args,
                          dataclasses.replace(dist, strategy=strategy, tp=world if strategy == "tp" else 1),
                          recompute=strategy != "ddp")  # FSDP2 and TP also with activation checkpointing
            (Path(root) / f"{strategy}.{rank}.json").write_text(json.dumps(losses))
        # and the single-process run's checkpoint continued by FSDP2, and by TP, on two processes
        for strategy, tp in (("fsdp", 1), ("tp", world)):
            losses = _fit(Path(root) / f"resumed-{strategy}", tokenizer, data_args,
                          dataclasses.replace(dist, strategy=strategy, tp=tp), resume_to=24)
            (Path(root) / f"resumed-{strategy}.{rank}.json").write_text(json.dumps(losses))
    finally:
        dist.close()


STRATEGIES = ("ddp", "fsdp", "tp")  # tiny's 4 heads and 2 key/value heads split in two for tp


def test_ddp_fsdp_and_tp_match_one_process(tmp_path, tiny_tokenizer, corpus_file):
    import torch.multiprocessing as mp

    tiny_tokenizer.save(tmp_path / "tok")
    data_args = (str(corpus_file), tiny_tokenizer, tmp_path / "cache")
    single = _fit(tmp_path / "single", tiny_tokenizer, data_args, Dist())
    assert len(single) == 20
    for strategy in ("fsdp", "tp"):
        shutil.copytree(tmp_path / "single", tmp_path / f"resumed-{strategy}")
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), data_args), nprocs=2, join=True)
    reference = load_model(tmp_path / "single").state_dict()
    for strategy in STRATEGIES:
        for rank in (0, 1):  # the reported loss is the global mean, the same on every rank
            losses = json.loads((tmp_path / f"{strategy}.{rank}.json").read_text())
            assert len(losses) == 20
            worst = max(abs(a - b) for a, b in zip(single, losses))
            assert worst <= 1e-5, (strategy, rank, worst)
        weights = load_model(tmp_path / strategy).state_dict()  # the consolidated HF directory rank 0 wrote
        for name, w in reference.items():
            torch.testing.assert_close(weights[name], w, atol=1e-5, rtol=1e-4, msg=f"{strategy}: {name}")
    # Checkpoints hold the whole model and optimizer state, so a run resumes with another process count and
    # continues the single-process loss curve: FSDP2 and TP on 2 -> one process, one process -> FSDP2 and TP on 2.
    after_single = _fit(tmp_path / "single", tiny_tokenizer, data_args, Dist(), resume_to=24)[20:]
    for strategy in ("fsdp", "tp"):
        after_two = _fit(tmp_path / strategy, tiny_tokenizer, data_args, Dist(), resume_to=24)[20:]
        on_two = json.loads((tmp_path / f"resumed-{strategy}.0.json").read_text())[20:]
        assert len(after_two) == len(on_two) == 4
        assert max(abs(a - b) for a, b in zip(after_single, after_two)) <= 1e-5, strategy
        assert max(abs(a - b) for a, b in zip(after_single, on_two)) <= 1e-5, strategy


def _cli_env(tmp_path) -> dict[str, str]:
    return {**os.environ, "LMFORGE_HOME": os.environ["LMFORGE_HOME"], "TQDM_DISABLE": "1", "LMFORGE_TEST_RUN": str(tmp_path)}


def _pretrain_argv(corpus_file, out, *extra) -> list[str]:
    return [sys.executable, "-m", "lmforge", "pretrain", "--nproc", "2", "--parallel", "ddp", "--preset", "tiny",
            "--data", str(corpus_file), "--vocab-size", "320", "--context-length", "32", "--batch-size", "2",
            "--eval-tokens", "256", "--samples", "0", "--out", str(out), *extra]


def test_cli_nproc_ddp_end_to_end(tmp_path, corpus_file):
    out = tmp_path / "run"
    proc = subprocess.run(_pretrain_argv(corpus_file, out, "--max-steps", "3", "--eval-interval", "3", "--log-interval", "1"),
                          env=_cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: step 3") == 1  # rank 0 reports, once
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # one writer
    assert [r for r in records if "loss" in r][-1]["tokens"] == 3 * 2 * 32  # the global batch, whatever the process count
    assert load_model(out).config.n_layers == get_preset("tiny").n_layers


@pytest.mark.parametrize("argv, says", [
    (["--parallel", "tp=2"], "--parallel 'tp=2' uses 2 processes, but --nproc (torchrun's world size) is 1"),
    (["--parallel", "tp=4", "--nproc", "4"], "the model's 2 key/value heads do not divide evenly among tp=4 ranks"),
    (["--parallel", "tp=2,dp=2", "--nproc", "2"], "--parallel 'tp=2,dp=2' uses 4 processes, but --nproc (torchrun's world size) is 2"),
    (["--parallel", "tp=4,fsdp", "--nproc", "8"], "the model's 2 key/value heads do not divide evenly among tp=4 ranks"),
    (["--parallel", "tp=2,dp=2", "--nproc", "4", "--batch-size", "3"], "must divide evenly among 2 data-parallel processes"),
    (["--parallel", "tp=2,pp=2", "--nproc", "4"], "pipeline parallelism combined with tensor parallelism is not available"),
    (["--parallel", "pp=2,dp=2", "--nproc", "4", "--batch-size", "3"], "must divide evenly among 2 data-parallel processes"),
    (["--parallel", "zero3"], "expected ddp, fsdp, or a list of dp=N, fsdp=N, tp=N, pp=N"),
    (["--nproc", "2"], "--parallel ddp, fsdp, tp=2 or pp=2"),
    (["--parallel", "dp=2,fsdp=2", "--nproc", "4"], "replicas of FSDP shards (HSDP"),
    (["--parallel", "ddp", "--backend", "nccl", "--device", "cpu"], "nccl"),
    (["--parallel", "ddp", "--nproc", "2", "--batch-size", "3"], "must divide evenly among 2 data-parallel processes"),
])
def test_bad_parallel_flags_are_one_line(capsys, tmp_path, corpus_file, argv, says):
    code, _, err = run_cli(capsys, "pretrain", "--preset", "tiny", "--data", corpus_file, "--vocab-size", "320",
                           "--context-length", "32", "--out", tmp_path / "x", *argv)
    assert code == 2
    assert says in err and len(err.strip().splitlines()) == 1, err


def _start_long_run(tmp_path, corpus_file, **env) -> tuple[subprocess.Popen, Path]:
    """A 2-process run far longer than the test, returned once it has logged its first step."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_pretrain_argv(corpus_file, out, "--max-steps", "100000", "--eval-interval", "100000",
                                           "--log-interval", "1"),
                            env={**_cli_env(tmp_path), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    if not wait_until(lambda: metrics.is_file() and metrics.stat().st_size > 0 or proc.poll() is not None, timeout=120):
        proc.kill()
        raise AssertionError("training never started")
    return proc, out


def test_sigterm_to_the_launcher_saves_and_exits_0(tmp_path, corpus_file):
    proc, out = _start_long_run(tmp_path, corpus_file)
    try:
        proc.send_signal(signal.SIGTERM)
        stdout, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert stdout.count("stopped early (signal)") == 1 and "--resume" in stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((out / "trainer_state" / "state.json").read_text())["step"] == steps[-1]  # all stopped there
    assert load_model(out) is not None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
def test_a_killed_rank_ends_the_job_with_a_message(tmp_path, corpus_file):
    proc, _ = _start_long_run(tmp_path, corpus_file, LMFORGE_DIST_TIMEOUT="60")
    try:
        pid = pid_of_rank(str(tmp_path), 1)
        assert pid is not None, "no rank 1 worker found"
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)  # ends: no hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode not in (0, None)
    assert "lmforge: error: the 2-process training job failed" in err, err[-3000:]
    root_cause = err[err.index("Root Cause"):]
    assert re.search(r"rank\s*:\s*1 ", root_cause) and "SIGKILL" in root_cause, err[-3000:]


@pytest.mark.parametrize("ok, calls", [(True, ["barrier", "destroy"]), (False, ["destroy"])])
def test_close_after_a_failure_skips_the_barrier(monkeypatch, ok, calls):
    """A rank leaving on an exception must not enter a barrier: it would pair with the barrier another rank
    reaches in its own run, which would then go on as if nothing had failed."""
    from lmforge.train import distributed

    seen = []
    monkeypatch.setattr(distributed.tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.tdist, "barrier", lambda: seen.append("barrier"))
    monkeypatch.setattr(distributed.tdist, "destroy_process_group", lambda: seen.append("destroy"))
    Dist(rank=0, world_size=2, strategy="ddp").close(ok)
    assert seen == calls
