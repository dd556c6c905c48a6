"""Tokenizer <-> `tokenizer.*` metadata: rebuilds an lmforge `Tokenizer` from a GGUF vocabulary (`gpt2`:
byte-level BPE with a named pre-tokenizer; `llama`: SentencePiece BPE rebuilt as a byte-fallback BPE, as
transformers does) with its special-token roles, BOS policy and chat template; and, for export, turns a
byte-level BPE tokenizer back into llama.cpp's tokens / token types / merges, and a SentencePiece-style one
(that rebuilt BPE, or transformers' legacy Llama / Gemma tokenizer.json) into a `llama` vocabulary whose
scores follow its merge order.

The rebuilt tokenizers aim at llama.cpp's ids and text, not only transformers': tests/loaders/gguf/
test_gguf_vs_llamacpp.py (and bench/tokenizer_vs_llamacpp.py) compare both kinds with llama.cpp's own
tokenizer on GGUFs made by its converter. The differences left on purpose: Qwen2's NFC normalization is
kept (the original tokenizer has it, llama.cpp skips it: only decomposed text gets other ids), byte-level
BPE decode is exact (llama.cpp's runs transformers' lossy clean-up of " ," and " 's"), and UNUSED "[PADn]"
fillers decode as their text (llama.cpp prints nothing for them).

A module of its own because the tokenizer shares nothing with the weights but the vocabulary size, and is
the part most likely to grow (new pre-tokenizer names).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.loaders.gguf.reader import is_int, meta, short
from lmforge.tokenizer import SPLIT_PATTERN, Tokenizer


# tokenizer.ggml.token_type values
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


# ---------------------------------------------------------------------------------------------------
# Tokenizer from metadata
# ---------------------------------------------------------------------------------------------------
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre name -> our pipeline. The first name of each group is what the writer emits.
_PRE_ALIASES = {"llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "qwen2": "qwen2",
                "deepseek-r1-qwen": "qwen2", "gpt-2": "gpt2", "default": "gpt2", "smollm": "smollm"}
_PRE_EXPORT_NAME = {"llama3": "llama-bpe", "qwen2": "qwen2", "gpt2": "gpt-2", "smollm": "smollm"}
_EOT_TEXTS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def _pipeline(kind: str) -> tuple[Any, Any]:
    """(normalizer, pre_tokenizer) of a byte-level BPE family, as in the original tokenizer.json files."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    def split(pattern: str) -> Any:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

    if kind == "llama3":
        return None, split(SPLIT_PATTERN)
    if kind == "qwen2":
        return normalizers.NFC(), split(_QWEN2_SPLIT)
    if kind == "smollm":
        return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _token_list(path: str, metadata: dict[str, Any]) -> tuple[list[str], list[int]]:
    tokens = meta(path, metadata, "tokenizer.ggml.tokens", "list")
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise UserError(f"{path}: tokenizer.ggml.tokens should be a non-empty list of strings")
    types = meta(path, metadata, "tokenizer.ggml.token_type", "list", None)
    if types is None:
        types = [_NORMAL] * len(tokens)
    if len(types) != len(tokens) or not all(is_int(t) for t in types):
        raise UserError(f"{path}: tokenizer.ggml.token_type should hold one integer per token")
    return tokens, types


def _special_token(path: str, metadata: dict[str, Any], key: str, tokens: list[str]) -> str | None:
    i = meta(path, metadata, f"tokenizer.ggml.{key}", "int", None)
    if i is None:
        return None
    if not 0 <= i < len(tokens):
        raise UserError(f"{path}: tokenizer.ggml.{key} = {i} is outside the vocabulary of {len(tokens)} tokens")
    return tokens[i]


def _add_special_tokens(tk: Any, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens (matched in raw text, skipped by skip_special_tokens);
    user-defined ones become ordinary added tokens. Both keep their ids (they are in the vocabulary)."""
    from tokenizers import AddedToken

    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    if control:
        tk.add_special_tokens(control)
    if user:
        tk.add_tokens(user)


def _bpe_backend(path: str, metadata: dict[str, Any], tokens: list[str], types: list[int]) -> tuple[Any, str]:
    """A byte-level BPE `tokenizers.Tokenizer` from tokens + merges + the pre-tokenizer name, and our name of
    that pre-tokenizer ("llama3", "qwen2", "gpt2", "smollm")."""
    import tokenizers
    from tokenizers import decoders, models

    pre = meta(path, metadata, "tokenizer.ggml.pre", "str", None)
    if pre is None:
        warnings.warn(f"{path}: no tokenizer.ggml.pre; using GPT-2's pre-tokenizer as llama.cpp does "
                      f"(text may be split differently from the original tokenizer)", stacklevel=3)
        pre = "default"
    if pre not in _PRE_ALIASES:
        raise UserError(f"{path}: tokenizer.ggml.pre {short(pre)} is not supported; supported: {', '.join(_PRE_ALIASES)}")
    kind = _PRE_ALIASES[pre]
    merges = []
    for m in meta(path, metadata, "tokenizer.ggml.merges", "list", []):
        pair = m.split(" ") if isinstance(m, str) else []
        if len(pair) != 2:
            raise UserError(f"{path}: tokenizer.ggml.merges holds {short(m)}, not a pair \"a b\"")
        merges.append((pair[0], pair[1]))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated token string keeps its first id
    try:
        # Llama 3 (in transformers and llama.cpp alike) takes a word that is itself a token whole.
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=kind == "llama3")
    except Exception as e:  # the Rust side raises plain Exception for merges of unknown tokens
        raise UserError(f"{path}: the tokenizer's merges do not fit its tokens: {short(' '.join(str(e).split()), 120, repr_=False)}") from None
    tk = tokenizers.Tokenizer(model)
    tk.normalizer, tk.pre_tokenizer = _pipeline(kind)
    tk.decoder = decoders.ByteLevel()
    _add_special_tokens(tk, tokens, types)
    return tk, kind


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece BPE vocabulary: SentencePiece joins the adjacent pair
    whose joined piece has the highest score, so every split of a normal piece into two pieces that exist
    is a merge, ranked by the joined piece's score (ties: lower ids first). Pieces of equal score are the
    one place this can differ from llama.cpp, which joins the leftmost such pair first; SentencePiece BPE
    models give every normal piece its own score, so trained vocabularies never have such ties."""
    ids = {}
    for i, t in enumerate(tokens):
        if types[i] == _NORMAL:
            ids.setdefault(t, i)
    found = []
    for piece, i in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                found.append((-scores[i], i, ids[left], ids[right], left, right))
    found.sort()
    return [(f[4], f[5]) for f in found]


def _spm_backend(path: str, metadata: dict[str, Any], tokens: list[str], types: list[int]) -> Any:
    """A SentencePiece BPE vocabulary (Llama 2, Mistral, TinyLlama, Gemma GGUFs) as a `tokenizers` BPE with
    byte fallback, built to give llama.cpp's ids and text (tests/loaders/gguf/test_gguf_vs_llamacpp.py
    compares them on files made by llama.cpp's converter):

    * normalizer: spaces become "▁" (only spaces: tabs and newlines stay, as llama.cpp escapes them), and
      a "▁" goes in front unless tokenizer.ggml.add_space_prefix is false. Added tokens are matched in the
      raw text first and each stretch of text between them is normalized on its own, so text after a
      special token gets its "▁" too, as llama.cpp prefixes a space after every special fragment;
    * no pre-tokenizer: SentencePiece (and llama.cpp) merge across the whole text, spaces included;
    * model: merges ranked by the joined piece's score (`_spm_merges`); characters that are no piece fall
      back to their UTF-8 bytes' <0xXX> tokens;
    * decoder: "▁" back to a space, <0xXX> pieces to bytes, and the first space of the text dropped when
      the encoder added one; `Tokenizer.token_bytes` reads pieces the same way for streaming, keeping that
      space (llama.cpp prints it too: it is a real space in the middle of a text);
    * control and unknown tokens are special added tokens (matched in text only when special tokens are
      allowed, skipped by skip_special_tokens), user-defined ones always-matched plain added tokens.

    This is also what transformers builds from the same vocabulary (its "legacy" Llama tokenizer)."""
    import tokenizers
    from tokenizers import decoders, models, normalizers

    scores = meta(path, metadata, "tokenizer.ggml.scores", "list")
    if len(scores) != len(tokens) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise UserError(f"{path}: tokenizer.ggml.scores should hold one number per token")
    unk = _special_token(path, metadata, "unknown_token_id", tokens)
    if unk is None:
        unk = next((t for t, k in zip(tokens, types) if k == _UNKNOWN), None)
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    try:
        model = models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types), unk_token=unk,
                           fuse_unk=True, byte_fallback=True)
    except Exception as e:
        raise UserError(f"{path}: cannot build the SentencePiece tokenizer: {short(' '.join(str(e).split()), 120, repr_=False)}") from None
    tk = tokenizers.Tokenizer(model)
    steps = [normalizers.Replace(" ", "▁")]
    if meta(path, metadata, "tokenizer.ggml.add_space_prefix", "bool", True):
        steps.insert(0, normalizers.Prepend("▁"))
    tk.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta(path, metadata, "tokenizer.ggml.add_space_prefix", "bool", True):
        dec.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(dec)
    _add_special_tokens(tk, tokens, [_CONTROL if k == _UNKNOWN else k for k in types])
    return tk


def tokenizer_from_metadata(path: str, metadata: dict[str, Any]) -> Tokenizer:
    """lmforge `Tokenizer` from the tokenizer.* metadata: vocabulary, merges, special-token roles, BOS
    policy and chat template."""
    model = meta(path, metadata, "tokenizer.ggml.model", "str")
    tokens, types = _token_list(path, metadata)
    if model == "gpt2":
        tk, kind = _bpe_backend(path, metadata, tokens, types)
        # Without the key llama.cpp adds a BOS for Llama 3's pre-tokenizer (Llama 3 files made before the
        # converter wrote the key need it) and none for the other BPE ones.
        add_bos_default = kind == "llama3"
    elif model == "llama":
        tk = _spm_backend(path, metadata, tokens, types)
        add_bos_default = True  # SentencePiece Llama models always started with <s> (llama.cpp's default too)
    else:
        raise UserError(f"{path}: tokenizer model {short(model)} is not supported (supported: gpt2, llama)")

    def role(key: str) -> str | None:
        return _special_token(path, metadata, key, tokens)

    eot = role("eot_token_id")
    if eot is None:  # llama.cpp also recognises the end-of-turn token by its text
        eot = next((t for t, k in zip(tokens, types) if k == _CONTROL and t in _EOT_TEXTS), None)
    eom = role("eom_token_id")
    template = meta(path, metadata, "tokenizer.chat_template", "str", None)
    add_bos = meta(path, metadata, "tokenizer.ggml.add_bos_token", "bool", add_bos_default)
    try:
        return Tokenizer(tk, chat_template=template, bos_token=role("bos_token_id"), eos_token=role("eos_token_id"),
                         eot_token=eot, pad_token=role("padding_token_id"), add_bos=add_bos,
                         extra_eos_tokens=[eom] if eom is not None else [])
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------------
# Tokenizer to metadata (export)
# ---------------------------------------------------------------------------------------------------
def _plain(obj: Any) -> Any:
    """A tokenizer component's JSON without fields that never change ids (offsets trimming)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if k != "trim_offsets"}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _component_json(normalizer: Any, pre_tokenizer: Any) -> tuple[Any, Any]:
    import tokenizers
    from tokenizers import models

    tk = tokenizers.Tokenizer(models.BPE())
    tk.normalizer, tk.pre_tokenizer = normalizer, pre_tokenizer
    j = json.loads(tk.to_str())
    return _plain(j["normalizer"]), _plain(j["pre_tokenizer"])


def _export_pre_name(tok: Tokenizer) -> tuple[str, dict[str, Any]]:
    """(tokenizer.ggml.pre name, the backend's JSON) for a byte-level BPE tokenizer llama.cpp knows."""
    j = json.loads(tok.backend.to_str())
    model, dec = j.get("model") or {}, j.get("decoder") or {}
    if model.get("type") != "BPE" or dec.get("type") != "ByteLevel" or model.get("byte_fallback") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UserError("GGUF export supports byte-level BPE tokenizers (like lmforge's own) and SentencePiece-"
                        "style byte-fallback ones (Llama 2, Gemma); this one is "
                        f"{model.get('type')} with a {dec.get('type')} decoder")
    ours = (_plain(j.get("normalizer")), _plain(j.get("pre_tokenizer")))
    for kind, name in _PRE_EXPORT_NAME.items():
        norm, pre = _component_json(*_pipeline(kind))
        if ours[1] == pre and ours[0] in (norm, None):
            return name, j
    raise UserError("GGUF export: the tokenizer's pre-tokenizer matches none llama.cpp knows "
                    f"({', '.join(_PRE_EXPORT_NAME.values())})")


def _spm_components(add_space_prefix: bool) -> tuple[Any, Any]:
    """(normalizer, decoder) JSON of the byte-fallback BPE `_spm_backend` builds from a `llama` vocabulary."""
    import tokenizers
    from tokenizers import decoders, models, normalizers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.normalizer = normalizers.Sequence([*([normalizers.Prepend("▁")] if add_space_prefix else []),
                                          normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    *([decoders.Strip(" ", 1, 0)] if add_space_prefix else [])])
    j = json.loads(tk.to_str())
    return _plain(j["normalizer"]), _plain(j["decoder"])


def _spm_prefix(j: dict[str, Any]) -> bool | None:
    """For a SentencePiece-style tokenizer (byte-fallback BPE over "▁"-joined text, as `_spm_backend` builds
    from a `llama` GGUF vocabulary and transformers' legacy Llama / Gemma tokenizers are): whether it puts a
    "▁" in front (llama.cpp's add_space_prefix). None for any other tokenizer."""
    model, pre, norm = j.get("model") or {}, j.get("pre_tokenizer"), _plain(j.get("normalizer"))
    # Gemma's files split on " " after a normalizer that left no space: a split that never splits
    no_op = pre is None or (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "})
    if model.get("type") != "BPE" or not model.get("byte_fallback") or not no_op:
        return None
    if isinstance(norm, dict) and norm.get("type") != "Sequence":  # one step, not in a Sequence (Gemma)
        norm = {"type": "Sequence", "normalizers": [norm]}
    for prefix in (True, False):
        if (norm, _plain(j.get("decoder"))) == _spm_components(prefix):
            return prefix
    return None


def _spm_scores(tokens: list[str], types: list[int], merges: list[str]) -> list[float]:
    """Scores for a `llama` vocabulary that make llama.cpp (and `_spm_merges` on reading it back) join pieces
    in the BPE's merge order: SentencePiece joins the pair whose joined piece scores highest, so each normal
    piece scores minus the rank of the first merge that makes it. Pieces no merge makes (single characters,
    which are never joined into, and bytes) score below every merge."""
    first: dict[str, int] = {}
    for rank, m in enumerate(merges):
        left, _, right = m.partition(" ")
        first.setdefault(left + right, rank)
    floor = -float(len(merges) + 1)
    return [-float(first[t]) if k == _NORMAL and t in first else floor for t, k in zip(tokens, types)]


def export_vocab(cfg: ModelConfig, tok: Tokenizer) -> dict[str, Any]:
    """tokens / token types / merges (or, for a SentencePiece-style tokenizer, scores) in llama.cpp's form,
    padded to the model's vocab_size."""
    j = json.loads(tok.backend.to_str())
    prefix = _spm_prefix(j)
    pre, j = ("default", j) if prefix is not None else _export_pre_name(tok)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"GGUF export: the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}")
    added = tok.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        t = tok.backend.id_to_token(i)
        if t is None:  # holes and the model's spare rows, as llama.cpp's converter fills them
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        else:
            tokens.append(t)
            types.append((_CONTROL if added[i].special else _USER_DEFINED) if i in added else _NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"].get("merges", [])]
    if prefix is None:
        return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "merges": merges}
    unk = j["model"].get("unk_token")
    # bytes, the unknown piece, and the converter's "[PADn]" fillers read back from a GGUF (UNUSED again)
    types = [_BYTE if k == _NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">")
             else _UNUSED if k == _NORMAL and t == f"[PAD{i}]"
             else _UNKNOWN if t == unk and k != _UNUSED else k for i, (t, k) in enumerate(zip(tokens, types))]
    return {"model": "llama", "pre": pre, "tokens": tokens, "types": types, "merges": [],
            "scores": _spm_scores(tokens, types, merges), "add_space_prefix": prefix,
            "unk": tokens.index(unk) if unk in tokens else None}


def add_tokenizer(w: Any, tok: Tokenizer, vocab: dict[str, Any], eos_token_ids: list[int] | None) -> None:
    """tokenizer.* keys. GGUF has one EOS and one EOT id: eos_token_ids[0] (or the tokenizer's EOS) and the
    tokenizer's end-of-turn token (or eos_token_ids[1]); further ids have no key to go to."""
    eos_ids = list(eos_token_ids or [])
    eos = eos_ids[0] if eos_ids else tok.eos_id
    eot = tok.eot_id if tok.eot_id is not None else next((i for i in eos_ids[1:] if i != eos), None)
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab["merges"]:
        w.add_token_merges(vocab["merges"])
    if vocab["model"] == "llama":
        w.add_token_scores(vocab["scores"])
        w.add_add_space_prefix(vocab["add_space_prefix"])
        if vocab["unk"] is not None:
            w.add_unk_token_id(vocab["unk"])
    for add, i in ((w.add_bos_token_id, tok.bos_id), (w.add_eos_token_id, eos), (w.add_eot_token_id, eot),
                   (w.add_pad_token_id, tok.pad_id)):
        if i is not None:
            add(int(i))
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
