// The token probability view of an answer: each token drawn as its own span (optionally coloured by its
// probability), and the popover with the token's probability and the alternatives the server reported,
// followed by mouse hover, click (pins it) and the arrow keys.
//
// A module of its own because it is the UI's one view of the raw logprobs rather than the text, with its
// own event handling (one set of listeners on #messages, wired once at start-up) and popover state.

import { $, h } from "./dom.js";
import { currentConversation } from "./store.js";

function formatProb(p) {
  if (p >= 0.995) return `${(p * 100).toFixed(1)}%`;
  if (p >= 0.001) return `${(p * 100).toFixed(p >= 0.1 ? 1 : 2)}%`;
  return p.toExponential(1);
}

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

export function tokenView(msg) {
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

export function hidePopover() {
  pinned = null;
  const pop = $("#token-popover");
  if (pop) pop.hidden = true;
  for (const s of document.querySelectorAll(".tok.current")) s.classList.remove("current");
}


/** Hide the popover if its pinned token is inside `el` (which is about to be redrawn). */
export function hidePopoverWithin(el) {
  if (pinned && el.contains(pinned)) hidePopover();
}

export function wireTokenEvents() {
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
