"""The server's memory check, through the real HTTP app: a model is counted as it will be held (weights +
KV cache + runtime, `lmforge.footprint`), idle models are unloaded least recently used first to make room,
a model with a request in flight never is, and what cannot fit gets a 503 that gives the figures.

Free memory is faked (`serve.models.available_memory`): the machine's total minus the estimates of the
models loaded, which is what a real machine would report if the estimates were exact."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import torch

from lmforge.footprint import estimate, gib
from lmforge.serve import models
from tests.serve.live import wait_until


def footprint(registry, path):
    return estimate(path, dtype=registry.dtype, device=registry.device, batch=registry.max_batch,
                    tokens=registry.max_context, chunk=registry.prefill_chunk)


def machine_with(monkeypatch, registry, total: int) -> None:
    """Pretend the machine has `total` bytes, of which the loaded models take their estimates."""
    monkeypatch.setattr(models, "available_memory",
                        lambda: total - sum(s.footprint.total for s in registry.snapshot()))


def complete(server, model: str, max_tokens: int = 1) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/completions", timeout=60,
                      json={"model": model, "prompt": "the", "max_tokens": max_tokens})


def test_idle_models_are_unloaded_least_recently_used_first(chat_model_dir, live_server, monkeypatch):
    s = live_server({"a": chat_model_dir, "b": chat_model_dir, "c": chat_model_dir})
    need = footprint(s.registry, chat_model_dir).total
    machine_with(monkeypatch, s.registry, int(2.5 * need))  # room for two models, not three
    for name in ("a", "b"):
        assert complete(s, name).status_code == 200
    assert sorted(s.registry.loaded) == ["a", "b"]
    time.sleep(0.01)  # distinct last-use times, whatever the clock's resolution
    assert complete(s, "a").status_code == 200  # a is now the more recently used
    assert complete(s, "c").status_code == 200
    assert sorted(s.registry.loaded) == ["a", "c"]  # b went, the least recently used
    assert complete(s, "b").status_code == 200
    assert sorted(s.registry.loaded) == ["b", "c"]


def test_a_second_model_loads_once_the_idle_first_one_is_unloaded(chat_model_dir, live_server, monkeypatch):
    s = live_server({"a": chat_model_dir, "b": chat_model_dir})
    need = footprint(s.registry, chat_model_dir).total
    machine_with(monkeypatch, s.registry, int(1.5 * need))
    assert complete(s, "a").status_code == 200
    assert list(s.registry.loaded) == ["a"]
    r = complete(s, "b")
    assert r.status_code == 200, r.text
    assert list(s.registry.loaded) == ["b"]


def test_a_model_too_big_for_the_machine_is_a_503_with_the_figures(chat_model_dir, live_server, monkeypatch):
    s = live_server({"a": chat_model_dir, "b": chat_model_dir})
    need = footprint(s.registry, chat_model_dir)
    machine_with(monkeypatch, s.registry, need.total - 1)
    r = complete(s, "b")
    assert r.status_code == 503 and r.headers["x-should-retry"] == "false"
    err = r.json()["error"]
    assert err["code"] == "insufficient_memory" and err["type"] == "server_error"
    msg = err["message"]
    assert "\n" not in msg and "'b'" in msg
    assert f"needs about {gib(need.total)}" in msg and f"weights {gib(need.weights)}" in msg
    assert f"KV cache for {s.registry.max_batch} x {need.tokens} tokens {gib(need.kv_cache)}" in msg
    assert f"and {gib(need.total - 1)} is available on cpu" in msg
    assert s.registry.loaded == {}


def test_no_model_is_unloaded_in_vain(chat_model_dir, live_server, monkeypatch):
    s = live_server({"a": chat_model_dir, "b": chat_model_dir})
    need = footprint(s.registry, chat_model_dir)
    machine_with(monkeypatch, s.registry, 2 * need.total)
    assert complete(s, "a").status_code == 200
    a = s.registry.loaded["a"]
    machine_with(monkeypatch, s.registry, need.total - 1)  # even with a unloaded, b would not fit
    r = complete(s, "b")
    assert r.status_code == 503 and r.json()["error"]["code"] == "insufficient_memory"
    assert f"{gib(need.total)} more once the idle models (a) are unloaded" in r.json()["error"]["message"]
    assert s.registry.loaded == {"a": a}  # the very same loaded model
    assert complete(s, "a").status_code == 200


def test_a_model_with_a_request_in_flight_is_never_unloaded(chat_model_dir, live_server, monkeypatch):
    s = live_server({"a": chat_model_dir, "b": chat_model_dir})
    need = footprint(s.registry, chat_model_dir).total
    machine_with(monkeypatch, s.registry, int(1.5 * need))
    assert complete(s, "a").status_code == 200
    model = s.registry.loaded["a"].engine.model
    forward = model.forward

    def slow_forward(*args, **kwargs):  # 40 tokens take about a second: the request is surely in flight
        time.sleep(0.025)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_forward)
    done: list[httpx.Response] = []
    t = threading.Thread(target=lambda: done.append(complete(s, "a", max_tokens=40)))
    t.start()
    try:
        assert wait_until(lambda: s.registry.loaded["a"].active == 1, timeout=30)
        r = complete(s, "b")
        assert r.status_code == 503 and r.json()["error"]["code"] == "insufficient_memory"
        assert "the models in use (a) stay loaded" in r.json()["error"]["message"]
        assert list(s.registry.loaded) == ["a"] and not done  # a's request was not cut short
    finally:
        t.join(60)
    assert done[0].status_code == 200 and done[0].json()["usage"]["completion_tokens"] == 40
    assert complete(s, "b").status_code == 200  # a is idle now: it makes room
    assert list(s.registry.loaded) == ["b"]


def test_unknown_free_memory_refuses_nothing(chat_model_dir, live_server, monkeypatch):
    s = live_server({"a": chat_model_dir})
    monkeypatch.setattr(models, "available_memory", lambda: None)
    assert complete(s, "a").status_code == 200


def test_the_registry_loads_at_the_dtype_it_is_given(chat_model_dir):
    registry = models.ModelRegistry({"a": chat_model_dir}, dtype=torch.bfloat16, fast=False, max_batch=2)
    try:
        served = asyncio.run(registry.get("a"))
        assert served.engine.model.tok_emb.weight.dtype == torch.bfloat16
        from lmforge.footprint import weights_bytes

        assert served.footprint.weights == weights_bytes(chat_model_dir, torch.bfloat16)
        assert served.footprint.weights * 2 == weights_bytes(chat_model_dir, torch.float32)
    finally:
        registry.stop()


@pytest.mark.parametrize("flag, dtype", [([], "auto"), (["--dtype", "bf16"], torch.bfloat16),
                                         (["--dtype", "f32"], torch.float32)])
def test_serve_dtype_reaches_the_registry(chat_model_dir, monkeypatch, capsys, flag, dtype):
    from lmforge.cli import main
    from lmforge.errors import UserError
    from lmforge.serve import server

    seen = {}

    class Spy(models.ModelRegistry):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

    def stop_here(*args, **kwargs):
        raise UserError("stopped before listening")

    monkeypatch.setattr(models, "ModelRegistry", Spy)
    monkeypatch.setattr(server, "build_server", stop_here)
    assert main(["serve", str(chat_model_dir), *flag]) == 2
    assert "stopped before listening" in capsys.readouterr().err
    assert seen["dtype"] == dtype


def test_serve_refuses_an_unknown_dtype_in_one_line(capsys):
    from lmforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--dtype", "int3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--dtype" in err[0] and "int3" in err[0]


def test_unloading_hands_the_memory_back(chat_model_dir, live_server, monkeypatch):
    s = live_server({"a": chat_model_dir}, keep_alive=0.0)
    returned = []
    monkeypatch.setattr(models, "_return_freed_memory", lambda device: returned.append(str(device)))
    assert complete(s, "a").status_code == 200
    assert s.registry.unload_idle() == ["a"] and returned == ["cpu"]
    assert s.registry.unload_idle() == [] and returned == ["cpu"]  # nothing unloaded, nothing to hand back
