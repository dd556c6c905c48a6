"""Security defaults of `lmforge serve`, and its graceful shutdown, against live servers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.serve.live import start_server, wait_until

U = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(chat_model_dir):
    s = start_server({"tiny": chat_model_dir})
    yield s
    s.stop()


def test_no_key_configured_accepts_any_key(server):
    for auth in ({}, {"authorization": "Bearer whatever"}, {"authorization": "Basic Zm9vOmJhcg=="}):
        assert httpx.get(server.base_url + "/v1/models", headers=auth).status_code == 200


def test_a_configured_key_is_required_on_the_api_only(chat_model_dir, live_server):
    s = live_server({"tiny": chat_model_dir}, api_key="s3cret")
    url = s.base_url
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Bearer s3cret-and-more"},
                    {"authorization": "s3cret"}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(url + "/v1/chat/completions", headers=headers, json={"model": "tiny", "messages": U}).status_code == 401
    assert httpx.get(url + "/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"x-api-key": "s3cret"}).status_code == 200
    assert httpx.get(url + "/health").status_code == 200  # liveness and the UI's page need no key
    assert httpx.get(url + "/").status_code in (200, 404)
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    assert openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0).models.list().data[0].id == "tiny"


def test_the_key_is_compared_in_constant_time():
    import inspect

    from lmforge.serve import app

    assert "hmac.compare_digest" in inspect.getsource(app.Guard._check)


def test_host_header_is_checked_on_loopback(server):
    port = server.server.port
    for host in ("evil.example", "evil.example:80", f"attacker.com:{port}", "127.0.0.1.nip.io", ""):
        r = httpx.get(server.base_url + "/v1/models", headers={"host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert httpx.get(server.base_url + "/v1/models", headers={"host": host}).status_code == 200, host


def test_allowed_hosts_extend_the_loopback_names(chat_model_dir, live_server):
    s = live_server({"tiny": chat_model_dir}, allowed_hosts=("proxy.internal",))
    assert httpx.get(s.base_url + "/health", headers={"host": "proxy.internal:443"}).status_code == 200
    assert httpx.get(s.base_url + "/health", headers={"host": "other.internal"}).status_code == 400


def test_no_cors_unless_configured(server, chat_model_dir, live_server):
    pre = {"origin": "https://evil.example", "access-control-request-method": "POST"}
    r = httpx.options(server.base_url + "/v1/chat/completions", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(server.base_url + "/v1/models", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    s = live_server({"tiny": chat_model_dir}, cors_origins=("https://ui.example",))
    r = httpx.options(s.base_url + "/v1/chat/completions", headers={**pre, "origin": "https://ui.example"})
    assert r.headers.get("access-control-allow-origin") == "https://ui.example"
    r = httpx.options(s.base_url + "/v1/chat/completions", headers=pre)
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"


def test_every_response_carries_the_security_headers(server):
    for r in (httpx.get(server.base_url + "/"), httpx.get(server.base_url + "/v1/models"),
              httpx.get(server.base_url + "/v1/nope"), httpx.get(server.base_url + "/health", headers={"host": "x"})):
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "object-src 'none'" in csp
        assert "unsafe-inline" not in csp and "http" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", [
    "/static/../app.py", "/static/..%2fapp.py", "/static/%2e%2e/%2e%2e/pyproject.toml", "/static/.hidden",
    "/static/web/../../app.py", "/vendor/../app.py", "/vendor/..%2f..%2fapp.py", "/vendor/%2e%2e/%2e%2e/app.py",
    "/vendor//etc/passwd", "/vendor/marked/../../../app.py", "/vendor/.bin/x", "/static/", "/vendor/",
    "/static/%00", "/v1/models/..%2f..%2fetc%2fpasswd",
])
def test_no_route_reaches_a_file_outside_what_it_serves(server, path):
    r = httpx.get(server.base_url + path)
    assert r.status_code == 404
    assert b"import " not in r.content and b"root:" not in r.content and b"[project]" not in r.content


def test_errors_carry_no_paths(tmp_path, live_server):
    broken = tmp_path / "secret-dir" / "broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    s = live_server({"broken": broken})
    r = httpx.post(s.base_url + "/v1/chat/completions", json={"model": "broken", "messages": U})
    assert 400 <= r.status_code < 600 and "error" in r.json()
    assert "secret-dir" not in r.text and str(tmp_path) not in r.text and "Traceback" not in r.text
    assert r.headers.get("x-should-retry") == "false"


def test_header_size_is_limited(server):
    for attempt in range(3):  # the server may answer and close while the client still sends: a reset, not a bug
        try:
            r = httpx.get(server.base_url + "/health", headers={"x-big": "a" * 64 * 1024}, timeout=30)
            break
        except httpx.TransportError:
            if attempt == 2:
                raise
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    assert httpx.get(server.base_url + "/health").status_code == 200


# ------------------------------------------------------------------------------------------------------
# The CLI: loopback by default, a loud warning otherwise, and a graceful shutdown on SIGTERM
# ------------------------------------------------------------------------------------------------------
def _start_cli(args: list[str], env_home: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "LMFORGE_HOME": str(env_home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", *args, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"API: (http://\S+)/v1", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise AssertionError("server did not start: " + "".join(lines) + proc.stderr.read())


def test_sigterm_finishes_requests_in_flight_and_refuses_new_ones(chat_model_dir, live_server):
    s = live_server({"tiny": chat_model_dir}, grace=30.0)
    url = s.base_url
    body = {"model": "tiny", "messages": U, "max_tokens": 5}
    assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 200
    sched = s.registry.loaded["tiny"].scheduler
    release = threading.Event()
    sched.call(lambda: release.wait(30))  # the request below stays in flight until we let go
    result = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/v1/chat/completions", json=body, timeout=60)))
    t.start()
    assert wait_until(lambda: s.registry.in_flight >= 1, timeout=60)  # (a bound on a busy machine, not a speed)
    s.server.handle_exit(signal.SIGTERM, None)  # what uvicorn calls on SIGTERM
    r = httpx.post(url + "/v1/chat/completions", json=body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert httpx.get(url + "/health").status_code == 503
    assert not s.server.should_exit  # still draining
    release.set()
    t.join(30)
    assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["message"]["content"] is not None
    s.thread.join(15)
    assert not s.thread.is_alive() and s.server.drained_in is not None


def test_cli_binds_loopback_by_default_and_exits_0_on_sigterm(chat_model_dir, tmp_path):
    proc, url = _start_cli([str(chat_model_dir)], tmp_path)
    try:
        assert url.startswith("http://127.0.0.1:")
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "the", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "shutting down" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_warns_loudly_without_a_key_on_a_public_address(chat_model_dir, tmp_path):
    proc, url = _start_cli([str(chat_model_dir), "--host", "0.0.0.0", "--api-key", ""], tmp_path)  # "" is no key
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    err = proc.stderr.read()
    assert "WARNING" in err and "no API key" in err and "0.0.0.0" in err


# -- other web pages cannot drive the server (issue 13, finding 1) -----------------------------------------------
EVIL = "https://evil.example"
FEEDBACK = {"model": "tiny", "messages": U, "response": "hello", "rating": "up"}


def test_a_simple_request_from_another_site_is_refused(server):
    """The audit's request: a browser 'simple request' (text/plain, no preflight) from another origin used to
    reach /v1/feedback (200, records written) and /v1/completions (work done). Both are refused now."""
    import json

    body = json.dumps(FEEDBACK)
    for path, payload in (("/v1/feedback", body), ("/v1/completions", json.dumps({"model": "tiny", "prompt": "x"}))):
        r = httpx.post(server.base_url + path, content=payload, headers={"content-type": "text/plain", "origin": EVIL})
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin", r.text
        # even as JSON, another origin is refused
        r = httpx.post(server.base_url + path, content=payload, headers={"content-type": "application/json", "origin": EVIL})
        assert r.status_code == 403
        # and with no Origin at all, a form or text/plain body is not JSON: 415
        r = httpx.post(server.base_url + path, content=payload, headers={"content-type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_refused_feedback_writes_nothing(chat_model_dir, live_server, tmp_path):
    s = live_server({"tiny": chat_model_dir}, feedback_dir=tmp_path / "fb")
    r = httpx.post(s.base_url + "/v1/feedback", json=FEEDBACK, headers={"origin": EVIL})
    assert r.status_code == 403 and not (tmp_path / "fb").exists()
    assert httpx.post(s.base_url + "/v1/feedback", json=FEEDBACK).status_code == 200  # a plain client still can


@pytest.mark.parametrize("headers, path, status", [
    ({"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"}, "/tokenizer_info?model=tiny", 403),  # an <img>
    ({"sec-fetch-site": "same-site", "sec-fetch-mode": "cors"}, "/v1/models", 403),  # another port of localhost
    ({"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}, "/", 200),  # following a link to the UI
    ({"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}, "/v1/models", 403),  # ... but not the API
    ({"sec-fetch-site": "same-origin", "sec-fetch-mode": "cors"}, "/v1/models", 200),  # the UI itself
    ({"sec-fetch-site": "none", "sec-fetch-mode": "navigate"}, "/v1/models", 200),  # typed in the address bar
    ({"origin": "null"}, "/v1/models", 403),  # a sandboxed frame or a file:// page
])
def test_requests_a_page_makes_without_an_origin(server, headers, path, status):
    r = httpx.get(server.base_url + path, headers=headers)
    assert r.status_code == status or (status == 200 and r.status_code == 404 and path == "/"), r.text


def test_the_servers_own_pages_and_configured_origins_are_let_in(server, chat_model_dir, live_server):
    own = server.base_url
    r = httpx.post(own + "/v1/feedback", json={**FEEDBACK, "rating": None, "better": None}, headers={"origin": own})
    assert r.status_code == 400  # past the guard: the handler's own check answered
    s = live_server({"tiny": chat_model_dir}, cors_origins=("https://ok.example",))
    r = httpx.get(s.base_url + "/v1/models", headers={"origin": "https://ok.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ok.example"
    assert httpx.get(s.base_url + "/v1/models", headers={"origin": EVIL}).status_code == 403


# -- with a key, strangers learn nothing (finding 13) --------------------------------------------------------------
def test_health_without_the_key_says_only_ok(chat_model_dir, live_server):
    s = live_server({"tiny": chat_model_dir}, api_key="s3cret")
    httpx.post(s.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1},
               headers={"authorization": "Bearer s3cret"})  # loads the model
    assert httpx.get(s.base_url + "/health").json() == {"status": "ok"}
    full = httpx.get(s.base_url + "/health", headers={"authorization": "Bearer s3cret"}).json()
    assert full["models_loaded"] == ["tiny"]


@pytest.mark.parametrize("path", ["/static/package.json", "/static/package-lock.json", "/static/index.html",
                                  "/vendor/marked/package.json", "/vendor/dompurify/README.md"])
def test_no_package_metadata_or_other_files_are_served(server, path):
    assert httpx.get(server.base_url + path).status_code == 404


def test_the_ui_assets_are_still_served(server):
    from lmforge.serve.routes import WEB_DIR

    assert httpx.get(server.base_url + "/static/app.js").headers["content-type"].startswith("text/javascript")
    if (WEB_DIR / "node_modules").is_dir():
        r = httpx.get(server.base_url + "/vendor/marked/lib/marked.esm.js")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")


# -- slow clients are dropped (finding 11) --------------------------------------------------------------------------
def _closed_within(sock, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (a bound on waiting, not a speed check)."""
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (TimeoutError, OSError) as e:
        return not isinstance(e, TimeoutError)


@pytest.mark.parametrize("send", [
    b"",  # connects and says nothing
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",  # headers that never end
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\n\r\n{\"model\"",  # a body that never arrives
])
def test_slow_clients_are_dropped(chat_model_dir, live_server, send):
    """50 slow-header and 50 slow-body connections all stayed open past 25 s; with a 1 s header and body
    deadline every one of them is closed, and the server still answers."""
    import socket

    s = live_server({"tiny": chat_model_dir}, header_timeout=1.0, body_timeout=1.0)
    socks = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", s.server.port))
        sock.sendall(send)
        socks.append(sock)
    try:
        assert all(_closed_within(sock, 20) for sock in socks)
        assert httpx.get(s.base_url + "/health").status_code == 200
    finally:
        for sock in socks:
            sock.close()


def test_a_steady_client_is_not_dropped(chat_model_dir, live_server):
    """Keep-alive requests one after another, each well within the deadlines, all succeed."""
    s = live_server({"tiny": chat_model_dir}, header_timeout=2.0, body_timeout=2.0)
    with httpx.Client(base_url=s.base_url) as client:
        for _ in range(5):
            assert client.get("/health").status_code == 200
            time.sleep(0.3)
