"""Hostile model output on every render path of the web UI, at any machine speed.

test_browser.py drives the real server with a real (tiny) model, so how an answer is cut into chunks, and how
many of those chunks the page draws on their own, depend on how fast the machine is. Here the page talks to
a fake of the OpenAI API instead (FAKE_API_JS replaces `fetch` in the page before the UI loads; the real
server still serves the page and its Content-Security-Policy), so the tests choose: an answer streamed a
few characters at a time, each piece drawn in its own frame before the next one arrives (every tag is cut
at several points: `<img src=x on` then `error=...`), or the whole answer in one burst. The same hostile text
also comes back as a conversation restored from localStorage, an edited question, an error message, the
token probability view and the better-answer form.

Each test runs with test_browser.WATCH_JS in the page, which reports an element with an on* attribute or a
javascript: URL at the moment it enters the document (even if it is gone again in the same task), any HTML
string parsed into the page's document, and every CSP violation. The assertion that matters is that there
are none: the sanitiser must stop the markup before it is live, so the CSP never has anything to block.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.serve.test_browser import Page, browser, sync_api  # noqa: F401  (browser: the fixture)

MODEL = "fake"
PWNED = "window.__pwned"

# One answer that tries everything at once. Markdown around it, so that marked's block and inline rules
# both see markup: raw HTML blocks, inline HTML, links and images, code (where it must show as text).
HOSTILE_ANSWER = "\n".join([
    "Hi <script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\"> and "
    "<svg onload=\"window.__pwned = 3\"><circle r=\"1\"></circle></svg>",
    "",
    "<details open ontoggle=\"window.__pwned = 4\"><summary>s</summary>x</details>",
    "",
    "<a href=\"javascript:window.__pwned = 5\">a link</a>, [a markdown link](javascript:window.__pwned=6), "
    "[tabbed](java\tscript:window.__pwned=7), ![an image](x\" onerror=\"window.__pwned=8)",
    "",
    "<iframe srcdoc=\"<script>parent.__pwned = 9</script>\"></iframe>",
    "<form action=\"javascript:window.__pwned = 10\"><button formaction=\"javascript:window.__pwned = 11\">go</button>"
    "<input autofocus onfocus=\"window.__pwned = 12\"></form>",
    "",
    "<noscript><p title=\"</noscript><img src=x onerror=window.__pwned=13>\"></noscript>",
    "",
    "<math><mtext><table><mglyph><style><img src=x onerror=window.__pwned=14></style></mglyph></table></mtext></math>",
    "",
    "<video><source onerror=\"window.__pwned = 15\"></video><body onload=\"window.__pwned = 16\">",
    "<object data=\"javascript:window.__pwned = 17\"></object><embed src=\"javascript:window.__pwned = 18\">",
    "<base href=\"http://example.invalid/\"><style>*{background:url(http://example.invalid/s.png)}</style>",
    "<img src=\"http://example.invalid/p.png\"> <div style=\"background:url(http://example.invalid/d.png)\">styled</div>",
    "",
    "```html",
    "<img src=x onerror=window.__pwned=19>",
    "```",
    "",
    "`<img src=x onerror=window.__pwned=20>` done",
])
# Short hostile strings for the places that are not markdown: titles, errors, user text, model names.
HOSTILE_LINE = '<img src=x onerror="window.__pwned = \'line\'"><script>window.__pwned = "script"</script>'


PIECE_SIZES = (1, 2, 3, 5, 7)


def pieces(text: str) -> list[str]:
    """`text` cut into pieces of PIECE_SIZES characters in turn: every tag is split at several points."""
    out, i, n = [], 0, 0
    while i < len(text):
        size = PIECE_SIZES[n % len(PIECE_SIZES)]
        out.append(text[i:i + size])
        i, n = i + size, n + 1
    return out


def logprob_entry(token: str, logprob: float) -> dict:
    """A token's logprobs, with a hostile alternative for the popover."""
    alt = HOSTILE_LINE
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()),
            "top_logprobs": [{"token": token, "logprob": logprob, "bytes": list(token.encode())},
                             {"token": alt, "logprob": -4.0, "bytes": list(alt.encode())}]}


def streamed(text: str, *, error: str | None = None, pace: str | None = None) -> dict:
    """An answer streamed as chat.completion.chunk events, one per piece; with `error`, it fails midway.
    `pace` ("frame" or "burst") overrides the page's."""
    parts = pieces(text)
    if error is not None:
        parts = parts[:len(parts) // 2]
    events = [{"object": "chat.completion.chunk", "model": MODEL, "choices": [{
        "index": 0, "delta": {"content": p}, "finish_reason": None,
        "logprobs": {"content": [logprob_entry(p, -0.01 * (i % 50))]}}]} for i, p in enumerate(parts)]
    if error is not None:
        events.append({"error": {"message": error, "type": "server_error"}})
    else:
        events.append({"object": "chat.completion.chunk", "model": MODEL,
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        events.append({"object": "chat.completion.chunk", "model": MODEL, "choices": [],
                       "usage": {"prompt_tokens": 3, "completion_tokens": len(parts), "total_tokens": len(parts) + 3}})
    return {"events": [json.dumps(e) for e in events] + ([] if error is not None else ["[DONE]"]), "pace": pace}


def refused(message: str, status: int = 400) -> dict:
    return {"status": status, "message": message}


# The fake API, installed before the UI's scripts. /v1/models lists MODEL, /v1/feedback accepts anything,
# /v1/chat/completions plays the next of `answers`. With pace "frame", each event is sent only after the next
# animation frame: the UI draws in a frame callback it asks for when the previous event arrives, after ours,
# so each piece is drawn on its own before the next one is sent, whatever the machine's speed. `redrawn`
# records, before each event, whether the answer on screen was drawn again since the previous one was sent.
FAKE_API_JS = r"""
((cfg) => {
  const api = (window.__fakeApi = { requests: [], redrawn: [] });
  const realFetch = window.fetch.bind(window);
  const json = (obj, status = 200) =>
    new Response(JSON.stringify(obj), { status, headers: { "Content-Type": "application/json" } });
  const frame = () => new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
  const drawn = () => {  // each drawing of an answer replaces every node of its body
    const bodies = document.querySelectorAll("[data-testid=message][data-role=assistant] [data-testid=message-body]");
    return bodies.length ? bodies[bodies.length - 1].firstChild : null;
  };
  let next = 0;
  window.fetch = async (input, init = {}) => {
    const path = new URL(typeof input === "string" ? input : input.url, location.href).pathname;
    if (path === "/v1/models") return json({ object: "list", data: [{ id: cfg.model, object: "model", owned_by: "test" }] });
    if (path === "/v1/feedback") return json({ object: "feedback", saved: {} });
    if (path !== "/v1/chat/completions") return realFetch(input, init);
    api.requests.push(JSON.parse(init.body));
    const answer = cfg.answers[Math.min(next++, cfg.answers.length - 1)];
    if (answer.status) return json({ error: { message: answer.message, type: "invalid_request_error" } }, answer.status);
    const encoder = new TextEncoder();
    const signal = init.signal;
    const body = new ReadableStream({
      async start(controller) {
        let last = drawn();
        for (const data of answer.events) {
          if ((answer.pace || cfg.pace) === "frame") {
            await frame();
            api.redrawn.push(drawn() !== last);
            last = drawn();
          }
          if (signal && signal.aborted) return controller.error(new DOMException("stopped", "AbortError"));
          controller.enqueue(encoder.encode(`data: ${data}\n\n`));
        }
        controller.close();
      },
    });
    return new Response(body, { headers: { "Content-Type": "text/event-stream" } });
  };
})(%s);
"""


@pytest.fixture
def make_ui(browser, live_server):  # noqa: F811  (browser: the fixture imported above)
    """`make_ui(answers, pace)` -> a Page on a real server (no models of its own) whose API is the fake."""
    base_url = live_server({}).base_url
    pages: list[Page] = []

    def make(answers: list[dict], pace: str = "frame") -> Page:
        ui = Page(browser, base_url, model=MODEL)
        ui.context.add_init_script(FAKE_API_JS % json.dumps({"model": MODEL, "answers": answers, "pace": pace}))
        pages.append(ui)
        return ui

    yield make
    for ui in pages:
        ui.close()


def requests_sent(ui: Page) -> list[dict]:
    return ui.page.evaluate("window.__fakeApi.requests")


PACED_TIMEOUT_MS = 90_000  # a frame per piece: about 6 s for HOSTILE_ANSWER at 60 frames a second


def assert_rendered_inert(ui: Page, answer) -> None:
    """Nothing hostile was ever live; the finished answer shows the model's HTML as the text it wrote."""
    ui.assert_inert()  # first: this is the assertion that fails on a page that let markup through
    expect = sync_api.expect
    body = answer.get_by_test_id("message-body")
    expect(body).to_contain_text("Hi <script>window.__pwned = 1</script>")
    expect(body).to_contain_text('<img src=x onerror="window.__pwned = 2">')
    expect(body).to_contain_text("done")
    assert body.locator("script, style, iframe, object, embed, form, input, base, svg, math, img, details").count() == 0
    for href in body.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))"):
        assert href is None or re.match(r"https?://|mailto:|#", href), href
    expect(body.locator("pre code").last).to_have_text("<img src=x onerror=window.__pwned=19>")
    expect(body.locator("p code").last).to_have_text("<img src=x onerror=window.__pwned=20>")


# ---------------------------------------------------------------------------------------------------
# The checks themselves: Trusted Types are on, and the watcher sees what it is there to see, here too
# ---------------------------------------------------------------------------------------------------
def test_trusted_types_guard_the_ui(make_ui):
    """In the UI's page the browser itself refuses an HTML string or a handler attribute from any script
    (index.html's Trusted Types policy): only DOMPurify, inside markdown.js, may turn HTML into nodes."""
    ui = make_ui([streamed("unused")])
    ui.open()
    blocked = ui.page.evaluate("""() => {
        const refused = [];
        const attempt = (what, f) => { try { f(); } catch (e) { if (e instanceof TypeError) refused.push(what); } };
        attempt("innerHTML", () => { document.createElement("div").innerHTML = "<b>x</b>"; });
        attempt("insertAdjacentHTML", () => document.body.insertAdjacentHTML("beforeend", "<b>x</b>"));
        attempt("DOMParser", () => new DOMParser().parseFromString("<b>x</b>", "text/html"));
        attempt("onerror", () => document.createElement("img").setAttribute("onerror", "window.__pwned = 1"));
        attempt("policy", () => trustedTypes.createPolicy("mine", { createHTML: (s) => s }));
        return refused;
    }""")
    assert blocked == ["innerHTML", "insertAdjacentHTML", "DOMParser", "onerror", "policy"]
    ui.errors.clear()  # each refusal is also logged
    ui.findings.clear()


def test_watcher_sees_transient_handlers_and_csp_violations(make_ui):
    """The watcher reports a handler that is live for a moment only and an HTML string parsed into the page,
    and an <img onerror> whose image fails gives the CSP violation test_browser.py's tests look for. On a
    page of the server without the UI (same CSP, no Trusted Types), where a script can still plant these."""
    ui = make_ui([streamed("unused")])
    ui.page.goto(ui.base_url + "/health")
    ui.page.evaluate("""() => {
        const live = (attr) => {
            const img = document.createElement("img");
            img.setAttribute(attr, "window.__pwned = 'watch'");
            document.body.append(img);
            return img;
        };
        live("onerror").remove();  // gone again in the same task, handler and all
        live("onload").removeAttribute("onload");  // cleaned in the same task: too late, it was live
        document.createElement("div").innerHTML = "<b>parsed in the page</b>";
    }""")
    ui.settle()
    assert any(f.startswith("inserted <img onerror") for f in ui.findings), ui.findings
    assert any(f.startswith("attribute onload changed") for f in ui.findings), ui.findings
    assert any(f.startswith("innerHTML parsed HTML into the page") for f in ui.findings), ui.findings

    ui.findings.clear()
    ui.page.evaluate("""() => {
        const img = document.createElement("img");
        img.setAttribute("onerror", "window.__pwned = 'csp'");
        img.src = "data:image/png;base64,AAAA";  // not an image: its error event fires, locally
        document.body.append(img);
    }""")
    ui.page.wait_for_function("() => document.querySelector('img[onerror]').complete")
    ui.settle()
    assert any(f.startswith("CSP violation: script-src-attr") for f in ui.findings), ui.findings
    assert any("Executing inline event handler violates" in e for e in ui.errors), ui.errors
    assert ui.page.evaluate(PWNED) is None  # the CSP did stop it: the second wall stands


# ---------------------------------------------------------------------------------------------------
# Streamed answers
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pace", ["frame", "burst"])
def test_streamed_hostile_answer_is_never_live(make_ui, pace):
    """Streamed a piece a frame (each partial answer drawn on its own) or all at once; as markdown, then
    as tokens (the colour switch draws every answer, the streaming one too, as tokens)."""
    expect = sync_api.expect
    ui = make_ui([streamed(HOSTILE_ANSWER), streamed(HOSTILE_LINE + " done")], pace)
    ui.open()
    answer = ui.ask("Show me html", PACED_TIMEOUT_MS)
    if pace == "frame":
        # Each piece was drawn before the next was sent: every partial answer really was on screen.
        n = len(pieces(HOSTILE_ANSWER))
        drawn_alone = sum(ui.page.evaluate("window.__fakeApi.redrawn")[1:n + 1])
        assert drawn_alone >= 0.9 * n, f"only {drawn_alone} of {n} pieces were drawn on their own"
    assert_rendered_inert(ui, answer)

    ui.page.get_by_test_id("prob-toggle").check()
    answer = ui.ask("Again", PACED_TIMEOUT_MS)
    tokens = answer.get_by_test_id("token")
    assert "".join(tokens.all_text_contents()) == HOSTILE_LINE + " done"
    tokens.nth(3).hover()
    expect(ui.page.get_by_test_id("popover-alt").last).to_have_text(re.compile(re.escape(json.dumps(HOSTILE_LINE))))
    assert answer.locator("img, script").count() == 0
    ui.page.get_by_test_id("prob-toggle").uncheck()
    expect(answer.get_by_test_id("message-body")).to_have_text(HOSTILE_LINE + " done")

    ui.assert_inert()
    assert ui.remote_requests() == []
    assert ui.errors == []


# ---------------------------------------------------------------------------------------------------
# A conversation restored from localStorage
# ---------------------------------------------------------------------------------------------------
def hostile_conversation(cid: str, updated: int) -> dict:
    entries = [logprob_entry(p, -0.5) for p in pieces(HOSTILE_ANSWER)]
    return {
        "id": cid, "title": f"Title {HOSTILE_LINE}", "model": MODEL, "system": HOSTILE_LINE,
        "created": updated, "updated": updated,
        "messages": [
            # A quote in an id must not break the selectors the UI builds from ids.
            {"id": f'{cid}-u"] , [x="', "role": "user", "content": f"Question {HOSTILE_LINE}"},
            {"id": f"{cid}-a", "role": "assistant", "content": HOSTILE_ANSWER, "model": HOSTILE_LINE,
             "system": HOSTILE_LINE, "logprobs": entries, "finish": "stop", "error": f"Error {HOSTILE_LINE}",
             "usage": {"completion_tokens": len(entries)}, "elapsed": 1.0,
             "feedback": {"rating": "down", "better": f"Better {HOSTILE_LINE}", "status": f"Status {HOSTILE_LINE}"}},
        ],
    }


def test_restored_hostile_conversation_is_never_live(make_ui):
    """Every field of a stored conversation is hostile; reloading draws it, and every view of it, inert."""
    expect = sync_api.expect
    ui = make_ui([streamed(HOSTILE_ANSWER)])
    page = ui.page
    ui.open()
    conversations = [hostile_conversation("old", 1), hostile_conversation("new", 2)]
    page.evaluate("(convs) => localStorage.setItem('lmforge.conversations.v1', JSON.stringify(convs))", conversations)
    page.reload()
    page.wait_for_selector("body[data-ready=true]")

    # Every part of the stored conversation is drawn, as text where it is not the answer's markdown.
    items = page.get_by_test_id("conversation-item")
    expect(items).to_have_text([f"Title {HOSTILE_LINE}"] * 2)
    answer = page.locator("[data-testid=message][data-role=assistant]")
    expect(answer).to_have_count(1)
    assert_rendered_inert(ui, answer)
    expect(answer.locator(".role")).to_have_text(HOSTILE_LINE)
    expect(answer.get_by_test_id("message-error")).to_have_text(f"Error {HOSTILE_LINE}")
    expect(answer.get_by_test_id("feedback-status")).to_have_text(f"Status {HOSTILE_LINE}")
    user = page.locator("[data-testid=message][data-role=user]")
    expect(user.get_by_test_id("message-body")).to_have_text(f"Question {HOSTILE_LINE}")

    # The token view and its popover, the better-answer form, editing the question, the other conversation.
    answer.get_by_test_id("tokens-button").click()
    tokens = answer.get_by_test_id("token")
    assert "".join(tokens.all_text_contents()) == HOSTILE_ANSWER
    tokens.nth(5).click()
    expect(page.get_by_test_id("popover-alt").last).to_have_text(re.compile(re.escape(json.dumps(HOSTILE_LINE))))
    page.keyboard.press("Escape")
    answer.get_by_test_id("better-answer").click()
    expect(answer.get_by_test_id("better-input")).to_have_value(f"Better {HOSTILE_LINE}")
    answer.get_by_test_id("better-cancel").click()
    user.get_by_test_id("edit").click()
    expect(user.get_by_test_id("edit-input")).to_have_value(f"Question {HOSTILE_LINE}")
    expect(user.get_by_test_id("edit-input")).to_be_focused()
    user.get_by_test_id("edit-cancel").click()
    items.last.click()
    expect(page.get_by_test_id("message")).to_have_count(2)
    assert_rendered_inert(ui, page.locator("[data-testid=message][data-role=assistant]"))

    assert ui.remote_requests() == []
    assert ui.errors == []


# ---------------------------------------------------------------------------------------------------
# Edit, regenerate, errors
# ---------------------------------------------------------------------------------------------------
def test_edit_regenerate_and_errors_are_never_live(make_ui):
    """An edited question and its answer (a piece a frame), a refusal and a stream that breaks off, both
    with hostile messages, then a regenerated answer."""
    expect = sync_api.expect
    ui = make_ui([streamed("A harmless first answer."), streamed(HOSTILE_ANSWER, pace="frame"),
                  refused(f"Refused {HOSTILE_LINE}"), streamed(HOSTILE_ANSWER, error=f"Failed {HOSTILE_LINE}"),
                  streamed(HOSTILE_ANSWER)], pace="burst")
    page = ui.page
    ui.open()
    ui.ask("Hello")

    # An edited question is hostile text: it is sent as typed and shown as typed.
    user = page.locator("[data-testid=message][data-role=user]")
    user.get_by_test_id("edit").click()
    user.get_by_test_id("edit-input").fill(HOSTILE_LINE)
    user.get_by_test_id("edit-save").click()
    answer = ui.wait_answer(PACED_TIMEOUT_MS)
    expect(user.get_by_test_id("message-body")).to_have_text(HOSTILE_LINE)
    assert requests_sent(ui)[-1]["messages"] == [{"role": "user", "content": HOSTILE_LINE}]
    assert_rendered_inert(ui, answer)

    # Regenerate: refused with a hostile message, then a stream that breaks off with one.
    answer.get_by_test_id("regenerate").click()
    answer = ui.wait_answer()
    expect(answer.get_by_test_id("message-error")).to_have_text(f"Refused {HOSTILE_LINE}")
    answer.get_by_test_id("regenerate").click()
    answer = ui.wait_answer()
    expect(answer.get_by_test_id("message-error")).to_have_text(f"Failed {HOSTILE_LINE}")
    ui.assert_inert()

    # And once more, whole.
    answer.get_by_test_id("regenerate").click()
    answer = ui.wait_answer()
    expect(answer.get_by_test_id("message-error")).to_have_count(0)
    assert_rendered_inert(ui, answer)
    assert len(requests_sent(ui)) == 5

    assert ui.remote_requests() == []
    assert ui.errors == []
