"""Model directories (lmforge/loaders/model_dir.py): round trip, transformers loads them, clear errors for
anything that is not plainly a directory of safetensors, and loading without a second copy of the weights."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import UserError
from lmforge.loaders.hf_tensors import state_dict_to_hf
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


# ---------------------------------------------------------------------------------------------------
# Absurd configs: refused from the config and the weight file's header, before anything is built
# ---------------------------------------------------------------------------------------------------
def _tiny_dir(tmp_path, tokenizer, rows=320, **config_edits):
    """A tiny saved model (`rows` embedding rows) whose config.json then gets `config_edits` (the weights
    stay the 2-layer tiny ones)."""
    torch.manual_seed(0)
    model = GPT(get_preset("tiny", vocab_size=rows))
    d = tmp_path / "m"
    _save(d, model, tokenizer)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **config_edits}))
    return d


@pytest.fixture
def no_model_is_built(monkeypatch):
    """Call it once the test's files are written: from then on, constructing a GPT at all (on any device,
    the meta device included) fails the test."""
    def refuse(self, cfg):
        raise AssertionError(f"a GPT with {cfg.n_layers} layers and context {cfg.context_length} was built")

    return lambda: monkeypatch.setattr(GPT, "__init__", refuse)


def _refused(call, *fragments):
    with pytest.raises(UserError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


@pytest.mark.parametrize("edits, fragments", [
    # before: tried to allocate a 32 GB rope table (RuntimeError from the allocator after 10 s, 4 GB RSS)
    ({"max_position_embeddings": 10**9}, ["max_position_embeddings is 1000000000, beyond what lmforge supports"]),
    # before: built 10,000 blocks on the meta device (47 s, 1 GB RSS), then "tensor ... layers.2 ... is missing"
    ({"num_hidden_layers": 10**4}, ["num_hidden_layers is 10000, beyond what lmforge supports"]),
    # within the ceiling: the weight file's header says how many layers there are
    ({"num_hidden_layers": 4000}, ["config.json says 4000 layers", "blocks in the weights are 2 (numbered 0..1)"]),
    ({"vocab_size": 1000}, ["'model.embed_tokens.weight'", "(320, 64)", "implies (1000, 64)"]),
    # before: TypeError "'>' not supported between instances of 'str' and 'int'"
    ({"rms_norm_eps": "1e-5"}, ["rms_norm_eps must be a positive number, got '1e-5'"]),
])
def test_absurd_configs_are_refused_before_any_model_is_built(tmp_path, tiny_tokenizer, no_model_is_built, edits, fragments):
    from lmforge.loaders.auto import load
    from lmforge.loaders.model_dir import load_config
    from lmforge.store import import_model

    d = _tiny_dir(tmp_path, tiny_tokenizer, **edits)
    no_model_is_built()
    _refused(lambda: load_config(d), *fragments)
    _refused(lambda: load_model(d), *fragments)
    _refused(lambda: load(d), *fragments)
    _refused(lambda: import_model(d, "absurd"), *fragments)


def test_learned_position_table_must_match_the_context(tmp_path, tiny_tokenizer, no_model_is_built):
    from lmforge.loaders.model_dir import load_config

    torch.manual_seed(0)
    model = GPT(get_preset("tiny", vocab_size=320, positions="learned", norm="layernorm", mlp="gelu"))
    _save(tmp_path / "m", model, tiny_tokenizer)
    f = tmp_path / "m" / "config.json"
    cfg = json.loads(f.read_text())
    if "n_positions" in cfg:  # GPT-2-shaped
        cfg["n_positions"] = 4096
    else:
        cfg["lmforge"]["context_length"] = 4096
    f.write_text(json.dumps(cfg))
    no_model_is_built()
    _refused(lambda: load_config(tmp_path / "m"), "position table", "implies (4096, 64)")


def tables_computed(monkeypatch) -> list[int]:
    """The context lengths for which position tables are computed for real from now on (the meta-device
    model built to check shapes computes nothing); also used by the GGUF tests."""
    computed: list[int] = []
    real = GPT.position_tables

    def spy(self):
        if torch.empty(0).device.type != "meta":
            computed.append(self.config.context_length)
        return real(self)

    monkeypatch.setattr(GPT, "position_tables", spy)
    return computed


def test_rope_tables_that_would_not_fit_are_refused_before_they_are_computed(tmp_path, tiny_tokenizer, monkeypatch):
    """RoPE models store no position table, so the weights cannot bound the context: what the tables would
    cost is compared with the memory available, before they are computed (here: 2**22 positions x 16 x 2
    float32s = 512 MiB against a pretend 100 MiB)."""
    from lmforge.loaders import model_dir, packed

    d = _tiny_dir(tmp_path, tiny_tokenizer, max_position_embeddings=2**22)
    assert model_dir.load_config(d).context_length == 2**22  # within the ceiling, and the header agrees
    computed = tables_computed(monkeypatch)
    monkeypatch.setattr(packed, "available_memory", lambda: 100 << 20)
    _refused(lambda: load_model(d), "context of 4194304 tokens", "1.0 GiB", "0.1 GiB")
    assert computed == []
    monkeypatch.setattr(packed, "available_memory", lambda: None)  # unknown: no refusal on a guess
    d2 = _tiny_dir(tmp_path / "small", tiny_tokenizer, max_position_embeddings=128)
    computed.clear()
    assert load_model(d2).config.context_length == 128 and computed == [128]


def test_tokenizer_with_more_ids_than_the_embedding_is_refused(tmp_path, tiny_tokenizer):
    """Before: imported, then the first prompt using an id >= 300 died with IndexError in the embedding."""
    from lmforge.loaders.auto import load
    from lmforge.loaders.model_dir import load_config
    from lmforge.store import import_model

    d = _tiny_dir(tmp_path, tiny_tokenizer, rows=300)
    for call in (lambda: load_config(d), lambda: load(d), lambda: import_model(d, "small-vocab")):
        _refused(call, "the tokenizer has 320 tokens but the model's embedding only 300 rows")


def test_tokenizer_with_fewer_ids_than_the_embedding_is_accepted(tmp_path, tiny_tokenizer):
    """An embedding padded past the tokenizer is how real models ship (Qwen2: 151,665 tokens, 151,936 rows)."""
    from lmforge.loaders.auto import load

    d = _tiny_dir(tmp_path, tiny_tokenizer, rows=384)
    loaded = load(d)
    assert loaded.model.config.vocab_size == 384 and loaded.tokenizer.vocab_size == 320


@pytest.mark.parametrize("text, fragment", [
    ("[" * 200_000 + "]" * 200_000, "nested too deeply to parse"),  # before: RecursionError
    ("[" * 100 + "]" * 100, "nested more than 64 levels deep"),
    ('{"architectures": ["LlamaForCausalLM"], "rope_scaling": ' + "[" * 500 + "]" * 500 + "}", "nested more than 64"),
])
def test_deeply_nested_config_is_one_line(tmp_path, tiny_tokenizer, text, fragment):
    from lmforge.loaders.model_dir import load_config

    d = _tiny_dir(tmp_path, tiny_tokenizer)
    (d / "config.json").write_text(text)
    assert _refused(lambda: load_config(d), fragment).startswith(str(d / "config.json"))
    _refused(lambda: load_model(d), fragment)
