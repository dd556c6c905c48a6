"""`lmforge bench` on a tiny model: it runs, its JSON has every figure with a sane value, and bad input is
one line with exit code 2. Speeds are never asserted, only that they are measured (positive, finite)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import save_tiny_model, run_cli
from lmforge import bench
from lmforge.footprint import weights_bytes


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("bench") / "tiny", tiny_tokenizer, context_length=64)


@pytest.fixture
def keep_threads():
    """`--threads` sets PyTorch's thread count for the process: give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


run = run_cli  # (code, out, err) of an in-process lmforge run, from conftest


def test_json_has_every_figure_with_a_sane_value(capsys, tiny_model, keep_threads):
    code, out, err = run(capsys, "bench", tiny_model, "--json", "--threads", "1", "--prompt-tokens", "1000",
                         "--decode-tokens", "6", "--batch", "1,3")
    assert code == 0, err
    assert err.splitlines()[0].startswith("lmforge bench: loading")  # the notice, before the slow part
    r = json.loads(out)
    assert set(r) == {"model", "device", "dtype", "threads", "weights_bytes", "prompt_tokens", "prefill_tok_s",
                      "ttft_s", "rss_after_load_bytes", "peak_rss_bytes", "bandwidth_bytes_s", "decode"}
    assert r["device"] == "cpu" and r["dtype"] == "auto" and r["threads"] == 1
    assert r["prompt_tokens"] == 63  # 1000 asked, clamped to the context (64) less the token it asks for
    assert r["weights_bytes"] == weights_bytes(tiny_model)
    for k in ("prefill_tok_s", "ttft_s", "bandwidth_bytes_s"):
        assert 0 < r[k] < math.inf, k
    assert abs(r["prefill_tok_s"] * r["ttft_s"] - 63) < 1e-6
    assert 100 << 20 < r["rss_after_load_bytes"] <= r["peak_rss_bytes"] < 64 << 30  # torch alone is >100 MiB
    assert [d["batch"] for d in r["decode"]] == [1, 3]
    for d in r["decode"]:
        assert d["new_tokens"] == 6 and d["prompt_tokens"] == 32
        assert d["tok_s"] > 0 and d["bound_tok_s"] > 0
        assert 0 < d["bandwidth_share_pct"] <= 200
        assert d["bandwidth_share_pct"] == pytest.approx(100 * d["tok_s"] / d["bound_tok_s"])


def test_the_table(capsys, tiny_model, monkeypatch):
    monkeypatch.setattr(bench, "read_bandwidth", lambda device: 10e9)  # the real one is tested above
    code, out, err = run(capsys, "bench", tiny_model, "--decode-tokens", "4", "--batch", "2", "--dtype", "bf16")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert "dtype bf16" in lines[0]
    assert lines[1].split()[:3] == ["prefill", "63", "tokens"] and "time to first token" in lines[1]
    assert lines[2].startswith("  decode b=2") and "% of the bandwidth bound" in lines[2]
    assert "weights" in lines[3] and "peak RSS" in lines[3]
    assert "10.0 GB/s" in lines[4]


def test_bandwidth_bound_is_bandwidth_over_the_bytes_of_a_step():
    # 1 GB/s, 100 MB of weights, 1 kB of KV per position over 1000 positions: 1 row reads 101 MB per token
    assert bench.bandwidth_bound(1e9, 100_000_000, 1_000, 1000, 1) == pytest.approx(1e9 / 101e6)
    # 4 rows share the weights: 4 tokens per 104 MB
    assert bench.bandwidth_bound(1e9, 100_000_000, 1_000, 1000, 4) == pytest.approx(4e9 / 104e6)


def test_random_prompts_are_seeded_and_inside_the_vocabulary():
    a = bench.random_prompts(50, 3, 7, seed=1)
    assert a == bench.random_prompts(50, 3, 7, seed=1) != bench.random_prompts(50, 3, 7, seed=2)
    assert len(a) == 3 and all(len(row) == 7 and all(0 <= i < 50 for i in row) for row in a)


@pytest.mark.parametrize("argv, fragment", [
    (["no-such-model"], "no model named no-such-model"),
    (["./nowhere"], "no such file or directory"),
    (["{model}", "--batch", "0"], "a batch size must be >= 1"),
    (["{model}", "--batch", "1,x"], "expected batch sizes like 1,8"),
    (["{model}", "--decode-tokens", "1"], "expected a number >= 2"),
    (["{model}", "--threads", "0"], "expected a number >= 1"),
    (["{model}", "--dtype", "int3"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2(capsys, tiny_model, argv, fragment):
    code, out, err = run(capsys, "bench", *[a.format(model=tiny_model) for a in argv])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lmforge"), err
    assert fragment in lines[0] and "Traceback" not in err
