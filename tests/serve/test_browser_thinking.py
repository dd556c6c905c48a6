"""A thinking model's thought in the web UI, in a real browser (the way of test_browser.py: Debian's Chromium
through Playwright, WATCH_JS reporting anything hostile that goes live): folded in a "Thinking" <details>
above the answer, viewable when opened (and kept open across re-renders), filled live while the model
thinks, shown as text, and never sent back to the model.

Two ways in: the real server, with a tiny random model whose Qwen3-style template thinks and which
llama.cpp's `grammar` field (set through the settings the page stores) makes write a known thought and
answer; and, for "live", a fake of the streaming API that sends the thought, then holds the answer back
until the test lets it go, so what is on screen mid-thought is checked without depending on timing.
"""

from __future__ import annotations

import json

import pytest

from tests.serve.test_browser import Page, browser, sync_api  # noqa: F401  (browser: the fixture)
from tests.serve.tool_templates import family_tokenizer
from tests.tokenizer.family_templates import FAMILIES

MODEL = "thinker"
THOUGHT, ANSWER = "add two and two", "It is **four**."
SAID = f'root ::= "<think>" "{THOUGHT}" "</think>" "\\n\\n{ANSWER}"'  # GBNF: the model's whole output
SETTINGS_JS = """localStorage.setItem("lmforge.settings.v1", JSON.stringify(%s));"""


@pytest.fixture(scope="module")
def thinker(tmp_path_factory, tiny_tokenizer):
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("browser-thinking") / MODEL,
                           family_tokenizer(tiny_tokenizer, "qwen3", FAMILIES), context_length=256)


def test_the_thought_is_folded_but_viewable(browser, live_server, thinker):
    ui = Page(browser, live_server({MODEL: thinker}).base_url, model=MODEL)
    try:
        ui.context.add_init_script(SETTINGS_JS % json.dumps(
            {"model": MODEL, "system": "", "probColours": False,
             "sampling": {"temperature": 0, "max_tokens": 40, "grammar": SAID}}))
        ui.open()
        answer = ui.ask("What is 2 + 2?")
        fold = answer.get_by_test_id("thinking")
        expect = sync_api.expect
        expect(fold).to_have_count(1)
        expect(fold.get_by_test_id("thinking-summary")).to_have_text("Thinking")
        assert fold.evaluate("d => d.tagName === 'DETAILS' && !d.open")  # folded
        expect(fold.get_by_test_id("thinking-text")).to_be_hidden()
        expect(answer.get_by_test_id("message-body")).to_have_text("It is four.")  # markdown, no thought
        assert answer.get_by_test_id("message-body").locator("strong").inner_text() == "four"

        fold.get_by_test_id("thinking-summary").click()  # viewable
        expect(fold.get_by_test_id("thinking-text")).to_have_text(THOUGHT)
        ui.page.get_by_test_id("tokens-button").last.click()  # any re-render keeps it open
        expect(answer.get_by_test_id("thinking-text")).to_be_visible()

        ui.ask("And 3 + 3?")  # the thought is not sent back to the model
        sent = ui.chat_bodies[-1]["messages"]
        assert [m["content"] for m in sent if m["role"] == "assistant"] == [ANSWER]
        assert ui.errors == []
        ui.assert_inert()
    finally:
        ui.close()


# A fake /v1/chat/completions (installed before the UI's scripts): it streams the thought in pieces, then waits
# for window.__release() before the answer and the end of the stream. Every other request goes to the server.
GATED_API_JS = r"""
((cfg) => {
  const realFetch = window.fetch.bind(window);
  let release;
  const gate = new Promise((r) => { release = r; });
  window.__release = () => release();
  const event = (delta, finish = null) => `data: ${JSON.stringify({ object: "chat.completion.chunk", model: cfg.model,
    choices: [{ index: 0, delta, finish_reason: finish, logprobs: null }] })}\n\n`;
  window.fetch = async (input, init = {}) => {
    const path = new URL(typeof input === "string" ? input : input.url, location.href).pathname;
    if (path === "/v1/models") {
      return new Response(JSON.stringify({ object: "list", data: [{ id: cfg.model, object: "model" }] }),
                          { headers: { "Content-Type": "application/json" } });
    }
    if (path !== "/v1/chat/completions") return realFetch(input, init);
    const encoder = new TextEncoder();
    const body = new ReadableStream({
      async start(controller) {
        controller.enqueue(encoder.encode(event({ role: "assistant", content: "" })));
        for (const piece of cfg.thought) controller.enqueue(encoder.encode(event({ reasoning_content: piece })));
        await gate;
        controller.enqueue(encoder.encode(event({ content: cfg.answer })));
        controller.enqueue(encoder.encode(event({}, "stop")));
        controller.enqueue(encoder.encode("data: [DONE]\n\n"));
        controller.close();
      },
    });
    return new Response(body, { headers: { "Content-Type": "text/event-stream" } });
  };
})(%s);
"""

HOSTILE_THOUGHT = ["I could write <img src=x on", "error=\"window.__pwned = 1\"> or ", "<script>window.__pwned = 2</script>"]


def test_the_thought_streams_live_and_stays_text(browser, live_server):
    ui = Page(browser, live_server({}).base_url, model=MODEL)
    try:
        ui.context.add_init_script(GATED_API_JS % json.dumps({"model": MODEL, "thought": HOSTILE_THOUGHT,
                                                              "answer": "Done."}))
        ui.open()
        page, expect = ui.page, sync_api.expect
        page.select_option("[data-testid=model-select]", MODEL)
        page.fill("[data-testid=composer-input]", "think about it")
        page.click("[data-testid=send]")
        answer = page.locator("[data-testid=message][data-role=assistant]").last
        fold = answer.get_by_test_id("thinking")
        # mid-thought (the answer is held back): the fold says so and holds the thought so far, folded
        expect(fold.get_by_test_id("thinking-summary")).to_have_text("Thinking…")
        expect(fold.get_by_test_id("thinking-text")).to_have_text("".join(HOSTILE_THOUGHT))
        expect(fold.get_by_test_id("thinking-text")).to_be_hidden()
        expect(page.get_by_test_id("stop")).to_be_visible()
        # Opened in the very task that lets the answer go: the fake stream is promise-driven, so the answer ends
        # and the page re-renders before <details>' "toggle" event for the click is dispatched (a task of its
        # own). That is the worst order a real click and the end of a stream can come in, made certain here.
        page.evaluate("""() => {
          document.querySelector("[data-testid=thinking-summary]").click();
          window.__release();
        }""")
        ui.wait_answer()
        expect(fold.get_by_test_id("thinking-summary")).to_have_text("Thinking")
        expect(fold.get_by_test_id("thinking-text")).to_be_visible()  # opened mid-stream, still open
        expect(fold.get_by_test_id("thinking-text")).to_have_text("".join(HOSTILE_THOUGHT))
        expect(answer.get_by_test_id("message-body")).to_have_text("Done.")
        page.reload()  # restored from localStorage: the thought too, folded again
        page.wait_for_selector("body[data-ready=true]")
        restored = page.locator("[data-testid=message][data-role=assistant]").last
        expect(restored.get_by_test_id("thinking-summary")).to_have_text("Thinking")
        expect(restored.get_by_test_id("thinking-text")).to_be_hidden()
        restored.get_by_test_id("thinking-summary").click()
        expect(restored.get_by_test_id("thinking-text")).to_have_text("".join(HOSTILE_THOUGHT))
        assert ui.errors == []
        ui.assert_inert()
    finally:
        ui.close()
