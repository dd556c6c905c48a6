// Markdown rendering of untrusted model output: `marked` turns the text into HTML, DOMPurify (with the
// hooks below) sanitises every byte of it into a DocumentFragment, and highlight.js colours code blocks.
// The libraries come from node_modules through /vendor/ (lmforge/serve/web/package.json).
//
// A module of its own because it is the one place untrusted HTML is made: everything else in the UI
// (token views, popovers, titles, errors) is built with textContent, never innerHTML. The server's
// Content-Security-Policy is the second wall: no inline scripts, no remote loads.

import { marked } from "/vendor/marked/lib/marked.esm.js";
import DOMPurify from "/vendor/dompurify/dist/purify.es.mjs";
import hljs from "/vendor/@highlightjs/cdn-assets/es/highlight.min.js";

import { h } from "./dom.js";

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
export function renderMarkdown(text) {
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
