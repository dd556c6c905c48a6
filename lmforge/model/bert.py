"""A BERT-family encoder for sentence embeddings (issue 15: retrieval needs vectors for local files).

Why our own module instead of `transformers`: lmforge never imports transformers at run time (it is a test
dependency, the parity oracle), and an encoder is small enough to read like the paper (Devlin et al. 2018):
token + position + token-type embeddings, LayerNorm, then N post-LN layers of multi-head self-attention
(with a padding mask) and a GELU MLP. `embed` pools the last hidden states (`mean` over real tokens, or the
`cls` token) and optionally L2-normalises, which is what sentence-transformers models expect for cosine
search. Weight names mirror HF `BertModel` so a loader maps them one to one (`lmforge.loaders.bert`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import UserError

__all__ = ["POOLINGS", "Encoder", "EncoderConfig"]

POOLINGS = ("mean", "cls")


@dataclass(frozen=True)
class EncoderConfig:
    """The hyper-parameters of a BERT encoder, named as in HF's `BertConfig` so a config.json maps 1:1."""

    vocab_size: int
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    pooling: str = "mean"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise UserError(f"pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"encoder config {name} must be a positive integer, got {value!r}")


class Embeddings(nn.Module):
    """Token + learned absolute position + token-type embeddings, then LayerNorm (BERT section 3.2)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.LayerNorm(x + self.token_type_embeddings(token_type_ids))


class Layer(nn.Module):
    """One post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + MLP(x)), as in the original paper."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(h, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, h)
        self.out_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        d = h // self.heads

        def split(p: torch.Tensor) -> torch.Tensor:
            return p.view(b, t, self.heads, d).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + bias
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h)
        x = self.attn_norm(x + self.attn_out(ctx))
        # exact (erf) GELU: BERT's "gelu", not the tanh approximation GPT-2 uses
        return self.out_norm(x + self.output(F.gelu(self.intermediate(x))))


class Encoder(nn.Module):
    """A BERT encoder: `forward` gives last hidden states, `embed` gives one pooled vector per sequence."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids and a (B, T) 1/0 mask of real tokens -> (B, T, H) last hidden states."""
        if input_ids.dim() != 2:
            raise UserError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.cfg.max_position_embeddings:
            raise UserError(
                f"{input_ids.shape[1]} tokens exceed the encoder's {self.cfg.max_position_embeddings} "
                "positions; truncate the input"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        # padded keys get the dtype's minimum (as HF does) so a fully padded row stays finite
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, bias)
        return x

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, H) pooled (`cfg.pooling`) and, when `cfg.normalize`, unit-length vectors."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.forward(input_ids, attention_mask)
        if self.cfg.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask[..., None].to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=-1) if self.cfg.normalize else pooled
