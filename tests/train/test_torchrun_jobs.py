"""torchrun jobs as users start them by hand: two "nodes" over 127.0.0.1 (`--nnodes 2 --node-rank R`, both on this
machine), and `--max-restarts`: a worker killed mid-run makes torchrun restart the job, which continues from its
own last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, pid_of_rank, wait_until

TINY = ["--preset", "tiny", "--vocab-size", "320", "--context-length", "32", "--batch-size", "2", "--eval-tokens", "256",
        "--samples", "0", "--seed", "3", "--lr", "3e-3", "--warmup-steps", "1"]


def _env(tmp_path) -> dict[str, str]:
    return {**os.environ, "TQDM_DISABLE": "1", "LMFORGE_TEST_RUN": str(tmp_path)}


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def test_two_nodes_over_loopback_match_one_process(tmp_path, corpus_file):
    env = _env(tmp_path)
    steps = ["--max-steps", "4", "--eval-interval", "4", "--log-interval", "1", "--data", str(corpus_file)]
    one = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", *TINY, *steps, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)  # also prepares the tokenizer and shards
    assert one.returncode == 0, one.stderr[-3000:]
    port = str(free_port())
    nodes = [subprocess.Popen(_torchrun("--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1",
                                        "--master-addr", "127.0.0.1", "--master-port", port,
                                        "-m", "lmforge", "pretrain", "--parallel", "ddp", *TINY, *steps,
                                        "--out", str(tmp_path / "two")),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        results = [n.communicate(timeout=300) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    for n, (_, err) in zip(nodes, results):
        assert n.returncode == 0, err[-3000:]
    assert results[0][0].count("done: step 4") == 1 and "done:" not in results[1][0]  # the global rank 0 reports
    single, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4]
    assert max(abs(single[s] - two[s]) for s in single) <= 1e-5


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
def test_max_restarts_continue_from_the_last_checkpoint(tmp_path, corpus_file):
    out = tmp_path / "run"
    proc = subprocess.Popen(_torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                                      "-m", "lmforge", "pretrain", "--parallel", "ddp", *TINY, "--data", str(corpus_file),
                                      "--max-steps", "100000", "--eval-interval", "100000", "--log-interval", "1",
                                      "--save-interval", "2", "--out", str(out)),
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = out / "trainer_state" / "state.json"

    def saved_step() -> int:
        try:
            return json.loads(state.read_text())["step"]
        except (OSError, ValueError):
            return 0

    try:
        assert wait_until(lambda: saved_step() >= 2 or proc.poll() is not None, timeout=180), "no checkpoint was saved"
        first = pid_of_rank(str(tmp_path), 1)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        # torchrun restarts both workers; they continue from the checkpoint and save again further on
        assert wait_until(lambda: (pid_of_rank(str(tmp_path), 1) not in (None, first) and saved_step() >= 8)
                          or proc.poll() is not None, timeout=240), "the restarted job did not continue"
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        proc.send_signal(signal.SIGTERM)  # the restarted workers save and stop, as one process does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "torchrun restarted the workers (restart 1): continuing" in err, err[-3000:]
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 8  # no step lost or counted twice
