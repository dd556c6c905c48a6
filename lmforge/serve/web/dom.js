// DOM building blocks shared by every part of the chat UI: a query helper, an element builder that only
// ever makes text nodes from strings, the action button, the thumbs icons, and the notice bar.
//
// A module of its own because everything that draws imports it, and because it is where the rule "text
// goes in with textContent, never innerHTML" is kept for everything but rendered markdown (markdown.js).

export const $ = (sel, root = document) => root.querySelector(sel);

/** Create an element with attributes and children. Text children become text nodes (never HTML). */
export function h(tag, attrs = {}, ...children) {
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
export function button(label, { title, testid, cls = "btn small", pressed, onClick, disabled } = {}) {
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
export function icon(name) {
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

/** A line in the notice bar; it goes after 6 s unless `sticky`. */
let noticeTimer = 0;
export function showNotice(text, sticky = false) {
  const el = $("#notice");
  el.textContent = text;
  el.hidden = false;
  clearTimeout(noticeTimer);
  if (!sticky) noticeTimer = setTimeout(() => { el.hidden = true; }, 6000);
}
