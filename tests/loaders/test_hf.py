"""Hugging Face import/export, proved against `transformers` itself.

Models: tiny random transformers models (built from configs, saved with `save_pretrained`) load with
`lmforge.loaders.model_dir.load_model` and give the same logits (fp32, 1e-4) and the same greedy continuation
token for token; our own models exported with `write_model_files` load in `AutoModelForCausalLM`.
Tokenizers: Llama-3-, ChatML/Qwen- and Mistral-style tokenizer directories render chats to the same text
and the same ids as `AutoTokenizer`, add the same BOS to plain text, and stop on generation_config's EOS ids.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer as Backend  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from lmforge.config import ModelConfig  # noqa: E402
from lmforge.errors import UserError  # noqa: E402
from lmforge.loaders.hf import SUPPORTED_ARCHITECTURES, load_hf_tokenizer  # noqa: E402
from lmforge.loaders.hf_read import config_from_hf  # noqa: E402
from lmforge.loaders.model_dir import load_config, load_model, write_model_files  # noqa: E402
from lmforge.model.gpt import GPT  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402
from lmforge.train.checkpointer import Checkpointer  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

V = 128  # vocabulary of the tiny models
PROMPT_LEN, NEW_TOKENS = 17, 12
LLAMA = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
GPT2 = dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

# variant -> (config class, its kwargs, what our ModelConfig must say)
ARCHS = {
    "llama-gqa-untied": ("LlamaConfig", dict(LLAMA, tie_word_embeddings=False, rope_theta=500000.0),
                         dict(n_kv_heads=2, tie_embeddings=False, rope_theta=500000.0)),
    "llama-tied-biases": ("LlamaConfig", dict(LLAMA, num_key_value_heads=4, tie_word_embeddings=True,
                                              attention_bias=True, mlp_bias=True),
                          dict(tie_embeddings=True, attention_bias=True, mlp_bias=True)),
    "llama3-rope": ("LlamaConfig", dict(LLAMA, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
                    dict(rope_scaling={**{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}, "type": "llama3"})),
    "llama-linear-rope": ("LlamaConfig", dict(LLAMA, rope_scaling={"rope_type": "linear", "factor": 2.0}),
                          dict(rope_scaling={"type": "linear", "factor": 2.0})),
    "llama-head-dim": ("LlamaConfig", dict(LLAMA, head_dim=24), dict(head_dim=24, d_model=64)),
    "mistral": ("MistralConfig", dict(LLAMA, sliding_window=4096, rope_theta=1e6),
                dict(context_length=64, tie_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(LLAMA, tie_word_embeddings=True, rms_norm_eps=1e-6),
              dict(qkv_bias=True, tie_embeddings=True)),
    "gpt2": ("GPT2Config", dict(GPT2, activation_function="gelu_new"),
             dict(norm="layernorm", mlp="gelu", positions="learned", tie_embeddings=True, d_ff=256)),
    "gpt2-untied-n-inner": ("GPT2Config", dict(GPT2, activation_function="gelu_pytorch_tanh", n_inner=96,
                                               tie_word_embeddings=False),
                            dict(d_ff=96, tie_embeddings=False)),
}


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random values for every parameter (norm weights and biases too, so a wrong mapping of any shows),
    with matrices wide enough that greedy decoding does not settle on one token."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def hf_model(variant: str, **overrides) -> torch.nn.Module:
    conf_cls, kw, _ = ARCHS[variant]
    torch.manual_seed(0)
    conf = getattr(transformers, conf_cls)(**{**kw, **overrides})
    return randomize(transformers.AutoModelForCausalLM.from_config(conf))


def ids(batch: int = 2, length: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model: GPT, idx: torch.Tensor, n: int) -> list[list[int]]:
    for _ in range(n):
        idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[:, -n:].tolist()


def assert_parity(ref: torch.nn.Module, ours: GPT, *, atol: float = 1e-4, generate: bool = True) -> None:
    idx = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref(idx).logits, atol=atol, rtol=atol)
        if generate:
            ref.generation_config.eos_token_id = None  # always NEW_TOKENS tokens, no EOS masking
            theirs = ref.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                                  max_new_tokens=NEW_TOKENS, pad_token_id=0)
            mine = greedy(ours, idx, NEW_TOKENS)
            assert mine == theirs[:, PROMPT_LEN:].tolist()
            assert len({t for row in mine for t in row}) > 2  # not one token repeated: a test that can fail


# ---------------------------------------------------------------------------------------------------
# Import: logits and greedy parity
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ARCHS)
def test_import_matches_transformers(variant, tmp_path):
    ref = hf_model(variant)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    for key, value in ARCHS[variant][2].items():
        assert getattr(ours.config, key) == value, key
    assert_parity(ref, ours)
    if ours.config.tie_embeddings:
        assert ours.lm_head.weight is ours.tok_emb.weight


# Tolerances in their own dtype, for logits up to ~3: measured max differences are 4e-3 (fp16) and 3.1e-2
# (bf16, two units in the last place there); allowed: about 2.5x and 2x that.
@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-2), (torch.bfloat16, 6.25e-2)])
def test_half_precision_checkpoints(tmp_path, dtype, atol):
    ref = hf_model("llama-gqa-untied").to(dtype)
    ref.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written.get("dtype") or written.get("torch_dtype")) == str(dtype).removeprefix("torch.")
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {dtype}
    idx = ids()
    native = load_model(tmp_path, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(native(idx).float(), ref(idx).logits.float(), atol=atol, rtol=0)
    # Upcast to float32 (what load_model does by default) against transformers loading the same file in
    # float32: the same rounded weights, so fp32 parity again. (Not `ref.float()`: that keeps the rotary
    # inv_freq buffer rounded to half precision, which transformers itself recomputes on load.)
    ref32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert_parity(ref32, load_model(tmp_path))


def test_sharded_checkpoint(tmp_path):
    ref = hf_model("llama-gqa-untied")
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert_parity(ref, load_model(tmp_path), generate=False)


def test_gpt2_without_prefix_and_with_mask_buffers(tmp_path):
    """Files saved from the bare GPT2Model (openai-community/gpt2 itself) have no "transformer." prefix and
    may carry the causal-mask buffers attn.bias / attn.masked_bias; neither stops the import."""
    ref = hf_model("gpt2")
    ref.save_pretrained(tmp_path)
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert_parity(ref, load_model(tmp_path), generate=False)


def test_config_spellings_of_transformers_4_and_5(tmp_path):
    ref = hf_model("llama3-rope")
    ref.save_pretrained(tmp_path / "v5")
    v5 = json.loads((tmp_path / "v5" / "config.json").read_text())
    assert "rope_parameters" in v5 and "rope_scaling" not in v5 and "torch_dtype" not in v5
    params = dict(v5["rope_parameters"])
    theta = params.pop("rope_theta")
    params["type"] = params.pop("rope_type")
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "dtype", "rope_theta")}
    v4.update(rope_scaling=params, rope_theta=theta, torch_dtype="float32")
    shutil.copytree(tmp_path / "v5", tmp_path / "v4")
    (tmp_path / "v4" / "config.json").write_text(json.dumps(v4))

    assert load_config(tmp_path / "v4") == load_config(tmp_path / "v5")
    assert load_config(tmp_path / "v4").rope_theta == 500000.0
    assert v4["torch_dtype"] == "float32" and v5.get("dtype") in ("float32", None)
    idx = ids()
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "v4")(idx), load_model(tmp_path / "v5")(idx))


# ---------------------------------------------------------------------------------------------------
# Export: our models load in transformers
# ---------------------------------------------------------------------------------------------------
EXPORTS = {
    "LlamaForCausalLM": dict(n_kv_heads=2, tie_embeddings=False, rope_theta=500000.0,
                             rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "Qwen2ForCausalLM": dict(n_kv_heads=2, qkv_bias=True),
    "GPT2LMHeadModel": dict(norm="layernorm", mlp="gelu", positions="learned", attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("arch", EXPORTS)
def test_export_loads_in_transformers(arch, tmp_path, tiny_tokenizer):
    cfg = ModelConfig(vocab_size=tiny_tokenizer.vocab_size, context_length=64, d_model=64, n_layers=2, n_heads=4,
                      d_ff=128, **EXPORTS[arch])
    torch.manual_seed(0)
    model = randomize(GPT(cfg))
    Checkpointer(tmp_path, tokenizer=tiny_tokenizer).save(model, None, [], {"step": 0})
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [arch]
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(ref).__name__ == arch
    idx = torch.randint(0, cfg.vocab_size, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=1e-4, rtol=1e-4)
    assert load_config(tmp_path) == cfg  # and back, losslessly


# ---------------------------------------------------------------------------------------------------
# Refusals: one clear line, never a model that computes something else
# ---------------------------------------------------------------------------------------------------
def _llama_dict(**edits):
    d = transformers.LlamaConfig(**LLAMA).to_dict()
    return {**d, "architectures": ["LlamaForCausalLM"], **edits}


@pytest.mark.parametrize("edits, match", [
    ({"auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}},
     "trust_remote_code"),
    ({"architectures": ["FalconForCausalLM"], "model_type": "falcon"},
     "'FalconForCausalLM' is not supported; supported: Llama/Mistral/Qwen2/Qwen3/.*Gemma2/Gemma3/Phi3/.*ForCausalLM, "
     "Gemma3ForConditionalGeneration, GPT2LMHeadModel"),
    ({"rope_parameters": {"rope_type": "proportional", "factor": 4.0, "rope_theta": 10000.0}}, "rope scaling type 'proportional'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope scaling type 'dynamic'"),
    ({"rope_parameters": None, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_scaling short_factor must be a list"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_refused_configs(edits, match):
    with pytest.raises(UserError, match=match):
        config_from_hf(_llama_dict(**edits))


def test_refused_gpt2_activation(tmp_path):
    d = {**transformers.GPT2Config(**GPT2, activation_function="relu").to_dict(), "architectures": ["GPT2LMHeadModel"]}
    with pytest.raises(UserError, match="activation_function 'relu'"):
        config_from_hf(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="relu"):
        load_model(tmp_path)
    assert "GPT2LMHeadModel" in SUPPORTED_ARCHITECTURES


def test_architecture_from_model_type_and_tokenizer_only_auto_map():
    d = _llama_dict(auto_map={"AutoTokenizer": ["tok.XTokenizer", None]})
    d.pop("architectures")
    assert config_from_hf(d).n_kv_heads == 2


# ---------------------------------------------------------------------------------------------------
# Every value type-checked where it is read: one line naming the config.json key, never a TypeError from
# inside (before: a string rms_norm_eps was a TypeError traceback; a bool layer count built a 1-layer model)
# ---------------------------------------------------------------------------------------------------
_GPT2_DICT = {"architectures": ["GPT2LMHeadModel"], **GPT2}


@pytest.mark.parametrize("base, edits, message", [
    ("llama", {"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a positive number, got '1e-5'"),
    ("llama", {"rms_norm_eps": float("nan")}, "rms_norm_eps must be a positive number, got nan"),
    ("llama", {"rms_norm_eps": 0}, "rms_norm_eps must be a positive number, got 0"),
    ("llama", {"num_hidden_layers": True}, "num_hidden_layers must be a positive integer, got True"),
    ("llama", {"num_hidden_layers": 2.0}, "num_hidden_layers must be a positive integer, got 2.0"),
    ("llama", {"num_hidden_layers": 10**4}, "num_hidden_layers is 10000, beyond what lmforge supports (4096)"),
    ("llama", {"max_position_embeddings": 10**9}, "max_position_embeddings is 1000000000, beyond what lmforge supports"),
    ("llama", {"max_position_embeddings": 1e9}, "max_position_embeddings must be a positive integer, got 1000000000.0"),
    ("llama", {"vocab_size": "128"}, "vocab_size must be a positive integer, got '128'"),
    ("llama", {"hidden_size": None}, "missing key 'hidden_size'"),
    ("llama", {"head_dim": [16]}, "head_dim must be a positive integer, got [16]"),
    ("llama", {"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ("llama", {"rope_theta": float("inf"), "rope_parameters": None}, "rope_theta must be a positive number, got inf"),
    ("llama", {"rope_theta": 10**400, "rope_parameters": None}, "rope_theta must be a positive number, got 1000"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": "2"}}, "rope_scaling needs a positive factor, got '2'"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
     "high_freq_factor (1.0) must be above low_freq_factor (4.0)"),
    ("llama", {"rope_parameters": [1, 2]}, "rope_parameters/rope_scaling should be an object, got [1, 2]"),
    ("llama", {"architectures": None, "model_type": ["llama"]}, "architecture ['llama'] is not supported"),
    ("llama", {"architectures": [{"x": 1}]}, "architecture {'x': 1} is not supported"),
    ("llama", {"hidden_act": ["silu"] * 10**5}, "hidden_act ['silu', 'silu'"),
    ("llama", {"lmforge": [1]}, None),  # a malformed optional section is ignored: transformers never reads it
    ("gpt2", {"n_embd": "64"}, "n_embd must be a positive integer, got '64'"),
    ("gpt2", {"layer_norm_epsilon": "x"}, "layer_norm_epsilon must be a positive number, got 'x'"),
    ("gpt2", {"scale_attn_weights": "yes"}, "scale_attn_weights must be true or false"),
    ("native", {"lmforge": {"norm_eps": "1e-5"}}, "norm_eps must be a positive number, got '1e-5'"),
    ("native", {"lmforge": {"n_layers": 3.5}}, "n_layers must be a positive integer, got 3.5"),
    ("native", {"lmforge": {"rope_scaling": "yes"}}, "rope_scaling must be an object, got 'yes'"),
])
def test_config_values_are_checked_naming_the_key(base, edits, message):
    d = {"llama": {"architectures": ["LlamaForCausalLM"], **LLAMA}, "gpt2": _GPT2_DICT,
         "native": {"architectures": ["LmforgeForCausalLM"], "lmforge": {}}}[base]
    d = {**d, **edits}
    if message is None:
        assert config_from_hf(d, source="cfg.json").n_layers == 2
        return
    with pytest.raises(UserError) as e:
        config_from_hf(d, source="cfg.json")
    msg = str(e.value)
    assert msg.startswith("cfg.json: ") and message in msg and "\n" not in msg and len(msg) < 300, msg


# ---------------------------------------------------------------------------------------------------
# Tokenizers and chat templates
# ---------------------------------------------------------------------------------------------------
LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = '' %}\n"
    "{%- endif %}\n"
    "{%- if system_message %}\n"
    "    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
MISTRAL_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {{- '[INST] ' + message['content'] + ' [/INST]' }}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token }}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)
CORPUS = [
    "the model reads the next word and writes a long sentence.",
    "Hello! How can I help you today? Tell me a joke about tokens.",
    "You are a helpful assistant. What is 2+2? It is 4.",
    "def f(x):\n    return x + 1\n",
    "émigré naïve façade 日本語 😀",
] * 20

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "What is 2+2?"}
ASSISTANT = {"role": "assistant", "content": "It is 4."}
USER2 = {"role": "user", "content": "  Tell me a joke about tokens 😀 "}
CHATS = {
    "system+user": [SYSTEM, USER],
    "multi-turn": [SYSTEM, USER, ASSISTANT, USER2],
    "user": [USER2],
}
MISTRAL_CHATS = {"user": [USER], "multi-turn": [USER, ASSISTANT, USER2]}

STYLES = {
    # Llama 3: BOS from tokenizer.json's post-processor (no add_bos_token); three EOS ids in generation_config.
    "llama3": dict(
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                  "<|eot_id|>"],
        post=lambda: processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                          pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                          special_tokens=[("<|begin_of_text|>", 0)]),
        ]),
        config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
                "model_max_length": 131072},
        generation={"bos_token_id": 0, "eos_token_id": [1, 4, 5]},
        template=LLAMA3_TEMPLATE, chats=CHATS, bos=0, eos_ids={1, 4, 5},
    ),
    # Qwen2.5: ChatML with a default system message, no BOS at all.
    "chatml": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        post=lambda: processors.ByteLevel(trim_offsets=False),
        config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                "chat_template": CHATML_TEMPLATE, "add_prefix_space": False},
        generation={"eos_token_id": [2, 0]},
        template=CHATML_TEMPLATE, chats=CHATS, bos=None, eos_ids={0, 2},
    ),
    # Mistral / Llama 2: add_bos_token in tokenizer_config and the BOS in tokenizer.json's post-processor.
    "mistral": dict(
        specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        post=lambda: processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                   special_tokens=[("<s>", 1)]),
        config={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                "add_eos_token": False, "chat_template": MISTRAL_TEMPLATE},
        generation={"bos_token_id": 1, "eos_token_id": 2},
        template=MISTRAL_TEMPLATE, chats=MISTRAL_CHATS, bos=1, eos_ids={2},
    ),
}


def _backend(specials: list[str]) -> Backend:
    tk = Backend(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer=trainer)
    return tk


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    out = {}
    for name, style in STYLES.items():
        d = tmp_path_factory.mktemp(f"tok-{name}")
        tk = _backend(style["specials"])
        post = style["post"]()
        if post is not None:
            tk.post_processor = post
        tk.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                             **style["config"]}))
        (d / "generation_config.json").write_text(json.dumps(style["generation"]))
        out[name] = d
    return out


@pytest.fixture(scope="module")
def tokenizer_pairs(tokenizer_dirs):
    """style -> (transformers tokenizer, ours), both loaded from the same directory."""
    return {name: (transformers.AutoTokenizer.from_pretrained(str(d)), load_hf_tokenizer(d))
            for name, d in tokenizer_dirs.items()}


CHAT_CASES = [(style, chat, gen) for style, s in STYLES.items() for chat in s["chats"] for gen in (True, False)]


@pytest.mark.parametrize("style, chat, add_generation_prompt", CHAT_CASES)
def test_chat_template_parity(tokenizer_pairs, style, chat, add_generation_prompt):
    hf, ours = tokenizer_pairs[style]
    messages = STYLES[style]["chats"][chat]
    assert ours.chat_template == STYLES[style]["template"]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    their_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                       return_dict=False)
    mine = ours.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert mine == list(their_ids)
    bos = STYLES[style]["bos"]
    if bos is not None:  # the template's own BOS, exactly once
        assert mine[0] == bos and mine.count(bos) == 1
    assert ours.decode(mine) == text


@pytest.mark.parametrize("style", STYLES)
def test_plain_text_gets_the_bos_transformers_adds(tokenizer_pairs, style):
    hf, ours = tokenizer_pairs[style]
    assert ours.add_bos == (STYLES[style]["bos"] is not None)
    for text in ["Hello! How can I help you today?", "  two leading spaces", "日本語 😀", ""]:
        assert ours.encode(text) == hf(text).input_ids, text
    if ours.add_bos:
        assert ours.encode("hi", add_bos=False) == hf("hi", add_special_tokens=False).input_ids


@pytest.mark.parametrize("flag", [True, False])
def test_tokenizer_json_decides_bos_like_transformers(tokenizer_dirs, tmp_path, flag):
    """transformers 5 ignores tokenizer_config's add_bos_token when tokenizer.json exists; so do we."""
    for style in ("mistral", "chatml"):
        d = tmp_path / style
        shutil.copytree(tokenizer_dirs[style], d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": flag}))
        hf, ours = transformers.AutoTokenizer.from_pretrained(str(d)), load_hf_tokenizer(d)
        assert ours.encode("Hello there") == hf("Hello there").input_ids
        assert ours.add_bos == (style == "mistral")


def test_bad_role_alternation_raises_in_both(tokenizer_pairs):
    hf, ours = tokenizer_pairs["mistral"]
    bad = [USER, USER2]
    with pytest.raises(Exception, match="alternate"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(UserError, match="Conversation roles must alternate"):
        ours.apply_chat_template(bad)
    with pytest.raises(UserError, match="Only user and assistant"):
        ours.encode_chat([USER, SYSTEM])


@pytest.mark.parametrize("style", STYLES)
def test_generation_config_eos_ids(tokenizer_dirs, tokenizer_pairs, style, tmp_path):
    _, ours = tokenizer_pairs[style]
    assert set(ours.eos_ids) == STYLES[style]["eos_ids"]
    assert ours.eos_id == ours.eos_ids[0]  # the tokenizer's own eos stays the main one
    plain = Tokenizer.load(tokenizer_dirs[style])
    assert set(plain.eos_ids) <= set(ours.eos_ids)
    ours.save(tmp_path)  # extra EOS ids travel with the tokenizer
    assert Tokenizer.load(tmp_path).eos_ids == ours.eos_ids


def test_llama3_eos_list_and_no_generation_config(tokenizer_dirs, tmp_path):
    tok = load_hf_tokenizer(tokenizer_dirs["llama3"])
    assert tok.eos_ids == [5, 1, 4]  # <|eot_id|> from the tokenizer, then <|end_of_text|>, <|eom_id|>
    assert Tokenizer.load(tokenizer_dirs["llama3"]).eos_ids == [5]
    shutil.copytree(tokenizer_dirs["llama3"], tmp_path / "t")
    (tmp_path / "t" / "generation_config.json").unlink()
    (tmp_path / "t" / "config.json").write_text(json.dumps({"eos_token_id": 1}))  # transformers' fallback
    assert load_hf_tokenizer(tmp_path / "t").eos_ids == [5, 1]
    (tmp_path / "t" / "config.json").write_text(json.dumps({"eos_token_id": [5, 999]}))
    with pytest.raises(UserError, match="999 is not in the tokenizer"):
        load_hf_tokenizer(tmp_path / "t")


def test_lmforge_model_directory_tokenizer(tmp_path, tiny_tokenizer):
    """Our own directories: generation_config lists the tokenizer's eos_ids, nothing changes on load."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tiny_tokenizer.vocab_size, context_length=32, d_model=32, n_layers=1,
                            n_heads=4, d_ff=64))
    Checkpointer(tmp_path, tokenizer=tiny_tokenizer).save(model, None, [], {"step": 0})
    tok = load_hf_tokenizer(tmp_path)
    assert tok.eos_ids == tiny_tokenizer.eos_ids and tok.extra_eos_tokens == []
    assert tok.fingerprint() == tiny_tokenizer.fingerprint() and not tok.add_bos


@pytest.mark.parametrize("extra", [dict(sliding_window=4), dict(embed_scale=True), dict(attn_scale=0.05),
                                   dict(attn_softcap=5.0), dict(post_norms=True), dict(qk_norm=True)])
def test_gpt2_shapes_with_features_gpt2_lacks_are_saved_as_ours(extra, tmp_path):
    """A GPT-2-shaped model with a window, q/k norms or a Gemma extra is not GPT2LMHeadModel: saved under our
    own architecture, it reloads computing the same."""
    from lmforge.loaders.hf import NATIVE, hf_architecture

    cfg = ModelConfig(vocab_size=V, context_length=32, d_model=32, n_layers=2, n_heads=4, norm="layernorm", mlp="gelu",
                      positions="learned", attention_bias=True, mlp_bias=True, **extra)
    assert hf_architecture(cfg) == NATIVE
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    write_model_files(tmp_path, model)
    again = load_model(tmp_path)
    assert again.config == cfg
    idx = ids(length=12)
    with torch.no_grad():
        torch.testing.assert_close(again(idx), model(idx))
