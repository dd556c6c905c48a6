"""What the GGUF tests share: tiny configs and seeded random models, a llama.cpp-converter-like writer that
is independent of lmforge's (names from gguf's own tensor map), transformers reference models, and the
check that an error is one line naming the file.

A module, not a conftest.py: the test files import these by name (`from tests.loaders.gguf.helpers import
...`), and a second conftest.py outside a package would replace the `conftest` module that other tests
import `make_corpus` / `save_tiny_model` from.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model.gpt import GPT
from lmforge.tokenizer import Tokenizer

T = gguf.GGMLQuantizationType
LLAMA3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

VARIANTS = {
    "llama-gqa-untied": dict(tie_embeddings=False),
    "llama-gqa-tied": dict(tie_embeddings=True),
    "qwen2-qkv-bias": dict(qkv_bias=True, tie_embeddings=True),
    "llama-attn-mlp-bias": dict(attention_bias=True, mlp_bias=True, tie_embeddings=False),
    "llama-head-dim-8": dict(head_dim=8, n_heads=4, n_kv_heads=1),
    "llama3-rope": dict(rope_scaling=LLAMA3, rope_theta=10000.0),
    # three frequencies between the boundaries: the boundaries are fitted, not assumed
    "llama3-rope-fitted": dict(rope_scaling={**LLAMA3, "factor": 4.0, "high_freq_factor": 16.0,
                                             "original_max_position_embeddings": 64}),
    "linear-rope": dict(rope_scaling={"type": "linear", "factor": 2.0}),
}


def tiny_cfg(tok: Tokenizer, **kw) -> ModelConfig:
    base = dict(vocab_size=tok.vocab_size, context_length=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                d_ff=128, tie_embeddings=False)
    return ModelConfig(**{**base, **kw})


def random_model(cfg: ModelConfig, seed: int = 0, emb_scale: float = 1.0) -> GPT:
    """Seeded model with random norms and biases too (so a mis-mapped vector shows), logits sharpened by
    `emb_scale` so that top-1 agreement under quantization means something."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.2)
        model.tok_emb.weight.mul_(emb_scale)
        if not cfg.tie_embeddings:
            model.lm_head.weight.mul_(emb_scale)
    return model


def load(g) -> GPT:
    model = GPT(g.config).eval()
    model.load_state_dict(g.state_dict, strict=True)
    return model


def ids_batch(cfg: ModelConfig, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


def assert_user_error(exc: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(exc.value)
    assert str(path) in msg, msg
    assert "\n" not in msg and len(msg) < len(str(path)) + 300, msg


# ---- a llama.cpp-converter-like writer, independent of lmforge's (names from gguf's own tensor map) ----
def hf_to_gguf_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute as described in formats.md (HF rotate_half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer_kv(tok: Tokenizer) -> dict:
    j = json.loads(tok.backend.to_str())
    added = {t["id"] for t in j["added_tokens"] if t["special"]}
    tokens = [tok.backend.id_to_token(i) for i in range(tok.vocab_size)]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if i in added else 1 for i in range(len(tokens))],
        "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": (tok.bos_id, gguf.GGUFValueType.UINT32),
        "tokenizer.ggml.eos_token_id": (tok.eos_id, gguf.GGUFValueType.UINT32),
        "tokenizer.chat_template": tok.chat_template,
    }


def write_llamacpp_style(path, arch: str, hp: dict, hf_sd: dict, kv: dict, *, skip_keys=(), skip_tensors=(),
                         types: dict | None = None) -> None:
    """A GGUF as llama.cpp's converter lays it out, from HF-named tensors, written with gguf.GGUFWriter."""
    n_layers, n_head, n_kv = hp["block_count"], hp["attention.head_count"], hp["attention.head_count_kv"]
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    w = gguf.GGUFWriter(str(path), arch)
    U32, F32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    keys = {f"{arch}.{k}": (v, F32 if isinstance(v, float) else U32) for k, v in hp.items()}
    keys.update(kv)
    for key in skip_keys:
        w.kv_data[0].pop(key, None)  # general.architecture, which the writer adds by itself
    for key, value in keys.items():
        if key in skip_keys:
            continue
        if isinstance(value, tuple):
            w.add_key_value(key, value[0], value[1])
        elif isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
    for hf_name, t in hf_sd.items():
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        if name in skip_tensors:
            continue
        t = t.detach().float()
        if arch == "llama" and ".attn_q." in name:
            t = hf_to_gguf_permute(t, n_head)
        if arch == "llama" and ".attn_k." in name:
            t = hf_to_gguf_permute(t, n_kv)
        if name in (types or {}):  # raw blocks of a quantized type: (uint8 array, type)
            w.add_tensor(name, types[name][0], raw_dtype=types[name][1])
        else:
            w.add_tensor(name, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_hp() -> dict:
    return {"context_length": 64, "embedding_length": 64, "block_count": 2, "feed_forward_length": 256,
            "attention.head_count": 4, "attention.head_count_kv": 2, "attention.layer_norm_rms_epsilon": 1e-5,
            "rope.freq_base": 10000.0, "rope.dimension_count": 16}


def transformers_model(arch: str, vocab: int, tied: bool):
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=tied)
    cls, conf = ((transformers.LlamaForCausalLM, transformers.LlamaConfig) if arch == "llama"
                 else (transformers.Qwen2ForCausalLM, transformers.Qwen2Config))
    torch.manual_seed(0)
    model = cls(conf(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.2)
    return model


def open_llama_cpp(path, **kwargs):
    """`llama_cpp.Llama` on `path` (skips without llama-cpp-python), with weight repacking into llama.cpp's
    "extra buffer types" turned off: on a CPU with AMX its AMX buffer takes Q8_0/Q4 matrices, and evaluating
    matrices this tiny then crashes the whole process (seen with llama-cpp-python 0.3.36 on a Xeon with AMX);
    the plain CPU path computes the same thing on every machine."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from unittest import mock

    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def without_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with mock.patch.object(llama_cpp.llama.llama_cpp, "llama_model_default_params", without_repacking):
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)


# ---------------------------------------------------------------------------------------------------
# What the family GGUF tests (MoE, Gemma, Phi-3) share
# ---------------------------------------------------------------------------------------------------
FAMILY_NEW_TOKENS = 16


def imported(ref, tmp_path, tokenizer) -> GPT:
    """A transformers model saved as transformers saves it (with `tokenizer` beside it), imported by us."""
    from lmforge.loaders.model_dir import load_model

    d = tmp_path / "hf"
    ref.save_pretrained(d)
    tokenizer.save(d)
    return load_model(d)


def export_gguf(ours, tokenizer, path, qtype: str = "f32", *, name: str = "m"):
    """Our GGUF export of `ours` at `path` (returned)."""
    from lmforge.loaders.gguf import write_gguf

    write_gguf(path, ours.config, ours.state_dict(), tokenizer, qtype=qtype, name=name)
    return path


def prompt_ids(vocab: int, n: int = 24) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(2)).tolist()


def llama_cpp_run(path, prompt: list[int], n_ctx: int = 64, new_tokens: int = FAMILY_NEW_TOKENS):
    """(logits of the prompt, greedy continuation) from llama.cpp itself, context `n_ctx`, fp32 KV cache (its
    default fp16 one rounds to ~1e-2)."""
    import numpy as np

    llm = open_llama_cpp(path, n_ctx=n_ctx, n_threads=1, logits_all=True, type_k=0, type_v=0, flash_attn=False)
    llm.eval(prompt)
    logits = np.array(llm.scores[:len(prompt)])
    out = []
    for _ in range(new_tokens):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return logits, out


def greedy(model, prompt: list[int], new_tokens: int = FAMILY_NEW_TOKENS) -> list[int]:
    """Greedy continuation by full recomputation (no cache, no Engine): the plainest reference."""
    x = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new_tokens):
            x = torch.cat([x, model(x)[:, -1:].argmax(-1)], 1)
    return x[0, len(prompt):].tolist()


def assert_quantized_file_runs(path, ref, vocab: int, n_ctx: int = 64):
    """A quantized GGUF at `path`, loaded keeping its blocks: every packed matrix holds exactly the weights the
    float read gives; our logits pick transformers' (`ref`) top token at >= 75% of places; and llama.cpp's logits
    on the file are those weights' (within 10% of their range, >= 75% same top token: it rounds activations to
    8 bits too). Returns the packed model."""
    import numpy as np

    from lmforge.loaders.auto import load
    from lmforge.loaders.gguf import read_gguf
    from lmforge.loaders.model_dir import build_model
    from lmforge.quant.linear import GGMLLinear

    model, floats = load(path, dtype="auto").model, read_gguf(path).state_dict
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GGMLLinear)}
    assert layers
    for name, m in layers.items():
        assert torch.equal(m.dequantized(), floats[f"{name}.weight"]), name
    prompt = prompt_ids(vocab)
    x = torch.tensor([prompt])
    with torch.no_grad():
        mine, expected = model(x)[0], ref(x).logits[0]
        exact = build_model(read_gguf(path).config, floats, source=str(path))(x)[0].numpy()
    assert (mine.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75
    logits, _ = llama_cpp_run(path, prompt, n_ctx, new_tokens=0)
    assert np.abs(logits - exact).max() < 0.1 * np.abs(exact).max()
    assert (logits.argmax(-1) == exact.argmax(-1)).mean() >= 0.75
    return model
