"""GGUF `gemma2` and `gemma3` both ways (issue 17), proved against `transformers` on tiny random Gemma 2 / Gemma 3
models built from their configs (tests/loaders/test_gemma.py's; no downloads).

What llama.cpp's gemma graphs do, and these files must say: norms stored as 1 + w, a norm after each
sublayer (`post_attention_norm`, `post_ffw_norm`) and Gemma's `ffn_norm` before the MLP, Gemma 3's
`attn_q_norm` / `attn_k_norm`, the window and which layers slide (`attention.sliding_window(_pattern)`; without
the pattern key llama.cpp assumes every 2nd (gemma2) / 6th (gemma3) layer global), gemma3's local RoPE base
(`rope.freq_base_swa`; 10000 without it), gemma2's soft caps, and an attention scale that GGUF cannot carry:
llama.cpp derives it (1/sqrt(head_dim) but for the 27B models), so the references here have
query_pre_attn_scalar = head_dim, and a model with another scale is refused on export.

Each family: transformers -> our import -> our GGUF -> our import gives transformers' logits at 24 tokens (three
windows of 8) and the same 16 greedy tokens (floats and kept packed); llama.cpp runs our file with
transformers' logits and tokens; llama.cpp's converter's file imports with transformers' logits; a q8_0 file
runs, kept quantized, in ours and in llama.cpp; `lmforge import/run/show` take the GGUF.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import run_cli  # noqa: E402
from lmforge.config import ModelConfig  # noqa: E402
from lmforge.errors import UserError  # noqa: E402
from lmforge.loaders.auto import load  # noqa: E402
from lmforge.loaders.gguf import read_gguf, read_gguf_header, write_gguf  # noqa: E402
from lmforge.loaders.gguf.reader import dequantize, open_data, parse_file  # noqa: E402
from lmforge.loaders.model_dir import build_model, load_model  # noqa: E402
from lmforge.model.gpt import GPT  # noqa: E402
from lmforge.quant.linear import GGMLLinear  # noqa: E402
from tests.loaders.gguf.helpers import (  # noqa: E402
    assert_quantized_file_runs,
    assert_user_error,
    export_gguf,
    greedy,
    imported,
    llama_cpp_run,
    prompt_ids,
)
from tests.loaders.gguf.test_gguf_moe import rewrite  # noqa: E402
from tests.loaders.parity import NEW_TOKENS, assert_matches_transformers  # noqa: E402
from tests.loaders.test_gemma import BASE, GEMMA2_KW, GEMMA3_KW, randomize  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# query_pre_attn_scalar = head_dim (16): the scale llama.cpp derives for every Gemma but the 27B ones
_BASE = {**BASE, "query_pre_attn_scalar": 16}
KINDS = {
    # (transformers config, llama.cpp arch, sliding layers)
    "gemma2": (lambda v: transformers.Gemma2Config(vocab_size=v, **_BASE, **GEMMA2_KW), "gemma2", [0, 2]),
    # llama.cpp's default gemma3 pattern (every 6th layer global): what its converter's files rely on
    "gemma3": (lambda v: transformers.Gemma3TextConfig(vocab_size=v, **{**_BASE, "num_hidden_layers": 6},
                                                       **{**GEMMA3_KW, "sliding_window_pattern": 6}), "gemma3", [0, 1, 2, 3, 4]),
    # another pattern (every 3rd layer global), which only the pattern key tells llama.cpp
    "gemma3-p3": (lambda v: transformers.Gemma3TextConfig(vocab_size=v, **_BASE, **GEMMA3_KW), "gemma3", [0, 1, 3]),
}


def reference(kind: str, vocab: int) -> torch.nn.Module:
    return randomize(transformers.AutoModelForCausalLM.from_config(KINDS[kind][0](vocab)))


@pytest.fixture(params=list(KINDS))
def gemma(request, tmp_path, tiny_tokenizer):
    """(kind, transformers model, our import of its saved directory)."""
    ref = reference(request.param, tiny_tokenizer.vocab_size)
    return request.param, ref, imported(ref, tmp_path, tiny_tokenizer)


def export(ours: torch.nn.Module, tokenizer, path, qtype: str = "f32"):
    return export_gguf(ours, tokenizer, path, qtype, name="gemma")


ids = prompt_ids


# ---------------------------------------------------------------------------------------------------
# Ours both ways
# ---------------------------------------------------------------------------------------------------
def test_export_is_laid_out_as_llama_cpp_reads_it(gemma, tiny_tokenizer, tmp_path):
    kind, _, ours = gemma
    arch = KINDS[kind][1]
    path = export(ours, tiny_tokenizer, tmp_path / "m.gguf")
    metadata, infos = read_gguf_header(path)
    assert metadata["general.architecture"] == arch
    assert metadata[f"{arch}.attention.sliding_window"] == 8
    pattern = metadata[f"{arch}.attention.sliding_window_pattern"]
    assert pattern == {"gemma2": 2, "gemma3": 6, "gemma3-p3": 3}[kind]
    assert metadata[f"{arch}.attention.key_length"] == 16
    if arch == "gemma2":
        assert (metadata["gemma2.attn_logit_softcapping"], metadata["gemma2.final_logit_softcapping"]) == (4.0, 3.0)
    else:
        assert metadata["gemma3.rope.freq_base"] == 1e6 and metadata["gemma3.rope.freq_base_swa"] == 10000.0
        assert metadata["gemma3.rope.scaling.type"] == "linear" and metadata["gemma3.rope.scaling.factor"] == 2.0
        assert "gemma3.attn_logit_softcapping" not in metadata
    names = {t.name for t in infos}
    assert {"blk.1.post_attention_norm.weight", "blk.1.ffn_norm.weight", "blk.1.post_ffw_norm.weight"} <= names
    assert ("blk.1.attn_q_norm.weight" in names) == (arch == "gemma3") and "output.weight" not in names
    # norms are stored as 1 + w, as llama.cpp's converter stores them; Gemma's post_attention_layernorm is the
    # norm of the attention's output, its pre_feedforward_layernorm llama.cpp's ffn_norm
    header = parse_file(path)
    data = open_data(str(path), header.size)
    info = {t.name: t for t in header.tensors}
    sd = ours.state_dict()
    for gguf_name, our_name in [("blk.1.post_attention_norm.weight", "blocks.1.post_attn_norm.weight"),
                                ("blk.1.ffn_norm.weight", "blocks.1.norm2.weight"),
                                ("blk.1.post_ffw_norm.weight", "blocks.1.post_mlp_norm.weight"),
                                ("output_norm.weight", "norm.weight")]:
        np.testing.assert_allclose(dequantize(str(path), data, info[gguf_name]), sd[our_name].numpy() + 1, rtol=0,
                                   atol=1e-7)


def test_export_import_matches_transformers(gemma, tiny_tokenizer, tmp_path):
    """transformers -> ours -> GGUF -> ours: the same config, logits 1e-4 past the window, 16 greedy tokens;
    as floats and packed."""
    kind, ref, ours = gemma
    path = export(ours, tiny_tokenizer, tmp_path / "m.gguf")
    g = read_gguf(path)
    assert g.config.diff(ours.config) == []
    assert g.config.sliding_window == 8 and [i for i in range(g.config.n_layers) if g.config.slides(i)] == KINDS[kind][2]
    for name, t in ours.state_dict().items():  # (1 + w) - 1 in float32: the norms within an ulp of 1
        torch.testing.assert_close(g.state_dict[name], t, atol=1e-7, rtol=0, msg=name)
    assert_matches_transformers(ref, build_model(g.config, g.state_dict, source=str(path)), tiny_tokenizer)
    packed = load(path, dtype="auto").model
    assert isinstance(packed.blocks[1].mlp.fc, GGMLLinear)
    assert_matches_transformers(ref, packed, tiny_tokenizer)


# ---------------------------------------------------------------------------------------------------
# llama.cpp runs our files
# ---------------------------------------------------------------------------------------------------
class GgmlGelu(torch.nn.Module):
    """GELU as llama.cpp's CPU backend computes it (ggml-cpu/vec.h, GGML_GELU_FP16): a table indexed by the
    input rounded to fp16, holding the tanh GELU rounded to fp16; 0 below -10 and the input above 10."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


def test_llama_cpp_runs_our_gemma_gguf(gemma, tiny_tokenizer, tmp_path):
    """llama.cpp's logits are transformers' within ~1e-4 once transformers' GELU is llama.cpp's (whose fp16
    table alone moves these logits by ~3e-4), and within 1e-3 of plain transformers; the greedy tokens are
    plain transformers'."""
    _, ref, ours = gemma
    path = export(ours, tiny_tokenizer, tmp_path / "m.gguf")
    prompt = ids(ours.config.vocab_size)
    logits, continuation = llama_cpp_run(path, prompt)
    with torch.no_grad():
        expected = ref(torch.tensor([prompt])).logits[0].numpy()
        acts = [layer.mlp.act_fn for layer in ref.model.layers]
        for layer in ref.model.layers:
            layer.mlp.act_fn = GgmlGelu()
        as_ggml = ref(torch.tensor([prompt])).logits[0].numpy()
        for layer, act in zip(ref.model.layers, acts):
            layer.mlp.act_fn = act
    # 2e-4: an input within float error of an fp16 rounding boundary may land one fp16 step away in llama.cpp
    np.testing.assert_allclose(logits, as_ggml, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=1e-3)
    theirs = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0,
                          eos_token_id=None)[0, len(prompt):].tolist()
    assert continuation == theirs == greedy(load(path).model, prompt)
    assert len(set(theirs)) > 2


@pytest.mark.parametrize("gemma", ["gemma2", "gemma3"], indirect=True)
def test_quantized_gemma_gguf_runs_in_ours_and_llama_cpp(gemma, tiny_tokenizer, tmp_path):
    """q8_0: our packed model keeps the matrices Q8_0, holding exactly the weights the float read gives, and
    llama.cpp's logits on the file are those of those weights (up to its 8-bit activations)."""
    _, ref, ours = gemma
    path = tmp_path / "m-q8_0.gguf"
    types = write_gguf(path, ours.config, ours.state_dict(), tiny_tokenizer, qtype="q8_0")
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.post_ffw_norm.weight"] == "F32"
    assert load(path, dtype="auto").format == "gguf:Q8_0"
    model = assert_quantized_file_runs(path, ref, ours.config.vocab_size)
    assert all(p.qtype == "Q8_0" for m in model.modules() if isinstance(m, GGMLLinear) and m is not model.lm_head
               for p in m.parts)


# ---------------------------------------------------------------------------------------------------
# llama.cpp's converter's files
# ---------------------------------------------------------------------------------------------------
def _gemma2_spm_dir(d, tmp_path):
    """A Gemma 2 directory with a SentencePiece tokenizer.model (llama.cpp's Gemma 2 converter reads no other)."""
    from tests.loaders.gguf.test_gguf_vs_llamacpp import spm_model_dir

    spm_model_dir(d)
    vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        (d / f).unlink(missing_ok=True)
    ref = reference("gemma2", vocab)
    ref.save_pretrained(d)
    return ref


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_gguf_made_by_llama_cpps_converter(kind, tmp_path, tiny_tokenizer):
    """convert_hf_to_gguf.py (skipped without it) turns transformers' directory into a gemma2 / gemma3 GGUF (no
    pattern key: llama.cpp's defaults, which these models follow) that imports with transformers' logits."""
    from tests.loaders.gguf.test_gguf_vs_llamacpp import convert, llama_cpp_src

    if llama_cpp_src() is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py not found (set LMFORGE_LLAMA_CPP_SRC)")
    d = tmp_path / "hf"
    if kind == "gemma2":
        ref, pre = _gemma2_spm_dir(d, tmp_path), None
    else:
        ref, pre = reference(kind, tiny_tokenizer.vocab_size), "llama-bpe"
        ref.save_pretrained(d)
        tiny_tokenizer.save(d)
    path = convert(d, tmp_path / "converted.gguf", pre=pre)
    metadata, _ = read_gguf_header(path)
    assert metadata["general.architecture"] == kind and f"{kind}.attention.sliding_window_pattern" not in metadata
    g = read_gguf(path)
    assert g.config.sliding_window == 8 and g.config.sliding_layers == ([0, 2] if kind == "gemma2" else [0, 1, 2, 3, 4])
    assert g.config.attn_scale == pytest.approx(16 ** -0.5)
    # and back to GGUF with its own vocabulary (gemma2's a SentencePiece one, written as llama.cpp's `llama`)
    again = tmp_path / "again.gguf"
    write_gguf(again, g.config, g.state_dict, g.tokenizer, qtype="f32")
    assert parse_file(again).metadata["tokenizer.ggml.model"] == ("llama" if kind == "gemma2" else "gpt2")
    x = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for model in (load(path).model, load(path, dtype="auto").model, load(again).model):
            torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gemma", ["gemma2", "gemma3-p3"], indirect=True)
def test_cli_imports_runs_and_shows_a_gemma_gguf(gemma, tiny_tokenizer, tmp_path, capsys, monkeypatch):
    kind, _, ours = gemma
    path = export(ours, tiny_tokenizer, tmp_path / "g.gguf", qtype="q8_0")
    code, out, err = run_cli(capsys, "show", path)
    assert code == 0 and KINDS[kind][1] in out, err
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n"))
    code, out, err = run_cli(capsys, "run", path, "--max-new-tokens", "4", "--temperature", "0", "--no-fast")
    assert code == 0, err
    code, _, err = run_cli(capsys, "import", path, "--name", "gg")
    assert code == 0, err
    argv = ["--prompt", "the model", "--temperature", "0", "--max-new-tokens", "8", "--no-fast"]
    code, out, err = run_cli(capsys, "generate", "gg", *argv)
    assert code == 0 and out.strip(), err


# ---------------------------------------------------------------------------------------------------
# What GGUF cannot say, refused in one line
# ---------------------------------------------------------------------------------------------------
def _gemma_cfg(tok, **kw) -> ModelConfig:
    base = dict(vocab_size=tok.vocab_size, context_length=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                head_dim=16, d_ff=96, norm_offset=True, post_norms=True, embed_scale=True, mlp="geglu",
                attn_softcap=4.0, final_softcap=3.0, sliding_window=8, sliding_layers=[0])
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("changes, message", [
    (dict(attn_scale=24 ** -0.5), "llama.cpp's gemma2 scales queries by 0.25 for this shape"),
    (dict(attn_softcap=None), "gemma2 always soft-caps"),
    (dict(tie_embeddings=False), "gemma2 computes the output from the token embeddings"),
    (dict(qk_norm=True, rope_local_theta=1e4, attn_softcap=5.0), "gemma3 has no attention soft-capping"),
    (dict(rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}), "rope scaling 'yarn'"),
])
def test_gemmas_llama_cpp_would_run_differently_are_refused(tiny_tokenizer, tmp_path, changes, message):
    cfg = _gemma_cfg(tiny_tokenizer, **changes)
    with pytest.raises(UserError, match=message) as e:
        write_gguf(tmp_path / "x.gguf", cfg, GPT(cfg).state_dict(), tiny_tokenizer)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.gguf").exists()


def test_the_27b_scale_is_derived_as_llama_cpp_does(tiny_tokenizer):
    """46 gemma2 layers / 62 gemma3 layers: llama.cpp scales by 1/sqrt(d_model / n_heads), so a GGUF of that
    depth reads back with that scale, and only a model with it exports."""
    from lmforge.loaders.gguf.config import export_arch, gemma_attn_scale

    assert gemma_attn_scale("gemma2", 46, 4608, 32, 128) == pytest.approx(144 ** -0.5)
    assert gemma_attn_scale("gemma3", 62, 5376, 32, 128) == pytest.approx(168 ** -0.5)
    assert gemma_attn_scale("gemma3", 34, 2560, 8, 256) == pytest.approx(256 ** -0.5)
    deep = _gemma_cfg(tiny_tokenizer, n_layers=46, d_model=96, sliding_layers=None)  # 96 / 4 = 24 != head_dim
    with pytest.raises(UserError, match="scales queries by 0.204124"):
        export_arch(deep)
    assert export_arch(deep.replace(attn_scale=24 ** -0.5)) == "gemma2"


@pytest.mark.parametrize("gemma", ["gemma3-p3"], indirect=True)
def test_pattern_and_defaults_as_llama_cpp_reads_them(gemma, tiny_tokenizer, tmp_path):
    """Without attention.sliding_window_pattern llama.cpp assumes its arch's; an explicit one-bool-per-layer
    pattern is read too; gemma3 without a window has none, and its local RoPE base defaults to 10000."""
    _, _, ours = gemma
    src = export(ours, tiny_tokenizer, tmp_path / "m.gguf")
    key = "gemma3.attention.sliding_window_pattern"
    cases = [({key: None}, [0, 1, 2, 3]), ({key: [True, False, False, True]}, [0, 3]),
             ({key: 1}, []), ({"gemma3.attention.sliding_window": None}, [])]
    for i, (edit, layers) in enumerate(cases):
        rewrite(src, tmp_path / f"p{i}.gguf", edit_kv=edit)
        cfg = read_gguf(tmp_path / f"p{i}.gguf").config
        assert [j for j in range(cfg.n_layers) if cfg.slides(j)] == layers, edit
    rewrite(src, tmp_path / "base.gguf", edit_kv={"gemma3.rope.freq_base_swa": None})
    assert read_gguf(tmp_path / "base.gguf").config.rope_local_theta == 10000.0
    for edit, message in [({key: [True, False]}, "sliding_window_pattern must hold one true/false per layer (4)"),
                          ({key: "3"}, "sliding_window_pattern must be an integer >= 0 or a list of booleans")]:
        rewrite(src, tmp_path / "bad.gguf", edit_kv=edit)
        with pytest.raises(UserError, match=re.escape(message)) as e:
            read_gguf(tmp_path / "bad.gguf")
        assert_user_error(e, tmp_path / "bad.gguf")


def test_gemma2_keys_llama_cpp_defaults(tiny_tokenizer, tmp_path):
    ref = reference("gemma2", tiny_tokenizer.vocab_size)
    (tmp_path / "hf").mkdir()
    ref.save_pretrained(tmp_path / "hf")
    tiny_tokenizer.save(tmp_path / "hf")
    src = export(load_model(tmp_path / "hf"), tiny_tokenizer, tmp_path / "m.gguf")
    rewrite(src, tmp_path / "bare.gguf", edit_kv={k: None for k in (
        "gemma2.attention.sliding_window", "gemma2.attention.sliding_window_pattern", "gemma2.attn_logit_softcapping",
        "gemma2.final_logit_softcapping")})
    cfg = read_gguf(tmp_path / "bare.gguf").config
    assert (cfg.sliding_window, cfg.sliding_layers, cfg.attn_softcap, cfg.final_softcap) == (4096, [0, 2], 50.0, 30.0)
    rewrite(src, tmp_path / "local.gguf", edit_kv={"gemma2.rope.freq_base_swa": 5000.0})
    with pytest.raises(UserError, match="no Gemma 2 has a local RoPE base") as e:
        read_gguf(tmp_path / "local.gguf")
    assert_user_error(e, tmp_path / "local.gguf")
