"""Autoregressive generation over the KV cache: prefill the prompt in one forward pass, then one token
per step, each step feeding only the new token (its keys and values join the cache)."""

from __future__ import annotations

from typing import Iterator

import torch

from lmforge.engine.sampling import sample
from lmforge.model.gpt import GPT
from lmforge.model.kv_cache import KVCache


@torch.inference_mode()
def generate_ids(model: GPT, prompt: list[int], *, max_new_tokens: int, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.9, min_p: float = 0.0, eos_ids: tuple[int, ...] = (), seed: int | None = None) -> Iterator[int]:
    """Yield generated token ids one by one until EOS, `max_new_tokens`, or the context limit."""
    if not prompt:
        raise ValueError("the prompt is empty")
    cfg = model.config
    budget = min(max_new_tokens, cfg.context_length - len(prompt))
    if budget <= 0:
        raise ValueError(f"the prompt ({len(prompt)} tokens) leaves no room in the context ({cfg.context_length})")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    cache = KVCache.for_model(cfg, 1, len(prompt) + budget, dtype=next(model.parameters()).dtype, device=device)
    logits = model(torch.tensor([prompt], device=device), cache=cache, last_only=True)[:, -1]
    for _ in range(budget):
        tok = int(sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=gen)[0])
        yield tok
        if tok in eos_ids:
            return
        logits = model(torch.tensor([[tok]], device=device), cache=cache)[:, -1]
