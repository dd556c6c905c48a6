"""`load_encoder` on real HF files written by transformers, a hand-made WordPiece tokenizer, and ST configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.errors import UserError
from lmforge.loaders.bert import embed_texts, encoder_config, load_encoder

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conftest import save_tiny_bert  # the shared tiny encoder


def _bert_dir(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """The shared tiny BERT with an 8-position context (the too-long-input tests need a short one), and
    transformers' own model of it, the reference."""
    d = save_tiny_bert(tmp_path / "bert", max_position_embeddings=8)
    return d, transformers.BertModel.from_pretrained(d).eval()


def test_round_trip_matches_transformers(tmp_path: Path) -> None:
    d, hf = _bert_dir(tmp_path)
    encoder, tokenizer = load_encoder(d)
    assert (encoder.cfg.pooling, encoder.cfg.normalize) == ("mean", True)  # the default without ST files
    enc = tokenizer.encode("The cats sat")
    assert enc.tokens == ["[CLS]", "the", "cat", "##s", "sat", "[SEP]"]
    texts = ["The cat sat on the mat.", "a dog ran"]
    vectors, truncated = embed_texts(encoder, tokenizer, texts, batch_size=1)
    assert truncated == [True, False]  # 9 tokens > 8 positions
    ids = torch.tensor([tokenizer.encode(texts[1]).ids])
    with torch.no_grad():
        want = hf(input_ids=ids).last_hidden_state.mean(1)
    assert torch.allclose(vectors[1], torch.nn.functional.normalize(want, dim=-1)[0], atol=1e-5)
    # a batch with padding gives the same vectors as one text at a time
    together, _ = embed_texts(encoder, tokenizer, texts, batch_size=2)
    assert torch.allclose(together, vectors, atol=1e-5)
    short, flags = embed_texts(encoder, tokenizer, ["a dog ran"], max_tokens=4)
    assert flags == [True] and short.shape == (1, 32)


def test_bert_prefixed_weights_load(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    d, _ = _bert_dir(tmp_path)
    plain = load_file(str(d / "model.safetensors"))
    save_file({"bert." + k: v.contiguous() for k, v in plain.items()}, str(d / "model.safetensors"))
    encoder, _ = load_encoder(d)
    assert torch.equal(encoder.embeddings.word_embeddings.weight, plain["embeddings.word_embeddings.weight"])


def test_sentence_transformers_pooling_is_read(tmp_path: Path) -> None:
    d, _ = _bert_dir(tmp_path)
    (d / "1_Pooling").mkdir()
    pool = {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    (d / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (d / "modules.json").write_text(json.dumps(modules))
    assert (encoder_config(d).pooling, encoder_config(d).normalize) == ("cls", False)
    pool.update(pooling_mode_cls_token=False, pooling_mode_mean_tokens=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (d / "modules.json").write_text(json.dumps(modules))
    assert (encoder_config(d).pooling, encoder_config(d).normalize) == ("mean", True)
    pool.update(pooling_mode_cls_token=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    with pytest.raises(UserError, match="several pooling modes"):
        encoder_config(d)
    pool.update(pooling_mode_cls_token=False, pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    with pytest.raises(UserError, match="max_tokens"):
        encoder_config(d)


def _one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def test_gpt2_dir_is_refused_in_one_line(tmp_path: Path) -> None:
    d = tmp_path / "gpt2"
    transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50,
                                                   n_positions=16)).save_pretrained(d)
    with pytest.raises(UserError) as e:
        load_encoder(d)
    assert "gpt2" in _one_line(e)


def test_pickles_and_missing_tensors_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    d, hf = _bert_dir(tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["encoder.layer.1.output.dense.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(UserError, match="missing tensor encoder.layer.1.output.dense.weight") as e:
        load_encoder(d)
    _one_line(e)
    (d / "model.safetensors").unlink()
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle") as e:
        load_encoder(d)
    _one_line(e)
