// The state of the page: conversations and settings, kept in the browser's localStorage (nothing is
// stored on the server), the generation in flight, and the UI-only flags that survive a re-render.
//
// A module of its own because every other module reads or changes this state, and the stored shape
// (STORE_KEY / SETTINGS_KEY) and how a full quota is handled must be decided in one place.

import { showNotice } from "./dom.js";

const STORE_KEY = "lmforge.conversations.v1"; // bump the suffix if the stored shape ever changes
const SETTINGS_KEY = "lmforge.settings.v1";

export const newId = () =>
  (crypto.randomUUID ? crypto.randomUUID() : `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`);

/**
 * A conversation: { id, title, model, system, created, updated, messages: [Message] }
 * A message:      { id, role: "user"|"assistant", content,
 *                   // assistant only:
 *                   reasoning: a thinking model's thought (`reasoning_content`; not sent back) | undefined,
 *                   model, system, logprobs: [{token, logprob, bytes, top_logprobs}] | null,
 *                   finish: "stop"|"length"|"stopped"|"error"|null, error, usage, elapsed,
 *                   feedback: {rating, better, status},
 *                   documents: index name | null, sources: [{index, path, heading, start_line, end_line,
 *                   score, text, truncated}] | null, grounding: {index, k, retrieved, passages, dropped,
 *                   dropped_messages, notice} | null }    (the last three: a grounded answer, see sources.js)
 * Settings: { model, system, sampling, probColours, docs } where docs is the picked index ("" = none;
 *           absent = the server's default, `lmforge serve --docs`).
 */
export const state = {
  conversations: loadJSON(STORE_KEY, []),
  currentId: null,
  settings: loadJSON(SETTINGS_KEY, { model: "", system: "", sampling: {}, probColours: false }),
  models: [],
  indexes: [], // document indexes the server lists (GET /v1/indexes)
  // The one generation in flight: {conv, msg, controller}. One at a time keeps the UI honest.
  busy: null,
};

// UI-only state, never persisted.
export const tokenViewOpen = new Set(); // ids of assistant messages showing the token view
export const thinkingOpen = new Set(); // ids of assistant messages whose "Thinking" fold is open
export const editing = new Set(); // ids of user messages being edited
export const betterOpen = new Set(); // ids of assistant messages with the "better answer" form open
export const drafts = new Map(); // "edit:<id>" / "better:<id>" -> text typed so far (re-renders rebuild the DOM)

function loadJSON(key, fallback) {
  try {
    const v = JSON.parse(localStorage.getItem(key));
    return v ?? fallback;
  } catch {
    return fallback;
  }
}

export function saveSettings() {
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(state.settings));
}

/**
 * Save every conversation. Token probabilities are the bulk of the data (~300 bytes a token); when the
 * browser's quota (about 5 MB) is hit we drop them from the oldest conversations first rather than lose
 * any text, and say so.
 */
export function saveConversations() {
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

export const currentConversation = () => state.conversations.find((c) => c.id === state.currentId) || null;

export function newConversation() {
  const conv = { id: newId(), title: "New chat", model: state.settings.model, system: state.settings.system,
    created: Date.now(), updated: Date.now(), messages: [] };
  state.conversations.unshift(conv);
  return conv;
}

