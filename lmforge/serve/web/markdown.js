// Markdown rendering of untrusted model output, and the UI's one door for HTML: `marked` turns the text into
// HTML, DOMPurify (with the hooks below) sanitises it into a DocumentFragment of an inert document, and
// highlight.js colours code blocks. The libraries come from node_modules through /vendor/
// (lmforge/serve/web/package.json).
//
// A module of its own because it is the one place HTML is made: everything else in the UI (token views,
// popovers, titles, errors, the user's own text) is built with textContent, never innerHTML. `sanitized`
// below is the only function that turns an HTML string into nodes, and index.html's Trusted Types policy
// makes that mechanical: the browser refuses an HTML string anywhere else (innerHTML, DOMParser...).
//
// The rule is that HTML the model writes is never parsed as markup, not even in DOMPurify's inert
// document: Chromium checks the page's Content-Security-Policy while it parses there too (a <style>, a
// style="" or a <base> in the answer is reported as a CSP violation before DOMPurify has removed it), and
// the CSP must stay the second wall, never the first. So it is shown as the text it is (bar a few inline
// tags with no attributes, such as <br> and <sub>), and DOMPurify parses only markup `marked` itself wrote,
// with the model's text escaped inside it; it still removes anything unsafe there (javascript: links,
// images from elsewhere).

import { marked } from "/vendor/marked/lib/marked.esm.js";
import DOMPurify from "/vendor/dompurify/dist/purify.es.mjs";
import hljs from "/vendor/@highlightjs/cdn-assets/es/highlight.min.js";

import { h } from "./dom.js";

// Inline tags the model may use as markup, exactly as written here: no attributes, so nothing to check.
const PLAIN_TAG = /^(<\/?(b|i|u|s|em|strong|sub|sup|kbd|mark|small|ins|del)>|<br\s*\/?>)$/i;
const escapeHtml = (s) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");

marked.use({
  gfm: true, breaks: false,
  renderer: {
    // Raw HTML in the answer: an inline tag is kept only if it is one of PLAIN_TAG; anything else is text.
    // A block of raw HTML is shown as HTML source, like a code block the model had fenced.
    html({ text, block }) {
      if (block) return `<pre><code class="language-html">${escapeHtml(text.replace(/\n+$/, ""))}</code></pre>\n`;
      return PLAIN_TAG.test(text) ? text.toLowerCase() : escapeHtml(text);
    },
  },
});

// Only HTML elements (no SVG/MathML), and nothing that can submit, embed, frame or load media.
// `style` attributes would be blocked by the CSP anyway; removing them keeps the DOM honest.
const MARKDOWN_CONFIG = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option", "iframe", "frame",
    "frameset", "object", "embed", "link", "meta", "base", "video", "audio", "source", "track", "picture",
    "template", "dialog"],
  FORBID_ATTR: ["style", "srcset", "action", "formaction", "background", "poster", "ping", "autofocus"],
  ALLOW_DATA_ATTR: false,
};
// highlight.js output: its spans and their classes, nothing else.
const CODE_CONFIG = { ALLOWED_TAGS: ["span"], ALLOWED_ATTR: ["class"], ALLOW_DATA_ATTR: false };

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

// What the check after sanitising refuses, whatever the configuration said (a later edit of it, a bug).
const UNSAFE_TAGS = new Set(["script", "style", "iframe", "frame", "object", "embed", "base", "link", "meta", "form",
  "svg", "math", "template"]);
const URL_ATTRS = new Set(["href", "src", "cite", "action", "formaction", "xlink:href"]);

/**
 * The one way in for HTML: `html` sanitised by DOMPurify into a DocumentFragment that belongs to DOMPurify's
 * inert document (no browsing context: nothing in it loads or runs), checked, and only then returned for
 * the caller to put in the page. Throws if the sanitiser is missing or let something through.
 */
function sanitized(html, config) {
  if (!DOMPurify.isSupported) throw new Error("DOMPurify cannot run in this browser");
  const frag = DOMPurify.sanitize(html, { ...config, RETURN_DOM_FRAGMENT: true });
  for (const el of frag.querySelectorAll("*")) {
    if (UNSAFE_TAGS.has(el.localName)) throw new Error(`the sanitiser kept a <${el.localName}>`);
    for (const { name, value } of el.attributes) {
      const scheme = URL_ATTRS.has(name) && /^(javascript|vbscript):/i.test(value.replace(/[\u0000-\u0020]/g, ""));
      if (/^on|^style$|^srcdoc$/i.test(name) || scheme) {
        throw new Error(`the sanitiser kept ${name}="${value.slice(0, 40)}" on a <${el.localName}>`);
      }
    }
  }
  return frag;
}

/** Markdown text -> a sanitized DocumentFragment with highlighted code blocks, not yet in the page. */
export function renderMarkdown(text) {
  const source = typeof text === "string" ? text : String(text ?? ""); // a stored conversation may hold anything
  try {
    const frag = sanitized(marked.parse(source, { async: false }), MARKDOWN_CONFIG);
    for (const img of frag.querySelectorAll("img:not([src])")) {
      const alt = img.getAttribute("alt");
      img.replaceWith(h("span", { class: "blocked-img", title: "Image not loaded: only inline data: images are shown" },
        `[image${alt ? `: ${alt}` : ""}]`));
    }
    for (const code of frag.querySelectorAll("pre > code")) highlightCode(code);
    return frag;
  } catch (e) {
    // Fail closed: the answer as plain text, and a console error (the browser tests fail on any).
    console.error(`lmforge: markdown not rendered (${e.message}); showing the answer as plain text`);
    return h("p", { class: "plain" }, source);
  }
}

function highlightCode(code) {
  // marked writes the fence's info string as class "language-xxx". An unknown language would make
  // highlight.js skip the block, so fall back to plain text for those; no info string: auto-detection.
  const m = /(?:^|\s)language-(\S+)/.exec(code.className);
  const language = m ? (hljs.getLanguage(m[1]) ? m[1] : "plaintext") : null;
  const text = code.textContent;
  const result = language ? hljs.highlight(text, { language, ignoreIllegals: true }) : hljs.highlightAuto(text);
  // highlight.js escapes the text and adds only <span class="hljs-...">; it still goes through the door.
  code.replaceChildren(sanitized(result.value, CODE_CONFIG));
  code.className = `hljs language-${language || result.language || "plaintext"}`;
}
