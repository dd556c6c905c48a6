"""Golden outputs: a seeded tiny model's greedy, sampled and beam-search token ids, pinned.

As llama2.c's `test_all.py` compares generated text byte for byte, these ids were produced once, at commit
ceafd32 (before the issue-12 refactor), and must not change when code moves: a refactor that changes an
output fails here even when every unit test still holds. Update the ids only for a change that is meant to
change outputs, and say so in the commit.

The models are random but not degenerate: untied output heads, init_std 0.2 and a sharpened head, so the
greedy path visits many tokens (the smallest top-1/top-2 logit gap along the pinned paths is 0.0023, far
above float32 rounding differences between CPUs). Both families are pinned: Llama-shaped (RMSNorm, SwiGLU,
RoPE, GQA) and GPT-2-shaped (LayerNorm, GELU, learned positions, biases).
"""

from __future__ import annotations

import pytest
import torch

from lmforge.engine.generate import Engine
from lmforge.engine.sampling import SamplingParams
from lmforge.engine.scheduler import Request, Scheduler
from lmforge.model.gpt import GPT
from lmforge.presets import get_preset
from conftest import wait_until

SHAPES = {
    "llama": dict(tie_embeddings=False, init_std=0.2),
    "gpt2": dict(norm="layernorm", mlp="gelu", positions="learned", attention_bias=True, mlp_bias=True,
                 n_kv_heads=4, tie_embeddings=False, init_std=0.2),
}

# shape -> prompt -> (prompt ids, greedy ids, sampled ids, best beam ids)
GOLDEN = {
    "llama": {
        "the model reads": (
            [261, 224, 80, 82, 71, 72, 79, 292],
            [112, 111, 64, 146, 46, 227, 48, 250, 149, 221, 245, 146, 146, 146, 146, 146],
            [185, 112, 149, 221, 37, 146, 61, 146, 250, 266, 268, 144, 194, 245, 301, 186],
            [51, 146, 283, 283, 157, 262, 47, 258, 268, 187, 146, 54]),
        "each layer writes the value.": (
            [72, 277, 75, 263, 68, 92, 266, 276, 85, 76, 264, 86, 267, 311, 17],
            [265, 171, 217, 185, 2, 173, 250, 297, 138, 210, 214, 18, 253, 172, 139, 70],
            [183, 68, 111, 102, 100, 80, 296, 5, 183, 207, 60, 135, 185, 224, 54, 201],
            [0, 299, 82, 99, 201, 100, 240, 117, 256, 150, 76, 253]),
        "a": (
            [68],
            [58, 55, 296, 164, 233, 279, 150, 69, 20, 148, 115, 193, 283, 250, 115, 105],
            [50, 85, 283, 182, 12, 43, 96, 111, 162, 238, 49, 309, 266, 258, 263, 195],
            [58, 159, 291, 266, 283, 237, 283, 185, 305, 164, 68, 8]),
    },
    "gpt2": {
        "the model reads": (
            [261, 224, 80, 82, 71, 72, 79, 292],
            [4, 12, 265, 182, 20, 254, 218, 4, 211, 4, 259, 33, 277, 184, 93, 4],
            [4, 12, 265, 182, 4, 31, 218, 225, 30, 2, 218, 254, 184, 209, 2, 218],
            [4, 12, 265, 182, 20, 254, 218, 4, 211, 4, 259, 33]),
        "each layer writes the value.": (
            [72, 277, 75, 263, 68, 92, 266, 276, 85, 76, 264, 86, 267, 311, 17],
            [232, 223, 24, 24, 147, 277, 184, 212, 168, 182, 4, 182, 4, 277, 4, 277],
            [232, 223, 24, 24, 4, 178, 182, 54, 209, 24, 202, 213, 4, 218, 46, 218],
            [232, 223, 24, 24, 147, 277, 184, 212, 168, 182, 4, 182]),
        "a": (
            [68],
            [221, 4, 175, 16, 63, 277, 315, 63, 151, 277, 246, 255, 300, 277, 151, 209],
            [221, 4, 4, 182, 4, 24, 315, 4, 12, 162, 211, 309, 12, 4, 61, 32],
            [221, 4, 175, 54, 221, 255, 315, 255, 23, 23, 184, 277]),
    },
}

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, min_p=0.0, seed=7, max_new_tokens=16,
                         ignore_eos=True, repetition_penalty=1.1)
BEAM = SamplingParams(temperature=0.0, num_beams=3, max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", params=list(SHAPES))
def engine(request, tiny_tokenizer):
    torch.manual_seed(0)
    model = GPT(get_preset("tiny", vocab_size=tiny_tokenizer.vocab_size, context_length=128, **SHAPES[request.param]))
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    engine = Engine(model, tiny_tokenizer, fast=False)
    engine.shape = request.param
    return engine


@pytest.mark.parametrize("prompt", list(GOLDEN["llama"]))
def test_engine_outputs_are_the_pinned_ones(engine, prompt):
    prompt_ids, greedy, sampled, beam = GOLDEN[engine.shape][prompt]
    assert engine.encode_prompt(prompt) == prompt_ids
    assert engine.complete([prompt], GREEDY)[0].ids == greedy
    assert engine.complete([prompt], SAMPLED)[0].ids == sampled
    assert engine.beam_search(prompt, BEAM)[0].ids == beam


def test_scheduler_outputs_are_the_pinned_ones(engine):
    """The server's path (continuous batching, all prompts in one batch) gives the same greedy and sampled ids."""
    prompts = list(GOLDEN[engine.shape])
    got: dict[tuple[int, int], list[int]] = {}
    done: list[int] = []

    def collect(key):
        def emit(ev):
            if ev is None:
                done.append(1)
            elif ev.token_id is not None:
                got.setdefault(key, []).append(ev.token_id)
        return emit

    sched = Scheduler(engine, max_batch=8)
    try:
        for i, p in enumerate(prompts):
            sched.submit(Request(GOLDEN[engine.shape][p][0], GREEDY, collect((i, 0))))
            sched.submit(Request(GOLDEN[engine.shape][p][0], SAMPLED, collect((i, 1)), seed_offset=0))
        assert wait_until(lambda: len(done) == 2 * len(prompts), timeout=60)
    finally:
        sched.stop()
    for i, p in enumerate(prompts):
        assert got[(i, 0)] == GOLDEN[engine.shape][p][1], p
        assert got[(i, 1)] == GOLDEN[engine.shape][p][2], p
