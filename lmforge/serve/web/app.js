// The lmforge chat UI: plain ES modules, no build step. This one wires the page: the model list, the
// settings panel, the composer, and start-up; the other modules each do one job:
//
//   dom.js       element builder, buttons, icons, the notice bar
//   markdown.js  model output -> sanitised, highlighted DOM (marked, DOMPurify, highlight.js)
//   store.js     conversations and settings in localStorage, the page's state
//   api.js       the OpenAI-style API client and the SSE stream reader
//   chat.js      send, stream an answer, stop, regenerate, edit, open, delete, copy
//   sources.js   a grounded answer's sources panel and its [n] citations (passages are inert text)
//   feedback.js  thumbs, the better-answer form, POST /v1/feedback
//   tokens.js    the token probability view and its popover
//   render.js    state -> DOM
//
// It talks to the server only through the public OpenAI-style API (/v1/models, /v1/chat/completions
// with SSE streaming and logprobs, and lmforge's `documents` extension) plus /v1/feedback and the index
// listing /v1/indexes, so anything it does a script can do too.
//
// Security model: model output is untrusted text, and so is everything stored in localStorage. Markdown is
// rendered by `marked` with every piece of the model's text escaped (HTML it writes is shown as text), then
// DOMPurify turns that HTML into nodes of an inert document, and only then do they go into the page
// (markdown.js: the one function that makes nodes from HTML, on every path: streaming, finished, restored,
// regenerated). Everything else (token views, popovers, titles, errors, the user's text) is built with
// textContent, never innerHTML. index.html's Trusted Types policy makes the browser refuse any other HTML
// string. The server's Content-Security-Policy is the second wall (no inline scripts or styles, no remote
// loads): nothing the model wrote ever gets as far as it.

import { API_KEY_KEY, apiHeaders, errorMessage } from "./api.js";
import { sendFromComposer, stop } from "./chat.js";
import { $, h, showNotice } from "./dom.js";
import { renderAll, updateControls } from "./render.js";
import { currentConversation, saveSettings, state } from "./store.js";
import { hidePopover, wireTokenEvents } from "./tokens.js";

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
 * The Documents picker: "none" and every index the server lists. The user's last pick is kept in the
 * settings; until there is one, the server's default (`lmforge serve --docs INDEX`) is picked. A server
 * without the listing (or one that wants a key we lack) leaves just "none".
 */
async function loadIndexes() {
  const select = $("#docs-select");
  let names = [];
  let fallback = "";
  try {
    const r = await fetch("/v1/indexes", { headers: apiHeaders() });
    if (r.ok) {
      const body = await r.json();
      names = (Array.isArray(body.data) ? body.data : []).map((d) => d && d.id).filter((id) => typeof id === "string");
      if (typeof body.default === "string") fallback = body.default;
    }
  } catch { /* the model list reports an unreachable server */ }
  state.indexes = names;
  select.replaceChildren(h("option", { value: "" }, "none"), ...names.map((n) => h("option", { value: n }, n)));
  const wanted = typeof state.settings.docs === "string" ? state.settings.docs : fallback;
  select.value = names.includes(wanted) ? wanted : "";
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
    loadIndexes();
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
  $("#docs-select").addEventListener("change", (e) => {
    state.settings.docs = e.target.value;
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
  loadIndexes();
  document.body.dataset.ready = "true"; // tests wait for this before interacting
}

start();
