// Grounded answers: the sources panel under an answer (the passages the server retrieved and showed the
// model, numbered as the answer cites them) and the [n] citations in the answer that open it at passage n.
//
// A module of its own because passages are a second kind of untrusted text: they come from whatever files
// were indexed (a web page saved as .md, a README with <script> in it), through the server's `sources`
// field or back out of localStorage. They are never markdown and never HTML here: every field becomes a
// text node through dom.js's h(), the passage itself in a <pre> (so its lines and indentation show as
// indexed). Nothing in this file parses a string as markup, and numbers are checked as numbers.

import { h } from "./dom.js";

/** The sources of a message as it was stored, keeping only well-formed entries (localStorage is untrusted). */
export function messageSources(msg) {
  if (!msg || !Array.isArray(msg.sources)) return [];
  return msg.sources.filter((s) => s && typeof s === "object" && Number.isInteger(s.index) && s.index > 0);
}

const openPanels = new Set(); // ids of answers whose panel is open: a re-render keeps it open (not stored)

const str = (v) => (typeof v === "string" ? v : v === null || v === undefined ? "" : String(v));

/** `path:start-end` of a passage. */
function place(s) {
  const a = Number.isInteger(s.start_line) ? s.start_line : null;
  const b = Number.isInteger(s.end_line) ? s.end_line : a;
  return a === null ? str(s.path) : `${str(s.path)}:${a === b ? a : `${a}-${b}`}`;
}

/**
 * The sources panel of an answer: a <details> (closed until opened or a citation is clicked) with the
 * index name, a notice when passages or messages were dropped to fit the context, and each passage.
 */
export function sourcesPanel(msg) {
  const sources = messageSources(msg);
  const g = msg.grounding && typeof msg.grounding === "object" ? msg.grounding : {};
  const from = g.index ? ` from ${str(g.index)}` : "";
  if (!sources.length) {
    return g.index && g.retrieved === 0
      ? h("p", { class: "source-notice", "data-testid": "sources-none" }, `No passage${from} matched this question.`)
      : null;
  }
  const items = sources.map((s) => h("li", { class: "source", "data-testid": "source", "data-source": s.index },
    h("div", { class: "source-head" },
      h("span", { class: "source-n", "data-testid": "source-n" }, `[${s.index}]`),
      h("span", { class: "source-place", "data-testid": "source-place" }, place(s)),
      s.heading ? h("span", { class: "source-heading", "data-testid": "source-heading" }, str(s.heading)) : null,
      s.truncated === true ? h("span", { class: "source-cut" }, "(cut to fit)") : null),
    h("pre", { class: "source-text", "data-testid": "source-text" }, str(s.text))));
  const panel = h("details", { class: "sources", "data-testid": "sources", open: openPanels.has(msg.id) },
    h("summary", {}, `Sources (${sources.length})${from}`),
    typeof g.notice === "string" && g.notice ? h("p", { class: "source-notice", "data-testid": "sources-notice" }, g.notice) : null,
    h("ol", { class: "source-list" }, items));
  panel.addEventListener("toggle", () => {
    if (panel.open) openPanels.add(msg.id);
    else openPanels.delete(msg.id);
  });
  return panel;
}

/** Open the panel of the answer `article` at passage `n` and bring it into view. */
function showSource(article, n) {
  const panel = article.querySelector(".sources");
  if (!panel) return;
  panel.open = true;
  for (const li of panel.querySelectorAll(".source")) {
    const hit = li.dataset.source === String(n);
    li.classList.toggle("current", hit);
    if (hit) li.scrollIntoView({ block: "nearest" });
  }
}

/**
 * Turn the [n] citations in a rendered answer (`root`, already sanitised DOM) into buttons that open
 * source n, for the n the answer was given. Only text nodes are split, outside code; the pieces are text
 * nodes and buttons made here: no markup is parsed.
 */
export function linkCitations(root, msg) {
  const known = new Set(messageSources(msg).map((s) => s.index));
  if (!known.size) return;
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT, {
    acceptNode: (node) => (node.parentElement && node.parentElement.closest("code, pre, button")
      ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT),
  });
  const nodes = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) if (/\[\d{1,3}\]/.test(n.data)) nodes.push(n);
  for (const node of nodes) {
    const parts = [];
    let last = 0;
    for (const m of node.data.matchAll(/\[(\d{1,3})\]/g)) {
      const n = Number(m[1]);
      if (!known.has(n)) continue;
      if (m.index > last) parts.push(document.createTextNode(node.data.slice(last, m.index)));
      const cite = h("button", { type: "button", class: "cite", "data-testid": "cite", title: `Show source ${n}`,
        "aria-label": `Show source ${n}` }, `[${n}]`);
      cite.addEventListener("click", () => showSource(cite.closest(".message"), n));
      parts.push(cite);
      last = m.index + m[0].length;
    }
    if (!parts.length) continue;
    if (last < node.data.length) parts.push(document.createTextNode(node.data.slice(last)));
    node.replaceWith(...parts);
  }
}
