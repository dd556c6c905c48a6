"""LoRA on a mixture of experts (lmforge/model/lora.py), in our own names: an expert projection adapts that
projection of every expert, each with its own A and B; the router only when named; exactness of the wrapped
and merged model; a training step that moves only the adapters and lowers the loss. PEFT's names and adapter
files for Mixtral / Qwen3-MoE: tests/loaders/test_peft_moe.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.model.gpt import GPT, router_logits
from lmforge.model.lora import (
    EXPERT_FC,
    EXPERT_PROJ,
    ROUTER,
    LoRALinear,
    apply_lora,
    base_fingerprint,
    has_lora,
    lora_modules,
    lora_parameters,
    lora_parts,
    lora_projections,
    merge_lora,
    module_template,
)
from lmforge.train.losses import load_balancing_loss
from tests.model.test_lora import randomize_lora

V = 97
E = 4  # experts per layer


def moe_cfg(**kw) -> ModelConfig:
    """A tiny Mixtral-shaped model: 4 SwiGLU experts of width 48 (d_model 32), top-2."""
    return ModelConfig(**{**dict(vocab_size=V, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                 d_ff=48, n_experts=E, experts_per_token=2, tie_embeddings=False), **kw})


def moe_model(cfg: ModelConfig | None = None, seed: int = 0) -> GPT:
    """Every weight random and large enough that tokens spread over the experts and the router is decisive
    (GPT-2's init puts every router logit near 0, where the top-2 choice is a coin toss)."""
    torch.manual_seed(seed)
    m = GPT(cfg or moe_cfg()).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.5 if "router" in name else 0.15)
    return m


def ids(batch: int = 2, length: int = 13) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(1))


ALL_BUT_ROUTER = {"attn.qkv": ["q", "k", "v"], "attn.proj": ["o"], EXPERT_FC: ["gate", "up"], EXPERT_PROJ: ["down"]}


def test_what_a_mixture_of_experts_adapts():
    cfg = moe_cfg()
    assert lora_projections(cfg) == ("attn.qkv", "attn.proj", "mlp.router", "mlp.experts.{}.fc", "mlp.experts.{}.proj")
    assert lora_parts(cfg, ROUTER) == [("router", 0, E)]
    assert lora_parts(cfg, EXPERT_FC) == [("gate", 0, 48), ("up", 48, 96)]
    assert lora_parts(cfg, EXPERT_PROJ) == [("down", 0, 32)]
    assert module_template("blocks.1.mlp.experts.3.fc") == EXPERT_FC
    assert module_template("blocks.0.attn.qkv") == "attn.qkv"
    with pytest.raises(UserError, match=r"'mlp.fc' is not a projection of this model; LoRA adapts attn.qkv, attn.proj, "
                                        r"mlp.router, mlp.experts.\{\}.fc, mlp.experts.\{\}.proj"):
        apply_lora(moe_model(), targets={"mlp.fc": ["gate"]})
    with pytest.raises(UserError, match=r"mlp.experts.\{\}.proj has the parts down; asked for \['up'\]"):
        apply_lora(moe_model(), targets={EXPERT_PROJ: ["up"]})


def test_every_expert_gets_its_own_adapters_and_the_router_none():
    m = moe_model()
    info = apply_lora(m, targets={EXPERT_FC: ["up"], EXPERT_PROJ: ["down"]}, rank=2, alpha=4)
    want = {f"blocks.{i}.mlp.experts.{e}.{p}" for i in range(2) for e in range(E) for p in ("fc", "proj")}
    assert set(info.modules) == want and list(info.modules) == [n for n, _ in lora_modules(m)]
    assert info.modules["blocks.1.mlp.experts.2.fc"] == ["up"] and info.targets == ["mlp.experts.{}.fc.up",
                                                                                     "mlp.experts.{}.proj.down"]
    assert type(m.blocks[0].mlp.router) is nn.Linear  # never adapted unless named
    a = {id(mod.lora_A) for _, mod in lora_modules(m)}
    assert len(a) == len(want)  # no A shared between experts
    # per expert: up's A (2 x 32) and B (48 x 2), down's A (2 x 48) and B (32 x 2)
    assert info.trainable_params == 2 * E * (2 * 32 + 48 * 2 + 2 * 48 + 32 * 2)

    r = moe_model()
    info = apply_lora(r, targets={ROUTER: ["router"]}, rank=2, alpha=4)
    assert set(info.modules) == {"blocks.0.mlp.router", "blocks.1.mlp.router"} and info.targets == ["mlp.router.router"]


def test_zero_b_exact_and_merged_equals_unmerged():
    idx = ids()
    m = moe_model()
    with torch.no_grad():
        ref = m(idx)
        apply_lora(m, targets={**ALL_BUT_ROUTER, ROUTER: ["router"]}, rank=4, alpha=8)
        assert torch.equal(m(idx), ref)  # B = 0: exactly the base model, routing included
    randomize_lora(m)
    with torch.no_grad():
        unmerged = m(idx)
        assert not torch.allclose(unmerged, ref, atol=1e-3)
        merge_lora(m)
        torch.testing.assert_close(m(idx), unmerged, atol=1e-5, rtol=1e-5)
    assert not has_lora(m) and set(m.state_dict()) == set(moe_model().state_dict())
    assert all(type(mod) is nn.Linear for mod in m.modules() if isinstance(mod, (nn.Linear, LoRALinear)))
    assert all(p.requires_grad for p in m.parameters())


def test_one_expert_adapter_changes_only_that_expert():
    m = moe_model()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    apply_lora(m, targets={EXPERT_PROJ: ["down"]}, rank=2, alpha=4)
    with torch.no_grad():
        m.blocks[1].mlp.experts[2].proj.lora_B.normal_()
    merge_lora(m)
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, base[k])}
    assert changed == {"blocks.1.mlp.experts.2.proj.weight"}


def test_a_training_step_moves_only_the_adapters_and_lowers_the_loss():
    cfg = moe_cfg()
    m = moe_model(cfg)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    apply_lora(m, targets={**ALL_BUT_ROUTER}, rank=4, alpha=8)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        n for n, _ in m.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    opt = torch.optim.AdamW(lora_parameters(m), lr=1e-2)
    x = ids(4, 17)
    m.train()

    def loss() -> torch.Tensor:
        logits = m(x[:, :-1])
        ce = nn.functional.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
        # plus the load-balancing loss, as pretraining adds it
        return ce + 0.01 * load_balancing_loss(router_logits(m), cfg.n_experts, cfg.experts_per_token)

    losses = []
    for _ in range(8):
        opt.zero_grad()
        value = loss()
        value.backward()
        if not losses:  # the frozen router gets no gradient; every expert's B does where tokens reached it
            assert m.blocks[0].mlp.router.weight.grad is None
            assert sum(mod.lora_B.grad.abs().sum() > 0 for n, mod in lora_modules(m) if ".experts." in n) > E
        opt.step()
        losses.append(value.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for name, p in m.named_parameters():  # the base weights are untouched (the wrapped ones under .base.)
        if not name.endswith(("lora_A", "lora_B")):
            assert torch.equal(p, base[name.replace(".base.", ".")]), name


def test_fingerprint_samples_an_expert():
    fp = base_fingerprint(moe_model())
    assert set(fp["weight_samples"]) == {"tok_emb", "blocks.0.attn.qkv", "blocks.1.mlp.experts.0.proj"}
