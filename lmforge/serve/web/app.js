// The lmforge chat UI: one ES module, no build step.
//
// It talks to the server only through the public OpenAI-style API (/v1/models, /v1/chat/completions
// with SSE streaming and logprobs) plus /v1/feedback, so anything it does a script can do too.
//
// Security model: model output is untrusted text. It is rendered as markdown by `marked`, then every
// byte of the resulting HTML goes through DOMPurify (with the hooks below) before it touches the DOM.
// Everything else (token views, popovers, titles, errors) is built with textContent, never innerHTML.
// The server's Content-Security-Policy is the second wall: no inline scripts, no remote loads.

import { marked } from "/vendor/marked/lib/marked.esm.js";
import DOMPurify from "/vendor/dompurify/dist/purify.es.mjs";
import hljs from "/vendor/@highlightjs/cdn-assets/es/highlight.min.js";

// ---------------------------------------------------------------------------------------------------
// Constants and small helpers
// ---------------------------------------------------------------------------------------------------

const STORE_KEY = "lmforge.conversations.v1"; // bump the suffix if the stored shape ever changes
const SETTINGS_KEY = "lmforge.settings.v1";
const API_KEY_KEY = "lmforge.apiKey";

// Sampling fields of the settings panel, with how to parse the text of their <input>.
// An empty field is not sent at all, so the server's (per-model) default applies.
const SAMPLING_FIELDS = {
  temperature: parseFloat,
  top_p: parseFloat,
  top_k: (s) => parseInt(s, 10),
  min_p: parseFloat,
  max_tokens: (s) => parseInt(s, 10),
  repetition_penalty: parseFloat,
  presence_penalty: parseFloat,
  frequency_penalty: parseFloat,
  seed: (s) => parseInt(s, 10),
  top_logprobs: (s) => parseInt(s, 10),
};
const DEFAULT_TOP_LOGPROBS = 5; // alternatives shown in the token popover when the field is empty

const $ = (sel, root = document) => root.querySelector(sel);

/** Create an element with attributes and children. Text children become text nodes (never HTML). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** A button with the accessible name and tooltip every action button must have. */
function button(label, { title, testid, cls = "btn small", pressed, onClick, disabled } = {}) {
  const name = title || (typeof label === "string" ? label : "");
  const b = h("button", {
    type: "button", class: cls, title: name, "aria-label": name,
    "data-testid": testid, disabled: !!disabled,
  }, label);
  if (pressed !== undefined) b.setAttribute("aria-pressed", pressed ? "true" : "false");
  if (onClick) b.addEventListener("click", onClick);
  return b;
}

// Thumbs icons drawn as SVG (Feather icons, MIT licence): emoji fonts are missing on many Linux boxes.
const ICONS = {
  up: "M14 9V5a3 3 0 0 0-3-3l-4 9v11h11.28a2 2 0 0 0 2-1.7l1.38-9a2 2 0 0 0-2-2.3zM7 22H4a2 2 0 0 1-2-2v-7a2 2 0 0 1 2-2h3",
  down: "M10 15v4a3 3 0 0 0 3 3l4-9V2H5.72a2 2 0 0 0-2 1.7l-1.38 9a2 2 0 0 0 2 2.3zm7-13h2.67A2.31 2.31 0 0 1 22 4v7a2.31 2.31 0 0 1-2.33 2H17",
};
function icon(name) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("class", "svg-icon");
  svg.setAttribute("aria-hidden", "true");
  const path = document.createElementNS(NS, "path");
  path.setAttribute("d", ICONS[name]);
  svg.append(path);
  return svg;
}

const newId = () =>
  (crypto.randomUUID ? crypto.randomUUID() : `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`);

function formatProb(p) {
  if (p >= 0.995) return `${(p * 100).toFixed(1)}%`;
  if (p >= 0.001) return `${(p * 100).toFixed(p >= 0.1 ? 1 : 2)}%`;
  return p.toExponential(1);
}

// ---------------------------------------------------------------------------------------------------
// Markdown rendering of untrusted model output
// ---------------------------------------------------------------------------------------------------

marked.use({ gfm: true, breaks: false });

// Only HTML elements (no SVG/MathML), and nothing that can submit, embed, frame or load media.
// `style` attributes would be blocked by the CSP anyway; removing them keeps the DOM honest.
const PURIFY_CONFIG = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option", "iframe", "frame",
    "frameset", "object", "embed", "link", "meta", "base", "video", "audio", "source", "track", "picture",
    "template", "dialog"],
  FORBID_ATTR: ["style", "srcset", "action", "formaction", "background", "poster", "ping", "autofocus"],
  ALLOW_DATA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};

// Images: a model must not make the browser fetch anything (tracking pixels, requests to the local
// server's own GET routes). Only inline `data:` raster images keep their src; others lose it and are
// replaced by a visible placeholder after sanitizing. Links open in a new tab without a referrer.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.nodeName === "IMG") {
    const src = node.getAttribute("src") || "";
    if (!/^data:image\/(png|jpe?g|gif|webp);base64,[a-z0-9+/=\s]*$/i.test(src)) node.removeAttribute("src");
  }
  if (node.nodeName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

/** Markdown text -> a sanitized DocumentFragment with highlighted code blocks. */
function renderMarkdown(text) {
  const html = marked.parse(text, { async: false });
  const frag = DOMPurify.sanitize(html, PURIFY_CONFIG);
  for (const img of frag.querySelectorAll("img:not([src])")) {
    const alt = img.getAttribute("alt");
    img.replaceWith(h("span", { class: "blocked-img", title: "Image not loaded: only inline data: images are shown" },
      `[image${alt ? `: ${alt}` : ""}]`));
  }
  for (const code of frag.querySelectorAll("pre > code")) highlightCode(code);
  return frag;
}

function highlightCode(code) {
  // marked writes the fence's info string as class "language-xxx". An unknown language would make
  // highlight.js log an error and skip the block, so fall back to plain text for those.
  const m = /(?:^|\s)language-(\S+)/.exec(code.className);
  if (m && !hljs.getLanguage(m[1])) code.className = "language-plaintext";
  hljs.highlightElement(code); // works on textContent and escapes it: adds only <span class="hljs-...">
}

hljs.configure({ ignoreUnescapedHTML: true });

// ---------------------------------------------------------------------------------------------------
// Persistent state: conversations and settings in localStorage
// ---------------------------------------------------------------------------------------------------

/**
 * A conversation: { id, title, model, system, created, updated, messages: [Message] }
 * A message:      { id, role: "user"|"assistant", content,
 *                   // assistant only:
 *                   model, system, logprobs: [{token, logprob, bytes, top_logprobs}] | null,
 *                   finish: "stop"|"length"|"stopped"|"error"|null, error, usage, elapsed,
 *                   feedback: {rating, better, status} }
 */
const state = {
  conversations: loadJSON(STORE_KEY, []),
  currentId: null,
  settings: loadJSON(SETTINGS_KEY, { model: "", system: "", sampling: {}, probColours: false }),
  models: [],
  // The one generation in flight: {conv, msg, controller}. One at a time keeps the UI honest.
  busy: null,
};

// UI-only state, never persisted.
const tokenViewOpen = new Set(); // ids of assistant messages showing the token view
const editing = new Set(); // ids of user messages being edited
const betterOpen = new Set(); // ids of assistant messages with the "better answer" form open
const messageElements = new Map(); // message id -> its element, for cheap streaming updates
const drafts = new Map(); // "edit:<id>" / "better:<id>" -> text typed so far (re-renders rebuild the DOM)

function loadJSON(key, fallback) {
  try {
    const v = JSON.parse(localStorage.getItem(key));
    return v ?? fallback;
  } catch {
    return fallback;
  }
}

function saveSettings() {
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(state.settings));
}

/**
 * Save every conversation. Token probabilities are the bulk of the data (~300 bytes a token); when the
 * browser's quota (about 5 MB) is hit we drop them from the oldest conversations first rather than lose
 * any text, and say so.
 */
function saveConversations() {
  const trySave = () => {
    try {
      localStorage.setItem(STORE_KEY, JSON.stringify(state.conversations));
      return true;
    } catch {
      return false;
    }
  };
  if (trySave()) return;
  const oldestFirst = [...state.conversations].sort((a, b) => a.updated - b.updated);
  for (const conv of oldestFirst) {
    let changed = false;
    for (const m of conv.messages) if (m.logprobs) { m.logprobs = null; changed = true; }
    if (changed && trySave()) {
      showNotice("Browser storage is full: token probabilities of older chats were dropped.");
      return;
    }
  }
  showNotice("Browser storage is full: this chat could not be saved. Delete some chats.", true);
}

const currentConversation = () => state.conversations.find((c) => c.id === state.currentId) || null;

function newConversation() {
  const conv = { id: newId(), title: "New chat", model: state.settings.model, system: state.settings.system,
    created: Date.now(), updated: Date.now(), messages: [] };
  state.conversations.unshift(conv);
  return conv;
}

// ---------------------------------------------------------------------------------------------------
// Talking to the server
// ---------------------------------------------------------------------------------------------------

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = localStorage.getItem(API_KEY_KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

/** The message of an OpenAI error object, or a readable fallback. */
async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch { /* not JSON */ }
  return `${response.status} ${response.statusText || "error"}`;
}

async function loadModels() {
  const select = $("#model-select");
  let models = [];
  try {
    const r = await fetch("/v1/models", { headers: apiHeaders() });
    if (r.status === 401) {
      showNotice("This server needs an API key: enter it under Settings.", true);
    } else if (!r.ok) {
      showNotice(`Could not list models: ${await errorMessage(r)}`, true);
    } else {
      models = ((await r.json()).data || []).map((m) => m.id);
    }
  } catch (e) {
    showNotice(`Could not reach the server: ${e.message}`, true);
  }
  state.models = models;
  select.replaceChildren(...models.map((id) => h("option", { value: id }, id)));
  if (!models.length) select.append(h("option", { value: "", disabled: true }, "no models"));
  const conv = currentConversation();
  const wanted = (conv && conv.model) || state.settings.model;
  if (models.includes(wanted)) select.value = wanted;
  state.settings.model = select.value;
  saveSettings();
  updateControls();
}

/**
 * Read an SSE stream and yield each event's data string. Events end with a blank line; a `data:` line
 * may be split across network reads, so we buffer until a whole event has arrived.
 */
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let m;
      while ((m = /\r?\n\r?\n/.exec(buffer))) {
        const event = buffer.slice(0, m.index);
        buffer = buffer.slice(m.index + m[0].length);
        const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data) yield data;
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // the caller stopped early ([DONE] or an error): let the body go
  }
}

/**
 * The OpenAI messages of a conversation: the system prompt first, then each turn. Answers that failed
 * before producing any text are left out: they are UI notes, not something the model said.
 */
function apiMessages(system, messages) {
  const out = system ? [{ role: "system", content: system }] : [];
  for (const m of messages) {
    if (m.role === "assistant" && m.finish === "error" && !m.content) continue;
    out.push({ role: m.role, content: m.content });
  }
  return out;
}

/** The request body for the conversation as it stands (its last message is the user's). */
function requestBody(conv) {
  const messages = apiMessages(conv.system, conv.messages);
  const body = {
    model: conv.model, messages, stream: true, stream_options: { include_usage: true },
    logprobs: true, top_logprobs: DEFAULT_TOP_LOGPROBS,
  };
  for (const [name, value] of Object.entries(state.settings.sampling || {})) {
    if (value !== null && value !== undefined && value !== "" && !Number.isNaN(value)) body[name] = value;
  }
  return body;
}

/** Generate the answer to `conv`'s last (user) message, streaming it into a new assistant message. */
async function generate(conv) {
  if (state.busy) return;
  conv.model = state.settings.model || $("#model-select").value;
  conv.system = state.settings.system;
  if (!conv.model) {
    showNotice("No model selected.", true);
    return;
  }
  // The system prompt is kept with each answer: feedback must pair an answer with what it answered.
  const msg = { id: newId(), role: "assistant", content: "", model: conv.model, system: conv.system,
    logprobs: [], finish: null, error: null, usage: null, elapsed: null, feedback: { rating: null, better: null, status: "" } };
  const body = requestBody(conv);
  conv.messages.push(msg);
  conv.updated = Date.now();
  const controller = new AbortController();
  state.busy = { conv, msg, controller };
  saveConversations();
  renderAll();
  const started = performance.now();
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: apiHeaders(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) throw new Error(await errorMessage(r));
    let done = false;
    for await (const data of sseData(r)) {
      if (data === "[DONE]") {
        done = true;
        break;
      }
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch {
        continue; // not ours to interpret; the stream goes on
      }
      if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
      if (chunk.usage) msg.usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && typeof choice.delta.content === "string") msg.content += choice.delta.content;
      const lp = choice.logprobs && choice.logprobs.content;
      if (Array.isArray(lp)) msg.logprobs.push(...lp);
      if (choice.finish_reason) msg.finish = choice.finish_reason;
      scheduleMessageUpdate(msg);
    }
    // A stream that just ends (server restarted, connection lost) must not pass for a whole answer.
    if (!done && !msg.finish) throw new Error("the connection closed before the answer was complete");
    if (!msg.finish) msg.finish = "stop";
  } catch (e) {
    if (e.name === "AbortError") {
      msg.finish = "stopped";
    } else {
      msg.finish = "error";
      msg.error = e.message || String(e);
    }
  } finally {
    msg.elapsed = (performance.now() - started) / 1000;
    if (!msg.logprobs.length) msg.logprobs = null;
    state.busy = null;
    conv.updated = Date.now();
    saveConversations();
    renderAll();
  }
}

function stop() {
  // Aborting the fetch closes the connection; the server notices and cancels the request.
  if (state.busy) state.busy.controller.abort();
}

/** The messages a rated answer was an answer to: system first, then everything before it. */
function promptFor(conv, index) {
  return apiMessages(conv.messages[index].system ?? conv.system, conv.messages.slice(0, index));
}

async function sendFeedback(conv, msg, { rating, better }) {
  const index = conv.messages.indexOf(msg);
  if (index < 0) return;
  const fb = msg.feedback || (msg.feedback = { rating: null, better: null, status: "" });
  if (rating !== undefined) fb.rating = rating;
  if (better !== undefined) fb.better = better;
  fb.status = "Saving…";
  renderAll();
  const body = { model: msg.model || conv.model, messages: promptFor(conv, index), response: msg.content,
    rating: fb.rating ?? null, better: better ?? null };
  try {
    const r = await fetch("/v1/feedback", { method: "POST", headers: apiHeaders(), body: JSON.stringify(body) });
    if (!r.ok) throw new Error(await errorMessage(r));
    fb.status = better ? "Better answer saved — thank you." : "Feedback saved — thank you.";
  } catch (e) {
    fb.status = `Feedback not saved: ${e.message}`;
  }
  saveConversations();
  renderAll();
}

// ---------------------------------------------------------------------------------------------------
// User actions
// ---------------------------------------------------------------------------------------------------

function sendFromComposer() {
  const input = $("#composer-input");
  const text = input.value.trim();
  if (!text || state.busy) return;
  if (!(state.settings.model || $("#model-select").value)) {
    showNotice("No model to answer: the server lists none, or it needs an API key (Settings).", true);
    return;
  }
  let conv = currentConversation();
  if (!conv) {
    conv = newConversation();
    state.currentId = conv.id;
  }
  conv.messages.push({ id: newId(), role: "user", content: text });
  if (conv.messages.length === 1) conv.title = titleOf(text);
  input.value = "";
  generate(conv);
}

const titleOf = (text) => text.replace(/\s+/g, " ").slice(0, 60);

function regenerate(conv, index) {
  if (state.busy) return;
  conv.messages.splice(index); // the answer and anything after it
  generate(conv);
}

function saveEdit(conv, msg, text) {
  if (state.busy || !text.trim()) return;
  const index = conv.messages.indexOf(msg);
  editing.delete(msg.id);
  drafts.delete(`edit:${msg.id}`);
  msg.content = text.trim();
  if (index === 0) conv.title = titleOf(msg.content);
  conv.messages.splice(index + 1); // editing a message rewrites history from there on
  generate(conv);
}

function openConversation(id) {
  state.currentId = id;
  const conv = currentConversation();
  if (conv && state.models.includes(conv.model)) {
    $("#model-select").value = conv.model;
    state.settings.model = conv.model;
  }
  if (conv) {
    state.settings.system = conv.system || "";
    $("#system-prompt").value = state.settings.system;
  }
  saveSettings();
  hidePopover();
  renderAll();
  $("#composer-input").focus();
}

function deleteConversation(id) {
  if (state.busy && state.busy.conv.id === id) stop();
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = null;
  saveConversations();
  renderAll();
}

// ---------------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------------

function renderAll() {
  renderSidebar();
  renderMessages();
  updateControls();
}

function updateControls() {
  const busy = !!state.busy;
  $("#send").hidden = busy;
  $("#stop").hidden = !busy;
  $("#send").disabled = !state.models.length;
  document.body.classList.toggle("prob-colours", !!state.settings.probColours);
}

function renderSidebar() {
  const list = $("#conversation-list");
  const items = [...state.conversations].sort((a, b) => b.updated - a.updated).map((conv) => {
    const open = h("button", {
      type: "button", class: "conv-open", "data-testid": "conversation-item",
      title: `Open “${conv.title}”`, "aria-current": conv.id === state.currentId ? "page" : null,
    }, conv.title);
    open.addEventListener("click", () => openConversation(conv.id));
    const del = button("×", { title: `Delete “${conv.title}”`, testid: "delete-conversation", cls: "btn icon",
      onClick: () => deleteConversation(conv.id) });
    return h("li", { class: conv.id === state.currentId ? "conv active" : "conv" }, open, del);
  });
  list.replaceChildren(...items);
}

function renderMessages() {
  const box = $("#messages");
  const conv = currentConversation();
  messageElements.clear();
  if (!conv || !conv.messages.length) {
    box.replaceChildren(h("div", { class: "empty", "data-testid": "empty" },
      h("h2", {}, "lmforge"), h("p", {}, "Pick a model, then ask something.")));
    return;
  }
  const stick = nearBottom(box);
  const scrollTop = box.scrollTop;
  box.replaceChildren(...conv.messages.map((m, i) => renderMessage(conv, m, i)));
  box.scrollTop = stick ? box.scrollHeight : scrollTop;
}

const nearBottom = (el) => el.scrollHeight - el.scrollTop - el.clientHeight < 80;

function renderMessage(conv, msg, index) {
  const el = h("article", {
    class: `message ${msg.role}`, "data-testid": "message", "data-role": msg.role, "data-id": msg.id,
    "aria-label": msg.role === "user" ? "You" : "Assistant",
  });
  el.append(h("div", { class: "role" }, msg.role === "user" ? "You" : (msg.model || "assistant")));
  const bodyEl = h("div", { class: "body", "data-testid": "message-body" });
  el.append(bodyEl);
  messageElements.set(msg.id, el);
  if (msg.role === "user") renderUserMessage(conv, msg, index, el, bodyEl);
  else renderAssistantMessage(conv, msg, index, el, bodyEl);
  return el;
}

function renderUserMessage(conv, msg, index, el, bodyEl) {
  if (editing.has(msg.id)) {
    const input = h("textarea", { class: "edit-input", "data-testid": "edit-input", rows: 3,
      "aria-label": "Edit message" });
    input.value = drafts.get(`edit:${msg.id}`) ?? msg.content;
    input.addEventListener("input", () => drafts.set(`edit:${msg.id}`, input.value));
    const save = button("Save & send", { title: "Replace this message, drop what follows, and resend",
      testid: "edit-save", cls: "btn small primary", onClick: () => saveEdit(conv, msg, input.value),
      disabled: !!state.busy });
    const cancel = button("Cancel", { title: "Cancel editing", testid: "edit-cancel",
      onClick: () => { editing.delete(msg.id); drafts.delete(`edit:${msg.id}`); renderAll(); } });
    bodyEl.append(input, h("div", { class: "actions" }, save, cancel));
    return;
  }
  // User text is shown as typed (not markdown): what you see is exactly what the model got.
  bodyEl.classList.add("plain");
  bodyEl.textContent = msg.content;
  el.append(h("div", { class: "actions" },
    button("Edit", { title: "Edit this message and resend (drops the messages after it)", testid: "edit",
      disabled: !!state.busy, onClick: () => {
        editing.add(msg.id);
        renderAll();
        const input = $(`[data-id="${msg.id}"] .edit-input`);
        if (input) input.focus();
      } })));
}

function renderAssistantMessage(conv, msg, index, el, bodyEl) {
  const streaming = state.busy && state.busy.msg === msg;
  el.classList.toggle("streaming", !!streaming);
  if (streaming) el.setAttribute("aria-busy", "true"); // assistive tech waits for the whole answer
  renderAssistantBody(msg, bodyEl);

  if (msg.error) el.append(h("div", { class: "error", "data-testid": "message-error", role: "alert" }, msg.error));
  const meta = metaLine(msg);
  if (meta) el.append(h("div", { class: "meta", "data-testid": "message-meta" }, meta));
  if (streaming) return; // actions appear once the answer is complete

  const isLast = index === conv.messages.length - 1;
  const fb = msg.feedback || {};
  const hasTokens = Array.isArray(msg.logprobs) && msg.logprobs.length > 0;
  const actions = h("div", { class: "actions" },
    button(icon("up"), { title: "Good answer", testid: "thumbs-up", pressed: fb.rating === "up",
      onClick: () => sendFeedback(conv, msg, { rating: "up" }) }),
    button(icon("down"), { title: "Bad answer", testid: "thumbs-down", pressed: fb.rating === "down",
      onClick: () => sendFeedback(conv, msg, { rating: "down" }) }),
    button("Better answer…", { title: "Write a better answer (saved as training data)", testid: "better-answer",
      pressed: betterOpen.has(msg.id),
      onClick: () => {
        if (!betterOpen.delete(msg.id)) betterOpen.add(msg.id);
        renderAll();
      } }),
    button("Tokens", {
      title: hasTokens ? "Inspect each token's probability and alternatives" : "No token probabilities for this answer",
      testid: "tokens-button", pressed: tokenViewOpen.has(msg.id), disabled: !hasTokens,
      onClick: () => {
        if (!tokenViewOpen.delete(msg.id)) tokenViewOpen.add(msg.id);
        hidePopover();
        renderAll();
      } }),
    button("Copy", { title: "Copy the answer's markdown", testid: "copy",
      onClick: () => copyText(msg.content) }),
    isLast ? button("Regenerate", { title: "Answer the last message again", testid: "regenerate",
      disabled: !!state.busy, onClick: () => regenerate(conv, index) }) : null,
  );
  el.append(actions);
  if (fb.status) {
    el.append(h("div", { class: "feedback-status", "data-testid": "feedback-status", role: "status" }, fb.status));
  }

  if (betterOpen.has(msg.id)) {
    const input = h("textarea", { class: "better-input", "data-testid": "better-input", rows: 4,
      "aria-label": "A better answer", placeholder: "Write the answer you would have wanted" });
    input.value = drafts.get(`better:${msg.id}`) ?? (fb.better || msg.content);
    input.addEventListener("input", () => drafts.set(`better:${msg.id}`, input.value));
    const submit = button("Save better answer", { title: "Send this answer as feedback", testid: "better-submit",
      cls: "btn small primary", onClick: () => {
        const text = input.value.trim();
        if (!text) return;
        betterOpen.delete(msg.id);
        drafts.delete(`better:${msg.id}`);
        // A written correction is a judgement that the original was not good enough.
        sendFeedback(conv, msg, { rating: fb.rating || "down", better: text });
      } });
    const cancel = button("Cancel", { title: "Close without saving", testid: "better-cancel",
      onClick: () => { betterOpen.delete(msg.id); renderAll(); } });
    el.append(h("div", { class: "better-form" }, input, h("div", { class: "actions" }, submit, cancel)));
  }
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text); // only in a secure context (localhost counts)
    showNotice("Copied.");
  } catch {
    showNotice("Copying needs https or localhost; select the text instead.");
  }
}

function metaLine(msg) {
  const parts = [];
  const n = (msg.usage && msg.usage.completion_tokens) ?? (msg.logprobs ? msg.logprobs.length : null);
  if (n !== null && n !== undefined && msg.finish) parts.push(`${n} tokens`);
  if (n && msg.elapsed) parts.push(`${(n / msg.elapsed).toFixed(1)} tok/s`);
  if (msg.finish === "length") parts.push("stopped at max_tokens");
  else if (msg.finish === "stopped") parts.push("stopped");
  return parts.join(" · ");
}

/** Body of an assistant message: markdown, or the token view when asked for. */
function renderAssistantBody(msg, bodyEl) {
  if (pinned && bodyEl.contains(pinned)) hidePopover(); // its token is about to be replaced
  const showTokens = (tokenViewOpen.has(msg.id) || state.settings.probColours) && msg.logprobs && msg.logprobs.length;
  if (showTokens) {
    bodyEl.className = "body tokens";
    bodyEl.replaceChildren(tokenView(msg));
  } else {
    bodyEl.className = "body markdown";
    bodyEl.replaceChildren(renderMarkdown(msg.content));
  }
  if (state.busy && state.busy.msg === msg) {
    // The cursor goes at the end of the text, inside the last paragraph or token run when there is one.
    const last = bodyEl.lastElementChild;
    const host = last && (last.matches("p, .token-view") ? last : null);
    (host || bodyEl).append(h("span", { class: "cursor", "aria-hidden": "true" }));
  }
}

// Streaming updates re-render only the streaming message, at most once per animation frame: marked is
// fast, but a frame per SSE chunk would still waste work on fast models.
let pendingFrame = 0;
function scheduleMessageUpdate(msg) {
  if (pendingFrame) return;
  pendingFrame = requestAnimationFrame(() => {
    pendingFrame = 0;
    const el = messageElements.get(msg.id);
    if (!el) return; // another conversation is on screen
    const box = $("#messages");
    const stick = nearBottom(box);
    renderAssistantBody(msg, $(".body", el));
    const metaEl = $(".meta", el);
    if (metaEl) metaEl.textContent = metaLine(msg);
    if (stick) box.scrollTop = box.scrollHeight;
  });
}

// ---------------------------------------------------------------------------------------------------
// Token probability view
// ---------------------------------------------------------------------------------------------------

/**
 * Text of each token. A token can be part of a UTF-8 character (byte-level BPE splits emoji), so we
 * decode the tokens' bytes as one stream: a token that only starts a character shows as empty (marked
 * "partial") and the one that completes it shows the whole character.
 */
function tokenTexts(entries) {
  if (!entries.every((e) => Array.isArray(e.bytes))) return entries.map((e) => e.token);
  const decoder = new TextDecoder("utf-8");
  return entries.map((e) => decoder.decode(new Uint8Array(e.bytes), { stream: true }));
}

function tokenView(msg) {
  const view = h("div", { class: "token-view", "data-testid": "token-view", "data-msg": msg.id, tabindex: 0,
    role: "group", "aria-label": "Answer tokens: hover, click or use the arrow keys to see probabilities" });
  const texts = tokenTexts(msg.logprobs);
  // A server may report the end-of-turn token too (its probability says how sure the model was to stop).
  // It is not part of the answer's text, so it is drawn apart.
  const last = texts.length - 1;
  const endToken = msg.finish === "stop" && last >= 0 && texts[last] && !msg.content.endsWith(texts[last]);
  msg.logprobs.forEach((entry, i) => {
    const p = Math.exp(entry.logprob);
    const cls = i === last && endToken ? "tok end" : texts[i] ? "tok" : "tok partial";
    const span = h("span", { class: cls, "data-testid": "token", "data-i": i,
      tabindex: -1, "data-prob": p.toFixed(4), title: cls === "tok end" ? "end of the answer" : null }, texts[i]);
    // Colour (when switched on) goes red -> yellow -> green with the probability; set through the CSSOM
    // because the CSP forbids style attributes.
    // Unlikely tokens are also painted more strongly, so they stand out among the many near-certain ones.
    span.style.setProperty("--tok-hue", String(Math.round(120 * p)));
    span.style.setProperty("--tok-strength", (0.35 + 0.65 * (1 - p)).toFixed(3));
    view.append(span);
  });
  return view;
}

function findEntry(span) {
  const view = span.closest(".token-view");
  const conv = currentConversation();
  const msg = conv && conv.messages.find((m) => m.id === view.dataset.msg);
  return msg && msg.logprobs ? msg.logprobs[Number(span.dataset.i)] : null;
}

let pinned = null; // the token span whose popover stays open after a click

function showPopover(span) {
  const entry = findEntry(span);
  if (!entry) return;
  const pop = $("#token-popover");
  const p = Math.exp(entry.logprob);
  const rows = (entry.top_logprobs || []).map((alt) => {
    const ap = Math.exp(alt.logprob);
    const bar = h("span", { class: "bar" });
    bar.style.width = `${Math.max(1, Math.round(ap * 100))}%`;
    return h("li", { class: alt.token === entry.token ? "alt chosen" : "alt", "data-testid": "popover-alt" },
      h("code", { class: "alt-token" }, JSON.stringify(alt.token)),
      h("span", { class: "bar-track" }, bar),
      h("span", { class: "alt-prob" }, formatProb(ap)));
  });
  pop.replaceChildren(
    h("div", { class: "pop-head" },
      h("code", { class: "pop-token", "data-testid": "popover-token" }, JSON.stringify(entry.token)),
      h("span", { class: "pop-prob", "data-testid": "popover-prob" }, formatProb(p))),
    h("div", { class: "pop-logprob" }, `logprob ${entry.logprob.toFixed(4)}`),
    h("div", { class: "pop-sub" }, rows.length ? "Top alternatives" : "No alternatives requested"),
    rows.length ? h("ol", { class: "alts" }, rows) : null,
  );
  pop.hidden = false;
  // Place it under the token, kept inside the viewport.
  const r = span.getBoundingClientRect();
  const pw = pop.offsetWidth, ph = pop.offsetHeight;
  let left = Math.min(Math.max(8, r.left), window.innerWidth - pw - 8);
  let top = r.bottom + 6;
  if (top + ph > window.innerHeight - 8) top = Math.max(8, r.top - ph - 6);
  pop.style.left = `${left}px`;
  pop.style.top = `${top}px`;
  for (const s of document.querySelectorAll(".tok.current")) s.classList.remove("current");
  span.classList.add("current");
}

function hidePopover() {
  pinned = null;
  const pop = $("#token-popover");
  if (pop) pop.hidden = true;
  for (const s of document.querySelectorAll(".tok.current")) s.classList.remove("current");
}

function wireTokenEvents() {
  const box = $("#messages");
  box.addEventListener("mouseover", (e) => {
    const span = e.target.closest(".tok");
    if (span && !pinned) showPopover(span);
  });
  box.addEventListener("mouseout", (e) => {
    const span = e.target.closest(".tok");
    if (span && !pinned && !span.contains(e.relatedTarget)) hidePopover();
  });
  box.addEventListener("click", (e) => {
    const span = e.target.closest(".tok");
    if (!span) return;
    e.stopPropagation();
    if (pinned === span) { hidePopover(); return; }
    pinned = null;
    showPopover(span);
    pinned = span;
  });
  // Keyboard: focus the token view, then arrows walk the tokens and the popover follows.
  box.addEventListener("keydown", (e) => {
    const view = e.target.closest(".token-view");
    if (!view || !["ArrowRight", "ArrowLeft", "Home", "End"].includes(e.key)) return;
    const toks = [...view.querySelectorAll(".tok")];
    if (!toks.length) return;
    let i = toks.indexOf(e.target.closest(".tok"));
    if (e.key === "ArrowRight") i = Math.min(toks.length - 1, i + 1);
    else if (e.key === "ArrowLeft") i = Math.max(0, i < 0 ? 0 : i - 1);
    else if (e.key === "Home") i = 0;
    else i = toks.length - 1;
    e.preventDefault();
    toks[i].focus();
    pinned = null;
    showPopover(toks[i]);
    pinned = toks[i];
  });
  document.addEventListener("click", (e) => {
    if (pinned && !e.target.closest("#token-popover")) hidePopover();
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") hidePopover(); });
  box.addEventListener("scroll", () => { if (!pinned) hidePopover(); else showPopover(pinned); }, { passive: true });
}

// ---------------------------------------------------------------------------------------------------
// Notices, settings, start-up
// ---------------------------------------------------------------------------------------------------

let noticeTimer = 0;
function showNotice(text, sticky = false) {
  const el = $("#notice");
  el.textContent = text;
  el.hidden = false;
  clearTimeout(noticeTimer);
  if (!sticky) noticeTimer = setTimeout(() => { el.hidden = true; }, 6000);
}

function wireSettings() {
  const panel = $("#settings");
  const toggle = $("#settings-button");
  toggle.addEventListener("click", () => {
    panel.hidden = !panel.hidden;
    toggle.setAttribute("aria-expanded", String(!panel.hidden));
  });

  const system = $("#system-prompt");
  system.value = state.settings.system || "";
  system.addEventListener("input", () => {
    state.settings.system = system.value;
    saveSettings();
  });

  if (!state.settings.sampling) state.settings.sampling = {};
  for (const input of document.querySelectorAll("[data-setting]")) {
    const name = input.dataset.setting;
    const saved = state.settings.sampling[name];
    if (saved !== undefined && saved !== null) input.value = String(saved);
    input.addEventListener("input", () => {
      const sampling = state.settings.sampling;
      const text = input.value.trim();
      const value = text === "" ? null : SAMPLING_FIELDS[name](text);
      if (value === null || Number.isNaN(value)) delete sampling[name];
      else sampling[name] = value;
      input.classList.toggle("invalid", text !== "" && (value === null || Number.isNaN(value)));
      saveSettings();
    });
  }
  $("#settings-reset").addEventListener("click", () => {
    state.settings.sampling = {};
    for (const input of document.querySelectorAll("[data-setting]")) {
      input.value = "";
      input.classList.remove("invalid");
    }
    saveSettings();
  });

  const apiKey = $("#api-key");
  apiKey.value = localStorage.getItem(API_KEY_KEY) || "";
  apiKey.addEventListener("change", () => {
    if (apiKey.value) localStorage.setItem(API_KEY_KEY, apiKey.value);
    else localStorage.removeItem(API_KEY_KEY);
    loadModels();
  });

  const prob = $("#prob-toggle");
  prob.checked = !!state.settings.probColours;
  prob.addEventListener("change", () => {
    state.settings.probColours = prob.checked;
    saveSettings();
    hidePopover();
    renderAll();
  });

  $("#model-select").addEventListener("change", (e) => {
    state.settings.model = e.target.value;
    saveSettings();
  });
}

function wireComposer() {
  const form = $("#composer");
  const input = $("#composer-input");
  form.addEventListener("submit", (e) => {
    e.preventDefault(); // the CSP forbids form submission anyway (form-action 'none')
    sendFromComposer();
  });
  input.addEventListener("keydown", (e) => {
    // Enter sends, Shift+Enter is a newline; never send in the middle of an IME composition.
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendFromComposer();
    }
  });
  $("#stop").addEventListener("click", stop);
  $("#new-chat").addEventListener("click", () => {
    state.currentId = null;
    hidePopover();
    renderAll();
    input.focus();
  });
}

function start() {
  // Open the most recent conversation, if any.
  const recent = [...state.conversations].sort((a, b) => b.updated - a.updated)[0];
  state.currentId = recent ? recent.id : null;
  wireSettings();
  wireComposer();
  wireTokenEvents();
  renderAll();
  loadModels();
  document.body.dataset.ready = "true"; // tests wait for this before interacting
}

start();
