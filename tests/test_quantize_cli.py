"""`lmforge quantize`: GGUF files and store entries with the mix llama.cpp would choose, a quality report with real
numbers (Q8_0 nearly lossless, Q4_0 worse), `show`/`list`, one line and a clean store for every mistake, and
(where llama-cpp-python is installed) llama.cpp loading and running what we wrote."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_corpus, run_cli


run = run_cli  # (code, out, err) of an in-process lmforge run, from conftest


def assert_user_error(capsys, argv, *fragments):
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge") and "error: " in lines[0], err  # ours or argparse's
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def kmodel(tmp_path_factory, tiny_tokenizer):
    """A seeded random model whose rows are 256 values (so the K-quants apply; ffn_down rows of 384 fall
    back as llama.cpp does), 8 layers (so the _M mix has both kinds of layer), and an untied output
    projection scaled up 5x (a random tied model just echoes its input token, and its logits hardly move
    under quantization; with this one Q8_0 gives KL ~2e-4 and 98 % top-1, Q4_0 ~0.04 and 73 %)."""
    from lmforge.model.gpt import GPT
    from lmforge.presets import get_preset
    from lmforge.train.checkpointer import Checkpointer

    d = tmp_path_factory.mktemp("kmodel") / "m"
    cfg = get_preset("tiny", vocab_size=tiny_tokenizer.vocab_size, context_length=64).replace(
        d_model=256, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=384, tie_embeddings=False)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    Checkpointer(d, tokenizer=tiny_tokenizer).save(model, None, [], {"step": 0})
    return d


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("evaltext") / "held_out.txt"
    f.write_text(make_corpus(400, seed=5))
    return f


def _record(name):
    from lmforge.store import model_path

    return json.loads((model_path(name) / "lmforge.json").read_text())["quantization"]


def test_store_entries_reports_show_and_list(capsys, kmodel, eval_file):
    reports = {}
    for t in ("q8_0", "q4_0", "q4_k_m"):
        code, out, err = run(capsys, "quantize", kmodel, "--type", t, "--name", f"k:{t}", "--eval-data", eval_file,
                             "--eval-tokens", "2000", "--no-progress")
        assert code == 0, err
        assert "perplexity" in out and "mean KL divergence" in out and f"added k:{t}" in out
        q = _record(f"k:{t}")
        assert q["type"] == t.upper() and q["source"] == str(kmodel)
        r = reports[t] = q["report"]
        assert r["eval_tokens"] == 31 * 64 and r["eval_source"] == str(eval_file)  # 31 context windows
        assert r["size_after"] < r["size_before"] and r["decode_tok_s"] > 0
    # 8 layers x 7 matrices + token_embd + output; 17 vectors
    want = {"q8_0": {"Q8_0": 58, "F32": 17},
            "q4_0": {"Q4_0": 57, "F32": 17, "Q6_K": 1},  # the output projection: Q6_K, as llama.cpp does
            # attn_v Q6_K in layers 0, 3, 6, 7; ffn_down's 384-value rows: Q6_K -> Q8_0 there, Q4_K -> Q5_0
            # elsewhere; attn_output's rows (4 heads x 16) are 64 values: Q4_K -> Q5_0
            "q4_k_m": {"Q4_K": 37, "F32": 17, "Q6_K": 5, "Q5_0": 12, "Q8_0": 4}}
    for t, counts in want.items():
        assert _record(f"k:{t}")["tensor_types"] == counts
    q8, q4, q4k = reports["q8_0"], reports["q4_0"], reports["q4_k_m"]
    # Q8_0 nearly lossless; 4-bit types clearly not; Q4_K_M (more bits where it matters) better than Q4_0
    assert q8["kld"] < 1e-3 and q8["top1"] > 95.0 and abs(q8["dppl_percent"]) < 0.5
    assert q4["kld"] > 10 * q8["kld"] and q4["top1"] < q8["top1"] - 5.0 and q4["dppl_percent"] > q8["dppl_percent"]
    assert q4k["kld"] < q4["kld"]
    assert q8["ppl_before"] == q4["ppl_before"]  # the same windows, the same original

    code, out, _ = run(capsys, "show", "k:q8_0")
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("quantization"))
    assert "Q8_0, dPPL " in line and "KLD " in line and "top-1 " in line
    code, out, _ = run(capsys, "show", "k:q4_k_m", "--json")
    assert json.loads(out)["quantization"]["tensor_types"]["Q6_K"] == 5
    code, out, _ = run(capsys, "list")
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines()[1:]}
    assert rows["k:q4_k_m"][3] == "Q4_K_M" and rows["k:q8_0"][3] == "Q8_0"

    # a quantized model loads and runs by name; quantizing it again down to a K-quant is refused ...
    code, out, _ = run(capsys, "generate", "k:q4_k_m", "--prompt", "the model", "--max-new-tokens", "3",
                       "--temperature", "0")
    assert code == 0
    assert_user_error(capsys, ["quantize", "k:q4_k_m", "--type", "q6_k", "--name", "k:again"],
                      "already quantized", "Q4_K_M -> Q6_K", "--allow-requantize")
    assert_user_error(capsys, ["quantize", "k:q8_0", "--type", "q8_0", "--out", "x.gguf"], "Q8_0 -> Q8_0")
    # ... unless asked; and going up (Q4_0 -> Q8_0) says from what to what
    code, out, err = run(capsys, "quantize", "k:q4_k_m", "--type", "q6_k", "--name", "k:again", "--no-report",
                         "--allow-requantize", "--no-progress")
    assert code == 0 and "Q4_K_M -> Q6_K" in err and _record("k:again")["report"] is None
    code, out, err = run(capsys, "quantize", "k:q4_0", "--type", "q8_0", "--name", "k:up", "--no-report", "--no-progress")
    assert code == 0 and "Q4_0 -> Q8_0" in err


def test_written_k_quant_file_matches_the_model(tmp_path, capsys, kmodel):
    """The Q4_K_M file decodes (through gguf-py's reader path) to weights close to the original, with
    the types `tensor_types` chose; logits stay close to the float model's."""
    from gguf import GGMLQuantizationType as T

    from lmforge.loaders.auto import load
    from lmforge.loaders.gguf import read_gguf_header
    from lmforge.quant.mix import tensor_types

    out = tmp_path / "m.gguf"
    code, stdout, err = run(capsys, "quantize", kmodel, "--type", "q4_k_m", "--out", out, "--no-report", "--no-progress")
    assert code == 0, err
    meta, infos = read_gguf_header(out)
    assert meta["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert {t.name: T(t.ggml_type).name for t in infos} == tensor_types({t.name: t.shape for t in infos}, "q4_k_m")
    ref, back = load(kmodel).model.eval(), load(out).model.eval()
    want, got = ref.state_dict(), back.state_dict()
    assert set(want) == set(got)
    for k, w in want.items():  # every matrix within a 4-bit quantizer's error (~0.07 of its spread on Gaussian data)
        assert ((got[k] - w).square().mean().sqrt() / w.std().clamp(min=1e-12)).item() < 0.12, k
    x = torch.randint(0, ref.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(x), back(x)
    assert ((a - b).square().mean().sqrt() / a.std()).item() < 0.25
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.6


def test_mistakes_are_one_line_and_leave_nothing(tmp_path, capsys, kmodel, monkeypatch):
    from lmforge.paths import models_root

    msg = assert_user_error(capsys, ["quantize", kmodel, "--type", "q3_k_s", "--out", tmp_path / "x.gguf"],
                            "unknown quantization type 'q3_k_s'")
    assert all(t in msg for t in ("q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"))
    assert_user_error(capsys, ["quantize", kmodel, "--type", "q8_0"], "--out", "--name")
    assert_user_error(capsys, ["quantize", kmodel, "--type", "q8_0", "--out", tmp_path / "a", "--name", "b"], "not allowed")
    assert_user_error(capsys, ["quantize", kmodel, "--type", "q8_0", "--out", tmp_path / "x.bin"], ".gguf")
    assert_user_error(capsys, ["quantize", kmodel, "--type", "f16", "--out", tmp_path / "x.gguf"], "lmforge export")
    assert_user_error(capsys, ["quantize", tmp_path / "nope", "--type", "q8_0", "--out", tmp_path / "x.gguf"])
    (tmp_path / "exists.gguf").write_bytes(b"x")
    assert_user_error(capsys, ["quantize", kmodel, "--type", "q8_0", "--out", tmp_path / "exists.gguf"], "--overwrite")
    assert_user_error(capsys, ["quantize", kmodel, "--type", "q8_0", "--name", "Bad Name!"])
    assert_user_error(capsys, ["quantize", kmodel, "--type", "q8_0", "--name", "z", "--eval-data", tmp_path / "missing.txt"],
                      "missing.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf"]

    import lmforge.cli.quantize as q

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(q, "quality_report", interrupted)  # Ctrl-C while the report is measured
    code, _, err = run(capsys, "quantize", kmodel, "--type", "q8_0", "--name", "z", "--eval-data", kmodel / "config.json",
                       "--no-progress")
    assert code == 130
    root = models_root()
    assert not root.exists() or [p.name for p in root.iterdir() if p.name != ".lock"] == []


def test_llama_cpp_loads_and_runs_our_q4_k_m(tmp_path, capsys, kmodel):
    from tests.loaders.gguf.helpers import open_llama_cpp
    out = tmp_path / "m.gguf"
    code, _, err = run(capsys, "quantize", kmodel, "--type", "q4_k_m", "--out", out, "--no-report", "--no-progress")
    assert code == 0, err
    llm = open_llama_cpp(out, vocab_only=False, n_ctx=64, n_threads=1)
    prompt = llm.tokenize(b"the model", add_bos=False)
    tokens = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1):
        tokens.append(tok)
        if len(tokens) == 5:
            break
    assert len(tokens) == 5 and all(0 <= t < llm.n_vocab() for t in tokens)


def test_lora_adapter_is_merged_first_and_its_base_decides_requantizing(tmp_path, capsys, tiny_tokenizer, eval_file):
    from conftest import save_tiny_model
    from lmforge.loaders.auto import load
    from lmforge.loaders.gguf import write_gguf
    from lmforge.loaders.peft import apply_lora
    from lmforge.model.lora import lora_modules
    from lmforge.train.checkpointer import Checkpointer

    base = save_tiny_model(tmp_path / "base", tiny_tokenizer)
    qbase = tmp_path / "base-q4km.gguf"
    for b, run_dir in ((base, tmp_path / "run"), (qbase, tmp_path / "qrun")):
        model = load(base).model
        if b == qbase:
            write_gguf(qbase, model.config, model.state_dict(), tiny_tokenizer, qtype="q4_k_m")
        apply_lora(model, targets="q_proj,v_proj", rank=2, alpha=4)
        with torch.no_grad():
            for _, m in lora_modules(model):
                m.lora_B.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
        Checkpointer(run_dir, tokenizer=tiny_tokenizer, base_model=str(b)).save(model, None, [], {"step": 1})
    code, out, err = run(capsys, "quantize", tmp_path / "run", "--type", "q8_0", "--out", tmp_path / "a.gguf",
                         "--eval-data", eval_file, "--eval-tokens", "256", "--no-progress")
    assert code == 0 and "LoRA adapter" in err and "merged" in err
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():  # the adapter's effect is in the file: closer to the merged model than to the base
        merged, plain, q = load(tmp_path / "run").model(ids), load(base).model(ids), load(tmp_path / "a.gguf").model(ids)
    assert (q - merged).abs().max() < 0.5 * (plain - merged).abs().max()
    assert_user_error(capsys, ["quantize", tmp_path / "qrun", "--type", "q4_k_m", "--out", tmp_path / "b.gguf"],
                      "already quantized", "Q4_K_M -> Q4_K_M")


def test_the_report_uses_the_validation_split_the_model_was_pretrained_with(tmp_path, capsys, kmodel, corpus_file):
    import shutil

    from lmforge.data.shards import prepare_data
    from lmforge.paths import cache_dir
    from lmforge.tokenizer import Tokenizer

    run_dir = tmp_path / "run"
    shutil.copytree(kmodel, run_dir)
    meta = json.loads((run_dir / "lmforge.json").read_text())
    meta["lineage"] = {**meta.get("lineage", {}), "objective": "pretrain", "data": str(corpus_file)}
    (run_dir / "lmforge.json").write_text(json.dumps(meta))
    code, out, err = run(capsys, "quantize", run_dir, "--type", "q8_0", "--name", "v", "--no-progress")
    assert code == 0, err
    r = _record("v")["report"]
    assert r["eval_source"] == f"the validation split of {corpus_file}"
    val = prepare_data(str(corpus_file), Tokenizer.load(run_dir), cache_dir("data"), val_fraction=0.05, seed=0,
                       show_progress=False).val  # what the pretrainer held out
    assert r["eval_tokens"] == min(len(val) - 1, 32768) // 64 * 64
