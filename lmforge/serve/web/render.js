// Drawing the page from `state`: the conversation list, the messages (user text as typed, answers as
// sanitised markdown or as the token view, with their actions), the send/stop controls, and the cheap
// per-frame update of the answer being streamed.
//
// A module of its own because it is the one place that turns state into DOM: actions (chat.js,
// feedback.js) change state and call renderAll; render.js calls them from the buttons it draws (an
// import cycle that is safe: neither side runs the other's code while the modules load).

import { copyText, deleteConversation, openConversation, regenerate, saveEdit } from "./chat.js";
import { $, button, h } from "./dom.js";
import { feedbackButtons, feedbackFooter } from "./feedback.js";
import { renderMarkdown } from "./markdown.js";
import { linkCitations, sourcesPanel } from "./sources.js";
import { currentConversation, drafts, editing, state, thinkingOpen, tokenViewOpen } from "./store.js";
import { hidePopover, hidePopoverWithin, tokenView } from "./tokens.js";

const messageElements = new Map(); // message id -> its element, for cheap streaming updates

export function renderAll() {
  renderSidebar();
  renderMessages();
  updateControls();
}

export function updateControls() {
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
  rememberFolds();
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

/**
 * Note which "Thinking" folds the user has open, from the folds themselves, just before a full re-render
 * throws them away. Not from <details>' "toggle" event: that is dispatched in a task of its own after the
 * click, and a re-render in between (the stream ending in the same task, say) would redraw a fold the user
 * had just opened as closed. An element's `open` is right the moment the click is handled.
 */
function rememberFolds() {
  for (const [id, el] of messageElements) {
    const fold = $(".thinking", el);
    if (!fold) continue;
    if (fold.open) thinkingOpen.add(id);
    else thinkingOpen.delete(id);
  }
}

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
        const input = $(`[data-id="${CSS.escape(msg.id)}"] .edit-input`); // ids come from localStorage too
        if (input) input.focus();
      } })));
}

function renderAssistantMessage(conv, msg, index, el, bodyEl) {
  const streaming = state.busy && state.busy.msg === msg;
  el.classList.toggle("streaming", !!streaming);
  if (streaming) el.setAttribute("aria-busy", "true"); // assistive tech waits for the whole answer
  renderThinking(msg, el, bodyEl);
  renderAssistantBody(msg, bodyEl);
  const panel = sourcesPanel(msg); // the passages a grounded answer was given (sources.js: inert text)
  if (panel) el.append(panel);

  if (msg.error) el.append(h("div", { class: "error", "data-testid": "message-error", role: "alert" }, msg.error));
  const meta = metaLine(msg);
  if (meta) el.append(h("div", { class: "meta", "data-testid": "message-meta" }, meta));
  if (streaming) return; // actions appear once the answer is complete

  const isLast = index === conv.messages.length - 1;
  const hasTokens = Array.isArray(msg.logprobs) && msg.logprobs.length > 0;
  const actions = h("div", { class: "actions" },
    feedbackButtons(conv, msg),
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
  el.append(...feedbackFooter(conv, msg));
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

/**
 * A thinking model's thought (the API's `reasoning_content`), above the answer: a <details> "Thinking"
 * block, folded unless the user opened it (kept open across re-renders by rememberFolds, not stored), filled
 * live while the model thinks. Plain text: a thought is shown as the model wrote it, never as markup.
 */
function renderThinking(msg, el, bodyEl) {
  if (!msg.reasoning) return;
  let fold = $(".thinking", el);
  if (!fold) {
    fold = h("details", { class: "thinking", "data-testid": "thinking", open: thinkingOpen.has(msg.id) },
      h("summary", { "data-testid": "thinking-summary" }), h("div", { class: "thinking-text", "data-testid": "thinking-text" }));
    el.insertBefore(fold, bodyEl); // its open state is read back before the next full re-render (rememberFolds)
  }
  const live = state.busy && state.busy.msg === msg && !msg.content;
  $("summary", fold).textContent = live ? "Thinking…" : "Thinking";
  $(".thinking-text", fold).textContent = msg.reasoning;
}

/** Body of an assistant message: markdown, or the token view when asked for. */
function renderAssistantBody(msg, bodyEl) {
  hidePopoverWithin(bodyEl); // its token is about to be replaced
  const showTokens = (tokenViewOpen.has(msg.id) || state.settings.probColours) && msg.logprobs && msg.logprobs.length;
  if (showTokens) {
    bodyEl.className = "body tokens";
    bodyEl.replaceChildren(tokenView(msg));
  } else {
    bodyEl.className = "body markdown";
    bodyEl.replaceChildren(renderMarkdown(msg.content));
    linkCitations(bodyEl, msg); // [n] opens source n of the panel
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
export function scheduleMessageUpdate(msg) {
  if (pendingFrame) return;
  pendingFrame = requestAnimationFrame(() => {
    pendingFrame = 0;
    const el = messageElements.get(msg.id);
    if (!el) return; // another conversation is on screen
    const box = $("#messages");
    const stick = nearBottom(box);
    renderThinking(msg, el, $(".body", el));
    renderAssistantBody(msg, $(".body", el));
    const metaEl = $(".meta", el);
    if (metaEl) metaEl.textContent = metaLine(msg);
    if (stick) box.scrollTop = box.scrollHeight;
  });
}
