"""lmforge.footprint: memory estimates from headers, held against what the loaders really hold and what
independent readers (gguf-py, safetensors, KVCache itself) say."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from safetensors.torch import save_file

from lmforge import footprint as fp
from lmforge.errors import UserError
from lmforge.loaders.auto import load
from lmforge.loaders.gguf import write_gguf
from lmforge.loaders.model_dir import write_model_files
from lmforge.model.gpt import GPT
from lmforge.model.kv_cache import KVCache
from lmforge.presets import get_preset
from lmforge.quant.linear import stored_nbytes


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    torch.manual_seed(0)
    return GPT(get_preset("tiny", vocab_size=tiny_tokenizer.vocab_size))


def model_dir(tmp_path, model, tokenizer, dtype=torch.float32, name="m"):
    """`model` saved as a model directory with its weights in `dtype`."""
    copy = GPT(model.config)
    copy.load_state_dict(model.state_dict())
    d = tmp_path / name
    d.mkdir()
    write_model_files(d, copy.to(dtype), tokenizer=tokenizer)
    return d


def tables_bytes(m) -> int:
    return sum(t.numel() * t.element_size() for t in m.position_tables().values())


def file_tensor_bytes(path) -> int:
    """The stored bytes of every tensor of a GGUF, by gguf-py's own reader."""
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_safetensors_weights_are_what_the_loader_holds(tmp_path, model, tiny_tokenizer, stored):
    d = model_dir(tmp_path, model, tiny_tokenizer, stored)
    for dtype in ("auto", torch.float32, torch.bfloat16):
        held = load(d, dtype=dtype).model
        assert fp.weights_bytes(d, dtype) == stored_nbytes(held) - tables_bytes(held), (stored, dtype)
    assert fp.weights_bytes(d) == fp.weights_bytes(d, "auto")  # None is auto
    n = sum(p.numel() for p in model.parameters())  # the tied head counted once, as the file stores it
    assert fp.weights_bytes(d, torch.float16) == 2 * n
    if stored is torch.bfloat16:  # on a GPU the whole model loads in its 16-bit type
        assert fp.weights_bytes(d, device="cuda") == 2 * n


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0", "q4_k_m"])
def test_gguf_weights_are_the_stored_blocks_and_an_explicit_dtype_dequantizes(tmp_path, tiny_tokenizer, qtype):
    cfg = get_preset("tiny", vocab_size=tiny_tokenizer.vocab_size, d_model=256, d_ff=512, n_heads=4, n_kv_heads=2)
    torch.manual_seed(0)
    path = tmp_path / f"m-{qtype}.gguf"
    write_gguf(path, cfg, GPT(cfg).state_dict(), tiny_tokenizer, qtype=qtype)
    assert fp.weights_bytes(path) == file_tensor_bytes(path)
    held = load(path, dtype="auto").model
    assert fp.weights_bytes(path) == stored_nbytes(held) - tables_bytes(held)
    elements = sum(int(t.n_elements) for t in gguf.GGUFReader(str(path)).tensors)
    assert fp.weights_bytes(path, torch.float32) == 4 * elements
    assert fp.weights_bytes(path, torch.bfloat16) == 2 * elements
    if qtype != "f16":
        assert fp.weights_bytes(path) < fp.weights_bytes(path, torch.float32) / 3


def test_a_store_entry_holding_a_gguf_and_sharded_safetensors(tmp_path, model, tiny_tokenizer):
    entry = tmp_path / "entry"
    entry.mkdir()
    write_gguf(entry / "model.gguf", model.config, model.state_dict(), tiny_tokenizer, qtype="q8_0")
    assert fp.weights_bytes(entry) == file_tensor_bytes(entry / "model.gguf")

    d = model_dir(tmp_path, model, tiny_tokenizer, torch.bfloat16, name="sharded")
    from safetensors.torch import load_file

    sd = load_file(d / "model.safetensors")
    names = sorted(sd)
    half = len(names) // 2
    save_file({k: sd[k] for k in names[:half]}, d / "a.safetensors")
    save_file({k: sd[k] for k in names[half:]}, d / "b.safetensors")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "a.safetensors" if i < half else "b.safetensors" for i, k in enumerate(names)}}))
    want = sum(t.numel() * t.element_size() for t in sd.values())
    assert fp.weights_bytes(d, torch.bfloat16) == want
    assert fp.weights_bytes(d, torch.float32) == 2 * want


def test_a_pickle_checkpoint_counts_the_configs_parameters_in_fp32(tmp_path, model, tiny_tokenizer):
    d = model_dir(tmp_path, model, tiny_tokenizer)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")  # never read: only its presence matters
    assert fp.weights_bytes(d) == 4 * model.config.num_params()
    assert fp.weights_bytes(d, torch.float16) == 2 * model.config.num_params()


def test_kv_cache_bytes_are_what_the_cache_allocates(model):
    cfg = model.config
    for batch, tokens, dtype in [(1, 64, torch.float32), (8, 33, torch.bfloat16), (3, 1, torch.float16)]:
        cache = KVCache.for_model(cfg, batch, tokens, dtype=dtype)
        real = cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
        assert fp.kv_cache_bytes(cfg, batch, tokens, dtype) == real


def test_kv_cache_bytes_count_sliding_window_rings():
    """Sliding layers that keep a ring (window + max_write - 1 slots) count as what KVCache allocates."""
    from lmforge.presets import get_preset

    cfg = get_preset("tiny", vocab_size=97, context_length=64, sliding_window=8, sliding_layers=[0])
    for max_write in (None, 4, 100):
        cache = KVCache.for_model(cfg, 3, 64, max_write=max_write)
        real = sum(t.numel() * t.element_size() for t in (cache.k, cache.v, cache.k_ring, cache.v_ring))
        assert fp.kv_cache_bytes(cfg, 3, 64, torch.float32, max_write) == real
    gemma = get_preset("gemma3-1b")  # 22 of 26 layers in rings of 512 + 4096 - 1 at a 32k context: a fifth
    assert fp.kv_cache_bytes(gemma, 1, 32768, torch.bfloat16, 4096) / fp.kv_cache_bytes(gemma, 1, 32768, torch.bfloat16) < 0.28


def test_estimate_adds_weights_cache_and_runtime(tmp_path, model, tiny_tokenizer):
    d = model_dir(tmp_path, model, tiny_tokenizer, torch.bfloat16)
    cfg = model.config
    e = fp.estimate(d, batch=4, tokens=10_000)  # more than the context: capped at it
    assert e.tokens == cfg.context_length and e.batch == 4
    assert e.kv_cache == fp.kv_cache_bytes(cfg, 4, cfg.context_length, torch.float32)  # the CPU computes in fp32
    assert e.weights == fp.weights_bytes(d)
    assert fp.RUNTIME_BYTES + tables_bytes(model) < e.runtime < fp.RUNTIME_BYTES + 2**20
    assert e.total == e.weights + e.kv_cache + e.runtime
    assert "GiB" in e.describe() and "4 x 64 tokens" in e.describe()
    # on a GPU a bf16 checkpoint computes (and caches) in bf16
    assert fp.estimate(d, device="cuda", batch=4).kv_cache == e.kv_cache // 2
    assert fp.estimate(d, dtype=torch.float32, device="cuda", batch=4).kv_cache == e.kv_cache


def test_free_memory_asks_the_device(monkeypatch):
    from lmforge import device

    monkeypatch.setattr(device, "available_memory", lambda: 12345)
    assert fp.free_memory("cpu") == 12345
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (1000, 8000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 300)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 100)
    assert fp.free_memory("cuda:0") == 1000 + 200  # the driver's free memory + the allocator's unused cache


def test_bad_input_is_one_line(tmp_path, model, tiny_tokenizer):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no weights found"):
        fp.weights_bytes(empty)
    d = model_dir(tmp_path, model, tiny_tokenizer)
    (d / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(UserError) as e:
        fp.weights_bytes(d)
    assert "not a readable safetensors file" in str(e.value) and "\n" not in str(e.value)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    with pytest.raises(UserError, match="not a GGUF file"):
        fp.weights_bytes(bad)
