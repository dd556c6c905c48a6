"""The prompt cache seen through the API: a multi-turn chat answers exactly as with the cache off, and the
usage object says how many prompt tokens the cache served (OpenAI's `prompt_tokens_details.cached_tokens`)."""

from __future__ import annotations

import openai
import pytest

from tests.serve.live import start_server

TURNS = ["hello there", "tell me more", "and then what", "why so", "thanks, one more thing"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_tokenizer):
    from conftest import save_tiny_model

    model = save_tiny_model(tmp_path_factory.mktemp("cache") / "tiny", tiny_tokenizer, context_length=512,
                            embedding_scale=8.0)
    on = start_server({"tiny": model})
    off = start_server({"tiny": model}, prompt_cache=False)
    yield on, off
    on.stop()
    off.stop()


def _chat(server, stream: bool) -> tuple[list[str], list[dict]]:
    """Play TURNS as a client does (each request the whole history so far), greedy; the answers and usages."""
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
    messages, answers, usages = [{"role": "system", "content": "you are terse"}], [], []
    for text in TURNS:
        messages.append({"role": "user", "content": text})
        if stream:
            chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
            answer = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            usage = chunks[-1].usage.model_dump()
        else:
            r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
            answer, usage = r.choices[0].message.content, r.usage.model_dump()
        messages.append({"role": "assistant", "content": answer})
        answers.append(answer)
        usages.append(usage)
    return answers, usages


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_chat_answers_the_same_with_and_without_the_cache(servers, stream):
    on, off = servers
    answers_on, usage_on = _chat(on, stream)
    answers_off, usage_off = _chat(off, stream)
    assert answers_on == answers_off
    assert [u["prompt_tokens"] for u in usage_on] == [u["prompt_tokens"] for u in usage_off]
    assert all(u["prompt_tokens_details"]["cached_tokens"] == 0 for u in usage_off)
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usage_on]
    # each later turn finds at least the previous turn's prompt in the cache (the previous answer's text may
    # tokenize differently when sent back, so not always the answer too); never the whole prompt
    for k in range(1, len(TURNS)):
        assert usage_on[k - 1]["prompt_tokens"] <= cached[k] < usage_on[k]["prompt_tokens"]


def test_copies_of_one_cold_prompt_are_not_cache_hits(servers):
    """n=4 choices of a prompt never seen: the later copies copy what the first reads rather than all reading
    it, but that is no reuse across requests. Usage reports nothing cached, the scheduler's totals grow by the
    prompt once (as usage counts it); the same prompt sent again is then served from the cache."""
    on, _ = servers
    c = openai.OpenAI(base_url=on.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
    c.completions.create(model="tiny", prompt="hi", max_tokens=1)  # the model is loaded
    sched = on.registry.snapshot()[0].scheduler
    before = sched.prompt_tokens_total, sched.cached_tokens_total
    prompt = " ".join(f"word{i} and" for i in range(12))  # well past MIN_SHARED tokens, in no other test
    usage = c.completions.create(model="tiny", prompt=prompt, max_tokens=3, n=4, temperature=1.0, seed=1).usage
    assert usage.prompt_tokens > 40 and usage.prompt_tokens_details.cached_tokens == 0
    assert (sched.prompt_tokens_total - before[0], sched.cached_tokens_total - before[1]) == (usage.prompt_tokens, 0)
    usage = c.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0).usage
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
