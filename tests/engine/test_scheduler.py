"""Continuous batching: requests join and leave a running batch, and each gets what it would get alone."""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import load_engine, save_tiny_model, wait_until
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
    return load_engine(d)


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
        step = model(last, cache=view, slots=slots, mask=view.mask(slots))[:, -1]
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
        assert wait_until(lambda: sched.busy == 0)
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


@pytest.fixture(scope="module")
def engine1(tmp_path_factory, tiny_tokenizer):
    """The tiny model without the sharpened embedding: its logprobs move by ~1e-3 when a few cache entries of
    a row are wrong (the sharpened one's by ~5e-5), so a badly copied row shows."""
    d = save_tiny_model(tmp_path_factory.mktemp("sched1") / "m", tiny_tokenizer, context_length=64)
    return load_engine(d)


def assert_as_alone(engine, col, i, prompt, params):
    """Request i got the tokens, text and logprobs of the same request served alone (logprobs catch a cache
    row that was not copied right: the tiny model's greedy tokens barely depend on the cache)."""
    ref = engine.complete([engine.encode_prompt(prompt)], params)[0]
    assert col.ids(i) == ref.ids and col.text(i) == ref.text, (i, prompt)
    assert [e.logprob for e in col.events[i]] == pytest.approx(ref.logprobs, abs=1e-4), (i, prompt)


@pytest.mark.parametrize("max_batch", [1, 2, 4, 8])
@pytest.mark.parametrize("budget", [8, 4096])
def test_long_prompts_prefilled_in_chunks_answer_as_alone(engine1, max_batch, budget):
    """Prompts longer than `prefill_chunk` mixed with short ones, read 8 tokens per turn (or, with nothing
    decoding and `max_prefill_tokens` 4096, at once): every answer equals the request served alone, whatever
    the order of admission, and nothing is left busy."""
    prompts = [PROMPTS[0], LONG[0], PROMPTS[1], LONG[1], PROMPTS[2], LONG[2], LONG[0]]
    assert all(len(engine1.encode_prompt(p)) > 8 for p in LONG)
    sched = Scheduler(engine1, max_batch=max_batch, max_queue=32, prefill_chunk=8, max_prefill_tokens=budget)
    try:
        col = Collector(len(prompts))
        params = [SamplingParams(temperature=0, max_new_tokens=6 + i, logprobs=1) for i in range(len(prompts))]
        for i, p in enumerate(prompts):
            sched.submit(Request(engine1.encode_prompt(p), params[i], col.emit_for(i)))
        col.wait(len(prompts))
        for i, p in enumerate(prompts):
            assert_as_alone(engine1, col, i, p, params[i])
        assert sched.busy == 0 and sched.queued == 0 and sched.filling is None and sched.idle
    finally:
        sched.stop()


def test_a_long_prompt_does_not_stall_running_streams(engine1):
    """While a long prompt is read chunk by chunk, the running request gets a token between chunks; and the
    long prompt's answer (its logprobs too) equals the one computed in a single pass."""
    sched = Scheduler(engine1, max_batch=2, prefill_chunk=8)
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

        long_ids = engine1.encode_prompt(LONG[0])
        chunks = -(-len(long_ids) // 8)
        sched.submit(Request(engine1.encode_prompt("the model"),
                             SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True), emit_short))
        assert first.wait(10)
        at_submit = len(order)
        params = SamplingParams(temperature=0, max_new_tokens=3, logprobs=2)
        sched.submit(Request(long_ids, params, emit_long))
        col.wait(2)
        assert order[at_submit:].index("long") >= chunks - 1  # a decode step between every two chunks
        assert_as_alone(engine1, col, 1, LONG[0], params)
    finally:
        sched.stop()


def test_long_prompts_arriving_together_are_read_side_by_side(engine1, monkeypatch):
    """n long prompts at once are one filling group: one forward pass per chunk for all of them, not one
    prompt after another. (Without the prompt cache, which would have the second LONG[0] wait and copy the
    first: tests/engine/test_prefix_cache.py.)"""
    sched = Scheduler(engine1, max_batch=4, prefill_chunk=8, max_prefill_tokens=32, prefix_cache=False)
    passes = []
    model = engine1.model
    inner = model.forward
    monkeypatch.setattr(model, "forward", lambda idx, **kw: (passes.append(tuple(idx.shape)), inner(idx, **kw))[1])
    try:
        col = Collector(4)
        hold = threading.Event()
        sched.call(lambda: hold.wait(10))  # all four are queued before the loop admits any
        params = SamplingParams(temperature=0, max_new_tokens=2, logprobs=1)
        prompts = [LONG[0], LONG[1], LONG[2], LONG[0]]
        for i, p in enumerate(prompts):
            sched.submit(Request(engine1.encode_prompt(p), params, col.emit_for(i)))
        hold.set()
        col.wait(4)
        monkeypatch.setattr(model, "forward", inner)
        fills = [s for s in passes if s[1] > 1]
        one_by_one = sum(-(-len(engine1.encode_prompt(p)) // 8) for p in prompts)  # 8-token chunks, in turn
        assert fills[0] == (4, 8) and len(fills) <= one_by_one // 2, fills  # 4 rows per pass, 8 tokens each
        for i, p in enumerate(prompts):
            assert_as_alone(engine1, col, i, p, params)
        assert sched.busy == 0
    finally:
        monkeypatch.setattr(model, "forward", inner)
        sched.stop()


@pytest.mark.parametrize("which", [0, 1, 2])
def test_cancelling_one_long_prompt_while_its_group_fills(engine1, which):
    """A member of a filling group cancelled mid-way ends at once; the others (whose rows move to keep the
    group contiguous) still answer exactly as alone, and the scheduler serves the next long prompt."""
    sched = Scheduler(engine1, max_batch=4, prefill_chunk=6, max_prefill_tokens=6)
    try:
        col = Collector(4)
        hold = threading.Event()
        sched.call(lambda: hold.wait(10))
        params = SamplingParams(temperature=0, max_new_tokens=4, logprobs=1)
        prompts = [LONG[2], LONG[0], LONG[1]]  # 27, 34, 41 tokens: rows in this order, shortest lowest
        reqs = [sched.submit(Request(engine1.encode_prompt(p), params, col.emit_for(i))) for i, p in enumerate(prompts)]
        turn = threading.Event()
        sched.call(lambda: (turn.set(), reqs[which].cancel()))  # after the group's first chunk
        hold.set()
        col.wait(3)
        assert turn.is_set() and col.ids(which) == []
        for i, p in enumerate(prompts):
            if i != which:
                assert_as_alone(engine1, col, i, p, params)
        sched.submit(Request(engine1.encode_prompt(LONG[1]), params, col.emit_for(3)))
        col.wait(1)
        assert_as_alone(engine1, col, 3, LONG[1], params)
        assert sched.busy == 0 and sched.filling is None
    finally:
        sched.stop()


def test_busy_counts_prompts_being_filled_and_stop_ends_them(engine1):
    sched = Scheduler(engine1, max_batch=2, prefill_chunk=4, max_prefill_tokens=4)
    col = Collector(1)
    seen = []
    req = Request(engine1.encode_prompt(LONG[0]), SamplingParams(temperature=0, max_new_tokens=4), col.emit_for(0))
    hold = threading.Event()
    sched.call(lambda: hold.wait(10))
    sched.submit(req)
    sched.call(lambda: seen.append((sched.busy, sched.idle, len(sched.filling.reqs))))  # after one chunk
    blocked = threading.Event()
    sched.call(lambda: blocked.wait(10))  # keep it mid-fill, then stop
    hold.set()
    wait_until(lambda: seen, timeout=10)
    assert seen == [(1, False, 1)]
    threading.Timer(0.2, blocked.set).start()
    sched.stop(timeout=10)
    col.wait(1)
    assert isinstance(req.error, SchedulerClosed) and col.ids(0) == []


def test_a_failing_fill_ends_its_group_alone(engine1, monkeypatch):
    """A forward pass that fails while reading long prompts ends those requests with the error; the row that
    was decoding finishes normally and the scheduler keeps serving."""
    sched = Scheduler(engine1, max_batch=3, prefill_chunk=8)
    try:
        col = Collector(3)
        first = threading.Event()
        short = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True, logprobs=1)
        sched.submit(Request(engine1.encode_prompt("the model"), short,
                             lambda ev: (first.set() if ev is not None else None, col.emit_for(0)(ev))))
        assert first.wait(10)
        monkeypatch.setattr(sched, "_fill_chunk", lambda f: (_ for _ in ()).throw(RuntimeError("boom")))
        long_req = sched.submit(Request(engine1.encode_prompt(LONG[0]), SamplingParams(temperature=0, max_new_tokens=3),
                                        col.emit_for(1)))
        col.wait(2)
        assert isinstance(long_req.error, RuntimeError) and col.ids(1) == []
        assert_as_alone(engine1, col, 0, "the model", short)
        monkeypatch.undo()
        sched.submit(Request(engine1.encode_prompt(LONG[1]), SamplingParams(temperature=0, max_new_tokens=3, logprobs=1),
                             col.emit_for(2)))
        col.wait(1)
        assert_as_alone(engine1, col, 2, LONG[1], SamplingParams(temperature=0, max_new_tokens=3, logprobs=1))
    finally:
        sched.stop()


@pytest.mark.parametrize("prefill_chunk", [512, 8], ids=["short-group", "filling-group"])
def test_a_row_whose_state_cannot_be_made_fails_alone(engine1, monkeypatch, prefill_chunk):
    """A request whose SequenceState cannot be made (its grammar's matcher, its settings) ends with that
    error alone: the requests admitted with it, in one prefill pass or one filling group, answer as alone."""
    import lmforge.engine.scheduler as scheduler_module

    real = scheduler_module.SequenceState

    def state(tokenizer, prompt_ids, params, *a, **kw):
        if params.max_new_tokens == 5:
            raise RuntimeError("no state for this one")
        return real(tokenizer, prompt_ids, params, *a, **kw)

    monkeypatch.setattr(scheduler_module, "SequenceState", state)
    prompts = LONG if prefill_chunk == 8 else PROMPTS[:3]
    params = [SamplingParams(temperature=0, max_new_tokens=n, logprobs=1) for n in (4, 5, 6)]
    sched = Scheduler(engine1, max_batch=4, prefill_chunk=prefill_chunk, max_prefill_tokens=4096, prefix_cache=False)
    try:
        col = Collector(3)
        with sched._wake:  # admitted together: one pass (short prompts) or one filling group (long ones)
            reqs = [sched.submit(Request(engine1.encode_prompt(p), q, col.emit_for(i)))
                    for i, (p, q) in enumerate(zip(prompts, params))]
        col.wait(3)
        assert isinstance(reqs[1].error, RuntimeError) and col.ids(1) == []
        for i in (0, 2):
            assert reqs[i].error is None
            assert_as_alone(engine1, col, i, prompts[i], params[i])
        assert sched.busy == 0 and sched.filling is None
    finally:
        sched.stop()


# --- sliding-window attention ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sliding(tmp_path_factory, tiny_tokenizer):
    """The tiny model with layer 0 attending through a 6-token window on a RoPE base of its own (Gemma's
    local/global layers): every long prompt below runs several windows past it."""
    d = save_tiny_model(tmp_path_factory.mktemp("slide") / "m", tiny_tokenizer, context_length=64,
                        sliding_window=6, sliding_layers=[0], rope_local_theta=100.0)
    return load_engine(d)


def test_ring_slots_and_reuse():
    """Which slot each ring index holds (per row and shared), and when a row's rings still hold a prefix."""
    cfg = get_preset("tiny", vocab_size=97, context_length=32, sliding_window=4, sliding_layers=[1])
    cache = KVCache.for_model(cfg, 2, 32, max_write=3)  # ring 4 + 3 - 1 = 6, layer 1 only
    assert (cache.ring, cache.rings(0), cache.rings(1), tuple(cache.k_ring.shape)) == (6, False, True, (1, 2, 2, 6, 16))
    slots = torch.tensor([[7], [2]])
    cache.advance(slots)
    assert cache.ring_slots(slots).tolist() == [[6, 7, 2, 3, 4, 5], [0, 1, 2, -1, -1, -1]]
    assert cache.ring_slots(torch.tensor([9, 10])).tolist() == [[6, 7, 8, 9, 10, 5]]
    assert cache.reach.tolist() == [8, 3]  # one past the furthest slot each row's rings were written at
    assert cache.reusable(0, 6) and not cache.reusable(0, 5)  # ring - window = 2 slots of slack
    cache.copy_row(0, 1, 8)  # rings are copied whole, and how far they reach with them
    assert cache.reach.tolist() == [8, 8] and not cache.reusable(1, 3)
    assert KVCache.for_model(cfg, 2, 32, max_write=40).ring is None  # no smaller than keeping every slot
    assert KVCache.for_model(cfg, 2, 32).ring is None  # callers that do not say how much they write


@pytest.mark.parametrize("max_write", [None, 3])
def test_sliding_window_rows_decode_like_full_recomputation(max_write):
    """Per-row timelines in one cache, with a window shorter than every row, the sliding layers keeping every
    slot or a ring of 6 written 3 slots at a time: the logits of a full forward."""
    torch.manual_seed(0)
    model = GPT(get_preset("tiny", vocab_size=97, context_length=32, sliding_window=4, rope_local_theta=50.0)).eval()
    seqs = [torch.randint(0, 97, (n,)) for n in (7, 12, 5)]
    cache = KVCache.for_model(model.config, 3, 32, max_write=max_write)
    with torch.no_grad():
        for b, s in enumerate(seqs):
            view = cache.rows(b + 1, b)
            for a in range(0, len(s) - 1, 3):
                slots = torch.arange(a, min(a + 3, len(s) - 1))
                model(s[None, slots], cache=view, slots=slots[None], mask=view.mask(slots[None]))
        last = torch.stack([s[-1] for s in seqs])[:, None]
        slots = torch.tensor([[len(s) - 1] for s in seqs])
        view = cache.rows(3)
        step = model(last, cache=view, slots=slots, mask=view.mask(slots))[:, -1]
        for b, s in enumerate(seqs):
            torch.testing.assert_close(step[b], model(s[None])[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("max_batch, prefix_cache, budget, new_tokens", [
    (1, False, 4096, 9), (4, False, 4096, 9), (4, True, 4096, 9),  # every layer keeps every slot
    (1, False, 8, 9), (4, False, 8, 9), (4, True, 8, 9), (4, True, 8, 24), (2, True, 8, 3),  # rings of 6 + 8 - 1
])
def test_sliding_window_requests_answer_as_alone(sliding, max_batch, prefix_cache, budget, new_tokens):
    """Long prompts read in 8-token chunks beside short ones, decoded together, some repeated so that the
    prompt cache hands rows over: each answer equals the request served alone (tokens and logprobs). With
    at most 8 tokens written per pass, the sliding layer keeps a ring of 13 slots, which the long prompts and
    answers wrap many times; a row whose ring has gone more than 7 slots past a shared prefix is not reused."""
    prompts = [LONG[0], PROMPTS[0], LONG[1], LONG[0], PROMPTS[1], LONG[2], LONG[1]]
    sched = Scheduler(sliding, max_batch=max_batch, max_queue=32, prefill_chunk=8, max_prefill_tokens=budget,
                      prefix_cache=prefix_cache)
    assert sched.cache.ring == (13 if budget == 8 else None)
    try:
        col = Collector(len(prompts))
        params = [SamplingParams(temperature=0, max_new_tokens=new_tokens, logprobs=1) for _ in prompts]
        for i, p in enumerate(prompts):
            sched.submit(Request(sliding.encode_prompt(p), params[i], col.emit_for(i)))
        col.wait(len(prompts))
        for i, p in enumerate(prompts):
            assert_as_alone(sliding, col, i, p, params[i])
    finally:
        sched.stop()


def test_a_row_whose_rings_reach_past_a_prefix_is_not_reused(sliding):
    """C takes a 28-token prefix of a 40-token row S (S's rings copied whole, reaching slot 39); D shares 18
    tokens with both. With rings of 6 + 16 - 1 = 21 slots, slot 18 - 6 .. 17 may be overwritten by slots up to
    39, so neither row serves D, which reads its prompt and answers as alone; without rings, D reuses 18."""
    g = torch.Generator().manual_seed(2)
    S = torch.randint(5, 300, (40,), generator=g).tolist()
    C = S[:28] + torch.randint(5, 300, (2,), generator=g).tolist()
    D = S[:18] + torch.randint(5, 300, (2,), generator=g).tolist()
    alone = sliding.complete([D], SamplingParams(temperature=0, max_new_tokens=4, logprobs=1))[0]
    for budget, d_cached in ((16, 0), (4096, 18)):
        sched = Scheduler(sliding, max_batch=4, prefill_chunk=budget, max_prefill_tokens=budget)
        try:
            cached, got = {}, None
            for name, ids in (("S", S), ("C", C), ("D", D)):
                col = Collector(1)
                req = sched.submit(Request(ids, SamplingParams(temperature=0, max_new_tokens=4 if name == "D" else 1,
                                                               logprobs=1), col.emit_for(0)))
                col.wait(1)
                cached[name], got = req.cached_tokens, col
        finally:
            sched.stop()
        assert (cached["C"], cached["D"]) == (28, d_cached)
        assert [e.logprob for e in got.events[0]] == pytest.approx(alone.logprobs, abs=1e-5)
