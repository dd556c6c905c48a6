"""The mixture-of-experts presets: `moe-small` (small's compute, 4x its MLP weights) trains from the command
line and plans with its active parameters; `mixtral-8x7b` is Mixtral-8x7B's published shape, counted the
way transformers builds it (46.7B parameters, 12.9B active per token)."""

from __future__ import annotations

import json

import torch

from conftest import run_cli
from lmforge.loaders.hf import MIXTRAL, config_to_hf
from lmforge.model.gpt import GPT
from lmforge.presets import get_preset
from lmforge.train.plan import estimate, format_plan


def mlp_params(cfg) -> int:
    """Parameters in the blocks' MLPs (all experts and the router, for a mixture)."""
    return cfg.num_params() - cfg.replace(n_experts=0, d_ff=1).num_params() + cfg.n_layers * 3 * cfg.d_model


def test_moe_small_is_small_with_experts_at_the_same_compute():
    small, moe = get_preset("small"), get_preset("moe-small")
    same = ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "n_kv_heads", "norm", "mlp", "positions")
    assert all(getattr(small, k) == getattr(moe, k) for k in same)
    assert (moe.n_experts, moe.experts_per_token, moe.d_ff * 2) == (8, 2, small.d_ff)
    router = moe.n_layers * moe.d_model * moe.n_experts
    # per token: small's FLOPs and parameters, plus the router
    assert moe.flops_per_token() == small.flops_per_token() + 6 * router
    assert moe.num_params(active=True) == small.num_params() + router
    # held: four times small's MLP weights (plus the router)
    assert mlp_params(moe) == 4 * mlp_params(small) + router
    assert mlp_params(small) == small.n_layers * 3 * small.d_model * small.d_ff  # (the helper counts right)
    assert moe.num_params() == 16_268_544 and moe.num_params(active=True) == 6_536_448


def test_mixtral_8x7b_preset_is_the_published_shape():
    """Written as a config.json, the planning preset is what transformers builds for Mixtral-8x7B: the same
    parameter count, 46.7B, of which 12.9B run for each token."""
    import transformers

    cfg = get_preset("mixtral-8x7b")
    d = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "lmforge")}
    assert config_to_hf(cfg)["architectures"] == [MIXTRAL]
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(**d))
    assert type(theirs).__name__ == "MixtralForCausalLM"
    assert cfg.num_params() == sum(p.numel() for p in theirs.parameters()) == 46_702_792_704
    assert round(cfg.num_params(active=True) / 1e9, 1) == 12.9
    with torch.device("meta"):
        assert GPT(cfg).num_params() == cfg.num_params()


def test_the_plan_shows_total_and_active_parameters():
    cfg = get_preset("mixtral-8x7b")
    plan = estimate(cfg, batch_size=1, grad_accum=1, max_steps=1)
    assert plan["active_parameters"] == 12_879_925_248
    text = format_plan(cfg, plan)
    assert "8 experts (2 per token)" in text
    assert "46,702,792,704 (46.70G" in text and "active/token   12,879,925,248 (12.88G" in text
    dense = format_plan(get_preset("small"), estimate(get_preset("small"), batch_size=1, grad_accum=1, max_steps=1))
    assert "experts" not in dense and "active" not in dense  # a dense model's plan is as before


def test_moe_small_pretrains_from_the_command_line(capsys, tmp_path):
    """A few seconds on the built-in data: the dry run plans both counts, three steps train with the
    load-balancing loss logged, and the checkpoint is a Mixtral directory named after its preset."""
    argv = ["pretrain", "--preset", "moe-small", "--data", "builtin:pydocs", "--out", tmp_path / "m", "--vocab-size", "512",
            "--context-length", "64", "--max-steps", "3", "--batch-size", "2", "--eval-interval", "3",
            "--eval-tokens", "1024", "--samples", "1", "--sample-tokens", "5", "--no-progress"]
    code, out, err = run_cli(capsys, *argv, "--dry-run")
    assert code == 0, err
    assert "8 experts (2 per token)" in out and "active/token" in out
    assert not (tmp_path / "m").exists()

    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "validation loss" in out and "sample 1" in out
    train = [r for r in map(json.loads, (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert train[-1]["step"] == 3 and train[-1]["aux_loss"] >= 2.0 - 1e-3  # k = 2 at best balance
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == [MIXTRAL] and config["lmforge"]["name"] == "moe-small"
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (8, 2, 352)
