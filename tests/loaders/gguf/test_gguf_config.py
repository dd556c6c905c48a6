"""GGUF metadata <-> ModelConfig (lmforge/loaders/gguf/config.py): Llama-3 rope scaling written as llama.cpp's
`rope_freqs.weight`, and an unsupported architecture refused with the supported ones named."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest

from lmforge.errors import UserError
from lmforge.loaders.gguf import read_gguf, read_gguf_header, write_gguf
from tests.loaders.gguf.helpers import LLAMA3, T, assert_user_error, random_model, tiny_cfg


def test_llama3_rope_freqs_are_the_converters(tmp_path, tiny_tokenizer):
    """rope_freqs.weight holds what llama.cpp's converter computes from the HF rope_scaling."""
    cfg = tiny_cfg(tiny_tokenizer, rope_scaling=LLAMA3)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_model(cfg).state_dict(), tiny_tokenizer, qtype="q8_0")
    reader = gguf.GGUFReader(path)
    got = np.asarray(reader.get_tensor([t.name for t in reader.tensors].index("rope_freqs.weight")).data)
    assert reader.tensors[[t.name for t in reader.tensors].index("rope_freqs.weight")].tensor_type == T.F32
    dim, base, sc = cfg.head_dim, cfg.rope_theta, LLAMA3
    want = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        lo, hi = sc["original_max_position_embeddings"] / sc["low_freq_factor"], sc["original_max_position_embeddings"] / sc["high_freq_factor"]
        if wavelen < hi:
            want.append(1.0)
        elif wavelen > lo:
            want.append(sc["factor"])
        else:
            smooth = (sc["original_max_position_embeddings"] / wavelen - sc["low_freq_factor"]) / (sc["high_freq_factor"] - sc["low_freq_factor"])
            want.append(1 / ((1 - smooth) / sc["factor"] + smooth))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_unsupported_architecture_lists_the_supported(tmp_path, tiny_tokenizer):
    path = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(path), "phi2")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="'phi2' is not supported; supported: llama, qwen2") as exc:
        read_gguf(path)
    assert_user_error(exc, path)
    assert read_gguf_header(path)[0]["general.architecture"] == "phi2"
