"""Tensor layouts GGUF <-> Hugging Face (lmforge/loaders/gguf/names.py): the `llama` rope permutation of q/k
rows is exactly llama.cpp's converter's, and under ggml's interleaved rope it scores like transformers'
rotate_half."""

from __future__ import annotations

import numpy as np
import torch

from tests.loaders.gguf.helpers import hf_to_gguf_permute


def test_rope_permutation_is_ggml_interleaved_rope():
    """The permuted rows under ggml's NORM rope (pairs 2i, 2i+1) score exactly like the HF rows under
    rotate_half (pairs i, i+D/2): what llama.cpp computes from a `llama` GGUF is what transformers computes."""
    from lmforge.loaders.gguf import rope_permute, rope_unpermute

    torch.manual_seed(0)
    H, D, C, P = 3, 8, 12, 10
    wq, wk, x = torch.randn(H * D, C, dtype=torch.float64), torch.randn(H * D, C, dtype=torch.float64), torch.randn(P, C, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.arange(P, dtype=torch.float64)[:, None] * inv  # (P, D/2)

    def hf_rope(v):  # (P, H, D), rotate_half
        a, b = v[..., : D // 2], v[..., D // 2:]
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    def ggml_rope(v):  # (P, H, D), interleaved pairs
        a, b = v[..., 0::2], v[..., 1::2]
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    def scores(rope, q_w, k_w):
        q, k = rope((x @ q_w.T).view(P, H, D)), rope((x @ k_w.T).view(P, H, D))
        return torch.einsum("phd,qhd->hpq", q, k)

    pq = torch.from_numpy(rope_permute(wq.numpy(), H))
    pk = torch.from_numpy(rope_permute(wk.numpy(), H))
    torch.testing.assert_close(scores(ggml_rope, pq, pk), scores(hf_rope, wq, wk))
    assert torch.equal(pq, hf_to_gguf_permute(wq, H))
    assert np.array_equal(rope_unpermute(pq.numpy(), H), wq.numpy())
