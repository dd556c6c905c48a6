// The client of the server's public OpenAI-style API: request headers (with the API key the user typed
// under Settings), error messages out of OpenAI error bodies, the SSE reader of a streamed answer, and
// the /v1/chat/completions request body built from a conversation.
//
// A module of its own because the UI talks to the server only through this public API (plus
// /v1/feedback), so anything the UI does a script can do too; it touches no DOM and no page state.

export const API_KEY_KEY = "lmforge.apiKey";
const DEFAULT_TOP_LOGPROBS = 5; // alternatives shown in the token popover when the field is empty

export function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = localStorage.getItem(API_KEY_KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

/** The message of an OpenAI error object, or a readable fallback. */
export async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch { /* not JSON */ }
  return `${response.status} ${response.statusText || "error"}`;
}

/**
 * Read an SSE stream and yield each event's data string. Events end with a blank line; a `data:` line
 * may be split across network reads, so we buffer until a whole event has arrived.
 */
export async function* sseData(response) {
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
export function apiMessages(system, messages) {
  const out = system ? [{ role: "system", content: system }] : [];
  for (const m of messages) {
    if (m.role === "assistant" && m.finish === "error" && !m.content) continue;
    out.push({ role: m.role, content: m.content });
  }
  return out;
}

/**
 * The request body for the conversation as it stands (its last message is the user's), with the settings
 * panel's `sampling` fields, grounded on the index `documents` when one is picked (lmforge's extension:
 * the server retrieves passages for the last message and returns them as the answer's `sources`). The
 * messages stay the plain conversation: the server puts the passages in, for the latest question only.
 */
export function requestBody(conv, sampling, documents = null) {
  const messages = apiMessages(conv.system, conv.messages);
  const body = {
    model: conv.model, messages, stream: true, stream_options: { include_usage: true },
    logprobs: true, top_logprobs: DEFAULT_TOP_LOGPROBS,
  };
  if (documents) body.documents = documents;
  for (const [name, value] of Object.entries(sampling || {})) {
    if (value !== null && value !== undefined && value !== "" && !Number.isNaN(value)) body[name] = value;
  }
  return body;
}
