"""The model: causality, GQA, parameter counts, KV-cache equivalence, padding, and transformers parity."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.model.gpt import GPT
from lmforge.model.kv_cache import KVCache
from lmforge.presets import get_preset, preset_names

VARIANTS = {
    "llama": dict(),
    "gpt2": dict(norm="layernorm", mlp="gelu", positions="learned", attention_bias=True, mlp_bias=True),
    "sinusoidal": dict(positions="sinusoidal", tie_embeddings=False),
    "mqa-qkv-bias": dict(n_kv_heads=1, qkv_bias=True),
    "llama3-rope": dict(rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "linear-rope": dict(rope_scaling={"type": "linear", "factor": 2.0}),
}


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, context_length=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    return ModelConfig(**{**base, **kw})


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Give norms and biases random values too, so a wrong mapping of any of them shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_mask(variant):
    torch.manual_seed(0)
    model = randomize(GPT(tiny(**VARIANTS[variant])))
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    t = 9
    changed[:, t + 1] = (idx[:, t + 1] + 1) % 97
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])  # positions <= t cannot see token t+1
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])


def test_gqa_equals_mha_with_repeated_kv_heads():
    """A GQA model equals the MHA model whose k/v heads are copies of the shared ones (head h uses kv head
    h // (H/K)), which proves the grouping; with n_kv_heads == n_heads both are plain MHA."""
    torch.manual_seed(0)
    gqa = randomize(GPT(tiny(n_heads=4, n_kv_heads=2)))
    mha = GPT(tiny(n_heads=4, n_kv_heads=4)).eval()
    sd = gqa.state_dict()
    D, H, K = 8, 4, 2
    for i in range(2):
        w = sd[f"blocks.{i}.attn.qkv.weight"]
        q, k, v = w.split([H * D, K * D, K * D])
        rep = lambda t: t.view(K, D, -1).repeat_interleave(H // K, dim=0).reshape(H * D, -1)
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx), mha(idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", preset_names())
def test_num_params_matches_module(name):
    cfg = get_preset(name)
    with torch.device("meta"):  # no memory for the 1B preset
        model = GPT(cfg)
    assert cfg.num_params() == model.num_params() == sum(p.numel() for p in model.parameters())


def test_known_parameter_counts():
    assert get_preset("gpt2").num_params() == 124_439_808  # GPT-2 small, as published
    assert get_preset("llama-1b").num_params() == 1_235_814_400  # Llama-3.2-1B
    assert get_preset("tiny").num_params() < 1_000_000
    assert 5e6 <= get_preset("small").num_params() <= 10e6
    assert 40e6 <= get_preset("base").num_params() <= 60e6


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_full_recompute(variant):
    torch.manual_seed(0)
    cfg = tiny(**VARIANTS[variant])
    model = randomize(GPT(cfg))
    idx = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(cfg, 2)
        steps = [model(idx[:, :8], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(8, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_equals_each_sequence_alone():
    """Sequences of different lengths share one cache: left padding, per-sequence positions, key mask."""
    torch.manual_seed(0)
    cfg = tiny()
    model = randomize(GPT(cfg))
    seqs = [torch.randint(0, 97, (n,)) for n in (5, 11)]
    S = 11
    idx = torch.zeros(2, S, dtype=torch.long)
    key_mask = torch.zeros(2, cfg.context_length, dtype=torch.bool)
    positions = torch.zeros(2, S, dtype=torch.long)
    for b, s in enumerate(seqs):
        pad = S - len(s)
        idx[b, pad:] = s
        key_mask[b, pad:] = True
        positions[b, pad:] = torch.arange(len(s))
    with torch.no_grad():
        cache = KVCache.for_model(cfg, 2)
        out = model(idx, positions=positions, cache=cache, mask=cache.mask(torch.arange(S), key_mask))
        nxt = torch.tensor([[3], [7]])
        key_mask[:, S] = True
        out2 = model(nxt, positions=positions[:, -1:] + 1, cache=cache, mask=cache.mask(torch.tensor([S]), key_mask))
        for b, s in enumerate(seqs):
            alone = model(torch.cat([s, nxt[b]])[None])
            torch.testing.assert_close(out[b, -1], alone[0, len(s) - 1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out2[b, -1], alone[0, -1], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()  # padding rows attend to themselves instead of producing NaN


def test_position_beyond_context_is_refused():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, 49, dtype=torch.long))


@pytest.mark.parametrize("bad", [dict(n_heads=3, n_kv_heads=2), dict(norm="batchnorm"), dict(positions="alibi"),
                                 dict(d_model=0), dict(head_dim=7), dict(rope_scaling={"type": "dynamic", "factor": 2})])
def test_invalid_configs_are_refused(bad):
    with pytest.raises(UserError):
        tiny(**bad)


@pytest.mark.parametrize("variant", ["llama", "mqa-qkv-bias", "llama3-rope", "untied"])
def test_logits_match_transformers(variant):
    transformers = pytest.importorskip("transformers")
    from lmforge.loaders.hf import config_to_hf
    from lmforge.loaders.hf_tensors import state_dict_to_hf

    kw = dict(VARIANTS.get(variant, {}))
    if variant == "untied":
        kw["tie_embeddings"] = False
    if variant == "mqa-qkv-bias":
        kw = dict(qkv_bias=True, n_kv_heads=1)
    torch.manual_seed(0)
    cfg = tiny(**kw)
    model = randomize(GPT(cfg))
    hf_cfg = config_to_hf(cfg, bos_token_id=0, eos_token_id=0)
    cls = transformers.Qwen2ForCausalLM if cfg.qkv_bias else transformers.LlamaForCausalLM
    conf_cls = transformers.Qwen2Config if cfg.qkv_bias else transformers.LlamaConfig
    ref = cls(conf_cls(**{k: v for k, v in hf_cfg.items() if k != "architectures"})).eval()
    missing, unexpected = ref.load_state_dict(state_dict_to_hf(cfg, model.state_dict()), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    idx = torch.randint(0, 97, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=1e-4, rtol=1e-4)


def test_a_chunk_that_does_not_start_an_empty_cache_needs_a_mask():
    """Without a mask the model could only guess what a chunk may see; it refuses instead of leaking."""
    torch.manual_seed(0)
    cfg = tiny()
    model = GPT(cfg)
    cache = KVCache.for_model(cfg, 1)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)  # fills slots 0..2: plain causal
        model(torch.tensor([[4]]), cache=cache)  # one token sees every cached slot
        with pytest.raises(ValueError, match="needs an attention mask"):
            model(torch.tensor([[5, 6]]), cache=cache)
        with pytest.raises(ValueError, match="needs an attention mask"):
            model(torch.tensor([[5]]), cache=KVCache.for_model(cfg, 1), slots=torch.tensor([[0]]))
        slots = torch.tensor([4, 5])
        assert model(torch.tensor([[5, 6]]), cache=cache, slots=slots, mask=cache.mask(slots)).shape == (1, 2, cfg.vocab_size)
