"""Byte-level BPE tokenizer, ChatML chat template, and the Hugging Face directory layout.

Training lives in :mod:`lmforge.tokenizer.train`; chat templates (any Hugging Face Jinja template,
sandboxed) are rendered by :mod:`lmforge.tokenizer.chat_template`.

Why this design
---------------
* **Byte-level BPE via Hugging Face `tokenizers`.** Training and encoding run in the Rust library
  (`models.BPE` + `trainers.BpeTrainer`), not in a Python merge loop, so a few hundred MB of text trains
  in minutes and `encode_batch` uses every core.
* **Exact round trip for any string.** Text is first split with a Llama-3-style regex (`Split`,
  behaviour "isolated", which keeps every character: the pieces concatenate back to the input), then
  `ByteLevel` maps each UTF-8 *byte* to one of 256 printable stand-in characters. The trainer starts from
  `ByteLevel.alphabet()`, so all 256 bytes are in the vocabulary and nothing is ever `<unk>`; the
  `ByteLevel` decoder maps the stand-ins back to bytes and decodes UTF-8. There is deliberately **no
  normalizer** (no NFC, no lowercasing, no whitespace cleanup) and no prefix space, because each of those
  rewrites the text and would break `decode(encode(s)) == s`. This holds for emoji, CJK, control
  characters, ``"\\r\\n"``, leading spaces, NUL bytes -- any `str` Python can encode as UTF-8.
* **Special tokens at fixed ids 0..3** (`SPECIAL_TOKENS`): the trainer adds them before the byte alphabet,
  so `<|endoftext|>` is 0, `<|im_start|>` 1, `<|im_end|>` 2, `<|pad|>` 3 whatever the vocab size.
  `<|endoftext|>` separates documents in pretraining data (EOS) and doubles as BOS; `<|im_end|>` ends a
  chat turn, so generation stops on either (`eos_ids`).
* **Special-token text inside raw input.** By default `encode` does what Hugging Face does: the literal
  text ``"<|im_end|>"`` in the input becomes the control token (id 2). That is required so that a rendered
  chat template (a plain string containing ``<|im_start|>``...) encodes to control tokens, and so that our
  ids equal `transformers`' ids. The round trip still holds because `decode(..., skip_special_tokens=False)`
  writes a control token back as its literal text. For untrusted text that must never turn into control
  tokens (web documents, user messages you tokenize yourself) pass ``allow_special=False``: then
  ``"<|im_end|>"`` is encoded as ordinary bytes (``<``, ``|``, ``im``...) and still round-trips.
* **No BOS on chat encodes.** `transformers` tokenizes a rendered chat with ``add_special_tokens=False``;
  the template itself decides every special token. Our ChatML template never emits a BOS and
  `encode_chat` never prepends one, so there is never a doubled BOS and our ids equal theirs.
* **Foreign tokenizers add the BOS transformers adds.** When a tokenizer.json exists, transformers 5 drops
  ``add_bos_token``/``add_eos_token`` from tokenizer_config.json and uses tokenizer.json's post-processor
  as it is: Llama-3 (no ``add_bos_token`` at all), Llama-2 and Mistral prepend their BOS through a
  ``TemplateProcessing`` post-processor there. `Tokenizer.load` therefore reads ``add_bos`` off the backend
  (by encoding a probe with and without special tokens), so plain-text prompts get exactly the BOS
  transformers adds, and chats still get none from us (their template renders ``{{ bos_token }}`` itself).
  Our own `save` keeps the two in agreement: ``add_bos=True`` writes the post-processor too.
* **Generation stops where transformers stops.** `load_hf_tokenizer` (for model directories) adds every id
  that generation_config.json lists as ``eos_token_id`` (Llama-3 Instruct: 128001, 128008, 128009) to
  `eos_ids`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import processors

from lmforge.errors import UserError, one_line
from lmforge.io import atomic_write_json, atomic_write_text, read_json_object
from lmforge.tokenizer.chat_template import check_chat_template, render_chat_template

__all__ = [
    "SPECIAL_TOKENS",
    "DEFAULT_CHAT_TEMPLATE",
    "ENDOFTEXT",
    "IM_START",
    "IM_END",
    "PAD",
    "SPLIT_PATTERN",
    "Tokenizer",
    "load_hf_tokenizer",
]

ENDOFTEXT = "<|endoftext|>"  # document separator; EOS of documents and BOS
IM_START = "<|im_start|>"  # ChatML: start of a turn, followed by the role and "\n"
IM_END = "<|im_end|>"  # ChatML: end of a turn ("end of turn" / EOT); generation stops here too
PAD = "<|pad|>"  # padding only; never trained on
SPECIAL_TOKENS: list[str] = [ENDOFTEXT, IM_START, IM_END, PAD]  # ids 0..3, in this order

# Llama-3's pre-tokenization regex: contractions, words with one leading non-letter (usually the space),
# numbers in groups of at most 3 digits, punctuation runs, newlines, other whitespace. Every character is
# matched by some branch and the Split behaviour "isolated" keeps unmatched text anyway, so splitting
# never drops or reorders anything (the round trip stays exact).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML. `is not string` also catches a missing key and `content=None` (which, like transformers, we drop
# before rendering). Never emits a BOS: see the module docstring.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {%- if message['role'] is not string or message['content'] is not string %}\n"
    "        {{- raise_exception('every chat message needs a string \"role\" and a string \"content\"') }}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# `tokenizers`' plain `encode` holds the GIL for the whole text (about a second per MB): a server's event
# loop would stop that long. Texts from this many characters on go through `encode_batch`, which does not.
_LONG_TEXT = 16_384
_VERY_LARGE_INTEGER = int(1e30)  # what transformers writes for "no model_max_length"
_CONFIG_KEY = "lmforge"  # our own settings inside tokenizer_config.json (transformers ignores the key)


# ----------------------------------------------------------------------------------------------------
# Byte-level alphabet (the GPT-2 bytes<->unicode table used by tokenizers' ByteLevel)
# ----------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes stand for themselves; the rest (control bytes, space, ...) are shifted to
    U+0100 and up. `tokenizers`' ByteLevel uses exactly this table, so inverting it recovers a token's bytes.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _token_text_to_bytes(token: str) -> bytes:
    """Mirror tokenizers' ByteLevel decoder for one token.

    A token whose characters are all stand-ins becomes those bytes; any other token (e.g. a special token
    containing a space) is passed through as its own UTF-8. Applying the same rule as the decoder keeps
    `b"".join(token_bytes(i) ...)` byte-identical to what `decode` produces.
    """
    out = bytearray()
    for ch in token:
        b = _CHAR_TO_BYTE.get(ch)
        if b is None:
            return token.encode("utf-8")
        out.append(b)
    return bytes(out)


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _piece_to_bytes(token: str) -> bytes:
    """Mirror a SentencePiece-style decoder for one token (Llama 2, Mistral, Gemma vocabularies): "▁" is a
    space, and a byte-fallback piece `<0xC3>` is that one byte."""
    m = _BYTE_PIECE.fullmatch(token)
    return bytes([int(m.group(1), 16)]) if m else token.replace("\u2581", " ").encode("utf-8")


def _decodes_pieces(backend: tokenizers.Tokenizer) -> bool:
    """Whether the backend's decoder is SentencePiece-style ("▁" for spaces, byte fallback) rather than
    byte-level: tokens' text then means something else, and so do their bytes."""
    dec = json.loads(backend.to_str()).get("decoder") or {}
    steps = dec.get("decoders") or [dec]
    return any(s.get("type") in ("Metaspace", "ByteFallback") or
               (s.get("type") == "Replace" and (s.get("pattern") or {}).get("String") == "\u2581")
               for s in steps if isinstance(s, dict))


# ----------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------


def _token_str(value: Any) -> str | None:
    """A special token from a HF config: a string, an AddedToken dict {"content": ...}, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise UserError(f"cannot read special token {value!r} from the tokenizer config")


def _backend_adds_bos(tk: tokenizers.Tokenizer, bos_id: int | None) -> bool:
    """True when the backend's own post-processor puts `bos_id` in front of a plain-text encode.

    Probed rather than parsed: post-processors come as TemplateProcessing, RobertaProcessing, Sequence...,
    and only what they produce matters. (Anything they append after the text, such as an EOS, is not ours
    to add to a prompt and is ignored.)
    """
    if bos_id is None or tk.post_processor is None:
        return False
    probe = "a"
    plain = tk.encode(probe, add_special_tokens=False).ids
    special = tk.encode(probe, add_special_tokens=True).ids
    return special[:1] == [bos_id] and special[1 : 1 + len(plain)] == plain


class Tokenizer:
    """A `tokenizers.Tokenizer` plus lmforge's special-token roles and chat template.

    Construct it with `train_tokenizer` or `Tokenizer.load`. `backend` is the Rust tokenizer; use it for
    anything not wrapped here. `encode` never asks the backend to add special tokens: a BOS is prepended
    here only when `add_bos` is on, and never for chats.

    When `add_bos=True` the backend gets (a copy with) a `TemplateProcessing` post-processor that prepends
    the BOS, so `transformers` loading the saved directory adds the same BOS for plain text; a backend whose
    post-processor already does that (Llama-3's) is kept as it is.
    """

    def __init__(
        self,
        tk: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = ENDOFTEXT,
        eos_token: str | None = ENDOFTEXT,
        eot_token: str | None = IM_END,
        pad_token: str | None = PAD,
        add_bos: bool = False,
        extra_eos_tokens: Sequence[str] = (),
        model_max_length: int | None = None,
    ) -> None:
        if not isinstance(tk, tokenizers.Tokenizer):
            raise TypeError(f"Tokenizer wants a tokenizers.Tokenizer, got {type(tk).__name__}")
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.eot_token = eot_token
        self.pad_token = pad_token
        self.extra_eos_tokens = list(extra_eos_tokens)
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        self.model_max_length = model_max_length

        def lookup(role: str, token: str | None) -> int | None:
            if token is None:
                return None
            i = tk.token_to_id(token)
            if i is None:
                raise UserError(f"{role} {token!r} is not in the tokenizer's vocabulary")
            return i

        self.bos_id = lookup("bos token", bos_token)
        self.eos_id = lookup("eos token", eos_token)
        self.eot_id = lookup("end-of-turn token", eot_token)
        self.pad_id = lookup("pad token", pad_token)
        extra = [lookup("extra eos token", t) for t in self.extra_eos_tokens]
        self.eos_ids: list[int] = []
        for i in [self.eos_id, self.eot_id, *extra]:
            if i is not None and i not in self.eos_ids:
                self.eos_ids.append(i)

        if self.add_bos:
            if self.bos_id is None:
                raise UserError("add_bos is on but the tokenizer has no bos token")
        if self.add_bos and not _backend_adds_bos(tk, self.bos_id):
            tk = tokenizers.Tokenizer.from_str(tk.to_str())  # don't mutate the caller's object
            tk.post_processor = processors.TemplateProcessing(
                single=f"{bos_token}:0 $A:0",
                pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1",
                special_tokens=[(bos_token, self.bos_id)],
            )
        self.backend: tokenizers.Tokenizer = tk
        self._literal_backend: tokenizers.Tokenizer | None = None  # lazily: specials encoded as plain text
        self._control_texts: list[str] | None = None
        self._token_bytes: list[bytes] | None = None

    def with_extra_eos_ids(self, ids: Iterable[int]) -> "Tokenizer":
        """A copy that also ends generation on each token id in `ids` (kept in `extra_eos_tokens`, so it is
        saved and loaded with the tokenizer). Ids already in `eos_ids` are skipped."""
        new = copy.copy(self)
        new.extra_eos_tokens = list(self.extra_eos_tokens)
        new.eos_ids = list(self.eos_ids)
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int):
                raise UserError(f"an eos token id must be an integer, got {i!r}")
            token = self.backend.id_to_token(i)
            if token is None:
                raise UserError(f"eos token id {i} is not in the tokenizer's vocabulary (size {self.vocab_size})")
            if i not in new.eos_ids:
                new.eos_ids.append(i)
                new.extra_eos_tokens.append(token)
        return new

    # -- basic properties ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding needs at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"eot={self.eot_token!r}, pad={self.pad_token!r}, add_bos={self.add_bos}, "
            f"chat_template={'yes' if self.chat_template else 'no'})"
        )

    # -- encode / decode ----------------------------------------------------------------------------

    def _backend_for(self, allow_special: bool) -> tokenizers.Tokenizer:
        if allow_special:
            return self.backend
        if self._literal_backend is None:
            # A separate copy, so flipping the flag never races with other threads using `backend`.
            literal = tokenizers.Tokenizer.from_str(self.backend.to_str())
            literal.encode_special_tokens = True
            self._literal_backend = literal
        return self._literal_backend

    def encode(self, text: str, *, add_bos: bool | None = None, allow_special: bool = True) -> list[int]:
        """Token ids for `text`; `decode(encode(text)) == text` for every string.

        `add_bos=None` uses `self.add_bos`. With `allow_special=True` (the default, as in transformers) the
        literal text of a special token becomes that control token; with `allow_special=False` it is encoded
        as ordinary text (use this for untrusted text).
        """
        backend = self._backend_for(allow_special)
        if len(text) < _LONG_TEXT:
            ids = backend.encode(text, add_special_tokens=False).ids
        else:  # the same ids, but `encode_batch` lets other threads run meanwhile (it releases the GIL)
            ids = backend.encode_batch([text], add_special_tokens=False)[0].ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise UserError("cannot add a BOS: the tokenizer has no bos token")
            ids.insert(0, self.bos_id)
        return ids

    def encode_batch(self, texts: list[str], *, allow_special: bool = True) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads). Never adds a BOS; see `encode` for `allow_special`."""
        return [e.ids for e in self._backend_for(allow_special).encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text for `ids`. Special tokens come back as their literal text unless `skip_special_tokens`.

        Byte sequences that are not valid UTF-8 (e.g. half of an emoji) decode to U+FFFD; ids outside the
        vocabulary are ignored (that is the backend's behaviour).
        """
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes token `id` stands for; special tokens give their UTF-8 text.

        Concatenating these and decoding UTF-8 incrementally gives streaming output that never splits a
        multi-byte character, and is byte-identical to `decode(ids)` (a SentencePiece-style decoder also
        drops the one space its encoder put in front of the whole text; a stream of generated tokens keeps
        it, as it must in the middle of a text). The token's text is read as its decoder reads it: bytes
        through the byte-level alphabet, or "▁" and `<0xXX>` pieces for SentencePiece vocabularies (which
        were streamed with a visible "▁" before).
        """
        table = self._token_bytes
        if table is None:
            to_bytes = _piece_to_bytes if _decodes_pieces(self.backend) else _token_text_to_bytes
            table = []
            for i in range(self.vocab_size):
                tok = self.backend.id_to_token(i)
                table.append(b"" if tok is None else to_bytes(tok))
            self._token_bytes = table
        i = int(id)
        if not 0 <= i < len(table):
            raise IndexError(f"token id {i} is outside the vocabulary (0..{len(table) - 1})")
        return table[i]

    def control_token_texts(self) -> list[str]:
        """The literal text of every special (control) token: `<|im_end|>`, `<|endoftext|>`, ..."""
        if self._control_texts is None:
            self._control_texts = sorted({t.content for t in self.backend.get_added_tokens_decoder().values()
                                          if t.special and t.content})
        return self._control_texts

    def control_token_in(self, text: str) -> str | None:
        """The first control token whose literal text occurs in `text`, or None. Text that goes through a
        chat template is encoded with control tokens recognised, so such text would forge turn boundaries:
        the chat routes, the terminal chat and feedback all refuse it by this one rule."""
        return next((t for t in self.control_token_texts() if t in text), None)

    def token_text(self, id: int) -> str:
        """Token `id` shown on its own: its bytes as text, with bytes that are not whole UTF-8 characters
        (half of an emoji) as \\x escapes, so every token has a printable, unambiguous form."""
        raw = self.token_bytes(id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(chr(b) if b < 128 else f"\\x{b:02x}" for b in raw)

    # -- chat ---------------------------------------------------------------------------------------

    def _special_tokens_for_template(self) -> dict[str, str]:
        # The named tokens transformers passes (only those that are set).
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        return {k: v for k, v in named.items() if v is not None}

    def check_chat_template(self) -> None:
        """Refuse (one-line UserError) a chat template that fails, or breaks the render limits, on a sample
        conversation with this tokenizer's special tokens: `lmforge import` asks before a model enters the
        store. No template: nothing to check."""
        if self.chat_template is not None:
            check_chat_template(self.chat_template, special_tokens=self._special_tokens_for_template())

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = False, **kwargs: Any
    ) -> str:
        """Render a conversation to text, string-identical to `transformers`' `apply_chat_template(...,
        tokenize=False)`. `kwargs` reach the template and override the special-token variables."""
        if self.chat_template is None:
            raise UserError("this tokenizer has no chat template")
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self._special_tokens_for_template(),
            **kwargs,
        )

    def encode_chat(
        self, messages: list[dict], *, add_generation_prompt: bool = False, **kwargs: Any
    ) -> list[int]:
        """Render and encode a conversation. No BOS is prepended, whatever `add_bos` says: the template owns
        every special token of a chat (this is what transformers does with `tokenize=True`)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_bos=False)

    # -- identity -----------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """sha256 hex over the full backend JSON, the chat template and the special-token roles.

        Used as the cache key for tokenized data: any change to vocab, merges, pre-tokenization, BOS
        handling or the template yields a new key.
        """
        h = hashlib.sha256()
        h.update(self.backend.to_str().encode("utf-8"))
        meta = {
            "chat_template": self.chat_template,
            "bos": self.bos_token,
            "eos": self.eos_token,
            "eot": self.eot_token,
            "pad": self.pad_token,
            "extra_eos": self.extra_eos_tokens,
            "add_bos": self.add_bos,
        }
        h.update(b"\0")
        h.update(json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        return h.hexdigest()

    # -- persistence --------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Write the Hugging Face layout (loadable by `transformers.AutoTokenizer`), every file atomically.

        tokenizer.json (the backend), tokenizer_config.json, chat_template.jinja and special_tokens_map.json.
        lmforge-only settings (end-of-turn token, extra EOS tokens) live under the "lmforge" key of
        tokenizer_config.json, which transformers ignores.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        added = self.backend.get_added_tokens_decoder()
        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        named_values = {v for v in named.values() if v is not None}
        additional = [t.content for _, t in sorted(added.items()) if t.special and t.content not in named_values]
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": None,  # byte-level BPE covers every byte; nothing is ever unknown
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "model_max_length": self.model_max_length if self.model_max_length is not None else _VERY_LARGE_INTEGER,
            "clean_up_tokenization_spaces": False,  # "cleanup" rewrites " ." etc. and breaks the round trip
            "added_tokens_decoder": {
                str(i): {
                    "content": t.content,
                    "lstrip": t.lstrip,
                    "normalized": t.normalized,
                    "rstrip": t.rstrip,
                    "single_word": t.single_word,
                    "special": t.special,
                }
                for i, t in sorted(added.items())
            },
            "additional_special_tokens": additional,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        config[_CONFIG_KEY] = {"eot_token": self.eot_token, "extra_eos_tokens": self.extra_eos_tokens}
        special_map: dict[str, Any] = {k: v for k, v in named.items() if v is not None}
        special_map["additional_special_tokens"] = additional

        atomic_write_text(d / "tokenizer.json", self.backend.to_str(pretty=True))
        atomic_write_json(d / "tokenizer_config.json", config)
        atomic_write_json(d / "special_tokens_map.json", special_map)
        template_file = d / "chat_template.jinja"
        if self.chat_template is not None:
            atomic_write_text(template_file, self.chat_template)
        elif template_file.exists():
            template_file.unlink()  # a stale template from an earlier save would win on load

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Load a directory written by `save` or by `transformers` (tokenizer.json required).

        The chat template comes from chat_template.jinja if present, else tokenizer_config.json's
        "chat_template". Without a tokenizer_config.json the lmforge defaults are used for whichever
        special tokens the vocabulary has.
        """
        d = Path(directory)
        if not d.is_dir():
            raise UserError(f"tokenizer directory {d} does not exist")
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise UserError(f"no tokenizer.json in {d}; expected a tokenizer saved by lmforge or transformers")
        try:
            tk = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:  # the Rust side raises plain Exception for bad JSON / unknown components
            raise UserError(f"{tj} is not a valid tokenizer file: {one_line(e)}") from None

        def read_json(name: str) -> dict | None:
            return read_json_object(d / name) if (d / name).is_file() else None

        config = read_json("tokenizer_config.json")
        special_map = read_json("special_tokens_map.json") or {}
        kwargs: dict[str, Any] = {}
        if config is None and not special_map:
            defaults = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": PAD, "eot_token": IM_END}
            for k, v in defaults.items():
                kwargs[k] = v if tk.token_to_id(v) is not None else None
            config = {}
        else:
            config = config or {}
            for k in ("bos_token", "eos_token", "pad_token"):
                kwargs[k] = _token_str(config[k] if k in config else special_map.get(k))
            ours = config.get(_CONFIG_KEY)
            if isinstance(ours, Mapping):
                kwargs["eot_token"] = _token_str(ours.get("eot_token"))
                extra = ours.get("extra_eos_tokens") or []
                kwargs["extra_eos_tokens"] = [t for t in (_token_str(x) for x in extra) if t is not None]
            else:  # a foreign tokenizer: use ChatML's end of turn if it has one
                kwargs["eot_token"] = IM_END if tk.token_to_id(IM_END) is not None else None
        # Like transformers 5, tokenizer.json's post-processor decides (tokenizer_config's add_bos_token is
        # ignored when a tokenizer.json exists): see the module docstring.
        bos = kwargs["bos_token"]
        kwargs["add_bos"] = _backend_adds_bos(tk, None if bos is None else tk.token_to_id(bos))
        mml = config.get("model_max_length")
        kwargs["model_max_length"] = mml if isinstance(mml, int) and 0 < mml < 10**18 else None

        template_file = d / "chat_template.jinja"
        template = config.get("chat_template")
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        elif isinstance(template, list):  # transformers' named templates: [{"name": ..., "template": ...}]
            named_templates = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named_templates.get("default")
        if template is not None and not isinstance(template, str):
            raise UserError(f"the chat_template in {d / 'tokenizer_config.json'} is not a string")
        kwargs["chat_template"] = template
        return cls(tk, **kwargs)


def load_hf_tokenizer(model_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model directory (ours or one saved by transformers), as transformers uses it.

    `Tokenizer.load` (which gives plain text the BOS transformers would add), plus the EOS ids generation
    stops on: generation_config.json's ``eos_token_id`` (an int or a list; e.g. Llama-3 Instruct lists
    128001, 128008 and 128009, while its tokenizer's eos_token is only <|eot_id|>), or config.json's when
    the generation config gives none, as transformers falls back to it.
    """
    tok = Tokenizer.load(model_dir)
    d = Path(model_dir)
    for name in ("generation_config.json", "config.json"):
        p = d / name
        if not p.is_file():
            continue
        eos = read_json_object(p).get("eos_token_id")
        if eos is None:
            continue
        ids = eos if isinstance(eos, list) else [eos]
        try:
            return tok.with_extra_eos_ids(ids)
        except UserError as e:
            raise UserError(f"{p}: {e}") from None
    return tok
