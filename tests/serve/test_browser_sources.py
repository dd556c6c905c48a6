"""Grounded answers in the web UI, in a real browser (the way of test_browser.py: Debian's Chromium through
Playwright, the real server, WATCH_JS reporting anything hostile that goes live).

The collection picker lists the server's indexes with `serve --docs`'s as the default; a grounded answer
gets a sources panel with the passages the server returned; passages are untrusted text (a README with a
<script> in it) and must show as text and run nothing, streamed or restored from localStorage; [n] in an
answer opens source n.

The model is a tiny random one with a 512-token context (room for the passages): what it says does not
matter here, only what the page sends and draws around it.
"""

from __future__ import annotations

import json

import pytest

from tests.serve.test_browser import Page, browser, sync_api  # noqa: F401  (browser: the fixture)

MODEL = "docs-tiny"
QUESTION = "how do I rotate the logs"
DOCS = {
    "notes/logs.md": "# Logs\n\n## Rotation\n\nRotate the logs daily with logrotate and keep a week.\n",
    "notes/cache.md": "# Cache\n\nThe cache keeps each answer for a day, then the logs say so.\n",
}
HOSTILE_TEXT = ('Rotate <script>window.__pwned = 1</script> the logs <img src=x onerror="window.__pwned = 2"> '
                '<a href="javascript:window.__pwned = 3">now</a>')
HOSTILE = {"evil/<img src=x onerror=window.__pwned=4>.md": "# Logs <b onmouseover=window.__pwned=5>bold</b>\n\n"
           + HOSTILE_TEXT + "\n"}


def make_index(name: str, docs: dict[str, str]) -> None:
    from lmforge.retrieval.index import Index, index_path

    with Index(index_path(name)) as index:
        index.update(list(docs.items()))


@pytest.fixture(scope="module")
def docs_model(tmp_path_factory, tiny_tokenizer):
    from conftest import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("browser-docs") / MODEL, tiny_tokenizer, context_length=512)


@pytest.fixture
def ui(browser, live_server, docs_model):
    make_index("mydocs", DOCS)
    make_index("hostile", HOSTILE)
    page = Page(browser, live_server({MODEL: docs_model}, docs="mydocs").base_url, model=MODEL)
    yield page
    page.close()


def open_ui(ui) -> None:
    ui.open()
    ui.page.wait_for_selector("[data-testid=docs-select] option[value=mydocs]", state="attached")
    ui.page.click("[data-testid=settings-button]")
    ui.page.fill("[data-testid=setting-temperature]", "0")
    ui.page.fill("[data-testid=setting-max_tokens]", "6")
    ui.page.click("[data-testid=settings-button]")


def reference(name: str, question: str, k: int = 4) -> list[dict]:
    from lmforge.retrieval.index import open_index

    with open_index(name) as index:
        return [{"index": h.rank, "path": h.path, "heading": h.heading, "start_line": h.start_line,
                 "end_line": h.end_line, "text": h.text} for h in index.search(question, k)]


def test_pick_a_collection_and_see_the_sources(ui):
    expect = sync_api.expect
    page = ui.page
    open_ui(ui)
    picker = page.get_by_test_id("docs-select")
    expect(picker).to_have_value("mydocs")  # the server's --docs
    assert picker.locator("option").all_text_contents() == ["none", "hostile", "mydocs"]

    answer = ui.ask(QUESTION)
    assert ui.chat_bodies[-1]["documents"] == "mydocs"
    assert ui.chat_bodies[-1]["messages"] == [{"role": "user", "content": QUESTION}]  # plain: the server grounds
    panel = answer.get_by_test_id("sources")
    expect(panel.locator("summary")).to_have_text("Sources (2) from mydocs")
    panel.locator("summary").click()
    items = panel.get_by_test_id("source")
    want = reference("mydocs", QUESTION)
    expect(items).to_have_count(len(want))
    for item, s in zip(items.all(), want):
        lines = f"{s['start_line']}" if s["start_line"] == s["end_line"] else f"{s['start_line']}-{s['end_line']}"
        expect(item.get_by_test_id("source-n")).to_have_text(f"[{s['index']}]")
        expect(item.get_by_test_id("source-place")).to_have_text(f"{s['path']}:{lines}")
        expect(item.get_by_test_id("source-heading")).to_have_text(s["heading"])
        expect(item.get_by_test_id("source-text")).to_have_text(s["text"])
        expect(item.get_by_test_id("source-text")).to_be_visible()

    # A question no passage matches: the answer says so instead of showing an empty panel.
    answer = ui.ask("zebra quantum")
    expect(answer.get_by_test_id("sources-none")).to_have_text("No passage from mydocs matched this question.")
    expect(answer.get_by_test_id("sources")).to_have_count(0)

    # "none": the next request is not grounded and its answer has no panel; the choice outlives a reload.
    picker.select_option("")
    answer = ui.ask(QUESTION)
    assert "documents" not in ui.chat_bodies[-1]
    expect(answer.get_by_test_id("sources")).to_have_count(0)
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_selector("[data-testid=docs-select] option[value=mydocs]", state="attached")
    expect(picker).to_have_value("")
    expect(page.get_by_test_id("sources")).to_have_count(1)  # the first answer's panel, restored

    assert ui.remote_requests() == []
    assert ui.errors == []
    ui.assert_inert()


def test_hostile_passages_render_as_text(ui):
    expect = sync_api.expect
    page = ui.page
    open_ui(ui)
    page.get_by_test_id("docs-select").select_option("hostile")
    answer = ui.ask(QUESTION)
    assert ui.chat_bodies[-1]["documents"] == "hostile"
    panel = answer.get_by_test_id("sources")
    panel.locator("summary").click()
    item = panel.get_by_test_id("source")
    expect(item).to_have_count(1)
    expect(item.get_by_test_id("source-text")).to_have_text(HOSTILE_TEXT)  # every character, as text
    expect(item.get_by_test_id("source-text")).to_be_visible()
    expect(item.get_by_test_id("source-place")).to_have_text("evil/<img src=x onerror=window.__pwned=4>.md:3")
    expect(item.get_by_test_id("source-heading")).to_have_text("Logs <b onmouseover=window.__pwned=5>bold</b>")
    item.get_by_test_id("source-heading").hover()
    page.wait_for_timeout(200)  # give a would-be handler time to fire
    assert panel.locator("script, img, a, b, [onerror], [onmouseover]").count() == 0
    assert page.evaluate("window.__pwned") is None
    ui.assert_inert()

    # Restored from localStorage: still text.
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    panel = page.get_by_test_id("sources")
    panel.locator("summary").click()
    expect(panel.get_by_test_id("source-text")).to_have_text(HOSTILE_TEXT)
    page.wait_for_timeout(200)
    assert page.locator("[onerror], [onmouseover], script:not([src])").count() == 0
    assert ui.remote_requests() == []
    assert ui.errors == []
    ui.assert_inert()


STORED_SOURCES = [
    {"index": 1, "path": "notes/logs.md", "heading": "Logs > Rotation", "start_line": 5, "end_line": 7,
     "score": 1.5, "text": "Rotate the logs daily.", "truncated": False},
    {"index": 2, "path": "<img src=x onerror=window.__pwned=6>", "heading": "<script>window.__pwned=7</script>",
     "start_line": 1, "end_line": 1, "score": 1.0, "text": "<img src=x onerror=window.__pwned=8>", "truncated": True},
    {"index": "<img src=x onerror=window.__pwned=9>", "path": "bad", "text": "not a source"},  # dropped: no number
]


def test_citations_open_their_source_on_a_restored_conversation(ui):
    expect = sync_api.expect
    page = ui.page
    open_ui(ui)
    conv = {"id": "c1", "title": "stored", "model": MODEL, "system": "", "created": 1, "updated": 2, "messages": [
        {"id": "u1", "role": "user", "content": QUESTION},
        {"id": "a1", "role": "assistant", "content": "Rotate them daily [1], as [2] and [7] say; `[1]` is code.",
         "model": MODEL, "logprobs": None, "finish": "stop", "documents": "mydocs", "sources": STORED_SOURCES,
         "grounding": {"index": "mydocs", "notice": "(dropped the 1 lowest-ranked passage to fit the context)"},
         "feedback": {"rating": None, "better": None, "status": ""}}]}
    page.evaluate("(c) => localStorage.setItem('lmforge.conversations.v1', JSON.stringify([c]))", conv)
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    answer = page.locator("[data-testid=message][data-role=assistant]")
    cites = answer.get_by_test_id("cite")
    expect(cites).to_have_text(["[1]", "[2]"])  # [7] names no source; the one in code is code
    expect(answer.locator("code")).to_have_text("[1]")
    panel = answer.get_by_test_id("sources")
    expect(panel.locator("summary")).to_have_text("Sources (2) from mydocs")
    expect(panel).not_to_have_attribute("open", "")
    cites.nth(1).click()
    expect(panel).to_have_attribute("open", "")
    expect(panel.locator("[data-source='2']")).to_have_class("source current")
    expect(panel.get_by_test_id("sources-notice")).to_have_text(
        "(dropped the 1 lowest-ranked passage to fit the context)")
    second = panel.get_by_test_id("source").nth(1)
    expect(second.get_by_test_id("source-place")).to_have_text("<img src=x onerror=window.__pwned=6>:1")
    expect(second.get_by_test_id("source-text")).to_have_text("<img src=x onerror=window.__pwned=8>")
    expect(second).to_contain_text("(cut to fit)")
    cites.nth(0).click()
    expect(panel.locator("[data-source='1']")).to_have_class("source current")
    page.wait_for_timeout(200)
    assert page.evaluate("window.__pwned") is None
    assert page.locator("[onerror], script:not([src])").count() == 0
    assert ui.errors == []
    ui.assert_inert()
    # The stored conversation is still what it was (rendering changed nothing).
    stored = json.loads(page.evaluate("() => localStorage.getItem('lmforge.conversations.v1')"))
    assert stored[0]["messages"][1]["sources"] == STORED_SOURCES
