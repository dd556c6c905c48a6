"""`Embedder`: a tiny random BERT written by transformers matches transformers + manual pooling, a decoder's
embedding matches a hand-computed mean of its hidden states, truncation is reported, and bad input is one
line. The tiny BERT directory comes from conftest (`save_tiny_bert`), shared with the loader tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.errors import UserError
from lmforge.retrieval.embed import Embedder, embedder_for, is_encoder_dir

transformers = pytest.importorskip("transformers")

from conftest import save_tiny_bert as bert_dir  # the shared tiny encoder


def _reference(d: Path, texts: list[str], *, cls: bool) -> np.ndarray:
    """transformers' BertModel on the same ids, pooled and normalised by hand."""
    from tokenizers import Tokenizer

    hf = transformers.BertModel.from_pretrained(d).eval()
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    out = []
    with torch.no_grad():
        for t in texts:
            h = hf(input_ids=torch.tensor([tok.encode(t).ids])).last_hidden_state[0]
            v = h[0] if cls else h.mean(0)
            out.append((v / v.norm()).numpy())
    return np.stack(out)


@pytest.mark.parametrize("cls", [False, True])
def test_encoder_matches_transformers_and_manual_pooling(tmp_path, cls):
    d = bert_dir(tmp_path / "bert", cls_pooling=cls)
    e = Embedder.load(d)
    assert (e.kind, e.dim, e.max_tokens, e.model_id) == ("encoder", 32, 16, str(d.resolve()))
    texts = ["The cat sat on the mat.", "a dog ran", "rotate the logs"]
    vectors, truncated = e.embed(texts, batch_size=2)  # batches with padding
    assert vectors.dtype == np.float32 and vectors.shape == (3, 32) and truncated == [False] * 3
    np.testing.assert_allclose(vectors, _reference(d, texts, cls=cls), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    # token ids given as they are: the same vectors as the texts they encode
    np.testing.assert_allclose(e.embed_ids(e.tokenize(texts)), vectors, atol=1e-5)


def test_encoder_truncates_and_says_so(tmp_path):
    e = Embedder.load(bert_dir(tmp_path / "bert"))
    long = " ".join(["cat"] * 40)
    vectors, truncated = e.embed(["a dog", long])
    assert truncated == [False, True] and np.isfinite(vectors).all()
    cut = e.tokenize([long])[0][:15] + [3]  # what was embedded: the beginning, and [SEP] last
    np.testing.assert_allclose(vectors[1], e.embed_ids([cut])[0], atol=1e-5)


def _decoder_dir(tmp_path, tiny_tokenizer) -> Path:
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path / "dec", tiny_tokenizer, context_length=32)


def test_decoder_embedding_is_the_mean_of_the_last_hidden_states(tmp_path, tiny_tokenizer):
    from lmforge.loaders.auto import load

    d = _decoder_dir(tmp_path, tiny_tokenizer)
    e = Embedder.load(d)
    texts = ["the quick brown fox", "a", "jumps over the lazy dog again and again"]
    vectors, truncated = e.embed(texts, batch_size=3)
    assert e.kind == "decoder" and vectors.shape == (3, e.dim) and truncated == [False] * 3
    model = load(d).model
    want = []
    with torch.no_grad():  # by hand: the blocks, the final norm, the mean over tokens, unit length
        for t in texts:
            ids = torch.tensor([tiny_tokenizer.encode(t, allow_special=False)])
            x = model.tok_emb(ids)
            if model.config.positions == "learned":
                x = x + model.pos_emb(torch.arange(ids.shape[1]))[None]
            rope = None
            if model.config.positions == "rope":
                pos = torch.arange(ids.shape[1])[None]
                rope = (model.rope_cos[pos][:, None], model.rope_sin[pos][:, None])
            for block in model.blocks:
                x = block(x, rope, None, True, None, None)
            v = model.norm(x)[0].mean(0)
            want.append((v / v.norm()).numpy())
    np.testing.assert_allclose(vectors, np.stack(want), atol=1e-5)
    # the hook only acts while embedding: the model still generates logits as before
    ids = torch.tensor([tiny_tokenizer.encode("the quick")])
    with torch.no_grad():
        assert torch.equal(e.model(ids), model(ids))
    long = " ".join(["word"] * 200)
    _, truncated = e.embed([long])
    assert truncated == [True]


def test_bad_inputs_are_one_line(tmp_path):
    e = Embedder.load(bert_dir(tmp_path / "bert"))
    for rows, needle in [([[]], "no tokens"), ([[5] * 17], "more than the model's context of 16"),
                         ([[5, 999]], "outside the vocabulary")]:
        with pytest.raises(UserError, match=needle):
            e.embed_ids(rows)
    with pytest.raises(UserError, match="list of strings"):
        e.embed([1, 2])
    assert e.embed([])[0].shape == (0, 32)


def test_is_encoder_dir_and_the_per_process_cache(tmp_path, tiny_tokenizer):
    d = bert_dir(tmp_path / "bert")
    assert is_encoder_dir(d) and not is_encoder_dir(_decoder_dir(tmp_path, tiny_tokenizer))
    assert embedder_for(str(d)) is embedder_for(str(d))
    with pytest.raises(UserError, match="cannot load embedding model .*missing"):
        embedder_for(str(tmp_path / "missing"))


def test_an_encoder_imports_into_the_store_as_an_embedding_model(tmp_path, capsys):
    from conftest import run_cli

    src = bert_dir(tmp_path / "bge-src", cls_pooling=True)
    code, out, err = run_cli(capsys, "import", src, "--name", "bge")
    assert code == 0, err
    code, out, _ = run_cli(capsys, "list")
    line = next(x for x in out.splitlines() if x.startswith("bge:latest"))
    assert "BertModel (embedding)" in line and "DAMAGED" not in line
    code, out, _ = run_cli(capsys, "show", "bge")
    assert code == 0 and "embedding model" in out and "context length       16" in out
    assert "embedding length     32" in out and "layers               2" in out
    # the pooling files came along: the stored model embeds exactly as the source directory does
    stored, source = Embedder.load("bge"), Embedder.load(src)
    assert stored.model_id == "bge" and stored.model.cfg.pooling == "cls"
    np.testing.assert_array_equal(stored.embed(["a dog ran"])[0], source.embed(["a dog ran"])[0])
    for argv in (["run", "bge"], ["generate", "bge", "--prompt", "hi"]):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and "is an embedding model" in err and "cannot generate" in err


def test_an_unsupported_encoder_is_refused_at_import(tmp_path, capsys):
    from conftest import run_cli

    src = bert_dir(tmp_path / "src", cls_pooling=True)
    modules = json.loads((src / "modules.json").read_text())
    (src / "modules.json").write_text(json.dumps(modules + [{"idx": 3, "name": "3", "path": "3_Dense",
                                                             "type": "sentence_transformers.models.Dense"}]))
    capsys.readouterr()  # transformers' own progress bars while writing the directory
    code, _, err = run_cli(capsys, "import", src, "--name", "x")
    assert code == 2 and "module 'Dense' is not supported" in err and err.count("\n") == 1
    src2 = bert_dir(tmp_path / "src2")
    from safetensors.torch import load_file, save_file

    t = load_file(str(src2 / "model.safetensors"))
    del t["encoder.layer.1.output.dense.weight"]
    save_file(t, str(src2 / "model.safetensors"))
    capsys.readouterr()
    code, _, err = run_cli(capsys, "import", src2, "--name", "x")
    assert code == 2 and "encoder.layer.1.output.dense.weight" in err and "missing" in err
    code, out, _ = run_cli(capsys, "list")
    assert "x:" not in out
