"""The scheduler's prompt cache: a prompt that starts with what a cache row already holds (the previous turn
of a chat, a shared system prompt) reads only the rest, and every answer is exactly what it is without the
cache. Answers are compared token for token and by their logprobs: the tiny model's greedy tokens barely
depend on a few wrong cache entries, its logprobs do (by ~1e-3), so a row reused wrongly shows."""

from __future__ import annotations

import threading

import pytest

from conftest import load_engine, save_tiny_model
from lmforge.engine.prefix_cache import MIN_REUSE, ParkedRows, common_prefix
from lmforge.engine.sampling import SamplingParams
from lmforge.engine.scheduler import Request, Scheduler

WORDS = ["the model", "a token reads the", "each layer", "the data returns the value and", "our loss",
         "every byte counts", "the cache writes a long sentence and", "some text"]
SYSTEM = "you are a helpful model . " + " ".join(WORDS[:4])  # ~30 tokens, shared by many prompts


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_tokenizer):
    d = save_tiny_model(tmp_path_factory.mktemp("prefix") / "m", tiny_tokenizer, context_length=256)
    return load_engine(d)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True, logprobs=1)


class Answer:
    """The events of one request, and a way to wait for its end."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.done = threading.Event()

    def __call__(self, ev) -> None:
        if ev is None:
            self.done.set()
        else:
            self.ids.append(ev.token_id)
            self.logprobs.append(ev.logprob)


def submit(sched: Scheduler, prompt: list[int], params: SamplingParams) -> tuple[Request, Answer]:
    ans = Answer()
    return sched.submit(Request(list(prompt), params, ans)), ans


def wait(*answers: Answer) -> None:
    for a in answers:
        assert a.done.wait(60), "a request never finished"


def same(a: Answer, b: Answer) -> None:
    assert a.ids == b.ids
    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def run_all(sched: Scheduler, prompts: list[list[int]], params: list[SamplingParams]):
    """Submit every prompt while the scheduler is held, so that they are admitted as one queue."""
    hold = threading.Event()
    sched.call(lambda: hold.wait(10))
    out = [submit(sched, p, q) for p, q in zip(prompts, params)]
    hold.set()
    wait(*(a for _, a in out))
    return out


def schedulers(engine, **kw):
    return Scheduler(engine, prefix_cache=True, **kw), Scheduler(engine, prefix_cache=False, **kw)


# --- the bookkeeping --------------------------------------------------------------------------------------
def test_common_prefix_against_a_plain_loop():
    import random

    rng = random.Random(0)
    for _ in range(500):
        size = rng.choice([40, 400])
        a = [rng.randrange(3) for _ in range(rng.randrange(size))]
        b = a[:rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(size))]
        ref = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert common_prefix(a, b) == ref
        assert common_prefix(a, b, 5) == min(ref, 5) and common_prefix(a, b, 0) == 0


def test_parked_rows_give_up_the_least_recently_used_first():
    p = ParkedRows(4)
    p.park(0, [1, 2])
    p.park(1, [3])
    p.park(2, [4])
    assert p.victim([0, 1, 2, 3]) == 3  # empty first
    p.touch(0)
    assert p.victim([0, 1, 2]) == 1
    assert p.less_valuable(1, 2) and not p.less_valuable(2, 1) and p.less_valuable(3, 0)
    p.swap(0, 3)
    assert p.tokens[3] == [1, 2] and p.tokens[0] is None


def test_estimating_changes_nothing_and_shares_needs_min_shared():
    """Admission asks `estimate` about every waiting prompt while a row is free; most are not admitted, so it
    must not make the rows they match look recently used (only `reserve`, for the admitted ones, does)."""
    from types import SimpleNamespace

    from lmforge.engine.prefix_cache import MIN_SHARED, PromptCache

    pc = PromptCache(SimpleNamespace(batch_size=3, reusable=lambda row, n: True))
    prompt = list(range(40))
    pc.parked.park(1, prompt[:30])
    pc.parked.park(2, [7] * 10)
    stamps = list(pc.parked.stamp)
    assert pc.estimate(prompt, [1, 2], []) == (1, 30)
    assert pc.estimate(prompt, [], [(prompt[:20], 12)]) == (None, 12)  # a busy row: only its written slots
    assert pc.estimate([7] * 5, [1, 2], []) == (None, 0)  # under MIN_REUSE: not worth a row
    assert pc.parked.stamp == stamps
    pc.reserve([None, 1])
    assert pc.parked.stamp[1] > max(stamps)
    others = [list(range(30 + MIN_SHARED)), list(range(29 + MIN_SHARED))]
    assert pc.shares(prompt + list(range(40, 80)), 50, others[:1])  # 32 shared beyond its cached 30
    assert not pc.shares(prompt + list(range(40, 80)), 50, others[1:])
    pc.enabled = False
    assert pc.estimate(prompt, [1, 2], []) == (None, 0) and not pc.shares(prompt, 50, others)


def test_admission_estimates_outside_the_submit_lock(engine, monkeypatch):
    """The estimates compare every waiting prompt with every row: `submit()` (the event loop) must not wait for
    them, so the scheduler makes them without holding its lock."""
    sched = Scheduler(engine, max_batch=2)
    try:
        run_all(sched, [engine.encode_prompt(SYSTEM)], [greedy(2)])
        estimate, free = sched.pcache.estimate, []

        def try_lock():
            got = sched._wake.acquire(timeout=5)
            if got:
                sched._wake.release()
            free.append(got)

        def probe(*a):
            t = threading.Thread(target=try_lock)
            t.start()
            t.join()
            return estimate(*a)
        monkeypatch.setattr(sched.pcache, "estimate", probe)
        (r, _), = run_all(sched, [engine.encode_prompt(SYSTEM + " more")], [greedy(2)])
        assert free == [True] and r.error is None and r.cached_tokens >= MIN_REUSE
    finally:
        sched.stop()


def test_a_prefix_lost_after_admission_is_not_read_past_the_chunk(engine, monkeypatch):
    """Admission counts a short prompt's reading with its cached prefix left out; should that prefix be gone
    when the prompt claims its row (an earlier claim of the turn saved over it; here forced once), reading it
    all would take one pass far past `prefill_chunk`. The prompt waits a turn instead, is estimated again (now
    a long prompt, read in chunks) and answers as alone."""
    base = engine.encode_prompt(" ".join(WORDS))  # ~45 tokens
    follow = base + engine.tokenizer.encode(" our loss", allow_special=False)
    sched = Scheduler(engine, max_batch=2, prefill_chunk=8, max_prefill_tokens=8)
    try:
        run_all(sched, [base], [greedy(2)])
        claim, claims, passes = sched.pcache.claim, [], []

        def forget_once(prompt, t, free, busy):
            n = claim(prompt, t, free, busy)
            claims.append(n)
            return 0 if len(claims) == 1 else n
        monkeypatch.setattr(sched.pcache, "claim", forget_once)
        inner = sched._forward_padded
        monkeypatch.setattr(sched, "_forward_padded",
                            lambda pieces, **kw: (passes.append(max(map(len, pieces))), inner(pieces, **kw))[1])
        (r, a), = run_all(sched, [follow], [greedy(4)])
        assert claims[0] >= len(base) - 1 and len(claims) == 2 and max(passes) <= 8, (claims, passes)
        ref = engine.complete([follow], greedy(4))[0]
        assert r.error is None and a.ids == ref.ids and a.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
        assert sched.prompt_tokens_total == len(base) + len(follow)  # the deferred claim is not counted twice
    finally:
        sched.stop()


# --- answers with and without the cache -----------------------------------------------------------------
@pytest.mark.parametrize("max_batch", [1, 4])
def test_a_ten_turn_chat_reads_only_what_is_new(engine, max_batch):
    """Each turn's prompt is the previous prompt + its answer + a new message: with the cache, turn k finds
    everything the previous turn wrote (its prompt and all but the last answer token, never written) and the
    transcript is token for token the one without the cache. With 4 rows, other requests come and go
    between the turns, so the chat's row is swapped around and its neighbours are reused too."""
    tok = engine.tokenizer
    transcripts = []
    for sched in schedulers(engine, max_batch=max_batch):
        try:
            prompt = engine.encode_prompt(SYSTEM)
            turns = []
            for k in range(10):
                prompt = prompt + tok.encode(" user : " + WORDS[k % len(WORDS)], allow_special=False)
                others = [submit(sched, engine.encode_prompt(WORDS[(k + j) % len(WORDS)]), greedy(3 + j))
                          for j in range(max_batch - 1)]
                req, ans = submit(sched, prompt, greedy(5 + k % 3))
                wait(ans, *(a for _, a in others))
                turns.append((list(prompt), req.cached_tokens, ans))
                prompt = prompt + ans.ids
            transcripts.append(turns)
            if sched.prefix_cache:
                assert sched.cached_tokens_total >= sum(c for _, c, _ in turns)
                assert sched.prompt_tokens_total >= sum(len(p) for p, _, _ in turns)
        finally:
            sched.stop()
    cached, plain = transcripts
    for k, ((p1, c1, a1), (p2, c2, a2)) in enumerate(zip(cached, plain)):
        assert p1 == p2, k
        same(a1, a2)
        assert c2 == 0
        if k:
            prev_prompt, _, prev = cached[k - 1]
            assert c1 == len(prev_prompt) + len(prev.ids) - 1, k


def test_many_requests_sharing_a_system_prompt(engine):
    """12 requests with one system prompt and their own questions, 3 rows, all waiting at once: the first
    reads everything, the others wait a turn rather than read the system prompt alongside it, and then each
    finds it in a busy or a parked row; every answer equals the answer without the cache."""
    system = engine.encode_prompt(SYSTEM)
    prompts = [system + engine.tokenizer.encode(f" question {i} : " + WORDS[i % len(WORDS)], allow_special=False)
               for i in range(12)]
    params = [greedy(2 + (5 * i) % 7) for i in range(12)]  # rows leave at different times
    results = []
    for sched in schedulers(engine, max_batch=3, max_queue=16):
        try:
            results.append(run_all(sched, prompts, params))
            if sched.prefix_cache:
                cached = [r.cached_tokens for r, _ in results[-1]]
                assert cached[0] == 0 and all(c >= len(system) for c in cached[1:]), cached
                assert sched.cached_tokens_total == sum(cached)
                assert sched.prompt_tokens_total == sum(map(len, prompts))
                assert sched.kv_tokens_used == 0 and sched.busy == 0
        finally:
            sched.stop()
    for (_, a), (_, b) in zip(*results):
        same(a, b)


@pytest.mark.parametrize("max_batch", [2, 4])
def test_long_prompts_with_a_cached_prefix_fill_from_it(engine, max_batch):
    """Prompts longer than `prefill_chunk` are read in chunks; one whose start is cached reads only the rest
    (in chunks when that is still long, in one pass when no longer), and members of one filling group start
    at their own cached lengths. Answers equal those without the cache."""
    base = engine.encode_prompt(" ".join(WORDS))  # ~45 tokens
    more = engine.tokenizer.encode(" " + " ".join(WORDS[2:6]), allow_special=False)
    first = [base]
    then = [base + more, base + more[:3], engine.encode_prompt(" ".join(reversed(WORDS))), base + more[::-1]]
    results = []
    for sched in schedulers(engine, max_batch=max_batch, prefill_chunk=8, max_prefill_tokens=8):
        try:
            out = run_all(sched, first, [greedy(4)])
            out += run_all(sched, then, [greedy(3 + i) for i in range(len(then))])
            results.append(out)
            if sched.prefix_cache:
                cached = [r.cached_tokens for r, _ in out]
                assert cached[0] == 0 and cached[1] >= len(base) and cached[2] >= len(base) and cached[3] == 0
                assert cached[4] >= len(base)
                assert sched.filling is None and sched.kv_tokens_used == 0
        finally:
            sched.stop()
    for (_, a), (_, b) in zip(*results):
        same(a, b)


def test_a_prompt_equal_to_or_shorter_than_a_parked_row(engine):
    """A prompt equal to everything a row holds rereads only its last token (whose logits choose the first
    answer token); a prompt that is a shorter prefix of a parked row reuses that prefix."""
    prompt = engine.encode_prompt(SYSTEM + " " + WORDS[6])
    results = []
    for sched in schedulers(engine, max_batch=2):
        try:
            (_, a), = run_all(sched, [prompt], [greedy(6)])
            held = prompt + a.ids[:-1]  # what the row holds: the last answer token was never written
            out = [run_all(sched, [p], [greedy(4)])[0] for p in (held, prompt, prompt[:20])]
            results.append([a] + [x for _, x in out])
            if sched.prefix_cache:
                assert [r.cached_tokens for r, _ in out] == [len(held) - 1, len(prompt) - 1, 19]
        finally:
            sched.stop()
    for a, b in zip(*results):
        same(a, b)


def test_cancelled_requests_leave_a_usable_row(engine):
    """A request cancelled mid-answer leaves its row parked with what it wrote; a follow-up that continues
    it reuses that and answers exactly as the same prompt served alone; cancelling a queued one costs nothing."""
    sched = Scheduler(engine, max_batch=2)
    try:
        prompt = engine.encode_prompt(SYSTEM)
        got = threading.Event()
        ans = Answer()

        def emit(ev):
            ans(ev)
            if ev is not None and len(ans.ids) >= 5:
                got.set()
        req = sched.submit(Request(prompt, greedy(200), emit))
        assert got.wait(30)
        req.cancel()
        wait(ans)
        assert 5 <= len(ans.ids) < 200
        follow = prompt + ans.ids[:4]
        queued = Request(follow, greedy(3), Answer())
        queued.cancel()
        sched.submit(queued)
        r, a = run_all(sched, [follow], [greedy(5)])[0]
        assert r.cached_tokens == len(follow) - 1 and queued.cached_tokens == 0
        ref = engine.complete([follow], greedy(5))[0]
        assert a.ids == ref.ids and a.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
    finally:
        sched.stop()


def test_a_failure_forgets_the_parked_rows(engine, monkeypatch):
    """After a failing step nothing parked is trusted: the next request reads its whole prompt."""
    sched = Scheduler(engine, max_batch=2)
    try:
        prompt = engine.encode_prompt(SYSTEM)
        run_all(sched, [prompt], [greedy(3)])
        original = sched._step
        monkeypatch.setattr(sched, "_step", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
        (r, _), = run_all(sched, [prompt + [5]], [greedy(3)])
        assert isinstance(r.error, RuntimeError) and r.cached_tokens == len(prompt)
        monkeypatch.setattr(sched, "_step", original)
        (r, a), = run_all(sched, [prompt], [greedy(3)])
        assert r.error is None and r.cached_tokens == 0
        assert a.ids == engine.complete([prompt], greedy(3))[0].ids
    finally:
        sched.stop()


def test_prefix_cache_can_be_switched_while_serving(engine):
    sched = Scheduler(engine, max_batch=2)
    try:
        prompt = engine.encode_prompt(SYSTEM)
        run_all(sched, [prompt], [greedy(2)])
        sched.set_prefix_cache(False)
        (r, _), = run_all(sched, [prompt], [greedy(2)])
        assert r.cached_tokens == 0
        sched.set_prefix_cache(True)
        run_all(sched, [prompt], [greedy(2)])
        (r, _), = run_all(sched, [prompt], [greedy(2)])
        assert r.cached_tokens == len(prompt) - 1 >= MIN_REUSE
    finally:
        sched.stop()


def test_a_filling_member_above_may_finish_first(engine, monkeypatch):
    """Long prompts fill with the least left to read lowest, as estimated at admission; should a member's
    cached prefix be lost before it takes its row (here: forced, it rereads everything), a member above it
    finishes first and is swapped to the bottom of the group before moving down. Answers stay exact."""
    base = engine.encode_prompt(" ".join(WORDS))
    longer = base + engine.tokenizer.encode(" " + " ".join(WORDS[2:5]), allow_special=False)
    other = engine.encode_prompt(" ".join(reversed(WORDS[1:])))
    sched = Scheduler(engine, max_batch=3, prefill_chunk=8, max_prefill_tokens=8)
    try:
        run_all(sched, [base], [greedy(2)])
        claim = sched.pcache.claim
        forced = []

        def forget(prompt, t, free, busy):
            n = claim(prompt, t, free, busy)
            if list(prompt) == longer:
                forced.append(n)
                return 0  # reading from slot 0 is always right, merely slower
            return n
        monkeypatch.setattr(sched.pcache, "claim", forget)
        out = run_all(sched, [longer, other], [greedy(4), greedy(5)])
        assert forced and forced[0] >= len(base) and len(other) < len(longer)
        for (r, a), p, n in zip(out, [longer, other], [4, 5]):
            ref = engine.complete([p], greedy(n))[0]
            assert r.error is None and a.ids == ref.ids and a.logprobs == pytest.approx(ref.logprobs, abs=1e-5)
        assert sched.filling is None and sched.busy == 0
    finally:
        sched.stop()


def test_copies_of_one_long_prompt_read_it_once(engine):
    """The n copies of an n > 1 request (one long prompt): the first is read alone, in chunks, and the others
    copy it once it is in, instead of all four reading it side by side; the answers are those without the
    cache, for a quarter of the prompt reading."""
    prompt = engine.encode_prompt(" ".join(WORDS + WORDS[:3]))  # ~80 tokens: 10 chunks of 8
    params = [SamplingParams(temperature=0.8, seed=5, max_new_tokens=4, logprobs=1) for _ in range(4)]
    results, reads = [], []
    for sched in schedulers(engine, max_batch=4, prefill_chunk=8, max_prefill_tokens=8):
        try:
            read = []
            inner = sched._forward_padded
            sched._forward_padded = lambda pieces, **kw: (read.append(sum(map(len, pieces))), inner(pieces, **kw))[1]
            hold = threading.Event()
            sched.call(lambda: hold.wait(10))
            out = [Answer() for _ in range(4)]
            reqs = [sched.submit(Request(prompt, p, a, seq=i)) for i, (p, a) in enumerate(zip(params, out))]
            hold.set()
            wait(*out)
            results.append(out)
            reads.append(sum(read))
        finally:
            sched.stop()
        if sched.prefix_cache:
            assert [r.cached_tokens for r in reqs] == [0] + [len(prompt) - 1] * 3
    for a, b in zip(*results):
        same(a, b)
    assert reads == [len(prompt) + 3, 4 * len(prompt)]


def test_padding_near_the_end_of_the_context(engine):
    """A filling group whose members start far apart (one has almost the whole context cached): the short
    member's padding would run past the context, and is kept inside it; both answers are exact."""
    words = engine.tokenizer.encode(" " + " ".join(WORDS * 12), allow_special=False)
    near = engine.encode_prompt("")[:1] + words[:249]  # 250 of the context's 256 tokens
    other = engine.encode_prompt(" ".join(reversed(WORDS)) * 2)
    results = []
    for sched in schedulers(engine, max_batch=3, prefill_chunk=8, max_prefill_tokens=64):
        try:
            run_all(sched, [near[:241]], [greedy(1)])
            out = run_all(sched, [near, other], [greedy(4), greedy(3)])
            assert [r.error for r, _ in out] == [None, None]
            if sched.prefix_cache:
                assert out[0][0].cached_tokens == 241 and len(near) - 241 > 8 and len(other) > 32
            results.append([a for _, a in out])
        finally:
            sched.stop()
    for a, b in zip(*results):
        same(a, b)
