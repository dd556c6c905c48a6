"""GGUF `phi3` both ways (issue 17), proved against `transformers` on tiny random Phi-3 models built from
`Phi3Config` (tests/loaders/test_phi3.py's; no downloads).

llama.cpp's `phi3`: q|k|v fused in `attn_qkv`, gate|up fused in `ffn_up` (2 x feed_forward_length rows, the
gate first: its SwiGLU activates the first half), a partial rotation as rope.dimension_count (NEOX pairs
(i, i + n/2) over the first n dims, as transformers rotates), LongRoPE's divisors as the tensors
`rope_factors_long` / `rope_factors_short` with rope.scaling.original_context_length and
rope.scaling.attn_factor (no rope.scaling.type, as its converter writes them). llama.cpp picks the long
divisors when its context is longer than the original one, transformers when the sequence is: the
comparisons run where both pick the same. Its phi3 graph ignores `attention.sliding_window` (the converter
writes it; llama.cpp warns and attends over everything): our import honours it, as transformers computes the
model, and our export makes the context the window as for `llama` (test_gguf_sliding.py).

Exported as `phi3` are the Phi-3s only Phi3ForCausalLM computes (a partial rotation or LongRoPE); the others
are Llama / Mistral and are written as `llama`, but llama.cpp's converter writes them as `phi3` too, and those
import (q, k, v and gate, up read as row ranges of the fused tensors, each kept packed).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import run_cli  # noqa: E402
from lmforge.loaders.auto import load  # noqa: E402
from lmforge.loaders.hf import PHI3  # noqa: E402
from lmforge.loaders.gguf import read_gguf, read_gguf_header, write_gguf  # noqa: E402
from lmforge.loaders.gguf.reader import dequantize, open_data, parse_file  # noqa: E402
from lmforge.loaders.model_dir import build_model, load_model  # noqa: E402
from lmforge.quant.linear import GGMLLinear  # noqa: E402
from lmforge.quant.mix import tensor_types  # noqa: E402
from tests.loaders.gguf.helpers import (  # noqa: E402
    assert_quantized_file_runs,
    export_gguf,
    greedy,
    imported,
    llama_cpp_run,
    prompt_ids,
)
from tests.loaders.parity import NEW_TOKENS, assert_matches_transformers  # noqa: E402
from tests.loaders.test_phi3 import VARIANTS, hf_phi3, longrope  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

KINDS = {
    # Phi-4-mini: 3/4 of each head rotated, tied, LongRoPE past an original context of 4 (the long divisors)
    "phi4-mini": VARIANTS["phi4-mini"],
    # Phi-3.5-mini without its (262144-long, here moot) window: LongRoPE within an original 48 (the short ones)
    # (llama.cpp's context is a multiple of 256: for its short divisors the original context is 256 here)
    "phi3.5-mini": dict(tie_word_embeddings=False, max_position_embeddings=512, original_max_position_embeddings=256,
                        rope_scaling=longrope(16)),
}
# the context llama.cpp runs each with: past the original 4 (long divisors), within the original 256 (short)
N_CTX = {"phi4-mini": 64, "phi3.5-mini": 256}
CONTEXT = {"phi4-mini": 64, "phi3.5-mini": 512}


@pytest.fixture(params=list(KINDS))
def phi(request, tmp_path, tiny_tokenizer):
    """(kind, transformers model, our import of its saved directory)."""
    ref = hf_phi3(tiny_tokenizer.vocab_size, **KINDS[request.param])
    return request.param, ref, imported(ref, tmp_path, tiny_tokenizer)


def export(ours: torch.nn.Module, tokenizer, path, qtype: str = "f32"):
    return export_gguf(ours, tokenizer, path, qtype, name="phi")


ids = prompt_ids


def same_config(a, b) -> None:
    """Equal configs, LongRoPE's divisors up to their float32 storage in the file."""
    sa, sb = dict(a.rope_scaling or {}), dict(b.rope_scaling or {})
    for key in ("short_factor", "long_factor"):
        np.testing.assert_allclose(sa.pop(key, []), sb.pop(key, []), rtol=1e-7)
    assert sa == sb and a.replace(rope_scaling=None).diff(b.replace(rope_scaling=None)) == []


# ---------------------------------------------------------------------------------------------------
# Ours both ways
# ---------------------------------------------------------------------------------------------------
def test_export_is_laid_out_as_llama_cpp_reads_it(phi, tiny_tokenizer, tmp_path):
    kind, ref, ours = phi
    cfg = ours.config
    path = export(ours, tiny_tokenizer, tmp_path / "m.gguf")
    metadata, infos = read_gguf_header(path)
    rotated = 12 if kind == "phi4-mini" else 16
    orig = ref.config.original_max_position_embeddings
    assert metadata["general.architecture"] == "phi3" and metadata["phi3.rope.dimension_count"] == rotated
    ctx = CONTEXT[kind]
    assert metadata["phi3.context_length"] == ctx and metadata["phi3.attention.sliding_window"] == 0
    assert metadata["phi3.rope.scaling.original_context_length"] == orig
    assert metadata["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(ctx / orig) / np.log(orig)) ** 0.5)
    assert "phi3.rope.scaling.type" not in metadata
    shapes = {t.name: t.shape for t in infos}
    C, F = 64, 96
    assert (shapes["blk.1.attn_qkv.weight"], shapes["blk.1.ffn_up.weight"], shapes["blk.1.ffn_down.weight"]) == (
        (C + 2 * 32, C), (2 * F, C), (C, F))
    assert not any(".attn_q." in n or ".ffn_gate." in n for n in shapes)
    assert shapes["rope_factors_long.weight"] == shapes["rope_factors_short.weight"] == (rotated // 2,)
    assert ("output.weight" in shapes) == (kind != "phi4-mini")
    # the fused tensors are transformers' own qkv_proj / gate_up_proj, and the factors its lists
    header = parse_file(path)
    data = open_data(str(path), header.size)
    info = {t.name: t for t in header.tensors}
    theirs = ref.state_dict()
    for name, hf in (("blk.1.attn_qkv.weight", "model.layers.1.self_attn.qkv_proj.weight"),
                     ("blk.1.ffn_up.weight", "model.layers.1.mlp.gate_up_proj.weight")):
        np.testing.assert_array_equal(dequantize(str(path), data, info[name]), theirs[hf].numpy())
    np.testing.assert_allclose(dequantize(str(path), data, info["rope_factors_long.weight"]),
                               cfg.rope_scaling["long_factor"], rtol=1e-7)


def test_export_import_matches_transformers(phi, tiny_tokenizer, tmp_path):
    """transformers -> ours -> GGUF -> ours: the same config, logits, 16 greedy tokens; floats and packed."""
    _, ref, ours = phi
    path = export(ours, tiny_tokenizer, tmp_path / "m.gguf")
    g = read_gguf(path)
    same_config(g.config, ours.config)
    for name, t in ours.state_dict().items():
        torch.testing.assert_close(g.state_dict[name], t, atol=0, rtol=0, msg=name)
    assert_matches_transformers(ref, build_model(g.config, g.state_dict, source=str(path)), tiny_tokenizer)
    packed = load(path, dtype="auto").model
    assert isinstance(packed.blocks[1].attn.qkv, GGMLLinear) and len(packed.blocks[1].attn.qkv.parts) == 1
    assert_matches_transformers(ref, packed, tiny_tokenizer)


# ---------------------------------------------------------------------------------------------------
# llama.cpp runs our files
# ---------------------------------------------------------------------------------------------------
def test_llama_cpp_runs_our_phi3_gguf(phi, tiny_tokenizer, tmp_path):
    kind, ref, ours = phi
    path = export(ours, tiny_tokenizer, tmp_path / "m.gguf")
    prompt = ids(ours.config.vocab_size)
    logits, continuation = llama_cpp_run(path, prompt, N_CTX[kind])
    with torch.no_grad():
        expected = ref(torch.tensor([prompt])).logits[0].numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
    theirs = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0,
                          eos_token_id=None)[0, len(prompt):].tolist()
    assert continuation == theirs == greedy(load(path).model, prompt)
    assert len(set(theirs)) > 2


@pytest.mark.parametrize("phi", ["phi4-mini"], indirect=True)
def test_quantized_phi3_gguf_runs_in_ours_and_llama_cpp(phi, tiny_tokenizer, tmp_path):
    """q8_0: the fused matrices kept Q8_0 in our packed model, holding exactly what the float read gives, and
    llama.cpp's logits those of the same weights (up to its 8-bit activations)."""
    kind, ref, ours = phi
    path = tmp_path / "m-q8_0.gguf"
    types = write_gguf(path, ours.config, ours.state_dict(), tiny_tokenizer, qtype="q8_0")  # named "phi3"
    assert read_gguf_header(path)[0]["general.name"] == "phi 3"  # llama.cpp would want </s> etc. of a "phi3"
    assert types["blk.0.attn_qkv.weight"] == types["blk.0.ffn_up.weight"] == "Q8_0"
    assert types["rope_factors_long.weight"] == "F32"
    model = assert_quantized_file_runs(path, ref, ours.config.vocab_size, N_CTX[kind])
    assert model.blocks[0].mlp.fc.parts[0].qtype == "Q8_0"


def test_mixes_give_a_fused_qkv_more_bits_as_llama_quantize_does():
    shapes = {f"blk.{i}.attn_qkv.weight": (3 * 256, 256) for i in range(4)}
    assert set(tensor_types(shapes, "q4_k_m").values()) == {"Q5_K"}
    assert set(tensor_types(shapes, "q5_k_m").values()) == {"Q6_K"}
    assert set(tensor_types(shapes, "q4_0").values()) == {"Q4_0"}


# ---------------------------------------------------------------------------------------------------
# Windows, and llama.cpp's converter's files
# ---------------------------------------------------------------------------------------------------
def test_a_window_becomes_the_context(tiny_tokenizer, tmp_path):
    """Phi-3.5's LongRoPE with a window of 8 in every layer (tests/loaders/test_phi3.py's): llama.cpp's phi3
    ignores windows, so the file's context is the window; the window key is written too, as the converter
    does. Read back, it gives the windowed model's logits over the window, and the attention factor of the
    model's own context is kept."""
    ref = hf_phi3(tiny_tokenizer.vocab_size, **VARIANTS["phi3.5-mini"])
    (tmp_path / "hf").mkdir()
    ref.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.config.sliding_window == 8
    path = export(ours, tiny_tokenizer, tmp_path / "m.gguf")
    metadata, _ = read_gguf_header(path)
    assert (metadata["phi3.context_length"], metadata["phi3.attention.sliding_window"]) == (8, 8)
    g = read_gguf(path)
    assert (g.config.context_length, g.config.sliding_window) == (8, 8)
    assert g.config.rope_scaling["attention_factor"] == pytest.approx(metadata["phi3.rope.scaling.attn_factor"])
    x = torch.randint(0, ref.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(build_model(g.config, g.state_dict, source=str(path))(x), ref(x).logits,
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["phi4-mini", "phi3-mini", "phi4"])
def test_gguf_made_by_llama_cpps_converter(variant, tmp_path, tiny_tokenizer):
    """convert_hf_to_gguf.py (skipped without it) writes every Phi-3 as `phi3`; each imports with transformers'
    logits, floats and packed: Phi-4-mini (partial rotation, LongRoPE), Phi-3-mini (its window honoured, at a
    length past it) and Phi-4 (Llama in Phi-3's layout: q/k/v and gate/up read as row ranges)."""
    from tests.loaders.gguf.test_gguf_vs_llamacpp import convert, llama_cpp_src

    if llama_cpp_src() is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py not found (set LMFORGE_LLAMA_CPP_SRC)")
    ref = hf_phi3(tiny_tokenizer.vocab_size, **VARIANTS[variant])
    d = tmp_path / "hf"
    ref.save_pretrained(d)
    tiny_tokenizer.save(d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    path = convert(d, tmp_path / "converted.gguf", pre="llama-bpe")
    metadata, _ = read_gguf_header(path)
    assert metadata["general.architecture"] == "phi3"
    g = read_gguf(path)
    assert g.config.sliding_window == (8 if variant == "phi3-mini" else None) and g.config.hf_class == PHI3
    x = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for model in (load(path).model, load(path, dtype="auto").model):
            torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("phi", ["phi4-mini"], indirect=True)
def test_cli_imports_runs_and_shows_a_phi3_gguf(phi, tiny_tokenizer, tmp_path, capsys, monkeypatch):
    _, _, ours = phi
    path = export(ours, tiny_tokenizer, tmp_path / "p.gguf", qtype="q8_0")
    code, out, err = run_cli(capsys, "show", path)
    assert code == 0 and "phi3" in out, err
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n"))
    code, out, err = run_cli(capsys, "run", path, "--max-new-tokens", "4", "--temperature", "0", "--no-fast")
    assert code == 0, err
    code, _, err = run_cli(capsys, "import", path, "--name", "pg")
    assert code == 0, err
    argv = ["--prompt", "the model", "--temperature", "0", "--max-new-tokens", "8", "--no-fast"]
    code, out, err = run_cli(capsys, "generate", "pg", *argv)
    assert code == 0 and out.strip(), err


# ---------------------------------------------------------------------------------------------------
# Refusals: one line each, naming the file
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("phi", ["phi4-mini"], indirect=True)
def test_bad_phi3_files_are_one_line(phi, tiny_tokenizer, tmp_path):
    from lmforge.errors import UserError
    from tests.loaders.gguf.helpers import assert_user_error
    from tests.loaders.gguf.test_gguf_moe import rewrite

    _, _, ours = phi
    src = export(ours, tiny_tokenizer, tmp_path / "m.gguf")
    cases = [
        (dict(edit_kv={"phi3.rope.dimension_count": 20}), "phi3.rope.dimension_count = 20 differs from the head size 16"),
        (dict(tensors=lambda a: {k: v for k, v in a.items() if k != "rope_factors_short.weight"}),
         "tensor 'rope_factors_short.weight' has shape none, expected [6]"),
        (dict(tensors=lambda a: {**a, "rope_factors_long.weight": -a["rope_factors_long.weight"]}),
         "rope_factors_long.weight holds factors that are not positive finite numbers"),
        (dict(tensors=lambda a: {k: v for k, v in a.items() if not k.startswith("rope_factors")}),
         "phi3.rope.scaling.attn_factor without LongRoPE factors is not supported"),
        (dict(tensors=lambda a: {k: v[:100] if k == "blk.1.attn_qkv.weight" else v for k, v in a.items()}),
         "tensor 'blk.1.attn_qkv.weight' has shape [100, 64], expected [128, 64]"),
    ]
    for i, (edit, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.gguf"
        rewrite(src, path, **edit)
        for read in (read_gguf, load):
            with pytest.raises(UserError) as e:
                read(path)
            assert message in str(e.value)
            assert_user_error(e, path)


@pytest.mark.parametrize("phi", ["phi3.5-mini"], indirect=True)
def test_a_family_that_splits_the_projections_reads_row_ranges(phi, tiny_tokenizer, tmp_path):
    """A phi3 file read for a config whose family names q, k, v and gate, up apart (a Phi-3 that only Llama
    describes, e.g. one with a scaling Phi-3 has not): each is a row range of the fused tensor, read as floats
    and kept packed, and together they are the same weights."""
    from lmforge.loaders.gguf.load import packed_tensors, _read_tensors

    _, _, ours = phi
    path = export(ours, tiny_tokenizer, tmp_path / "m.gguf", qtype="q8_0")
    cfg = read_gguf(path).config
    llama = cfg.replace(rope_scaling=None, hf_class=None)  # Llama's names: q_proj, k_proj, ..., gate_proj, up_proj
    header = parse_file(path)
    data = open_data(str(path), header.size)
    floats = _read_tensors(str(path), llama, "phi3", header, data, torch.float32)
    packed = packed_tensors(str(path), llama, "phi3", header, data)
    assert [(p.qtype, p.rows, p.packed.shape[0]) for p in packed["blocks.1.attn.qkv.weight"]] == [
        ("Q8_0", 64, 64), ("Q8_0", 32, 32), ("Q8_0", 32, 32)]
    fused = read_gguf(path).state_dict
    for name in ("blocks.1.attn.qkv.weight", "blocks.1.mlp.fc.weight"):
        torch.testing.assert_close(floats[name], fused[name], atol=0, rtol=0)
