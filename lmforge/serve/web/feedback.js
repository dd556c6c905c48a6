// Feedback on an answer: the thumbs up / down buttons, the "better answer" form, the status line under
// them, and the POST to /v1/feedback that pairs the answer with the exact messages it answered (the
// server saves them as ratings, SFT and preference data for training).
//
// A module of its own because feedback is the UI's one way of writing training data, with its own request
// and its own rule for what "the prompt" of an answer is (promptFor). render.js draws these parts on each
// finished answer; they ask it to redraw (an import cycle that is safe: neither module runs any of the
// other's code while loading).

import { apiHeaders, apiMessages, errorMessage } from "./api.js";
import { button, h, icon } from "./dom.js";
import { renderAll } from "./render.js";
import { betterOpen, drafts, saveConversations } from "./store.js";

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

/** The feedback buttons of a finished answer, first in its row of actions. */
export function feedbackButtons(conv, msg) {
  const fb = msg.feedback || {};
  return [
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
  ];
}

/** What goes under the answer's actions: the feedback status line and, when open, the better-answer form. */
export function feedbackFooter(conv, msg) {
  const fb = msg.feedback || {};
  const parts = [];
  if (fb.status) {
    parts.push(h("div", { class: "feedback-status", "data-testid": "feedback-status", role: "status" }, fb.status));
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
    parts.push(h("div", { class: "better-form" }, input, h("div", { class: "actions" }, submit, cancel)));
  }
  return parts;
}
