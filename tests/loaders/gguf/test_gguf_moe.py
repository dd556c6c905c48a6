"""GGUF mixtures of experts both ways (issue 17): Mixtral as llama.cpp's arch `llama` with `llama.expert_count`,
Qwen3-MoE as `qwen3moe`, proved against `transformers` on tiny random models built from `MixtralConfig` and
`Qwen3MoeConfig` (4 experts, top-2; no downloads).

Each family: transformers' model -> our import -> our GGUF export -> our import gives transformers' logits
(fp32, 1e-4), the same experts chosen for every token in every layer and the same 16 greedy tokens, read
back as floats and kept packed (each expert a slice of llama.cpp's stacked 3-D `ffn_*_exps` tensors);
llama.cpp itself (llama-cpp-python; skipped without it) runs our file with transformers' logits and greedy
tokens; a q8_0 file (router kept F32, as llama-quantize does) runs in both, its experts packed Q8_0;
llama.cpp's own converter's file (where its source tree is here) and the old one-tensor-per-expert layout
import; `lmforge run` chats with a MoE GGUF. Bad files and exports llama.cpp would run differently are
one-line errors.
"""

from __future__ import annotations

import io

import gguf
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
from lmforge.quant.mix import tensor_types  # noqa: E402
from tests.loaders.gguf.helpers import assert_user_error, export_gguf, greedy, imported, llama_cpp_run, prompt_ids  # noqa: E402
from tests.loaders.parity import NEW_TOKENS, assert_moe_matches_transformers, our_choices, their_choices  # noqa: E402
from tests.loaders.test_mixtral import hf_mixtral  # noqa: E402
from tests.loaders.test_qwen3_moe import hf_qwen3_moe  # noqa: E402

transformers.logging.set_verbosity_error()

FAMILIES = {"mixtral": "llama", "qwen3moe": "qwen3moe"}  # family -> llama.cpp architecture


def reference(family: str, vocab: int) -> torch.nn.Module:
    # Qwen3-MoE renormalised over the chosen experts, as the released models are (llama.cpp always does); its
    # experts 32 wide (whole Q8_0 blocks), neither the hidden size nor the dense intermediate_size (96)
    if family == "mixtral":
        return hf_mixtral(vocab)
    return hf_qwen3_moe(vocab, norm_topk_prob=True, moe_intermediate_size=32)


@pytest.fixture(params=list(FAMILIES))
def moe(request, tmp_path, tiny_tokenizer):
    """(family, transformers model, our import of its saved directory)."""
    ref = reference(request.param, tiny_tokenizer.vocab_size)
    return request.param, ref, imported(ref, tmp_path, tiny_tokenizer)


def export(ours: torch.nn.Module, tokenizer, path, qtype: str = "f32"):
    return export_gguf(ours, tokenizer, path, qtype, name="moe")


ids = prompt_ids


# ---------------------------------------------------------------------------------------------------
# Ours both ways
# ---------------------------------------------------------------------------------------------------
def test_export_is_laid_out_as_llama_cpp_reads_it(moe, tiny_tokenizer, tmp_path):
    family, _, ours = moe
    cfg = ours.config
    path = export(ours, tiny_tokenizer, tmp_path / "m.gguf")
    metadata, infos = read_gguf_header(path)
    arch = FAMILIES[family]
    assert metadata["general.architecture"] == arch
    assert (metadata[f"{arch}.expert_count"], metadata[f"{arch}.expert_used_count"]) == (4, 2)
    if family == "qwen3moe":  # the experts' own width, not the dense intermediate_size (96)
        assert metadata["qwen3moe.expert_feed_forward_length"] == cfg.d_ff == 32
        assert metadata["qwen3moe.expert_weights_norm"] is True
    else:
        assert metadata["llama.feed_forward_length"] == cfg.d_ff and "llama.expert_feed_forward_length" not in metadata
    shapes = {t.name: t.shape for t in infos}
    E, F, C = 4, cfg.d_ff, cfg.d_model
    # numpy order; GGML's ne is reversed: {C, F, E} for gate/up, {F, C, E} for down, as llama.cpp creates them
    assert (shapes["blk.1.ffn_gate_inp.weight"], shapes["blk.1.ffn_gate_exps.weight"],
            shapes["blk.1.ffn_up_exps.weight"], shapes["blk.1.ffn_down_exps.weight"]) == ((E, C), (E, F, C), (E, F, C), (E, C, F))
    assert not any(n.startswith("blk.0.ffn_gate.") or n == "blk.0.ffn_up.weight" for n in shapes)
    # slice e of a stacked tensor is expert e's matrix: gate rows of our fused fc, and down as it is
    header = parse_file(path)
    data = open_data(str(path), header.size)
    info = {t.name: t for t in header.tensors}
    gate = dequantize(str(path), data, info["blk.1.ffn_gate_exps.weight"])
    down = dequantize(str(path), data, info["blk.1.ffn_down_exps.weight"])
    sd = ours.state_dict()
    np.testing.assert_array_equal(gate[3], sd["blocks.1.mlp.experts.3.fc.weight"][:F].numpy())
    np.testing.assert_array_equal(down[2], sd["blocks.1.mlp.experts.2.proj.weight"].numpy())
    np.testing.assert_array_equal(dequantize(str(path), data, info["blk.1.ffn_gate_exps.weight"].slice(3)), gate[3])


def test_export_import_matches_transformers(moe, tiny_tokenizer, tmp_path):
    """transformers -> ours -> GGUF -> ours: logits, experts per token, 16 greedy tokens; as floats and packed."""
    _, ref, ours = moe
    path = export(ours, tiny_tokenizer, tmp_path / "m.gguf")
    g = read_gguf(path)
    assert g.config.diff(ours.config) == []
    for name, t in ours.state_dict().items():  # q/k rows un-permuted for llama: every tensor comes back exactly
        torch.testing.assert_close(g.state_dict[name], t, atol=0, rtol=0, msg=name)
    assert_moe_matches_transformers(ref, build_model(g.config, g.state_dict, source=str(path)), tiny_tokenizer)
    packed = load(path, dtype="auto").model
    assert isinstance(packed.blocks[1].mlp.experts[3].proj, GGMLLinear)
    assert packed.blocks[1].mlp.experts[3].proj.parts[0].qtype == "F32"
    assert_moe_matches_transformers(ref, packed, tiny_tokenizer)


# ---------------------------------------------------------------------------------------------------
# llama.cpp runs our files
# ---------------------------------------------------------------------------------------------------
def test_llama_cpp_runs_our_moe_gguf(moe, tiny_tokenizer, tmp_path):
    _, ref, ours = moe
    path = export(ours, tiny_tokenizer, tmp_path / "m.gguf")
    prompt = ids(ours.config.vocab_size)
    logits, continuation = llama_cpp_run(path, prompt)
    with torch.no_grad():
        expected = ref(torch.tensor([prompt])).logits[0].numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
    theirs = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0,
                          eos_token_id=None)[0, len(prompt):].tolist()
    assert continuation == theirs == greedy(load(path).model, prompt)
    assert len(set(theirs)) > 2


def test_quantized_moe_gguf_runs(moe, tiny_tokenizer, tmp_path):
    """q8_0: experts stacked as Q8_0, the router F32 (llama-quantize never quantizes it). Our packed model
    keeps every expert a Q8_0 view of its slice, holding exactly the weights the float read gives, and
    picks transformers' experts.

    Q8_0 kernels (ours and llama.cpp's) also round the activations to 8 bits, and a token whose top-2 is
    nearly tied may route differently, so "the same" here is the weights bit for bit, and the outputs close."""
    _, ref, ours = moe
    path = tmp_path / "m-q8_0.gguf"
    types = write_gguf(path, ours.config, ours.state_dict(), tiny_tokenizer, qtype="q8_0")
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert {types[f"blk.1.ffn_{k}_exps.weight"] for k in ("gate", "up", "down")} == {"Q8_0"}
    loaded = load(path, dtype="auto")  # what `lmforge run` does: matrices kept in their GGML types
    assert loaded.format == "gguf:Q8_0"
    model, floats = loaded.model, read_gguf(path).state_dict
    fc = model.blocks[1].mlp.experts[2].fc
    assert isinstance(fc, GGMLLinear) and [p.qtype for p in fc.parts] == ["Q8_0", "Q8_0"]  # gate | up slices
    assert model.blocks[0].mlp.router.parts[0].qtype == "F32"
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GGMLLinear)}
    assert len(layers) == 2 * (3 + 2 * 4) + 1  # qkv, proj, router and 4 experts' fc and proj per layer, head
    for name, m in layers.items():
        assert torch.equal(m.dequantized(), floats[f"{name}.weight"]), name
    x = torch.tensor([ids(ours.config.vocab_size)])
    with torch.no_grad():
        mine, expected = model(x)[0], ref(x).logits[0]
    assert (mine.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75
    for a, b in zip(our_choices(model, x), their_choices(ref, x)):
        assert (a == b).all(-1).float().mean() >= 0.9


def test_llama_cpp_runs_our_quantized_moe_gguf(moe, tiny_tokenizer, tmp_path):
    """llama.cpp's logits on our q8_0 file are those of the weights we read from it (up to its 8-bit
    activations)."""
    _, _, ours = moe
    path = export(ours, tiny_tokenizer, tmp_path / "m-q8_0.gguf", qtype="q8_0")
    prompt = ids(ours.config.vocab_size)
    g = read_gguf(path)
    with torch.no_grad():
        exact = build_model(g.config, g.state_dict, source=str(path))(torch.tensor([prompt]))[0].numpy()
    logits, _ = llama_cpp_run(path, prompt, new_tokens=0)
    assert np.abs(logits - exact).max() < 0.1 * np.abs(exact).max()
    assert (logits.argmax(-1) == exact.argmax(-1)).mean() >= 0.75


def test_mixes_treat_stacked_experts_as_llama_quantize_does():
    """The router is never quantized; ffn_down_exps gets the _M mixes' extra bits where ffn_down would."""
    shapes = {}
    for i in range(8):
        shapes.update({f"blk.{i}.ffn_gate_inp.weight": (8, 256), f"blk.{i}.ffn_gate_exps.weight": (8, 512, 256),
                       f"blk.{i}.ffn_down_exps.weight": (8, 256, 512)})
    types = tensor_types(shapes, "q4_k_m")
    assert {types[f"blk.{i}.ffn_gate_inp.weight"] for i in range(8)} == {"F32"}
    more_bits = [0, 3, 6, 7]  # llama.cpp's use_more_bits(i, 8): the first and last eighth, every third between
    assert [types[f"blk.{i}.ffn_down_exps.weight"] for i in range(8)] == [
        "Q6_K" if i in more_bits else "Q4_K" for i in range(8)]
    assert {types[f"blk.{i}.ffn_gate_exps.weight"] for i in range(8)} == {"Q4_K"}


# ---------------------------------------------------------------------------------------------------
# Files made by others: llama.cpp's converter, and the old one-tensor-per-expert layout
# ---------------------------------------------------------------------------------------------------
def test_gguf_made_by_llama_cpps_converter(moe, tmp_path):
    """convert_hf_to_gguf.py (from the llama-cpp-python sdist's tree; skipped without it) turns transformers'
    directory into a llama / qwen3moe MoE GGUF that imports with transformers' logits, floats and packed."""
    from tests.loaders.gguf.test_gguf_vs_llamacpp import convert, llama_cpp_src

    if llama_cpp_src() is None:
        pytest.skip("llama.cpp's convert_hf_to_gguf.py not found (set LMFORGE_LLAMA_CPP_SRC)")
    family, ref, ours = moe
    path = convert(tmp_path / "hf", tmp_path / "converted.gguf", pre="llama-bpe")
    metadata, _ = read_gguf_header(path)
    arch = FAMILIES[family]
    assert metadata["general.architecture"] == arch and f"{arch}.expert_weights_norm" not in metadata
    g = read_gguf(path)
    assert (g.config.n_experts, g.config.experts_per_token, g.config.d_ff, g.config.norm_topk_prob) == (
        4, 2, ours.config.d_ff, True)
    x = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for model in (load(path).model, load(path, dtype="auto").model):
            torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=1e-4)


def rewrite(src, dst, *, edit_kv=None, tensors=None) -> None:
    """A copy of GGUF `src` with metadata edited ({key: value, or None to drop}) and/or its tensors replaced
    by `tensors(name -> float array)` -> {name: array}: for files our writer would never make."""
    header = parse_file(src)
    data = open_data(str(src), header.size)
    arrays = {t.name: dequantize(str(src), data, t) for t in header.tensors}
    if tensors is not None:
        arrays = tensors(arrays)
    w = gguf.GGUFWriter(str(dst), header.metadata["general.architecture"])
    w.kv_data[0].pop("general.architecture", None)
    for key, value in {**header.metadata, **(edit_kv or {})}.items():
        if value is None or key.startswith("GGUF."):
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, arr in arrays.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def per_expert(arrays: dict) -> dict:
    """llama.cpp's layout before it stacked experts: blk.N.ffn_gate.E.weight, one 2-D tensor per expert."""
    out = {}
    for name, arr in arrays.items():
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        if kind.endswith("_exps"):
            for e, matrix in enumerate(arr):
                out[name.replace(f"{kind}.", f"{kind.removesuffix('_exps')}.{e}.")] = matrix
        else:
            out[name] = arr
    return out


def test_old_one_tensor_per_expert_layout_imports(moe, tiny_tokenizer, tmp_path):
    _, ref, ours = moe
    src = export(ours, tiny_tokenizer, tmp_path / "m.gguf")
    path = tmp_path / "per-expert.gguf"
    rewrite(src, path, tensors=per_expert)
    names = {t.name for t in read_gguf_header(path)[1]}
    assert "blk.1.ffn_down.3.weight" in names and "blk.1.ffn_down_exps.weight" not in names
    x = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for model in (load(path).model, load(path, dtype="auto").model):
            torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("moe", ["qwen3moe"], indirect=True)
def test_lmforge_run_chats_with_a_moe_gguf(moe, tiny_tokenizer, tmp_path, capsys, monkeypatch):
    _, _, ours = moe
    path = export(ours, tiny_tokenizer, tmp_path / "m.gguf", qtype="q8_0")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n"))
    code, out, err = run_cli(capsys, "run", path, "--max-new-tokens", "4", "--temperature", "0", "--no-fast")
    assert code == 0, err
    code, out, err = run_cli(capsys, "show", path)
    assert code == 0 and "qwen3moe" in out, err


@pytest.mark.parametrize("moe", ["mixtral"], indirect=True)
def test_cli_exports_and_imports_a_moe_gguf(moe, tmp_path, capsys):
    code, _, err = run_cli(capsys, "import", tmp_path / "hf", "--name", "mx")
    assert code == 0, err
    path = tmp_path / "mx.gguf"
    code, _, err = run_cli(capsys, "export", "mx", "--format", "gguf", "--type", "f32", "--out", path)
    assert code == 0, err
    code, _, err = run_cli(capsys, "import", path, "--name", "mxg")
    assert code == 0, err
    argv = ["--prompt", "the model", "--temperature", "0", "--max-new-tokens", "8", "--no-fast"]
    first = run_cli(capsys, "generate", "mx", *argv)
    assert first[0] == 0 and first[1] == run_cli(capsys, "generate", "mxg", *argv)[1]


# ---------------------------------------------------------------------------------------------------
# Refusals: one line each, naming the file
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("moe", ["mixtral"], indirect=True)
@pytest.mark.parametrize("edit, message", [
    ({"llama.expert_used_count": 5}, "llama.expert_used_count is 5; it must be between 1 and expert_count (4)"),
    ({"llama.expert_used_count": 0}, "llama.expert_used_count is 0; it must be between 1 and expert_count (4)"),
    ({"llama.expert_count": 3}, "llama.expert_count is 3 but tensor 'blk.0.ffn_gate_inp.weight' (the router) has shape [4, 64]"),
    ({"llama.expert_count": None}, "llama.expert_used_count is 2 but the model has no experts"),
    ({"llama.expert_count": None, "llama.expert_used_count": None}, "tensor 'blk.0.ffn_gate.weight' is missing"),
    ({"llama.expert_weights_norm": False}, "llama.expert_weights_norm is false; llama.cpp's llama architecture always"),
    ({"llama.expert_count": "4"}, "metadata 'llama.expert_count' should be an int, got str"),
])
def test_bad_mixtral_files_are_one_line(moe, tiny_tokenizer, tmp_path, edit, message):
    _, _, ours = moe
    src = export(ours, tiny_tokenizer, tmp_path / "m.gguf")
    path = tmp_path / "bad.gguf"
    rewrite(src, path, edit_kv=edit)
    with pytest.raises(UserError) as e:
        read_gguf(path)
    assert message in str(e.value)
    assert_user_error(e, path)


@pytest.mark.parametrize("moe", ["qwen3moe"], indirect=True)
def test_bad_qwen3moe_files_are_one_line(moe, tiny_tokenizer, tmp_path):
    _, _, ours = moe
    src = export(ours, tiny_tokenizer, tmp_path / "m.gguf")
    cases = [
        ({"qwen3moe.expert_count": None, "qwen3moe.expert_used_count": None}, "'qwen3moe.expert_count' is missing or 0"),
        ({"qwen3moe.expert_used_count": 9}, "expert_used_count is 9; it must be between 1 and expert_count (4)"),
        ({"qwen3moe.expert_feed_forward_length": 40}, "tensor 'blk.0.ffn_gate_exps.weight' has shape [4, 32, 64], expected [4, 40, 64]"),
        ({"qwen3moe.expert_feed_forward_length": 0}, "the experts' width (qwen3moe.expert_feed_forward_length"),
    ]
    for i, (edit, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.gguf"
        rewrite(src, path, edit_kv=edit)
        with pytest.raises(UserError) as e:
            read_gguf(path)
        assert message in str(e.value)
        assert_user_error(e, path)
    # A missing stacked tensor, and a truncated stack
    path = tmp_path / "missing.gguf"
    rewrite(src, path, tensors=lambda a: {k: v for k, v in a.items() if k != "blk.1.ffn_up_exps.weight"})
    with pytest.raises(UserError, match="'blk.1.ffn_up_exps.weight' is missing"):
        read_gguf(path)
    path = tmp_path / "three.gguf"
    rewrite(src, path, tensors=lambda a: {k: v[:3] if k == "blk.1.ffn_down_exps.weight" else v for k, v in a.items()})
    with pytest.raises(UserError, match=r"'blk.1.ffn_down_exps.weight' has shape \[3, 64, 32\], expected \[4, 64, 32\]"):
        read_gguf(path)


def test_without_expert_weights_norm_qwen3moe_renormalises_as_llama_cpp_does(tiny_tokenizer, tmp_path):
    """llama.cpp's qwen3moe graph renormalises the top-k weights whatever the file says; a file without the
    key (as llama.cpp's converter writes them) is read that way, one that says false is honoured."""
    ref = reference("qwen3moe", tiny_tokenizer.vocab_size)
    (tmp_path / "hf").mkdir()
    ref.save_pretrained(tmp_path / "hf")
    tiny_tokenizer.save(tmp_path / "hf")
    src = export(load_model(tmp_path / "hf"), tiny_tokenizer, tmp_path / "m.gguf")
    rewrite(src, tmp_path / "absent.gguf", edit_kv={"qwen3moe.expert_weights_norm": None})
    rewrite(src, tmp_path / "false.gguf", edit_kv={"qwen3moe.expert_weights_norm": False})
    assert read_gguf(tmp_path / "absent.gguf").config.norm_topk_prob is True
    assert read_gguf(tmp_path / "false.gguf").config.norm_topk_prob is False


def test_exports_llama_cpp_would_run_differently_are_refused(tiny_tokenizer, tmp_path):
    base = dict(vocab_size=tiny_tokenizer.vocab_size, context_length=64, d_model=64, n_layers=1, n_heads=4,
                d_ff=64, n_experts=4, experts_per_token=2)
    for cfg, message in [
        (ModelConfig(**base, qk_norm=True, norm_topk_prob=False), "qwen3moe architecture always renormalises"),
        (ModelConfig(**base, qk_norm=True, attention_bias=True), "qwen3moe architecture has no output-projection bias"),
        (ModelConfig(**base, norm_topk_prob=False), "needs Mixtral's or Qwen3-MoE's shape"),
        (ModelConfig(**base, mlp_bias=True), "needs Mixtral's or Qwen3-MoE's shape"),
    ]:
        with pytest.raises(UserError, match=message) as e:
            write_gguf(tmp_path / "x.gguf", cfg, GPT(cfg).state_dict(), tiny_tokenizer)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "x.gguf").exists()
