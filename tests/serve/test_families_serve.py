"""The server with the new families' real architectures behind it (tiny random models built by transformers,
imported as a user imports them, each with its family's chat template): OpenAI chat completions with
logprobs and n > 1 (batched), a stream, and Ollama's /api/chat, answered by the same scheduler - sliding
windows (and their KV rings), Gemma's soft caps and norms, Phi-3's LongRoPE and partial rotation, and the
experts of Qwen3-MoE included."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

from tests.serve.live import start_server  # noqa: E402
from tests.serve.tool_templates import family_tokenizer  # noqa: E402
from tests.tokenizer.family_templates import FAMILIES  # noqa: E402

transformers.logging.set_verbosity_error()
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _configs(vocab: int) -> dict[str, tuple[str, object]]:
    """model name -> (template family, transformers config)."""
    return {
        "gemma3": ("gemma3", transformers.Gemma3TextConfig(vocab_size=vocab, **SMALL, head_dim=16, sliding_window=6,
                                                           sliding_window_pattern=2, query_pre_attn_scalar=16)),
        "gemma2": ("gemma2", transformers.Gemma2Config(vocab_size=vocab, **SMALL, head_dim=16, sliding_window=6,
                                                       query_pre_attn_scalar=16)),
        "phi4-mini": ("phi4", transformers.Phi3Config(
            vocab_size=vocab, **SMALL, partial_rotary_factor=0.75, original_max_position_embeddings=32,
            rope_scaling={"type": "longrope", "short_factor": [1.0] * 6, "long_factor": [4.0] * 6})),
        "qwen3-moe": ("qwen3", transformers.Qwen3MoeConfig(vocab_size=vocab, **SMALL, head_dim=16, num_experts=4,
                                                           num_experts_per_tok=2, moe_intermediate_size=32)),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("families")
    models = {}
    for name, (family, conf) in _configs(1).items():
        tok = family_tokenizer(tiny_tokenizer, family, FAMILIES)
        conf.vocab_size = tok.vocab_size
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(conf).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.02 if "embed" in pname else 0.2)
        model.save_pretrained(root / name)
        tok.save(root / name)
        models[name] = root / name
    s = start_server(models, max_batch=4, max_queue=8)
    yield s
    s.stop()


@pytest.mark.parametrize("name", ["gemma3", "gemma2", "phi4-mini", "qwen3-moe"])
def test_openai_and_ollama_routes_answer(server, name):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=60, max_retries=0)
    ask = [{"role": "user", "content": "the model reads the cache " * 4}]  # (Gemma 2 refuses a system role)
    r = client.chat.completions.create(model=name, messages=ask, max_tokens=12, temperature=0.8, seed=1, n=2,
                                       logprobs=True, top_logprobs=2)
    assert len(r.choices) == 2 and r.usage.completion_tokens > 0
    for c in r.choices:
        assert c.finish_reason in ("stop", "length") and c.logprobs.content
        assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in c.logprobs.content)
    greedy = client.chat.completions.create(model=name, messages=ask, max_tokens=12, temperature=0)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=name, messages=ask, max_tokens=12, temperature=0, stream=True) if ch.choices)
    assert streamed == greedy.choices[0].message.content
    native = ollama.Client(host=server.base_url).chat(model=name, messages=ask,
                                                      options={"temperature": 0, "num_predict": 12})
    assert native.message.content == greedy.choices[0].message.content
