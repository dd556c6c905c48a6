"""The web chat UI in a real browser: Debian's Chromium driven by Playwright, against the real server.

The model's answers must come through the server's real streaming path, so the tests need a model whose
greedy output is known: `parrot_model` overfits a `tiny` lmforge model (with a tokenizer trained on the
replies themselves, so they are a few dozen tokens) on two fixed conversations in a couple of seconds:

    "Show me markdown" -> MARKDOWN_REPLY   (bold text and a python code fence)
    "Show me html"     -> HOSTILE_REPLY    (a <script>, an <img onerror>, a remote image, a style="")

Skipped, with the reason, when /usr/bin/chromium or lmforge/serve/web/node_modules is missing (`make test`
sets both up when it can). We never run `playwright install`: the browser is the distribution's.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
WEB = Path(__file__).resolve().parents[2] / "lmforge" / "serve" / "web"

if not CHROMIUM.exists():
    pytest.skip("browser tests need Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
                allow_module_level=True)
if not (WEB / "node_modules").is_dir():
    pytest.skip(f"browser tests need the web UI's libraries: npm ci --prefix {WEB}", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need the playwright package")

MODEL = "parrot"
MARKDOWN_PROMPT = "Show me markdown"
MARKDOWN_REPLY = "Here is **bold** and code:\n\n```python\nprint(42)\n```"
HOSTILE_PROMPT = "Show me html"
HOSTILE_REPLY = ('Hi <script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
                 '<img src="http://example.invalid/p.png"><span style="color: red">red</span> done')
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ANSWER_TIMEOUT_MS = 20_000  # the whole answer of a tiny model takes well under a second; this is slack


# ---------------------------------------------------------------------------------------------------
# A model with a known greedy answer
# ---------------------------------------------------------------------------------------------------
def train_parrot(directory: Path, pairs: list[tuple[str, str]], *, steps: int = 150) -> Path:
    """Overfit a `tiny` model so that, greedily, each user message in `pairs` gets its reply then <|im_end|>.

    The prompt is rendered by the tokenizer's own chat template exactly as the server renders it (no system
    message: the UI sends one only when the user wrote a system prompt). Loss covers the reply tokens only.
    """
    import torch

    from lmforge.train.checkpointer import Checkpointer
    from lmforge.model.gpt import GPT
    from lmforge.presets import get_preset
    from lmforge.tokenizer import train_tokenizer

    # A tokenizer trained on the conversations themselves: replies become short runs of word tokens.
    template = train_tokenizer(["x"], 300, show_progress=False)
    texts = [template.apply_chat_template([{"role": "user", "content": u}, {"role": "assistant", "content": r}])
             for u, r in pairs]
    tok = train_tokenizer(texts * 20, 400, show_progress=False)

    rows = []
    for user, reply in pairs:
        prompt = tok.encode_chat([{"role": "user", "content": user}], add_generation_prompt=True)
        rows.append((prompt, tok.encode(reply, add_bos=False) + [tok.eot_id]))
    width = max(len(p) + len(a) for p, a in rows)
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), -100, dtype=torch.long)  # -100: not a target
    for i, (prompt, answer) in enumerate(rows):
        ids = prompt + answer
        x[i, :len(ids)] = torch.tensor(ids)
        y[i, len(prompt) - 1:len(ids) - 1] = torch.tensor(answer)  # position t predicts token t + 1

    torch.manual_seed(0)
    model = GPT(get_preset("tiny", vocab_size=tok.vocab_size, context_length=128))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(x)  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()

    # Prove the premise here, so a failure below is the UI's or the server's and not the model's.
    model.eval()
    with torch.no_grad():
        for prompt, answer in rows:
            logits = model(torch.tensor([prompt + answer]))[0, len(prompt) - 1:-1]
            assert logits.argmax(-1).tolist() == answer, "the parrot model did not learn its replies"
            assert logits.softmax(-1).max(-1).values.min() > 0.9  # a wide margin: greedy is unambiguous
    Checkpointer(directory, tokenizer=tok).save(model, None, [], {"step": 0})
    return directory


@pytest.fixture(scope="module")
def _one_thread():
    """A 0.1M-parameter model is fastest on one thread, and several OpenMP threads spinning on a busy
    2-core machine can make every step a thousand times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def parrot_model(tmp_path_factory, _one_thread) -> Path:
    return train_parrot(tmp_path_factory.mktemp("parrot"),
                        [(MARKDOWN_PROMPT, MARKDOWN_REPLY), (HOSTILE_PROMPT, HOSTILE_REPLY)])


# ---------------------------------------------------------------------------------------------------
# The browser
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


# Installed in every page before the page's own scripts (add_init_script), this watches the live document
# for the moment hostile markup would become live, however briefly and however fast the machine: a
# MutationObserver sees every element inserted (by the parser or by script) and every attribute change, so an
# element that arrives with an on* attribute or a javascript: URL is reported even when it is cleaned or
# removed again in the same task; the HTML-parsing setters and methods report any HTML string parsed into
# a node of this document (attached or not: a detached <img> of the page's document still loads, and its
# onerror runs); and every CSP violation is reported. Reports are console errors starting with WATCH_PREFIX,
# which Page collects in `findings`. Only Playwright calls this code; the UI never sees it.
WATCH_PREFIX = "lmforge-watch:"
WATCH_JS = r"""
(() => {
  const report = (what) => console.error("%s " + what);
  const clip = (s) => String(s).slice(0, 160);
  const URL_ATTRS = new Set(["href", "src", "action", "formaction", "xlink:href", "data", "poster", "background"]);
  const badAttr = (name, value) => {
    name = name.toLowerCase();
    if (name.startsWith("on") || name === "srcdoc") return true;
    // Browsers drop ASCII whitespace and control characters inside a URL's scheme ("java\tscript:").
    return URL_ATTRS.has(name) && value !== null &&
      /^(javascript|vbscript|data:text\/html)/i.test(String(value).replace(/[\u0000-\u0020]/g, ""));
  };
  const check = (el, how) => {
    const tag = el.localName;
    if ((tag === "script" && !el.hasAttribute("src")) || ["iframe", "frame", "object", "embed", "base"].includes(tag)) {
      report(`${how} <${tag}>: ${clip(el.outerHTML)}`);
    }
    for (const a of el.attributes) if (badAttr(a.name, a.value)) report(`${how} <${tag} ${a.name}="${clip(a.value)}">`);
  };
  const checkTree = (node, how) => {
    if (node.nodeType === Node.ELEMENT_NODE) check(node, how);
    if (node.querySelectorAll) for (const el of node.querySelectorAll("*")) check(el, how);
  };
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.type === "childList") for (const n of r.addedNodes) checkTree(n, "inserted");
      else if (badAttr(r.attributeName, r.oldValue) || badAttr(r.attributeName, r.target.getAttribute(r.attributeName))) {
        report(`attribute ${r.attributeName} changed on a live <${r.target.localName}>`);
      }
    }
  }).observe(document, { childList: true, subtree: true, attributes: true, attributeOldValue: true });

  const inPage = (node) => node && (node.ownerDocument || node) === document;
  const parses = (html) => /</.test(String(html));
  const wrapSetter = (proto, name) => {
    const d = Object.getOwnPropertyDescriptor(proto, name);
    if (!d || !d.set) return;
    Object.defineProperty(proto, name, { ...d, set(v) {
      if (inPage(this) && parses(v)) report(`${name} parsed HTML into the page: ${clip(v)}`);
      return d.set.call(this, v);
    } });
  };
  const wrapMethod = (proto, name, htmlArg, nodeOf = (self) => self) => {
    const f = proto && proto[name];
    if (typeof f !== "function") return;
    proto[name] = function (...args) {
      if (inPage(nodeOf(this)) && parses(args[htmlArg])) report(`${name} parsed HTML into the page: ${clip(args[htmlArg])}`);
      return f.apply(this, args);
    };
  };
  for (const proto of [Element.prototype, ShadowRoot.prototype]) wrapSetter(proto, "innerHTML");
  wrapSetter(Element.prototype, "outerHTML");
  wrapMethod(Element.prototype, "insertAdjacentHTML", 1);
  wrapMethod(Element.prototype, "setHTMLUnsafe", 0);
  wrapMethod(ShadowRoot.prototype, "setHTMLUnsafe", 0);
  wrapMethod(Range.prototype, "createContextualFragment", 0, (range) => range.startContainer);
  wrapMethod(Document.prototype, "write", 0);
  wrapMethod(Document.prototype, "writeln", 0);

  document.addEventListener("securitypolicyviolation",
    (e) => report(`CSP violation: ${e.effectiveDirective} blocked ${clip(e.blockedURI)} ${clip(e.sample)}`));
})();
""" % WATCH_PREFIX


class Page:
    """A fresh browser context (empty localStorage) on the server, recording what the page does."""

    def __init__(self, browser, base_url: str, model: str = MODEL) -> None:
        self.base_url, self.model = base_url, model
        self.context = browser.new_context(viewport={"width": 1200, "height": 900})
        self.context.add_init_script(WATCH_JS)
        self.page = self.context.new_page()
        self.page.set_default_timeout(ANSWER_TIMEOUT_MS)
        self.errors: list[str] = []  # console errors and uncaught exceptions
        self.findings: list[str] = []  # what WATCH_JS saw (it outlives reloads: the list is ours)
        self.requests: list[str] = []  # every URL the page asked for
        self.chat_bodies: list[dict] = []  # the JSON bodies sent to /v1/chat/completions
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("request", self._on_request)

    def _on_console(self, message) -> None:
        if message.text.startswith(WATCH_PREFIX):
            self.findings.append(message.text[len(WATCH_PREFIX):].strip())
        elif message.type == "error":
            self.errors.append(f"console: {message.text}")

    def settle(self) -> None:
        """Let pending observer callbacks, frames and console messages through before reading findings."""
        self.page.evaluate("() => new Promise((r) => requestAnimationFrame(() => setTimeout(r, 50)))")

    def assert_inert(self) -> None:
        """Nothing hostile was ever live in the page: no finding, no script of the model's ran."""
        self.settle()
        assert self.findings == [], f"hostile markup reached the page {len(self.findings)} times: {self.findings[:8]}"
        assert self.page.evaluate("window.__pwned") is None

    def _on_request(self, request) -> None:
        self.requests.append(request.url)
        if request.url.endswith("/v1/chat/completions"):
            self.chat_bodies.append(json.loads(request.post_data))

    def open(self):
        response = self.page.goto(self.base_url + "/")
        self.page.wait_for_selector("body[data-ready=true]")
        self.page.wait_for_selector(f"[data-testid=model-select] option[value='{self.model}']", state="attached")
        return response

    def greedy(self) -> None:
        """Temperature 0 through the settings panel: the answers are then exactly the parrot's replies."""
        self.page.click("[data-testid=settings-button]")
        self.page.fill("[data-testid=setting-temperature]", "0")
        self.page.fill("[data-testid=setting-max_tokens]", "80")
        self.page.click("[data-testid=settings-button]")

    def ask(self, text: str, timeout_ms: int = ANSWER_TIMEOUT_MS):
        """Send `text` and wait until its answer has finished streaming; the answer's locator."""
        page = self.page
        page.select_option("[data-testid=model-select]", self.model)
        page.fill("[data-testid=composer-input]", text)
        page.click("[data-testid=send]")
        return self.wait_answer(timeout_ms)

    def wait_answer(self, timeout_ms: int = ANSWER_TIMEOUT_MS):
        answer = self.page.locator("[data-testid=message][data-role=assistant]").last
        # Actions (thumbs, regenerate...) are drawn once the stream has ended.
        sync_api.expect(answer.get_by_test_id("thumbs-down")).to_be_visible(timeout=timeout_ms)
        sync_api.expect(self.page.get_by_test_id("stop")).to_be_hidden()
        return answer

    def remote_requests(self) -> list[str]:
        return [u for u in self.requests if not (u.startswith(self.base_url + "/") or u.startswith("data:"))]

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def ui(browser, live_server, parrot_model):
    page = Page(browser, live_server({MODEL: parrot_model}).base_url)
    yield page
    page.close()


def feedback_dir() -> Path:
    return Path(os.environ["LMFORGE_HOME"]) / "feedback"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------
def test_chat_markdown_token_probabilities_and_feedback(ui):
    expect = sync_api.expect
    response = ui.open()
    assert "script-src 'self'" in response.headers.get("content-security-policy", "")
    ui.greedy()
    answer = ui.ask(MARKDOWN_PROMPT)

    # The request is the OpenAI streaming request the UI promises.
    sent = ui.chat_bodies[-1]
    assert sent["model"] == MODEL and sent["stream"] is True and sent["logprobs"] is True
    assert sent["messages"] == [{"role": "user", "content": MARKDOWN_PROMPT}]
    assert sent["temperature"] == 0 and sent["max_tokens"] == 80

    # Rendered as markdown, with the code block highlighted.
    body = answer.get_by_test_id("message-body")
    expect(body.locator("strong")).to_have_text("bold")
    code = body.locator("pre > code")
    expect(code).to_have_class(re.compile(r"\bhljs\b"))
    expect(code).to_have_class(re.compile(r"\blanguage-python\b"))
    expect(code).to_have_text("print(42)\n")
    expect(code.locator("span.hljs-number")).to_have_text("42")

    # The token view: every token of the answer, each with its probability and alternatives.
    answer.get_by_test_id("tokens-button").click()
    tokens = body.get_by_test_id("token")
    expect(tokens.first).to_be_visible()
    assert "".join(tokens.all_text_contents()).startswith(MARKDOWN_REPLY)
    tokens.filter(has_text=re.compile(r"^bold$")).click()
    popover = ui.page.get_by_test_id("token-popover")
    expect(popover).to_be_visible()
    expect(popover.get_by_test_id("popover-token")).to_have_text('"bold"')
    prob = popover.get_by_test_id("popover-prob").text_content()
    assert re.fullmatch(r"\d+(\.\d+)?%", prob) and float(prob[:-1]) > 90, prob
    alts = popover.get_by_test_id("popover-alt")
    expect(alts).to_have_count(5)  # the UI asks for top_logprobs=5 by default
    expect(alts.first).to_have_class(re.compile(r"\bchosen\b"))
    expect(alts.first).to_contain_text('"bold"')
    ui.page.keyboard.press("Escape")
    expect(popover).to_be_hidden()

    # The colour toggle paints tokens by probability.
    ui.page.get_by_test_id("prob-toggle").check()
    colour = tokens.first.evaluate("el => getComputedStyle(el).backgroundColor")
    assert colour not in ("rgba(0, 0, 0, 0)", "transparent"), colour
    ui.page.get_by_test_id("prob-toggle").uncheck()
    answer.get_by_test_id("tokens-button").click()
    expect(body.locator("strong")).to_have_text("bold")

    # Thumbs down, then a better answer: both reach the server and land on disk.
    answer.get_by_test_id("thumbs-down").click()
    expect(answer.get_by_test_id("feedback-status")).to_have_text(re.compile("saved", re.I))
    expect(answer.get_by_test_id("thumbs-down")).to_have_attribute("aria-pressed", "true")
    answer.get_by_test_id("better-answer").click()
    better = "Here is **bold** text and a code block:\n\n```python\nprint(42)\n```"
    answer.get_by_test_id("better-input").fill(better)
    answer.get_by_test_id("better-submit").click()
    expect(answer.get_by_test_id("feedback-status")).to_have_text(re.compile("better answer saved", re.I))

    ratings = read_jsonl(feedback_dir() / "feedback.jsonl")
    assert len(ratings) == 2
    for r in ratings:
        assert r["model"] == MODEL and r["response"] == MARKDOWN_REPLY and r["rating"] == "down"
        assert r["messages"] == [{"role": "user", "content": MARKDOWN_PROMPT}]
    assert ratings[0]["better"] is None and ratings[1]["better"] == better
    from lmforge.data.records import read_preferences

    prefs = read_preferences(str(feedback_dir() / "feedback.jsonl")).pairs
    assert prefs[-1].chosen == better and prefs[-1].rejected == MARKDOWN_REPLY
    assert prefs[-1].prompt == [{"role": "user", "content": MARKDOWN_PROMPT}]

    assert ui.remote_requests() == []
    assert ui.errors == []
    ui.assert_inert()


def test_hostile_model_output_renders_inert(ui):
    expect = sync_api.expect
    ui.open()
    ui.greedy()
    answer = ui.ask(HOSTILE_PROMPT)
    ui.assert_inert()  # nothing of it was ever live, and the CSP never had anything to block
    body = answer.get_by_test_id("message-body")
    # The HTML the model wrote is shown as the text it is, never parsed (test_browser_hostile.py has more).
    expect(body).to_have_text(HOSTILE_REPLY)

    # Nothing ran, nothing executable is in the DOM, nothing was ever live (ui.assert_inert below).
    assert ui.page.evaluate("window.__pwned") is None
    assert ui.page.locator("script:not([src])").count() == 0
    assert ui.page.locator("[onerror]").count() == 0
    assert body.locator("script, img").count() == 0

    # The token view shows the raw markup as text, still inert.
    answer.get_by_test_id("tokens-button").click()
    tokens = body.get_by_test_id("token")
    expect(tokens.first).to_be_visible()
    assert "".join(tokens.all_text_contents()).startswith(HOSTILE_REPLY)
    tokens.filter(has_text=re.compile(r"^\s*onerror$")).hover()
    expect(ui.page.get_by_test_id("popover-token")).to_have_text('" onerror"')
    assert body.locator("script, img").count() == 0

    # Reloading re-renders the stored conversation from localStorage: still inert.
    ui.page.reload()
    ui.page.wait_for_selector("body[data-ready=true]")
    expect(ui.page.locator("[data-testid=message][data-role=assistant]")).to_have_count(1)
    ui.page.wait_for_timeout(200)  # give a would-be onerror handler time to fire
    assert ui.page.evaluate("window.__pwned") is None
    assert ui.page.locator("[onerror]").count() == 0

    assert ui.remote_requests() == [], "the page tried to reach another host"
    assert ui.errors == []
    ui.assert_inert()


def test_edit_regenerate_and_conversations(ui):
    expect = sync_api.expect
    page = ui.page
    ui.open()
    ui.greedy()
    ui.ask(HOSTILE_PROMPT)
    messages = page.get_by_test_id("message")

    # Edit the question: what followed is dropped and the new question is answered.
    user = page.locator("[data-testid=message][data-role=user]").first
    user.get_by_test_id("edit").click()
    user.get_by_test_id("edit-input").fill(MARKDOWN_PROMPT)
    user.get_by_test_id("edit-save").click()
    answer = ui.wait_answer()
    expect(messages).to_have_count(2)
    expect(answer.locator("strong")).to_have_text("bold")
    assert ui.chat_bodies[-1]["messages"] == [{"role": "user", "content": MARKDOWN_PROMPT}]

    # Regenerate replaces the last answer (greedy: with the same text).
    answer.get_by_test_id("regenerate").click()
    answer = ui.wait_answer()
    expect(messages).to_have_count(2)
    expect(answer.locator("strong")).to_have_text("bold")
    assert len(ui.chat_bodies) == 3

    # A follow-up sends the whole conversation (the parrot knows single questions only: its answer to a
    # second one is not checked).
    ui.ask(HOSTILE_PROMPT)
    expect(messages).to_have_count(4)
    assert [m["content"] for m in ui.chat_bodies[-1]["messages"]] == [MARKDOWN_PROMPT, MARKDOWN_REPLY, HOSTILE_PROMPT]

    # A second conversation; both are listed (titled by their first message), kept across a reload, and
    # can be reopened and deleted.
    page.get_by_test_id("new-chat").click()
    expect(messages).to_have_count(0)
    ui.ask(HOSTILE_PROMPT)
    items = page.get_by_test_id("conversation-item")
    expect(items).to_have_text([HOSTILE_PROMPT, MARKDOWN_PROMPT])  # most recent first
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    expect(items).to_have_text([HOSTILE_PROMPT, MARKDOWN_PROMPT])
    expect(messages).to_have_count(2)  # the most recent conversation is reopened
    items.filter(has_text=MARKDOWN_PROMPT).click()
    expect(messages).to_have_count(4)
    page.get_by_role("button", name=f"Delete “{HOSTILE_PROMPT}”").click()
    expect(items).to_have_text([MARKDOWN_PROMPT])
    expect(messages).to_have_count(4)

    # A request the server refuses: its error is shown on the answer, and Regenerate retries it.
    page.get_by_test_id("new-chat").click()
    page.get_by_test_id("settings-button").click()
    page.get_by_test_id("setting-temperature").fill("-1")
    answer = ui.ask(HOSTILE_PROMPT)
    expect(answer.get_by_test_id("message-error")).to_contain_text("temperature")
    page.get_by_test_id("setting-temperature").fill("0")
    answer.get_by_test_id("regenerate").click()
    answer = ui.wait_answer()
    expect(answer.get_by_test_id("message-error")).to_have_count(0)
    expect(answer.get_by_test_id("message-body")).to_contain_text("done")

    assert ui.remote_requests() == []
    # The refused request is the one error the browser may log (as a failed resource load).
    assert [e for e in ui.errors if "status of 4" not in e] == []
    ui.assert_inert()
