// What the user can do with conversations: send a message, stream the model's answer into the
// conversation (and stop it), regenerate an answer, edit a question, open, delete, copy.
//
// A module of its own because these actions are the only code that changes conversations after start-up
// (bar feedback, in feedback.js): each changes `state`, saves it, and asks render.js to redraw. render.js
// in turn calls them from its buttons; the import cycle is safe because neither module runs any of the
// other's code while loading.

import { apiHeaders, errorMessage, requestBody, sseData } from "./api.js";
import { $, showNotice } from "./dom.js";
import { renderAll, scheduleMessageUpdate } from "./render.js";
import { hidePopover } from "./tokens.js";
import { currentConversation, drafts, editing, newConversation, newId, saveConversations, saveSettings, state }
  from "./store.js";

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
  const documents = $("#docs-select").value || null; // the collection picked now (none: "")
  const msg = { id: newId(), role: "assistant", content: "", model: conv.model, system: conv.system,
    logprobs: [], finish: null, error: null, usage: null, elapsed: null, feedback: { rating: null, better: null, status: "" },
    documents, sources: null, grounding: null };
  const body = requestBody(conv, state.settings.sampling, documents);
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
      if (chunk.grounding && typeof chunk.grounding === "object") msg.grounding = chunk.grounding;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && Array.isArray(choice.delta.sources)) {
        msg.sources = choice.delta.sources; // a grounded answer: its passages come before any text
        renderAll(); // draws the sources panel (streaming updates redraw only the text)
      }
      if (choice.delta && typeof choice.delta.reasoning_content === "string") {
        msg.reasoning = (msg.reasoning || "") + choice.delta.reasoning_content; // drawn folded (render.js)
      }
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

export function stop() {
  // Aborting the fetch closes the connection; the server notices and cancels the request.
  if (state.busy) state.busy.controller.abort();
}

export function sendFromComposer() {
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

export function regenerate(conv, index) {
  if (state.busy) return;
  conv.messages.splice(index); // the answer and anything after it
  generate(conv);
}

export function saveEdit(conv, msg, text) {
  if (state.busy || !text.trim()) return;
  const index = conv.messages.indexOf(msg);
  editing.delete(msg.id);
  drafts.delete(`edit:${msg.id}`);
  msg.content = text.trim();
  if (index === 0) conv.title = titleOf(msg.content);
  conv.messages.splice(index + 1); // editing a message rewrites history from there on
  generate(conv);
}

export function openConversation(id) {
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

export function deleteConversation(id) {
  if (state.busy && state.busy.conv.id === id) stop();
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = null;
  saveConversations();
  renderAll();
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text); // only in a secure context (localhost counts)
    showNotice("Copied.");
  } catch {
    showNotice("Copying needs https or localhost; select the text instead.");
  }
}
