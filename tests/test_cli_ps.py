"""`lmforge ps`, `lmforge stop` and `lmforge run MODEL PROMPT` against a running server (LMFORGE_HOST), and
what they say when none answers."""

from __future__ import annotations

import socket

import httpx
import pytest

from conftest import run_cli, save_tiny_model

MSG = "the model reads"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("ps") / "tiny", tiny_tokenizer, context_length=128,
                           embedding_scale=8.0)


@pytest.fixture
def server(model_dir, monkeypatch):
    from tests.serve.live import start_server

    s = start_server({"tiny": model_dir}, max_batch=2, max_queue=4)
    monkeypatch.setenv("LMFORGE_HOST", f"127.0.0.1:{s.server.port}")
    yield s
    s.stop()


@pytest.fixture
def no_server(monkeypatch):
    """LMFORGE_HOST pointing at a port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("LMFORGE_HOST", f"http://127.0.0.1:{port}")
    return port


def table(out: str) -> list[list[str]]:
    return [line.split() for line in out.strip().splitlines()]


def test_ps_lists_what_the_server_holds_and_stop_unloads_it(server, capsys):
    code, out, _ = run_cli(capsys, "ps")
    assert code == 0 and table(out) == [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]]
    r = httpx.post(server.base_url + "/api/generate", json={"model": "tiny", "keep_alive": "1h"}, timeout=60)
    assert r.json()["done_reason"] == "load"
    code, out, _ = run_cli(capsys, "ps")
    header, row = table(out)
    digest = httpx.get(server.base_url + "/api/ps").json()["models"][0]["digest"]
    assert row[:2] == ["tiny", digest[:12]] and row[4:6] == ["100%", "CPU"] and row[6] == "128"
    assert " ".join(row[7:]) == "59 minutes from now"
    code, out, err = run_cli(capsys, "stop", "tiny")
    assert code == 0 and out == "" and "tiny" not in server.registry.loaded
    assert table(run_cli(capsys, "ps")[1]) == [header]
    code, _, err = run_cli(capsys, "stop", "tiny")
    assert code == 2 and "tiny is not loaded" in err and len(err.strip().splitlines()) == 1


def test_without_a_server_ps_and_stop_say_so_in_one_line(no_server, capsys):
    for argv in (("ps",), ("stop", "tiny")):
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and f"no lmforge server answers at http://127.0.0.1:{no_server}" in err


def test_a_bad_lmforge_host_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("LMFORGE_HOST", "http://:80")
    code, _, err = run_cli(capsys, "ps")
    assert code == 2 and "LMFORGE_HOST" in err and len(err.strip().splitlines()) == 1


def test_run_with_a_prompt_answers_through_the_running_server(server, greedy, capsys):
    body = {"model": "tiny", "messages": [{"role": "user", "content": MSG}], "stream": False,
            "options": {"temperature": 0, "num_predict": 6}}
    want = httpx.post(server.base_url + "/api/chat", json=body, timeout=60).json()["message"]["content"]
    assert want == greedy
    server.registry.unload("tiny")
    code, out, _ = run_cli(capsys, "run", "tiny", MSG, "--temperature", "0", "--max-new-tokens", "6")
    assert code == 0 and out == want + "\n"
    assert "tiny" in server.registry.loaded  # the server answered: it loaded the model, this process did not


@pytest.fixture(scope="module")
def greedy(model_dir):
    """The engine's own greedy answer to MSG, 6 tokens: what every path of `run` must print."""
    from conftest import load_engine
    from lmforge.engine.sampling import SamplingParams

    engine = load_engine(model_dir)
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": MSG}], add_generation_prompt=True)
    return engine.complete([ids], SamplingParams(temperature=0, max_new_tokens=6))[0].text


def test_run_with_a_prompt_loads_in_process_without_a_server(no_server, model_dir, greedy, capsys):
    code, out, _ = run_cli(capsys, "run", model_dir, MSG, "--temperature", "0", "--max-new-tokens", "6")
    assert code == 0 and out == greedy + "\n"


def test_run_falls_back_to_in_process_for_a_model_the_server_does_not_serve(server, model_dir, greedy, capsys):
    code, out, _ = run_cli(capsys, "run", model_dir, MSG, "--temperature", "0", "--max-new-tokens", "6")
    assert code == 0 and out == greedy + "\n"
    assert server.registry.loaded == {}  # a directory is not one of the server's model names
    code, _, err = run_cli(capsys, "run", "tiny", "  ")
    assert code == 2 and "PROMPT is empty" in err


def test_until_column():
    from lmforge.cli.use import _until

    now = 1_700_000_000.0
    assert _until("9999-12-31T23:59:59.999999999Z", now) == "Forever"
    assert _until("2023-11-14T22:13:20.000000000Z", now) == "Stopping..."
    assert _until("2023-11-14T23:13:19.123456789Z", now) == "59 minutes from now"
    assert _until("2023-11-14T22:13:50.5Z", now) == "30 seconds from now"
    assert _until("2023-11-17T22:13:21Z", now) == "3 days from now"


def test_run_with_loading_flags_loads_in_process(model_dir, greedy, monkeypatch, capsys):
    """--dtype/--device/--no-fast say how this process loads the model: a server would drop them."""
    from tests.serve.live import start_server

    s = start_server({str(model_dir): model_dir}, max_batch=2, max_queue=4)  # serves the very name given
    try:
        monkeypatch.setenv("LMFORGE_HOST", f"127.0.0.1:{s.server.port}")
        code, out, _ = run_cli(capsys, "run", str(model_dir), MSG, "--temperature", "0", "--max-new-tokens", "6",
                               "--no-fast")
        assert code == 0 and out == greedy + "\n"
        assert s.registry.loaded == {}  # answered here, not by the server
    finally:
        s.stop()


def test_an_error_in_the_middle_of_a_stream_has_no_made_up_status(monkeypatch):
    import contextlib

    from lmforge.cli.client import Client, ServerError

    c = Client("127.0.0.1:1")
    monkeypatch.setattr(c, "_request", lambda *a, **k: contextlib.nullcontext(
        [b'{"message": {"content": "a"}}\n', b'{"error": "invalid \'format\': bad"}\n']))
    with pytest.raises(ServerError) as e:
        list(c.stream("/api/chat", {}))
    assert e.value.status is None and "format" in str(e.value)
