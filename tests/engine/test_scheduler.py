"""Continuous batching: requests join and leave a running batch, and each gets what it would get alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import save_tiny_model
from lmforge.engine.generate import Engine
from lmforge.engine.sampling import SamplingParams
from lmforge.engine.scheduler import QueueFull, Request, Scheduler, SchedulerClosed
from lmforge.model.gpt import GPT
from lmforge.model.kv_cache import KVCache
from lmforge.presets import get_preset

PROMPTS = ["the model", "a token reads the", "each layer", "the data returns the value and", "our loss",
           "every byte counts", "the cache writes a long sentence and the model learns", "some text"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_tokenizer):
    d = save_tiny_model(tmp_path_factory.mktemp("sched") / "m", tiny_tokenizer, context_length=64, embedding_scale=8.0)
    return Engine.load(d, fast=False)


class Collector:
    """Gathers the events of many requests; `wait()` returns when every request is over."""

    def __init__(self, n: int) -> None:
        self.events = {i: [] for i in range(n)}
        self.done = threading.Semaphore(0)

    def emit_for(self, i: int):
        def emit(ev):
            if ev is None:
                self.done.release()
            else:
                self.events[i].append(ev)
        return emit

    def wait(self, n: int, timeout: float = 60) -> None:
        for _ in range(n):
            assert self.done.acquire(timeout=timeout), "a request never finished"

    def ids(self, i: int) -> list[int]:
        return [e.token_id for e in self.events[i]]

    def text(self, i: int) -> str:
        return "".join(e.text for e in self.events[i])


def alone(engine, prompt, params):
    return engine.complete([prompt], params)[0]


def test_per_row_slots_decode_like_full_recomputation():
    """Rows at different positions in one cache (each its own timeline) give the logits of a full forward."""
    torch.manual_seed(0)
    model = GPT(get_preset("tiny", vocab_size=97, context_length=32)).eval()
    seqs = [torch.randint(0, 97, (n,)) for n in (5, 9, 3)]
    cache = KVCache.for_model(model.config, 3, 32)
    with torch.no_grad():
        for b, s in enumerate(seqs):  # prefill each row alone, at its own positions
            view = cache.rows(b + 1, b)
            model(s[None, :-1], cache=view, slots=torch.arange(len(s) - 1))
        last = torch.stack([s[-1] for s in seqs])[:, None]
        slots = torch.tensor([[len(s) - 1] for s in seqs])
        view = cache.rows(3)
        step = model(last, cache=view, slots=slots)[:, -1]
        for b, s in enumerate(seqs):
            full = model(s[None])[0, -1]
            torch.testing.assert_close(step[b], full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_greedy_answers_equal_the_request_served_alone(engine, max_batch):
    sched = Scheduler(engine, max_batch=max_batch, max_queue=32)
    try:
        col = Collector(len(PROMPTS))
        params = [SamplingParams(temperature=0, max_new_tokens=4 + 3 * i) for i in range(len(PROMPTS))]
        for i, p in enumerate(PROMPTS):
            sched.submit(Request(engine.encode_prompt(p), params[i], col.emit_for(i)))
        col.wait(len(PROMPTS))
        for i, p in enumerate(PROMPTS):
            ref = alone(engine, p, params[i])
            assert col.ids(i) == ref.ids and col.text(i) == ref.text
            assert col.events[i][-1].finish_reason == ref.finish_reason
        total = sum(len(col.ids(i)) for i in range(len(PROMPTS)))
        if max_batch > 1:
            assert sched.steps < total - len(PROMPTS)  # decode steps were shared
        assert sched.busy == 0 and sched.queued == 0
    finally:
        sched.stop()


def test_mixed_settings_in_one_batch(engine):
    """Penalties, logit bias, stop strings and logprobs are per request, even within one step."""
    cases = [SamplingParams(temperature=0, max_new_tokens=12),
             SamplingParams(temperature=0, max_new_tokens=12, repetition_penalty=1.5, presence_penalty=0.5),
             SamplingParams(temperature=0, max_new_tokens=12, logit_bias={5: 30.0}),
             SamplingParams(temperature=0, max_new_tokens=12, logprobs=3),
             SamplingParams(temperature=0, max_new_tokens=12, stop=["e"])]
    sched = Scheduler(engine, max_batch=8)
    try:
        col = Collector(len(cases))
        for i, p in enumerate(cases):
            sched.submit(Request(engine.encode_prompt("the model"), p, col.emit_for(i)))
        col.wait(len(cases))
        for i, p in enumerate(cases):
            ref = alone(engine, "the model", p)
            assert col.ids(i) == ref.ids and col.text(i) == ref.text, i
        lps = [e.logprob for e in col.events[3]]
        assert lps == pytest.approx(alone(engine, "the model", cases[3]).logprobs, abs=1e-5)
        assert all(len(e.top_logprobs) == 3 for e in col.events[3])
    finally:
        sched.stop()


def test_seeded_sampling_is_reproducible_whatever_else_runs(engine):
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=11, max_new_tokens=10)
    outs = []
    for company in (0, 5):
        sched = Scheduler(engine, max_batch=8)
        try:
            col = Collector(1 + company)
            sched.submit(Request(engine.encode_prompt("the model"), p, col.emit_for(0)))
            for j in range(company):
                sched.submit(Request(engine.encode_prompt(PROMPTS[j]), SamplingParams(temperature=0.9, max_new_tokens=10),
                                     col.emit_for(1 + j)))
            col.wait(1 + company)
            outs.append(col.ids(0))
        finally:
            sched.stop()
    assert outs[0] == outs[1]


def test_cancel_frees_the_row_within_a_step(engine):
    sched = Scheduler(engine, max_batch=2)
    try:
        col = Collector(1)
        req = Request(engine.encode_prompt("the model"), SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True),
                      col.emit_for(0))
        first = threading.Event()
        inner = req.emit

        def emit(ev):
            inner(ev)
            first.set()
        req.emit = emit
        release = threading.Event()
        sched.submit(req)
        assert first.wait(10)
        sched.call(lambda: release.wait(10))  # freeze between two steps
        req.cancel()
        steps = sched.steps
        release.set()
        col.wait(1, timeout=10)
        assert sched.steps <= steps + 1 and len(col.ids(0)) < 50
        deadline = time.monotonic() + 5
        while sched.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sched.busy == 0
    finally:
        sched.stop()


def test_bounded_queue_and_closed_scheduler(engine):
    sched = Scheduler(engine, max_batch=1, max_queue=2)
    try:
        hold = threading.Event()
        sched.call(lambda: hold.wait(10))
        col = Collector(3)
        p = SamplingParams(temperature=0, max_new_tokens=2)
        sched.submit(Request(engine.encode_prompt("a"), p, col.emit_for(0)))
        sched.submit(Request(engine.encode_prompt("b"), p, col.emit_for(1)))
        with pytest.raises(QueueFull):
            sched.submit(Request(engine.encode_prompt("c"), p, col.emit_for(2)))
        hold.set()
        col.wait(2)
        sched.close()
        with pytest.raises(SchedulerClosed):
            sched.submit(Request(engine.encode_prompt("d"), p, col.emit_for(2)))
        with pytest.raises(ValueError, match="context"):
            Scheduler.submit(sched, Request(list(range(64)), p, col.emit_for(2)))
    finally:
        sched.stop()


def test_a_failing_step_fails_its_requests_and_the_scheduler_keeps_serving(engine, monkeypatch):
    sched = Scheduler(engine, max_batch=4)
    try:
        col = Collector(2)
        original = sched._step
        monkeypatch.setattr(sched, "_step", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
        r = sched.submit(Request(engine.encode_prompt("the model"), SamplingParams(temperature=0, max_new_tokens=8,
                                                                                   ignore_eos=True), col.emit_for(0)))
        col.wait(1)
        assert isinstance(r.error, RuntimeError) and sched.busy == 0
        monkeypatch.setattr(sched, "_step", original)
        sched.submit(Request(engine.encode_prompt("the model"), SamplingParams(temperature=0, max_new_tokens=3),
                             col.emit_for(1)))
        col.wait(1)
        assert col.ids(1) == alone(engine, "the model", SamplingParams(temperature=0, max_new_tokens=3)).ids
    finally:
        sched.stop()


# --- chunked prefill ------------------------------------------------------------------------------------
LONG = [" ".join(PROMPTS[:4]), " ".join(PROMPTS[4:]), " ".join(PROMPTS[1:4])]  # 27..41 tokens


@pytest.mark.parametrize("max_batch", [1, 2, 4])
def test_long_prompts_prefilled_in_chunks_answer_as_alone(engine, max_batch):
    """Prompts longer than `prefill_chunk` (read 8 tokens per turn here) mixed with short ones: every greedy
    answer equals the request served alone, whatever the order of admission, and nothing is left busy."""
    prompts = [PROMPTS[0], LONG[0], PROMPTS[1], LONG[1], PROMPTS[2], LONG[2]]
    assert all(len(engine.encode_prompt(p)) > 8 for p in LONG)
    sched = Scheduler(engine, max_batch=max_batch, max_queue=32, prefill_chunk=8)
    try:
        col = Collector(len(prompts))
        params = [SamplingParams(temperature=0, max_new_tokens=6 + i) for i in range(len(prompts))]
        for i, p in enumerate(prompts):
            sched.submit(Request(engine.encode_prompt(p), params[i], col.emit_for(i)))
        col.wait(len(prompts))
        for i, p in enumerate(prompts):
            ref = alone(engine, p, params[i])
            assert col.ids(i) == ref.ids and col.text(i) == ref.text, (i, p)
        assert sched.busy == 0 and sched.queued == 0 and sched.filling is None
    finally:
        sched.stop()


def test_a_long_prompt_does_not_stall_running_streams(engine):
    """While a long prompt is read chunk by chunk, the running request gets a token between chunks; and the
    long prompt's first token (its logprob too) equals the one computed in a single pass."""
    sched = Scheduler(engine, max_batch=2, prefill_chunk=8)
    try:
        order: list[str] = []
        col = Collector(2)
        first = threading.Event()

        def emit_short(ev):
            if ev is not None:
                order.append("short")
                first.set()
            col.emit_for(0)(ev)

        def emit_long(ev):
            if ev is not None:
                order.append("long")
            col.emit_for(1)(ev)

        long_ids = engine.encode_prompt(LONG[0])
        chunks = -(-len(long_ids) // 8)
        sched.submit(Request(engine.encode_prompt("the model"),
                             SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True), emit_short))
        assert first.wait(10)
        at_submit = len(order)
        params = SamplingParams(temperature=0, max_new_tokens=3, logprobs=2)
        sched.submit(Request(long_ids, params, emit_long))
        col.wait(2)
        before_long = order[at_submit:].index("long")
        assert before_long >= chunks - 1  # a decode step of the short request between every two chunks
        ref = engine.complete([long_ids], params)[0]
        assert col.ids(1) == ref.ids
        assert [e.logprob for e in col.events[1]] == pytest.approx(ref.logprobs, abs=1e-5)
    finally:
        sched.stop()


def test_cancelling_a_long_prompt_while_it_fills(engine):
    sched = Scheduler(engine, max_batch=2, prefill_chunk=4)
    try:
        hold, col = threading.Event(), Collector(2)
        sched.call(lambda: hold.wait(10))  # keep the loop busy while the request is queued and cancelled
        req = sched.submit(Request(engine.encode_prompt(LONG[0]), SamplingParams(temperature=0, max_new_tokens=5),
                                   col.emit_for(0)))
        turn = threading.Event()
        sched.call(lambda: (turn.set(), req.cancel()))  # cancels it after its first chunk is in
        hold.set()
        col.wait(1)
        assert turn.is_set() and col.ids(0) == [] and sched.filling is None
        sched.submit(Request(engine.encode_prompt(LONG[1]), SamplingParams(temperature=0, max_new_tokens=4), col.emit_for(1)))
        col.wait(1)
        assert col.ids(1) == alone(engine, LONG[1], SamplingParams(temperature=0, max_new_tokens=4)).ids
        assert sched.busy == 0
    finally:
        sched.stop()
