"""Model directories (lmforge/loaders/model_dir.py): round trip, transformers loads them, clear errors for
anything that is not plainly a directory of safetensors, and loading without a second copy of the weights."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import UserError
from lmforge.loaders.hf import state_dict_to_hf
from lmforge.checkpoint import transaction
from lmforge.loaders.model_dir import load_model, write_model_files
from lmforge.model.gpt import GPT
from lmforge.presets import get_preset


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(get_preset("tiny", vocab_size=320, **kw))


def _save(directory, model, tokenizer):
    with transaction(directory) as staging:
        write_model_files(staging, model, tokenizer=tokenizer, lineage={"data": "test"})


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False}, {"positions": "learned", "norm": "layernorm", "mlp": "gelu"}])
def test_round_trip(tmp_path, tiny_tokenizer, kw):
    model = _model(**kw).eval()
    _save(tmp_path / "m", model, tiny_tokenizer)
    loaded = load_model(tmp_path / "m")
    idx = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.tok_emb.weight


def test_llama_shaped_directory_loads_in_transformers(tmp_path, tiny_tokenizer):
    transformers = pytest.importorskip("transformers")
    model = _model().eval()
    _save(tmp_path / "m", model, tiny_tokenizer)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    ids = tok("the model reads the value.", return_tensors="pt").input_ids
    assert ids[0].tolist() == tiny_tokenizer.encode("the model reads the value.")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "no config.json"),
    (lambda p: p.write_text("x"), "is a file"),
])
def test_not_a_model_directory(tmp_path, make, message):
    make(tmp_path / "x")
    with pytest.raises(UserError, match=message):
        load_model(tmp_path / "x")


def test_corrupt_weights_are_a_clear_error(tmp_path, tiny_tokenizer):
    _save(tmp_path / "m", _model(), tiny_tokenizer)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match="model.safetensors"):
        load_model(tmp_path / "m")


# ---------------------------------------------------------------------------------------------------
# Hostile weight files: one clear error naming the file, never a huge allocation or a crash
# ---------------------------------------------------------------------------------------------------
def _corrupt(kind: str, data: bytes) -> bytes:
    import struct

    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    if kind == "empty":
        return b""
    if kind == "short":
        return data[:5]
    if kind == "truncated-header":
        return data[: 8 + n // 2]
    if kind == "truncated-data":
        return data[: len(data) - 100]
    if kind == "huge-header-length":
        return struct.pack("<Q", 2**62) + data[8:]
    if kind == "header-longer-than-file":
        return struct.pack("<Q", len(data)) + data[8:]
    name = next(k for k in header if k != "__metadata__")
    if kind == "offsets-beyond-file":
        header[name]["data_offsets"] = [0, 2**40]
    elif kind == "shape-disagrees-with-offsets":
        header[name]["shape"] = [10**6, 10**6]
    elif kind == "unknown-dtype":
        header[name]["dtype"] = "Q9"
    elif kind == "negative-offset":
        header[name]["data_offsets"] = [-8, 8]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    return struct.pack("<Q", len(new)) + new + data[8 + n:]


HOSTILE = ["empty", "short", "truncated-header", "truncated-data", "huge-header-length", "header-longer-than-file",
           "offsets-beyond-file", "shape-disagrees-with-offsets", "unknown-dtype", "negative-offset"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_safetensors_give_one_clear_error(tmp_path, tiny_tokenizer, kind):
    _save(tmp_path / "m", _model(), tiny_tokenizer)
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(_corrupt(kind, f.read_bytes()))
    with pytest.raises(UserError, match="model.safetensors") as e:
        load_model(tmp_path / "m")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
def test_weight_index_cannot_point_outside_the_directory(tmp_path, tiny_tokenizer, shard):
    _save(tmp_path / "m", _model(), tiny_tokenizer)
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard}}))
    with pytest.raises(UserError, match="not a plain file name"):
        load_model(tmp_path / "m")


def test_missing_shard_and_duplicate_tensor(tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file, save_file

    _save(tmp_path / "m", _model(), tiny_tokenizer)
    d = tmp_path / "m"
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:3]}, d / "a.safetensors")
    save_file({k: tensors[k] for k in names[2:]}, d / "b.safetensors")  # names[2] in both
    index = {"weight_map": {**{k: "a.safetensors" for k in names[:3]}, **{k: "b.safetensors" for k in names[3:]}}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="also appears in another shard"):
        load_model(d)
    save_file({k: tensors[k] for k in names[3:]}, d / "b.safetensors")
    m = load_model(d)
    back = state_dict_to_hf(m.config, m.state_dict())
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    (d / "b.safetensors").unlink()
    with pytest.raises(UserError, match="b.safetensors is missing"):
        load_model(d)


def test_load_assigns_weights_without_a_second_copy(tmp_path, tiny_tokenizer):
    """Loading in the file's dtype keeps unfused tensors as views of the memory-mapped file (copy-on-write:
    changing them never changes the file), and fused ones are built once."""
    _save(tmp_path / "m", _model(), tiny_tokenizer)
    a = load_model(tmp_path / "m")
    with torch.no_grad():
        a.norm.weight.add_(1.0)
    b = load_model(tmp_path / "m")
    assert not torch.equal(a.norm.weight, b.norm.weight)
    assert b.lm_head.weight is b.tok_emb.weight
