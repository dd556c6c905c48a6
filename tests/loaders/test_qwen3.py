"""Qwen3 (dense), end to end, proved against `transformers` on tiny random models built from `Qwen3Config`
(no downloads): head_dim different from hidden_size / num_attention_heads, grouped-query attention, tied
and untied output heads, and attention biases.

Each path a user takes gives transformers' logits (fp32, 1e-4), the same 16 greedy tokens through our
`Engine`, and cached decoding equal to full recomputation: the Hugging Face directory as transformers
saves it; our export of it (which transformers loads back as `Qwen3ForCausalLM`); our GGUF export of it
(arch `qwen3`) read back, which llama.cpp itself also runs with transformers' logits; a GGUF laid out
independently with gguf-py's own `qwen3` tensor names; and (where its source tree is here) one made by
llama.cpp's own converter. The CLI imports both kinds and `show`/`list` name the family.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import run_cli  # noqa: E402
from lmforge.config import ModelConfig  # noqa: E402
from lmforge.errors import UserError  # noqa: E402
from lmforge.loaders.auto import load  # noqa: E402
from lmforge.loaders.gguf import read_gguf, read_gguf_header, write_gguf  # noqa: E402
from lmforge.loaders.hf import NATIVE, hf_architecture  # noqa: E402
from lmforge.loaders.hf_read import config_from_hf  # noqa: E402
from lmforge.loaders.model_dir import build_model, load_model, write_model_files  # noqa: E402
from lmforge.model.gpt import GPT  # noqa: E402
from tests.loaders.gguf.helpers import open_llama_cpp, tokenizer_kv, write_llamacpp_style  # noqa: E402
from tests.loaders.parity import assert_matches_transformers  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=24, max_position_embeddings=64, rms_norm_eps=1e-6)
# variant -> (Qwen3Config kwargs, what our ModelConfig must say)
VARIANTS = {
    "gqa-tied": (dict(tie_word_embeddings=True), dict(head_dim=24, n_kv_heads=2, tie_embeddings=True)),
    "gqa-untied": (dict(tie_word_embeddings=False, rope_theta=1e6),
                   dict(head_dim=24, tie_embeddings=False, rope_theta=1e6)),
    "mha-attention-bias": (dict(num_key_value_heads=4, head_dim=8, attention_bias=True, tie_word_embeddings=False),
                           dict(head_dim=8, n_kv_heads=4, attention_bias=True)),
}


def hf_qwen3(variant: str, vocab: int) -> torch.nn.Module:
    """A seeded Qwen3ForCausalLM with every parameter random (q_norm/k_norm weights and biases too, so a
    mis-mapped vector shows), wide enough that greedy decoding does not settle on one token."""
    torch.manual_seed(0)
    conf = transformers.Qwen3Config(vocab_size=vocab, **{**BASE, **VARIANTS[variant][0]})
    model = transformers.AutoModelForCausalLM.from_config(conf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


@pytest.fixture
def qwen3_dir(tmp_path, tiny_tokenizer, request):
    """(transformers model, its saved directory with our tokenizer beside it)."""
    ref = hf_qwen3(request.param, tiny_tokenizer.vocab_size)
    d = tmp_path / "qwen3-hf"
    ref.save_pretrained(d)
    tiny_tokenizer.save(d)
    return ref, d


# ---------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------
def test_config_from_transformers():
    d = {**transformers.Qwen3Config(vocab_size=128, **BASE).to_dict(), "architectures": ["Qwen3ForCausalLM"]}
    cfg = config_from_hf(d)
    assert (cfg.qk_norm, cfg.head_dim, cfg.n_kv_heads, cfg.qkv_bias, cfg.attention_bias) == (True, 24, 2, False, False)
    assert hf_architecture(cfg) == "Qwen3ForCausalLM"
    # A sparse file means what it means to transformers: Qwen3Config's head_dim is 128 whatever hidden/heads is.
    d.pop("head_dim")
    assert config_from_hf(d).head_dim == 128 == transformers.Qwen3Config(**{k: v for k, v in d.items()}).head_dim
    d.pop("architectures")  # model_type alone names the family
    assert config_from_hf(d).qk_norm
    # Sliding windows follow the same rules as Qwen2's: here layer 1 of 2 slides, and the context stays whole.
    slide = transformers.Qwen3Config(**BASE, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    cfg = config_from_hf({**slide.to_dict(), "architectures": ["Qwen3ForCausalLM"]})
    assert (cfg.context_length, cfg.sliding_window, cfg.sliding_layers) == (64, 16, [1])


def test_shapes_without_a_transformers_class_stay_native():
    base = ModelConfig(qk_norm=True)
    assert hf_architecture(base) == "Qwen3ForCausalLM"
    assert hf_architecture(base.replace(attention_bias=True)) == "Qwen3ForCausalLM"
    for other in (dict(qkv_bias=True), dict(mlp_bias=True), dict(norm="layernorm")):
        assert hf_architecture(base.replace(**other)) == NATIVE, other
    for cfg in (base, base.replace(head_dim=16, n_kv_heads=2, attention_bias=True, tie_embeddings=False)):
        assert cfg.num_params() == GPT(cfg).num_params()


def test_qwen3_0_6b_preset_is_the_published_shape():
    """The planning preset, written as a config.json, is what transformers builds for Qwen3-0.6B: the same
    parameter count (0.6B; 0.44B without the embedding, as its model card says)."""
    from lmforge.loaders.hf import config_to_hf
    from lmforge.presets import get_preset

    cfg = get_preset("qwen3-0.6b")
    d = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "lmforge")}
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(**d))
    assert type(theirs).__name__ == "Qwen3ForCausalLM"
    assert cfg.num_params() == sum(p.numel() for p in theirs.parameters()) == 596_049_920
    assert round(cfg.num_params(include_embeddings=False) / 1e9, 2) == 0.44


# ---------------------------------------------------------------------------------------------------
# Import, HF export, GGUF export: each against transformers
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qwen3_dir", VARIANTS, indirect=True)
def test_import_matches_transformers(qwen3_dir, tiny_tokenizer, request):
    ref, d = qwen3_dir
    ours = load_model(d)
    variant = request.node.callspec.params["qwen3_dir"]
    for key, value in VARIANTS[variant][1].items():
        assert getattr(ours.config, key) == value, key
    assert ours.config.qk_norm and ours.config.head_dim * ours.config.n_heads != ours.config.d_model
    assert (ours.lm_head.weight is ours.tok_emb.weight) == ours.config.tie_embeddings
    assert_matches_transformers(ref, ours, tiny_tokenizer)


@pytest.mark.parametrize("qwen3_dir", ["gqa-tied", "mha-attention-bias"], indirect=True)
def test_hf_export_loads_in_transformers_and_back(qwen3_dir, tiny_tokenizer, tmp_path):
    ref, d = qwen3_dir
    ours = load_model(d)
    out = tmp_path / "exported"
    out.mkdir()
    write_model_files(out, ours, tokenizer=tiny_tokenizer)
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == ["Qwen3ForCausalLM"] and written["model_type"] == "qwen3"
    assert written["head_dim"] == ours.config.head_dim
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Qwen3ForCausalLM"
    x = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ref(x).logits, atol=1e-5, rtol=1e-5)
    back = load_model(out)
    assert back.config.diff(ours.config) == []
    assert_matches_transformers(ref, back, tiny_tokenizer)


def test_our_own_qwen3_shaped_model_exports(tmp_path, tiny_tokenizer):
    """A model built here from a ModelConfig (not imported) with q/k norms is a Qwen3 to transformers."""
    cfg = ModelConfig(vocab_size=tiny_tokenizer.vocab_size, context_length=64, d_model=64, n_layers=2, n_heads=4,
                      n_kv_heads=2, head_dim=8, d_ff=96, qk_norm=True, tie_embeddings=False)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
    write_model_files(tmp_path, model, tokenizer=tiny_tokenizer)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Qwen3ForCausalLM"
    x = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs(x).logits, atol=1e-4, rtol=1e-4)
    assert load_model(tmp_path).config.diff(cfg) == []


@pytest.mark.parametrize("qwen3_dir", ["gqa-tied", "gqa-untied"], indirect=True)  # llama.cpp's qwen3 has no o bias
def test_gguf_export_import(qwen3_dir, tiny_tokenizer, tmp_path):
    ref, d = qwen3_dir
    ours = load_model(d)
    cfg = ours.config
    path = tmp_path / "q3.gguf"
    write_gguf(path, cfg, ours.state_dict(), tiny_tokenizer, qtype="f32", name="q3")
    metadata, infos = read_gguf_header(path)
    names = {t.name for t in infos}
    assert metadata["general.architecture"] == "qwen3"
    assert metadata["qwen3.attention.key_length"] == metadata["qwen3.attention.value_length"] == cfg.head_dim
    assert {"blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= names
    assert ("output.weight" in names) == (not cfg.tie_embeddings)
    g = read_gguf(path)
    assert g.config.diff(cfg) == []
    # qwen3 uses NEOX (rotate_half) rope in llama.cpp: q/k rows are written as transformers has them
    torch.testing.assert_close(g.state_dict["blocks.0.attn.qkv.weight"], ours.state_dict()["blocks.0.attn.qkv.weight"],
                               atol=0, rtol=0)
    assert_matches_transformers(ref, build_model(g.config, g.state_dict, source=str(path)), tiny_tokenizer)
    assert_matches_transformers(ref, load(path, dtype="auto").model, tiny_tokenizer)  # matrices kept as GGML F32 blocks


def test_gguf_laid_out_as_llama_cpp_does(tmp_path, tiny_tokenizer):
    """Written from transformers' tensors with gguf-py's own qwen3 name map and the metadata llama.cpp's
    converter writes (key_length/value_length for head_dim, no rope.dimension_count): nothing of ours."""
    ref = hf_qwen3("gqa-untied", tiny_tokenizer.vocab_size)
    hp = {"context_length": 64, "embedding_length": 64, "block_count": 2, "feed_forward_length": 96,
          "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 24,
          "attention.value_length": 24, "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 1e6}
    path = tmp_path / "llamacpp-style.gguf"
    write_llamacpp_style(path, "qwen3", hp, ref.state_dict(), tokenizer_kv(tiny_tokenizer))
    g = read_gguf(path)
    assert (g.config.qk_norm, g.config.head_dim, g.config.rope_theta) == (True, 24, 1e6)
    assert_matches_transformers(ref, load(path).model, tiny_tokenizer)


def test_gguf_refusals(tmp_path, tiny_tokenizer):
    ref = hf_qwen3("gqa-tied", tiny_tokenizer.vocab_size)
    hp = {"context_length": 64, "embedding_length": 64, "block_count": 2, "feed_forward_length": 96,
          "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 24,
          "attention.value_length": 24, "attention.layer_norm_rms_epsilon": 1e-6}
    path = tmp_path / "no-k-norm.gguf"
    write_llamacpp_style(path, "qwen3", hp, ref.state_dict(), tokenizer_kv(tiny_tokenizer),
                         skip_tensors=("blk.1.attn_k_norm.weight",))
    with pytest.raises(UserError, match="'blk.1.attn_k_norm.weight' is missing"):
        read_gguf(path)
    # q/k/v biases without the output's: Qwen2's biases, which no Qwen3 has
    biased = hf_qwen3("mha-attention-bias", tiny_tokenizer.vocab_size)
    path = tmp_path / "qkv-bias.gguf"
    write_llamacpp_style(path, "qwen3", {**hp, "attention.head_count_kv": 4, "attention.key_length": 8,
                                         "attention.value_length": 8}, biased.state_dict(),
                         tokenizer_kv(tiny_tokenizer), skip_tensors=("blk.0.attn_output.bias", "blk.1.attn_output.bias"))
    with pytest.raises(UserError, match="bias tensors matches no qwen3 model"):
        read_gguf(path)
    cfg = ModelConfig(vocab_size=tiny_tokenizer.vocab_size, context_length=64, d_model=64, n_layers=1, n_heads=4,
                      qk_norm=True, rope_scaling={"type": "llama3", "factor": 8.0})
    with pytest.raises(UserError, match="qwen3 architecture has no Llama-3 rope scaling"):
        write_gguf(tmp_path / "x.gguf", cfg, GPT(cfg).state_dict(), tiny_tokenizer)
    cfg = cfg.replace(rope_scaling=None, attention_bias=True)  # llama.cpp would refuse the file's o_proj bias
    with pytest.raises(UserError, match="qwen3 architecture has no output-projection bias"):
        write_gguf(tmp_path / "x.gguf", cfg, GPT(cfg).state_dict(), tiny_tokenizer)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("qwen3_dir", ["gqa-tied", "gqa-untied"], indirect=True)
def test_llama_cpp_runs_our_qwen3_gguf(qwen3_dir, tiny_tokenizer, tmp_path):
    """llama.cpp itself loads the exported file as qwen3 and computes transformers' logits (with an fp32 KV
    cache; its default fp16 one rounds to ~1e-2)."""
    pytest.importorskip("llama_cpp")
    import numpy as np

    ref, d = qwen3_dir
    ours = load_model(d)
    path = tmp_path / "q3.gguf"
    write_gguf(path, ours.config, ours.state_dict(), tiny_tokenizer, qtype="f32")
    llm = open_llama_cpp(path, n_ctx=64, n_threads=1, logits_all=True, type_k=0, type_v=0, flash_attn=False)
    ids = torch.randint(0, ours.config.vocab_size, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    llm.eval(ids)
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(llm.scores[:24]), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qwen3_dir", ["gqa-tied", "gqa-untied"], indirect=True)
def test_gguf_made_by_llama_cpps_converter(qwen3_dir, tmp_path):
    """llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python sdist's tree; skipped without it) turns
    the transformers directory into a qwen3 GGUF that imports with transformers' logits, packed or not."""
    from tests.loaders.gguf.test_gguf_vs_llamacpp import convert, llama_cpp_src

    if llama_cpp_src() is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py not found (set LMFORGE_LLAMA_CPP_SRC)")
    ref, d = qwen3_dir
    path = convert(d, tmp_path / "converted.gguf", pre="llama-bpe")  # our tokenizer's split regex is Llama 3's
    metadata, _ = read_gguf_header(path)
    assert metadata["general.architecture"] == "qwen3" and metadata["qwen3.attention.key_length"] == 24
    x = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for model in (load(path).model, load(path, dtype="auto").model):
            torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# The CLI: import a directory and a GGUF; show and list name the family
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qwen3_dir", ["gqa-tied"], indirect=True)
def test_cli_import_show_export(qwen3_dir, capsys, tmp_path):
    _, d = qwen3_dir
    code, out, err = run_cli(capsys, "import", d, "--name", "q3")
    assert code == 0 and "q3:latest" in out, err
    code, out, _ = run_cli(capsys, "show", "q3")
    assert code == 0 and "Qwen3ForCausalLM" in out
    code, out, _ = run_cli(capsys, "list")
    assert out.splitlines()[1].split()[:2] == ["q3:latest", "Qwen3"]
    gguf_path = tmp_path / "q3.gguf"
    code, out, err = run_cli(capsys, "export", "q3", "--format", "gguf", "--type", "f32", "--out", gguf_path)
    assert code == 0, err
    code, out, err = run_cli(capsys, "import", gguf_path, "--name", "q3g")
    assert code == 0, err
    code, out, _ = run_cli(capsys, "show", "q3g")
    assert code == 0 and "qwen3" in out
    argv = ["--prompt", "the model", "--temperature", "0", "--max-new-tokens", "8", "--no-fast"]
    first = run_cli(capsys, "generate", "q3", *argv)
    assert first[0] == 0 and first[1] == run_cli(capsys, "generate", "q3g", *argv)[1]
