"""The mixture-of-experts MLP (`lmforge.model.gpt.MoE`), its load-balancing loss, and training one.

The block is checked against a per-token loop written from the definition and against transformers'
`MixtralSparseMoeBlock` in float32 and bf16 (routing weights in float32, as there); the losses against
transformers' `load_balancing_loss_func` and hand computations; and a tiny MoE trains through the one `fit()`
with the auxiliary loss in its logged total. (Import/export parity: tests/loaders/test_mixtral.py.)
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.data.shards import prepare_data
from lmforge.engine.generate import Engine
from lmforge.engine.sampling import SamplingParams
from lmforge.errors import UserError
from lmforge.model.gpt import GPT, MLP, MoE, router_logits
from lmforge.model.kv_cache import KVCache
from lmforge.presets import get_preset
from lmforge.train import objectives
from lmforge.train.checkpointer import Checkpointer
from lmforge.train.losses import load_balancing_loss, router_z_loss
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.pretrain import WindowBatches

CFG = ModelConfig(vocab_size=97, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                  n_experts=4, experts_per_token=2)


def moe_block(cfg: ModelConfig = CFG, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    block = MoE(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block.eval()


def by_definition(block: MoE, x: torch.Tensor) -> torch.Tensor:
    """The mixture written out token by token: softmax over experts, top k, renormalise, weighted sum."""
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            probs = torch.softmax(block.router(x[b, t]).float(), dim=-1)
            w, e = probs.topk(block.top_k)
            if block.norm_topk_prob:
                w = w / w.sum()
            for weight, expert in zip(w, e):
                out[b, t] += (weight * block.experts[int(expert)](x[b, t][None])[0]).to(x.dtype)
    return out


# ---------------------------------------------------------------------------------------------------
# The block
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_block_equals_the_definition(norm_topk_prob):
    block = moe_block(CFG.replace(norm_topk_prob=norm_topk_prob))
    x = torch.randn(2, 5, CFG.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(block(x), by_definition(block, x), atol=1e-6, rtol=1e-5)
    assert block.router_logits.shape == (10, CFG.n_experts)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 0.0)])
def test_block_equals_transformers_mixtral_block(dtype, atol):
    """Same weights in MixtralSparseMoeBlock: the same output (bit for bit in bf16, where the routing weights
    stay float32 and each expert's weighted output is cast back before it is summed, as there)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    conf = transformers.MixtralConfig(hidden_size=CFG.d_model, intermediate_size=CFG.d_ff, num_local_experts=4,
                                      num_experts_per_tok=2)
    conf._experts_implementation = "eager"  # the reference loop (the default grouped_mm sums in another order)
    theirs = MixtralSparseMoeBlock(conf).eval()
    ours = moe_block()
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.router.weight)
        for e, expert in enumerate(ours.experts):
            theirs.experts.gate_up_proj[e].copy_(expert.fc.weight)  # gate rows then up rows, as our fc
            theirs.experts.down_proj[e].copy_(expert.proj.weight)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    x = torch.randn(2, 7, CFG.d_model, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=atol, rtol=atol)


def test_dense_configs_are_unchanged():
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=4)
    assert cfg.n_experts == 0
    model = GPT(cfg)
    assert type(model.blocks[0].mlp) is MLP and router_logits(model) == []
    assert not any("experts" in k or "router" in k for k in model.state_dict())


def test_parameter_counts_and_active_flops():
    model = GPT(CFG)
    assert CFG.num_params() == model.num_params()
    expert = 3 * CFG.d_model * CFG.d_ff
    assert CFG.num_params() - CFG.num_params(active=True) == CFG.n_layers * 2 * expert  # 2 of 4 experts idle
    dense = CFG.replace(n_experts=0)
    # a token runs through k = 2 experts and the router: twice a dense MLP's matmuls, plus the router's
    assert CFG.flops_per_token() - dense.flops_per_token() == 6 * CFG.n_layers * (expert + CFG.d_model * 4)


@pytest.mark.parametrize("bad, message", [
    (dict(n_experts=-1), "n_experts must be an integer >= 0"),
    (dict(experts_per_token=5), "experts_per_token must be between 1 and n_experts (4), got 5"),
    (dict(experts_per_token=0), "experts_per_token must be between 1 and n_experts"),
    (dict(norm_topk_prob="yes"), "norm_topk_prob must be true or false"),
    (dict(mlp="gelu"), "experts are SwiGLU MLPs"),
])
def test_invalid_expert_configs(bad, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CFG.replace(**bad)


def test_cached_decoding_and_engine_paths_agree(tiny_tokenizer):
    cfg = CFG.replace(vocab_size=tiny_tokenizer.vocab_size)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else None
    idx = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(cfg, 2)
        steps = [model(idx[:, :5], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(5, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)  # logits up to ~10 here

    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    prompts = [idx[0, :9].tolist(), idx[1, :4].tolist()]  # left-padded together in one batch
    slow = [c.ids for c in Engine(model, tiny_tokenizer, fast=False).complete(prompts, params)]
    for prompt, got in zip(prompts, slow):  # each equals greedy decoding by full recomputation, alone
        x = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(8):
                x = torch.cat([x, model(x)[:, -1:].argmax(-1)], 1)
        assert got == x[0, len(prompt):].tolist()
        assert len(set(got)) > 2
    # the CLI's and server's default: the fast matrix-vector kernels swapped into every Linear, experts too
    assert [c.ids for c in Engine(model, tiny_tokenizer, fast=True).complete(prompts, params)] == slow


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------
def test_load_balancing_loss_by_hand():
    ln3 = math.log(3)
    logits = torch.tensor([[ln3, 0.0], [0.0, ln3], [ln3, 0.0]])
    assert load_balancing_loss(logits, 2, 1).item() == pytest.approx(19 / 18, abs=1e-6)  # the docstring's example
    assert load_balancing_loss(torch.zeros(6, 4), 4, 1).item() == pytest.approx(1.0)  # balanced: 1 per unit of k
    even = torch.tensor([[5.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 5.0]])
    assert load_balancing_loss(even, 4, 2).item() == pytest.approx(2.0, abs=1e-4)  # spread evenly: k
    assert router_z_loss(torch.zeros(1, 2)).item() == pytest.approx(math.log(2) ** 2)


def test_load_balancing_loss_equals_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(2 * 9, 8, generator=g) * 2 for _ in range(3))
    mask = torch.rand(2, 9, generator=g) > 0.3
    for k in (1, 2, 3):
        torch.testing.assert_close(load_balancing_loss(layers, 8, k), load_balancing_loss_func(layers, 8, k))
        torch.testing.assert_close(load_balancing_loss(layers, 8, k, mask=mask),
                                   load_balancing_loss_func(layers, 8, k, mask.long()))
    # and what MixtralForCausalLM itself reports as aux_loss for a batch
    torch.manual_seed(0)
    conf = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    ref = transformers.AutoModelForCausalLM.from_config(conf).eval()
    out = ref(torch.randint(0, 64, (2, 11), generator=g), output_router_logits=True)
    torch.testing.assert_close(load_balancing_loss(out.router_logits, 4, 2), out.aux_loss)


def test_the_router_learns_from_the_aux_loss():
    block = moe_block().train()
    x = torch.randn(3, 4, CFG.d_model, generator=torch.Generator().manual_seed(2))
    block(x)
    load_balancing_loss([block.router_logits], CFG.n_experts, CFG.experts_per_token).backward()
    assert block.router.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in block.experts.parameters())  # the loss is the router's alone


# ---------------------------------------------------------------------------------------------------
# Training through fit()
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_data(tmp_path_factory, tiny_tokenizer, corpus_file):
    return prepare_data(str(corpus_file), tiny_tokenizer, tmp_path_factory.mktemp("cache"), show_progress=False)


def test_pretraining_a_tiny_moe(tmp_path, tiny_tokenizer, token_data):
    cfg = get_preset("tiny", vocab_size=tiny_tokenizer.vocab_size, context_length=32, d_ff=64, n_experts=4)
    tc = TrainConfig(max_steps=16, batch_size=4, lr=1e-2, warmup_steps=2, eval_interval=16, log_interval=1,
                     save_interval=0, seed=7, router_aux_loss_coef=0.02)
    torch.manual_seed(tc.seed)
    model = GPT(cfg)
    data = WindowBatches(token_data, batch_size=4, block_size=32, grad_accum=1, seed=7, eval_tokens=1024,
                         device=torch.device("cpu"))
    objective = objectives.Pretrain(tc.router_aux_loss_coef, tc.router_z_loss_coef)
    result = fit(model, objective, data, tc, Checkpointer(tmp_path / "run", tokenizer=tiny_tokenizer), progress=False)
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logs if "loss" in r]
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 1.0  # it learns
    for r in train:  # the logged loss is the total the optimiser saw: cross-entropy + coef * balance
        assert r["aux_loss"] >= 2.0 - 1e-3  # k = 2 at best balance
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.02 * r["aux_loss"], abs=1e-5)
    val = [r for r in logs if "val_loss" in r][-1]
    assert "val_aux_loss" not in val and val["val_ppl"] == pytest.approx(math.exp(val["val_loss"]))
    assert result.val_loss == pytest.approx(val["val_loss"])
    # the checkpoint is a Mixtral directory
    assert json.loads((tmp_path / "run" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]


def test_pretrain_objective_adds_router_losses_only_when_training():
    torch.manual_seed(0)
    model = GPT(CFG)
    batch = (torch.randint(0, CFG.vocab_size, (2, 8)), torch.randint(0, CFG.vocab_size, (2, 8)))
    loss, m = objectives.Pretrain(0.5, 0.25)(model.train(), batch)
    assert set(m) == {"lm_loss", "aux_loss", "z_loss"}
    torch.testing.assert_close(loss.detach(), m["lm_loss"] + 0.5 * m["aux_loss"] + 0.25 * m["z_loss"])
    with torch.no_grad():
        loss_eval, m_eval = objectives.pretrain(model.eval(), batch)
    assert m_eval == {} and loss_eval.item() == pytest.approx(m["lm_loss"].item(), abs=1e-6)
    dense = GPT(CFG.replace(n_experts=0)).train()
    assert objectives.pretrain(dense, batch)[1] == {}
