"""Load a Hugging Face `BertModel` directory (optionally a sentence-transformers one) as our `Encoder`.

Why a separate loader: retrieval (issue 15) embeds text with small BERT-family models, which share no
tensor names with the decoder families in `lmforge.loaders.hf`. The map below is explicit, name for name,
and every tensor the encoder needs must be present with the right shape; a missing or misshaped one is a
`UserError`, never a silently random weight. We read only `model.safetensors` (a pickle can run code, so
`pytorch_model.bin` alone is refused) and only `model_type: "bert"` (another architecture would load and
compute garbage). Pooling and normalisation follow sentence-transformers' own files when present
(`1_Pooling/config.json`, `modules.json`); without them we default to mean pooling + L2 normalisation, the
setting of the common retrieval models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import UserError, one_line
from lmforge.model.bert import Encoder, EncoderConfig

__all__ = ["embed_texts", "encoder_config", "load_encoder", "tensor_map"]

_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id")


def _read_json(f: Path, kind: type = dict) -> Any:
    """`f`'s JSON, which must be a `kind` (an object, or a list for modules.json); else one line."""
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{f}: not readable JSON ({one_line(e)})") from None
    if not isinstance(data, kind):
        raise UserError(f"{f}: expected a JSON {'object' if kind is dict else 'list of modules'}")
    return data


def _pooling(d: Path) -> tuple[str, bool]:
    """(pooling, normalize) from sentence-transformers' files; mean + normalise when they are absent."""
    pooling, normalize = "mean", True
    pool_file = d / "1_Pooling" / "config.json"
    modules_file = d / "modules.json"
    if pool_file.is_file():
        pc = _read_json(pool_file)
        modes = sorted(k for k, v in pc.items() if k.startswith("pooling_mode") and v)
        if len(modes) > 1:  # sentence-transformers concatenates them: a vector we do not compute
            raise UserError(f"{pool_file}: several pooling modes {modes} are not supported (one of mean or cls)")
        if pc.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif pc.get("pooling_mode_mean_tokens"):
            pooling = "mean"
        else:
            raise UserError(f"{pool_file}: pooling {modes or 'none'} is not supported (only mean or cls tokens)")
    if modules_file.is_file():
        modules = _read_json(modules_file, list)
        normalize = any(isinstance(m, dict) and str(m.get("type", "")).endswith("Normalize") for m in modules)
    return pooling, normalize


def encoder_config(path: str | os.PathLike) -> EncoderConfig:
    """The `EncoderConfig` of a BERT directory: `config.json` (refusing other model types) + pooling files."""
    d = Path(path)
    if not (d / "config.json").is_file():
        raise UserError(f"{d}: no config.json; expected a Hugging Face BERT model directory")
    raw = _read_json(d / "config.json")
    if raw.get("model_type") != "bert":
        raise UserError(f"{d}: model_type {raw.get('model_type')!r} is not an encoder we load (only 'bert')")
    act = raw.get("hidden_act", "gelu")
    if act != "gelu":
        raise UserError(f"{d}: hidden_act {act!r} is not supported (only 'gelu')")
    pet = raw.get("position_embedding_type", "absolute")
    if pet != "absolute":
        raise UserError(f"{d}: position_embedding_type {pet!r} is not supported (only 'absolute')")
    if "vocab_size" not in raw:
        raise UserError(f"{d / 'config.json'}: missing vocab_size")
    pooling, normalize = _pooling(d)
    kwargs = {k: raw[k] for k in _CONFIG_KEYS if k in raw}
    if kwargs.get("pad_token_id") is None:
        kwargs.pop("pad_token_id", None)
    return EncoderConfig(**kwargs, pooling=pooling, normalize=normalize)


def tensor_map(cfg: EncoderConfig) -> dict[str, str]:
    """Our parameter name -> the HF `BertModel` tensor name (without the optional `bert.` prefix)."""
    out = {f"embeddings.{n}.weight": f"embeddings.{n}.weight"
           for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    for p in ("weight", "bias"):
        out[f"embeddings.LayerNorm.{p}"] = f"embeddings.LayerNorm.{p}"
        for i in range(cfg.num_hidden_layers):
            hf = f"encoder.layer.{i}."
            for ours, theirs in (("query", "attention.self.query"), ("key", "attention.self.key"),
                                 ("value", "attention.self.value"), ("attn_out", "attention.output.dense"),
                                 ("attn_norm", "attention.output.LayerNorm"), ("intermediate", "intermediate.dense"),
                                 ("output", "output.dense"), ("out_norm", "output.LayerNorm")):
                out[f"layers.{i}.{ours}.{p}"] = f"{hf}{theirs}.{p}"
    return out


def load_encoder(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[Encoder, Any]:
    """(Encoder in eval mode, `tokenizers.Tokenizer`) from an HF BERT directory with model.safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    d = Path(path)
    cfg = encoder_config(d)
    weights = d / "model.safetensors"
    if not weights.is_file():
        pickles = [f.name for f in d.glob("*.bin")]
        hint = f" (found pickled {pickles[0]}; pickles can run code and are refused)" if pickles else ""
        raise UserError(f"{d}: no model.safetensors{hint}")
    try:
        tensors = load_file(str(weights))
    except (OSError, SafetensorError) as e:
        raise UserError(f"{weights}: unreadable safetensors ({one_line(e)})") from None
    prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
    encoder = Encoder(cfg)
    state = encoder.state_dict()
    for ours, theirs in tensor_map(cfg).items():
        t = tensors.get(prefix + theirs)
        if t is None:
            raise UserError(f"{weights}: missing tensor {prefix + theirs}")
        if tuple(t.shape) != tuple(state[ours].shape):
            raise UserError(f"{weights}: {prefix + theirs} has shape {tuple(t.shape)}, "
                            f"config.json implies {tuple(state[ours].shape)}")
        state[ours] = t.to(state[ours].dtype)
    encoder.load_state_dict(state)
    tok_file = d / "tokenizer.json"
    if not tok_file.is_file():
        raise UserError(f"{d}: no tokenizer.json (a fast Hugging Face tokenizer file is required)")
    try:
        tokenizer = Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise UserError(f"{tok_file}: unreadable tokenizer ({one_line(e)})") from None
    return encoder.to(device).eval(), tokenizer


@torch.inference_mode()
def embed_texts(encoder: Encoder, tokenizer, texts: list[str], *, max_tokens: int | None = None,
                batch_size: int = 32) -> tuple[torch.Tensor, list[bool]]:
    """(N, H) embeddings of `texts` and, per text, whether it was truncated to fit.

    Truncation is to `max_tokens`, never beyond the model's positions; the tokenizer's own special tokens
    ([CLS] ... [SEP]) are kept, and the last one stays last so a truncated text still ends as BERT saw
    in training. Callers report the flags: an index silently built on cut-off text misleads its user.
    """
    limit = encoder.cfg.max_position_embeddings
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 2:
            raise UserError(f"max_tokens must be an integer of at least 2, got {max_tokens!r}")
        limit = min(limit, max_tokens)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = next(encoder.parameters()).device
    pad = encoder.cfg.pad_token_id
    vectors, truncated = [], []
    for start in range(0, len(texts), batch_size):
        rows = []
        for text in texts[start:start + batch_size]:
            ids = tokenizer.encode(text).ids
            cut = len(ids) > limit
            truncated.append(cut)
            rows.append(ids[: limit - 1] + ids[-1:] if cut else ids)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        vectors.append(encoder.embed(ids.to(device), mask.to(device)).float().cpu())
    if not vectors:
        return torch.zeros((0, encoder.cfg.hidden_size)), []
    return torch.cat(vectors), truncated
