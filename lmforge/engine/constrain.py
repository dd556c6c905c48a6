"""Structured output: a grammar that decides, token by token, which ids the sampler may pick.

A `Grammar` is what a request asks for (OpenAI's `response_format`, Ollama's `format`, llama.cpp's
`grammar`, a forced tool call); a `Constraint` is one sequence's progress through it. The grammar engine is
llguidance (a maintained Rust library: JSON Schema, Lark and GBNF, an Earley parser over a token trie), never
a hand-written one here.

Why this design
---------------
* **Validated where the request arrives, compiled once, copied per row.** The constructors check the
  grammar's syntax and features without a tokenizer, so a request handler can refuse a bad one with a 400
  before any model work (the server runs them on its worker pool: an 80 KB GBNF takes a quarter second).
  `check(tokenizer)` compiles it against the model's vocabulary and attaches the compiled matcher to that
  `Grammar` object; each sequence then starts from a `deep_copy` of it, which is cheap and cannot fail. So
  in the server, which checks every grammar in the request's handler, nothing is compiled on the
  scheduler's thread, however many grammars are in use. A small LRU keyed by the grammar's text only saves
  the next request with the same grammar the compile. A grammar never checked is compiled by its first
  `constraint()` (the CLI, which has no scheduler).
* **A grammar fails its own sequence, never its neighbours.** A `Constraint` that cannot be made (compiling
  an unchecked grammar fails) becomes a `FailedConstraint`, whose first mask raises the error: the row
  ends with it where every row's sampling errors end (`generate.SequenceState`), not in the batch's
  prefill that other requests share.
* **One `LLTokenizer` per tokenizer**, built from our own `token_bytes` (so byte-level and SentencePiece
  vocabularies both work) and cached weakly by tokenizer object. Special tokens are marked as special, so a
  JSON string can never contain `<|im_end|>`.
* **The mask is a filter like the others** (`sampling.py`): a disallowed token's logit becomes -inf before
  penalties, temperature and top-k/p, so it has probability exactly 0 and the truncation filters work on
  the distribution that can actually be sampled. Log-probabilities stay those of the raw model (as every
  other filter leaves them), so a constrained token's reported logprob says how likely the *model* found it.
* **The grammar ends the sequence.** When the grammar accepts, the tokenizer's EOS ids are allowed; when
  nothing more can follow (the closing `}` of a JSON object), the sequence stops there with finish reason
  "stop", without spending a step on an EOS token.
* **Bounded work for untrusted grammars**: llguidance's own limits (`LLParserLimits`: grammar size, lexer
  states, Earley items and lexer fuel per token) apply; a grammar that trips one mid-generation ends that
  sequence with a `GrammarError`, never the others.

JSON defaults: no free whitespace between tokens (a JSON value cannot be padded with endless newlines by a
wandering model) and the separators `", "` and `": "`, as `json.dumps` writes them. A schema may change
these with llguidance's `"x-guidance"` object. `strict` follows OpenAI's structured outputs: an object
schema that does not say otherwise allows no properties beyond its `properties`.
"""

from __future__ import annotations

import collections
import copy
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import llguidance
from llguidance import gbnf_to_lark as _gbnf
import numpy as np
import torch

__all__ = ["Grammar", "GrammarError", "Constraint", "FailedConstraint", "JSON_DEFAULTS", "apply_constraints",
           "closed_schema"]

COMPILED_CACHE = 32  # compiled grammars kept (per process): a server's recurring schemas stay hot
VALIDATED_CACHE = 256  # llguidance's verdicts on grammar texts (small strings; the keys are the texts)
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# llguidance's defaults are sized for servers; only the error text is made short (no parser dumps).
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)


class GrammarError(ValueError):
    """A grammar that cannot be used: a syntax error, an unsupported feature, a broken reference, or a
    resource limit hit. The message is one line naming what is wrong."""


def _one_line(message: str) -> str:
    """llguidance's message made one line, its "Unimplemented keys" named as the feature a user looks for."""
    text = message.strip()
    m = re.search(r'Unimplemented keys: \[([^\]]*)\]', text)
    if m:
        keys = [k.strip().strip('"') for k in m.group(1).split(",") if k.strip()]
        word = "keyword" if len(keys) == 1 else "keywords"
        return f"unsupported {word} " + ", ".join(f"'{k}'" for k in keys)
    # llguidance adds indented excerpts of the grammar with a caret under the place; the position is already
    # in the message ("1(12): ..."), so the unindented lines are kept, joined into one
    kept = [line.strip() for line in text.splitlines() if line.strip() and not line[:1].isspace()]
    line = " ".join(kept) or "invalid grammar"
    line = re.sub(r"^(?:at )?(\d+)\((\d+)\):", r"line \1, column \2:", line)
    return line[:300]


@dataclass(frozen=True)
class Grammar:
    """An immutable, validated grammar. Build one with `json_object()`, `json_schema(...)`, `lark(...)` or
    `gbnf(...)`; equal texts give equal (and hashable) grammars. `spec` is llguidance's grammar text."""

    kind: str  # "json_object" | "json_schema" | "lark" | "gbnf"
    spec: str
    # what check() compiled, per llguidance tokenizer: id -> (that tokenizer, never-advanced matcher). Not part
    # of the value: two equal grammars are equal whether or not they were checked.
    _bound: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __repr__(self) -> str:
        return f"Grammar.{self.kind}(<{len(self.spec)} chars>)"

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's `json_object` mode, Ollama's `format: "json"`)."""
        return cls._from_schema("json_object", {"type": "object"})

    @classmethod
    def json_schema(cls, schema: dict, *, strict: bool = False) -> Grammar:
        """A JSON value valid under `schema` (JSON Schema; see llguidance's docs for what it covers). With
        `strict`, objects allow no properties beyond their `properties` unless the schema says otherwise."""
        if not isinstance(schema, dict):
            raise GrammarError(f"the schema must be a JSON object, got {type(schema).__name__}")
        if strict:
            schema = closed_schema(copy.deepcopy(schema))
        return cls._from_schema("json_schema", schema)

    @classmethod
    def lark(cls, text: str) -> Grammar:
        """A Lark grammar in llguidance's dialect (`start: ...`; `%json {...}` embeds a JSON schema;
        `<|name|>` is a special token)."""
        if not isinstance(text, str) or not text.strip():
            raise GrammarError("the grammar is empty")
        return cls._validated("lark", llguidance.LLMatcher.grammar_from_lark(text))

    @classmethod
    def gbnf(cls, text: str) -> Grammar:
        """A llama.cpp GBNF grammar (`root ::= ...`), converted to Lark by llguidance's converter."""
        if not isinstance(text, str) or not text.strip():
            raise GrammarError("the grammar is empty")
        try:
            lark = _gbnf.gbnf_to_lark(text)
        except Exception as e:  # the converter's own errors, and anything a hostile text provokes in it
            raise GrammarError(f"GBNF syntax error: {_one_line(str(e))}") from None
        return cls._validated("gbnf", llguidance.LLMatcher.grammar_from_lark(lark))

    @classmethod
    def from_text(cls, text: str) -> Grammar:
        """A grammar written either way, as llama.cpp's `grammar` field takes it: Lark when it has a `start:`
        rule (or `%llguidance`), GBNF otherwise."""
        if isinstance(text, str) and _gbnf.is_lark_syntax(text):
            return cls.lark(text)
        return cls.gbnf(text)

    @classmethod
    def _from_schema(cls, kind: str, schema: dict) -> Grammar:
        try:
            spec = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        except (ValueError, TypeError) as e:
            raise GrammarError(_one_line(str(e))) from None
        return cls._validated(kind, spec)

    @classmethod
    def _validated(cls, kind: str, spec: str) -> Grammar:
        with _lock:
            error = _validated_cache.get(spec)
        if error is None:  # a server sees the same few schemas again and again: validate each once
            error = llguidance.LLMatcher.validate_grammar(spec, None, limits=_LIMITS)
            with _lock:
                _validated_cache[spec] = error
                while len(_validated_cache) > VALIDATED_CACHE:
                    _validated_cache.popitem(last=False)
        if error and not error.startswith("WARNING"):
            raise GrammarError(_one_line(error))
        return cls(kind, spec)

    # -- against a tokenizer -----------------------------------------------------------------------
    def check(self, tokenizer) -> None:
        """Compile against `tokenizer`'s vocabulary (raising GrammarError, e.g. for a special token it does
        not have) and attach the result to this object, for the sequences that will use it (`constraint`
        then only copies it). Call it where slow work may happen: the server's worker pool."""
        lltok = _lltokenizer(tokenizer)
        with _lock:
            if id(lltok) in self._bound:
                return
        matcher = _compiled(lltok, self.spec)
        with _lock:
            self._bound[id(lltok)] = (lltok, matcher)

    def constraint(self, tokenizer) -> Constraint:
        """A fresh matcher for one sequence: a copy of what `check` attached, else compiled now (through
        the LRU)."""
        lltok = _lltokenizer(tokenizer)
        with _lock:
            bound = self._bound.get(id(lltok))
        matcher = bound[1] if bound is not None else _compiled(lltok, self.spec)
        return Constraint(matcher.deep_copy(), tokenizer.vocab_size, lltok.vocab_size, lltok.eos_tokens)


_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_NOT_SCHEMAS = frozenset({"const", "enum", "default", "examples", "x-guidance"})  # data and options, not schemas


def closed_schema(schema: Any) -> Any:
    """`schema` (changed in place) with `additionalProperties: false` on every object schema that does not set it (OpenAI's
    strict mode), walking every nested schema (properties, items, $defs, anyOf...) but never data (`const`,
    `enum`, `default`, `examples`: an object there is a value, not a schema)."""
    if isinstance(schema, list):
        for item in schema:
            closed_schema(item)
    elif isinstance(schema, dict):
        for key, value in schema.items():
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                for sub in value.values():
                    closed_schema(sub)
            elif key not in _NOT_SCHEMAS:
                closed_schema(value)
        types = schema.get("type")
        is_object = types == "object" or (isinstance(types, list) and "object" in types)
        if "additionalProperties" not in schema and ("properties" in schema or is_object):
            schema["additionalProperties"] = False
    return schema


class Constraint:
    """One sequence's place in its grammar: the mask of the ids that may come next, and `advance(token)`.
    `done` is true once nothing more may follow (the sequence ends there)."""

    __slots__ = ("matcher", "vocab", "eos", "_bits")

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int, ll_vocab: int, eos: Sequence[int]) -> None:
        if matcher.is_error():
            raise GrammarError(_one_line(matcher.get_error()))
        self.matcher, self.vocab, self.eos = matcher, vocab, frozenset(eos)
        # one bit per id of llguidance's vocabulary (which may hold one virtual EOS id past ours)
        self._bits = torch.zeros(1, (ll_vocab + 31) // 32, dtype=torch.int32)

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the ids the grammar allows next (EOS among them when it accepts here)."""
        return torch.from_numpy(self._allowed())

    def _allowed(self) -> np.ndarray:
        bits = self._bits
        self.matcher.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * bits.element_size())
        if self.matcher.is_error():
            raise GrammarError(f"the grammar failed: {_one_line(self.matcher.get_error())}")
        return np.unpackbits(bits.numpy().view(np.uint8), bitorder="little")[:self.vocab].view(np.bool_)

    def advance(self, token: int) -> None:
        """Move past `token` (one the mask allowed); a token the grammar refuses is a bug upstream."""
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} does not fit the grammar: {_one_line(self.matcher.get_error())}")


class FailedConstraint:
    """The place of a sequence whose grammar could not be started: it allows nothing, and its first mask
    (or step) raises `error`, so the error ends that sequence where sampling errors do, one row only."""

    __slots__ = ("error", "vocab", "eos")

    def __init__(self, error: Exception) -> None:
        self.error, self.vocab, self.eos = error, 0, frozenset()

    @property
    def done(self) -> bool:
        return False

    def allowed(self) -> torch.Tensor:
        raise self.error

    def _allowed(self) -> np.ndarray:
        raise self.error

    def advance(self, token: int) -> None:
        raise self.error


def apply_constraints(logits: torch.Tensor, constraints: Sequence[Constraint | None]) -> torch.Tensor:
    """`logits` (B, V) with every id its row's constraint disallows set to -inf (a new tensor; rows whose
    constraint is None, or done, are unchanged). Ids past the tokenizer's vocabulary are never allowed on a
    constrained row."""
    rows = [b for b, c in enumerate(constraints) if c is not None and not c.done]
    if not rows:
        return logits
    out = logits.detach().clone()  # sampling never backpropagates; numpy needs a tensor outside autograd
    for b in rows:
        c = constraints[b]
        n = min(c.vocab, out.shape[-1])
        banned = ~c._allowed()[:n]
        if out.device.type == "cpu" and out.dtype == torch.float32:
            # in place through numpy: a third of torch's masked_fill on a 150k-entry row (measured)
            np.copyto(out[b, :n].numpy(), -np.inf, where=banned)
        else:
            out[b, :n].masked_fill_(torch.from_numpy(banned).to(out.device), float("-inf"))
        out[b, n:] = float("-inf")
    return out


# -- caches -------------------------------------------------------------------------------------------
_lock = threading.Lock()
_lltokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_validated_cache: collections.OrderedDict[str, str] = collections.OrderedDict()  # spec -> llguidance's verdict
_compiled_cache: collections.OrderedDict[tuple[int, str], tuple[Any, Any]] = collections.OrderedDict()


class _Vocab:
    """What `llguidance.TokenizerWrapper` reads from a tokenizer: every id's bytes, the special ids, and an
    encoder (used only to tokenize forced text)."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        n = tokenizer.vocab_size
        eos = list(getattr(tokenizer, "eos_ids", []) or [])
        self.eos_token_id = eos[0] if eos else n  # no EOS: a virtual id past the vocabulary, never sampled
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(n)] + ([] if eos else [b""])
        backend = getattr(tokenizer, "backend", None)
        added = backend.get_added_tokens_decoder() if backend is not None else {}
        self.special_token_ids = sorted(i for i, t in added.items() if t.special)

    def __call__(self, text: str) -> list[int]:
        # str only: TokenizerWrapper probes with bytes and, refused, passes text, so llguidance itself deals
        # with bytes that are not whole UTF-8 characters (decoding them here would invent U+FFFD tokens)
        if not isinstance(text, str):
            raise TypeError("text only")
        return self._tok.encode(text, add_bos=False, allow_special=False)


def _lltokenizer(tokenizer) -> llguidance.LLTokenizer:
    """The llguidance tokenizer for `tokenizer`, built once (it indexes every token in a trie)."""
    with _lock:
        found = _lltokenizers.get(tokenizer)
    if found is not None:
        return found
    eos = list(getattr(tokenizer, "eos_ids", []) or []) or [tokenizer.vocab_size]
    vocab = _Vocab(tokenizer)
    built = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab), n_vocab=len(vocab.tokens), eos_token=eos)
    with _lock:
        return _lltokenizers.setdefault(tokenizer, built)


def _compiled(lltok: llguidance.LLTokenizer, spec: str) -> llguidance.LLMatcher:
    """A never-advanced matcher for `spec` over `lltok`, from the LRU (compiled on a miss)."""
    key = (id(lltok), spec)
    with _lock:
        hit = _compiled_cache.get(key)
        if hit is not None:
            _compiled_cache.move_to_end(key)
            return hit[1]
    matcher = llguidance.LLMatcher(lltok, spec, log_level=0, limits=_LIMITS)
    if matcher.is_error():
        raise GrammarError(_one_line(matcher.get_error()))
    with _lock:
        _compiled_cache[key] = (lltok, matcher)  # the tokenizer is kept alive with it, so its id stays unique
        while len(_compiled_cache) > COMPILED_CACHE:
            _compiled_cache.popitem(last=False)
    return matcher
