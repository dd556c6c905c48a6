"""The bounds-checked GGUF reader (lmforge/loaders/gguf/reader.py): the header against gguf's own reader,
file-type names, K-quant dequantization against gguf.quants, and hostile or damaged files, each of which
must be a one-line UserError naming the file, without a large allocation."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.errors import UserError
from lmforge.loaders.gguf import describe_file_type, read_gguf, read_gguf_header, write_gguf
from tests.loaders.gguf.helpers import (LLAMA3, T, assert_user_error, llama_hp, random_model, tiny_cfg, tokenizer_kv,
                                        transformers_model, write_llamacpp_style)


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory, tiny_tokenizer) -> Path:
    """A small valid F32 GGUF with every feature the parser must walk (llama3 rope_freqs, biases, vocab)."""
    path = tmp_path_factory.mktemp("gguf") / "valid.gguf"
    cfg = tiny_cfg(tiny_tokenizer, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, rope_scaling=LLAMA3)
    write_gguf(path, cfg, random_model(cfg).state_dict(), tiny_tokenizer, qtype="f32")
    return path


def test_header_agrees_with_gguf_reader(valid_gguf):
    """gguf's own reader, as an independent oracle of our parser."""
    md, infos = read_gguf_header(valid_gguf)
    reader = gguf.GGUFReader(valid_gguf)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            continue
        v = field.contents()
        assert md[key] == (pytest.approx(v, rel=1e-6) if isinstance(v, float) else v), key
    assert [t.name for t in infos] == [t.name for t in reader.tensors]
    for ours, theirs in zip(infos, reader.tensors):
        assert ours.shape == tuple(int(d) for d in reversed(theirs.shape))
        assert (ours.ggml_type, ours.offset, ours.n_bytes) == (theirs.tensor_type, theirs.data_offset, theirs.n_bytes)


def test_describe_file_type():
    info = lambda t, shape=(64, 64): type("I", (), {"shape": shape, "type_name": t})  # noqa: E731
    assert describe_file_type({"general.file_type": 15}, []) == "Q4_K_M"
    assert describe_file_type({"general.file_type": 0}, []) == "F32"
    assert describe_file_type({}, [info("Q4_K"), info("Q6_K"), info("F32", (64,))]) == "mixed (Q4_K, Q6_K)"
    assert describe_file_type({"general.file_type": 1024}, [info("Q8_0")]) == "Q8_0"


def test_k_quant_tensors_dequantize_like_gguf(tmp_path, tiny_tokenizer):
    """Q6_K and Q4_K blocks (gguf-py cannot quantize to them, so random valid blocks) read back as exactly
    what gguf.quants.dequantize gives."""
    hf = transformers_model("llama", tiny_tokenizer.vocab_size, tied=True)
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    rng = np.random.default_rng(0)
    blocks = {}
    for layer, (qt, d_at) in enumerate([(T.Q6_K, slice(208, 210)), (T.Q4_K, slice(0, 4))]):
        n_bytes = gguf.GGML_QUANT_SIZES[qt][1]
        raw = rng.integers(0, 256, size=(64, n_bytes), dtype=np.uint8)  # 64 rows of 256 values = one block
        scale = np.full((64, (d_at.stop - d_at.start) // 2), 0.01, dtype=np.float16)
        raw[:, d_at] = scale.view(np.uint8)
        blocks[f"blk.{layer}.ffn_down.weight"] = (raw, qt)
    path = tmp_path / "k.gguf"
    write_llamacpp_style(path, "llama", llama_hp(), sd, tokenizer_kv(tiny_tokenizer), types=blocks)
    g = read_gguf(path)
    assert g.file_type == "mixed (F32, Q4_K, Q6_K)"
    for layer, qt in enumerate([T.Q6_K, T.Q4_K]):
        want = gguf.quants.dequantize(blocks[f"blk.{layer}.ffn_down.weight"][0], qt)
        assert np.isfinite(want).all() and want.std() > 0
        np.testing.assert_array_equal(g.state_dict[f"blocks.{layer}.mlp.proj.weight"].numpy(), want)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(UserError, match="directory"):
        read_gguf_header(tmp_path)

# ---------------------------------------------------------------------------------------------------
# Hostile files: each damage is a one-line UserError
# ---------------------------------------------------------------------------------------------------
def _gstr(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _kv(key, vtype: int, payload: bytes) -> bytes:
    return _gstr(key) + struct.pack("<I", vtype) + payload


def _tinfo(name, dims, ggml_type=0, offset=0, n_dims=None) -> bytes:
    n = len(dims) if n_dims is None else n_dims
    return _gstr(name) + struct.pack("<I", n) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset)


def _gguf(kvs=(), infos=(), data=b"", *, n_kv=None, n_tensors=None, version=3) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % 32) + data


def _at(blob: bytes, needle: bytes, delta: int) -> int:
    i = blob.find(needle)
    assert i >= 0, needle
    return i + delta


def _hostile_cases() -> dict:
    """name -> function of the valid file's bytes giving the damaged file's bytes."""
    u8arr = struct.pack("<I", 0)
    f32 = struct.pack("<f", 1.0) * 4
    return {
        "empty": lambda valid: b"",
        "wrong-magic": lambda valid: b"GGML" + valid[4:],
        "three-bytes": lambda valid: valid[:3],
        "version-99": lambda valid: valid[:4] + struct.pack("<I", 99) + valid[8:],
        "version-1": lambda valid: valid[:4] + struct.pack("<I", 1) + valid[8:],
        "big-endian": lambda valid: valid[:4] + struct.pack(">I", 3) + valid[8:],
        "truncated-header": lambda valid: valid[:14],
        "truncated-kv": lambda valid: valid[:_at(valid, b"general.name", 6)],
        "truncated-kv-value": lambda valid: valid[:_at(valid, b"tokenizer.ggml.tokens", 40)],
        "truncated-tensor-info": lambda valid: valid[:_at(valid, b"blk.0.attn_norm.weight", 10)],
        "truncated-data": lambda valid: valid[:-1],
        "truncated-after-infos": lambda valid: valid[:_at(valid, b"output_norm.weight", 40)],
        "tensor-count-2**40": lambda valid: valid[:8] + struct.pack("<Q", 2**40) + valid[16:],
        "kv-count-2**40": lambda valid: valid[:16] + struct.pack("<Q", 2**40) + valid[24:],
        "key-length-2**62": lambda valid: _gguf([struct.pack("<Q", 2**62) + b"abc"]),
        "string-length-2**62": lambda valid: _gguf([_gstr("general.name") + struct.pack("<IQ", 8, 2**62) + b"x"]),
        "array-count-2**40": lambda valid: _gguf([_kv("a", 9, u8arr + struct.pack("<Q", 2**40) + b"\0" * 64)]),
        "string-array-count-2**40": lambda valid: _gguf([_kv("a", 9, struct.pack("<IQ", 8, 2**40) + b"\0" * 64)]),
        "arrays-nested-deep": lambda valid: _gguf([_kv("a", 9, struct.pack("<IQ", 9, 1) * 8 + u8arr + struct.pack("<Q", 0))]),
        "unknown-value-type": lambda valid: _gguf([_kv("a", 13, b"\0" * 8)]),
        "unknown-array-type": lambda valid: _gguf([_kv("a", 9, struct.pack("<IQ", 77, 1) + b"\0" * 8)]),
        "duplicate-key": lambda valid: _gguf([_kv("a", 4, b"\0" * 4), _kv("a", 4, b"\0" * 4)]),
        "key-not-utf8": lambda valid: _gguf([_kv(b"\xff\xfe", 4, b"\0" * 4)]),
        "alignment-3": lambda valid: _gguf([_kv("general.alignment", 4, struct.pack("<I", 3))], [_tinfo("x", [4])], f32),
        "alignment-0": lambda valid: _gguf([_kv("general.alignment", 4, struct.pack("<I", 0))], [_tinfo("x", [4])], f32),
        "tensor-offset-beyond-eof": lambda valid: _gguf([], [_tinfo("x", [4], 0, 2**40)], f32),
        "tensor-offset-2**64-1": lambda valid: _gguf([], [_tinfo("x", [4], 0, 2**64 - 32)], f32),
        "tensor-offset-misaligned": lambda valid: _gguf([], [_tinfo("x", [4], 0, 4)], f32 * 2),
        "tensor-data-past-eof": lambda valid: _gguf([], [_tinfo("x", [8])], f32),
        "dims-product-overflows": lambda valid: _gguf([], [_tinfo("x", [2**63, 2**63, 2**63, 2**63])], f32),
        "dims-huge": lambda valid: _gguf([], [_tinfo("x", [2**40, 2**20])], f32),
        "row-not-whole-blocks": lambda valid: _gguf([], [_tinfo("x", [31], int(T.Q8_0))], b"\0" * 64),
        "unknown-ggml-type": lambda valid: _gguf([], [_tinfo("x", [4], 99)], f32),
        "removed-ggml-type-4": lambda valid: _gguf([], [_tinfo("x", [4], 4)], f32),
        "n-dims-9": lambda valid: _gguf([], [_tinfo("x", [4] * 9)], f32),
        "n-dims-0": lambda valid: _gguf([], [_tinfo("x", [], n_dims=0)], f32),
        "n-dims-2**31": lambda valid: _gguf([], [_tinfo("x", [4], n_dims=2**31)], f32),
        "duplicate-tensor": lambda valid: _gguf([], [_tinfo("x", [4]), _tinfo("x", [4], 0, 32)], f32 + b"\0" * 16 + f32),
        "tensor-name-2**62": lambda valid: _gguf([], [struct.pack("<Q", 2**62) + b"x"]),
        "no-architecture": lambda valid: _gguf([], [_tinfo("x", [4])], f32),
    }


HOSTILE = _hostile_cases()


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_files_are_one_line_user_errors(tmp_path, valid_gguf, case):
    blob = HOSTILE[case](valid_gguf.read_bytes())
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(blob)
    tracemalloc.start()
    try:
        for fn in (read_gguf_header, read_gguf):
            if fn is read_gguf_header and case == "no-architecture":
                continue  # structurally fine; only a model reader minds
            with pytest.raises(UserError) as exc:
                fn(path)
            assert_user_error(exc, path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{case}: peak allocation {peak} bytes"

# ---------------------------------------------------------------------------------------------------
# Fuzzing: damaged files never raise anything but UserError
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_base(valid_gguf):
    blob = valid_gguf.read_bytes()
    _, infos = read_gguf_header(valid_gguf)
    return blob, min(t.offset for t in infos)  # bytes, and where the tensor data begins


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_files_raise_only_user_error(tmp_path_factory, fuzz_base, data):
    blob, header_end = fuzz_base
    buf = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        pos = data.draw(st.one_of(st.integers(0, header_end - 1), st.integers(0, len(buf) - 1)), label="pos")
        buf[pos] = data.draw(st.integers(0, 255), label="byte")
    if data.draw(st.booleans(), label="truncate"):
        buf = buf[: data.draw(st.integers(0, len(buf)), label="length")]
    path = tmp_path_factory.getbasetemp() / "fuzz.gguf"
    path.write_bytes(bytes(buf))
    for fn in (read_gguf_header, read_gguf):
        try:
            fn(path)
        except UserError as e:
            assert str(path) in str(e) and "\n" not in str(e)
