"""THE model: a decoder-only transformer, GPT-2 or Llama flavoured by `ModelConfig`.

Reading order follows the data: token ids -> embeddings (+ learned or sinusoidal positions) -> n_layers x
[norm -> causal self-attention (per-head q/k norm, RoPE, grouped-query, SDPA) -> residual -> norm -> MLP ->
residual] -> final norm -> output projection -> logits. Shapes in comments: B batch, T tokens in this call,
S key/value slots, C d_model, H query heads, K key/value heads, D head_dim, V vocab.

Training, quantization and distribution wrap this module from outside; it imports none of them. The
optional `KVCache` argument is what the generation engine uses to decode one token at a time.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import GATED_MLPS, ModelConfig
from lmforge.model.kv_cache import KVCache
from lmforge.model.rope import apply_rope, inverse_frequencies, longrope_short_length, rope_tables


# ---------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): rescale, don't re-centre; no bias.

    Computed in float32 and cast back before the weight multiply, exactly as Llama does, so that bf16
    activations don't lose the small variance terms and our logits match the reference implementation.
    Gemma stores the weight as w and scales by (1 + w), multiplied in float32 before the cast (`offset`).
    """

    def __init__(self, dim: int, eps: float, offset: bool = False) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The identity: a weight of 1, stored as 0 when applied as (1 + w)."""
        nn.init.zeros_(self.weight) if self.offset else nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim or cfg.d_model, cfg.norm_eps, cfg.norm_offset)
    return nn.LayerNorm(dim or cfg.d_model, eps=cfg.norm_eps)


# ---------------------------------------------------------------------------------------------------
# Positions (the rotary ones in lmforge.model.rope)
# ---------------------------------------------------------------------------------------------------
def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """The inverse frequencies of the global (non-sliding) layers, scaling included."""
    return inverse_frequencies(cfg.rope_dim or cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.context_length)[0]


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """Fixed sin/cos position encodings of "Attention Is All You Need" (sin on even, cos on odd dims)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


# ---------------------------------------------------------------------------------------------------
# Attention, MLP and mixture of experts
# ---------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Causal self-attention with H query heads sharing K key/value heads (MHA: K=H, GQA: 1<K<H, MQA: K=1).

    q, k and v come from one fused projection (one matmul instead of three), and attention itself is
    `F.scaled_dot_product_attention`, which dispatches to flash / memory-efficient kernels where available.
    A sliding layer differs only in the mask and the rotary tables it is given (`GPT.forward` makes both).
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.attention_bias)
        if cfg.qk_norm:  # Qwen3: one RMSNorm weight over D shared by all query heads, one by all key heads
            self.q_norm, self.k_norm = make_norm(cfg, cfg.head_dim), make_norm(cfg, cfg.head_dim)
        self.qk_norm = cfg.qk_norm
        self.scale = cfg.attn_scale  # None: SDPA's 1/sqrt(D)
        self.softcap = cfg.attn_softcap
        self.dropout = cfg.dropout
        self.use_rope = cfg.positions == "rope"

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        causal: bool,
        cache: KVCache | None,
        slots: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        qk, v = self.qkv(x).split([(H + K) * D, K * D], dim=-1)
        qk = qk.view(B, T, H + K, D).transpose(1, 2)  # (B, H+K, T, D): queries and keys rotate alike
        if self.qk_norm:  # each head's query and key scaled to unit RMS before rotation: bounded logits
            qk = torch.cat([self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])], dim=1)
        if self.use_rope:
            qk = apply_rope(qk, *rope)  # one rotation for both (half the small ops of a decode step)
        q, k = qk.split([H, K], dim=1)  # (B, H, T, D), (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, slots)  # (B, K, S, D): everything cached so far
        dropout = self.dropout if self.training else 0.0
        if self.softcap is not None:
            y = capped_attention(q, k, v, mask, self.scale, self.softcap, dropout)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                is_causal=causal and mask is None,
                dropout_p=dropout,
                scale=self.scale,
                enable_gqa=K != H,  # K/V heads are shared by H/K query heads each, without copying them
            )  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))


def capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float | None, cap: float, dropout: float = 0.0) -> torch.Tensor:
    """Attention with Gemma 2's soft cap on the scores: cap * tanh(scores / cap) bounds them smoothly to
    (-cap, cap) before the softmax. SDPA has no such step, so this is attention written out; `mask` None
    means causal (queries are the last T of the S keys)."""
    H, K, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if K != H:
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)  # (B, H, T, S)
    scores = cap * torch.tanh(scores / cap)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype), dropout)
    return probs @ v


class MLP(nn.Module):
    """Position-wise feed-forward. Gated (Shazeer 2020): down(act(gate(x)) * up(x)), with gate and up fused
    into one matmul, act = SiLU (SwiGLU: Llama) or tanh-GELU (GeGLU: Gemma); or GPT-2's proj(gelu(fc(x)))."""

    def __init__(self, cfg: ModelConfig, d_ff: int | None = None) -> None:
        super().__init__()
        self.gated = cfg.mlp in GATED_MLPS
        self.swiglu = cfg.mlp == "swiglu"
        d_ff = d_ff or cfg.d_ff
        self.fc = nn.Linear(cfg.d_model, 2 * d_ff if self.gated else d_ff, bias=cfg.mlp_bias)  # gated: [gate; up]
        self.proj = nn.Linear(d_ff, cfg.d_model, bias=cfg.mlp_bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = (F.silu(gate) if self.swiglu else F.gelu(gate, approximate="tanh")) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.proj(h))


class MoE(nn.Module):
    """Sparse mixture of experts (Shazeer et al. 2017; Mixtral, Jiang et al. 2024): E SwiGLU MLPs, of which
    each token runs through k. A linear router scores the experts; softmax (in float32) -> top k -> the k
    probabilities renormalised to sum to 1 (`norm_topk_prob`) weight the chosen experts' outputs. Exactly
    transformers' MixtralSparseMoeBlock, whose expert outputs are also weighted in float32 and cast back.

    One pass per expert over the tokens routed to it (gather, compute, `index_add_` back), never a loop over
    tokens: E small batched matmuls instead of B*T*k tiny ones. Each expert is an `MLP`, so quantized and
    16-bit layers swap into experts as into any linear layer. The router logits of the last call are kept in
    `router_logits` (B*T, E): the load-balancing loss of training reads them (`train.losses`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.experts_per_token, cfg.norm_topk_prob
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(cfg.n_experts))
        if cfg.shared_expert_d_ff:  # Qwen2-MoE: an expert every token uses, weighted by a sigmoid gate of its own
            self.shared, self.shared_gate = MLP(cfg, cfg.shared_expert_d_ff), nn.Linear(cfg.d_model, 1, bias=False)
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C): routing is per token
        self.router_logits = logits = self.router(x)  # (N, E)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k) each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)  # (n_e,): the tokens routed to expert e, and in which of k
            y = expert(x[token]) * weights[token, slot, None]  # (n_e, C), float32
            out.index_add_(0, token, y.to(out.dtype))
        if hasattr(self, "shared"):
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out.view(B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)) (GPT-2 onwards). Gemma 2/3 also
    normalise each sublayer's output before adding it back (`post_norms`), which keeps the residual stream's
    scale in check at their depth."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.slides = cfg.slides(layer)
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.norm2 = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.n_experts else MLP(cfg)
        if cfg.post_norms:
            self.post_attn_norm, self.post_mlp_norm = make_norm(cfg), make_norm(cfg)
        self.post_norms = cfg.post_norms
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, causal, cache, slots):
        h = self.attn(self.norm1(x), rope, mask, causal, cache, slots)
        if self.post_norms:
            h = self.post_attn_norm(h)
        x = x + self.resid_dropout(h)
        h = self.mlp(self.norm2(x))
        return x + (self.post_mlp_norm(h) if self.post_norms else h)


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------
class AttentionInputs(NamedTuple):
    """Rotary tables (cos, sin) and masks for global layers, then for sliding-window layers."""

    rope: tuple[torch.Tensor, torch.Tensor] | None
    mask: torch.Tensor | None
    causal: bool
    local_rope: tuple[torch.Tensor, torch.Tensor] | None
    local_mask: torch.Tensor | None
    local_causal: bool


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one matrix to read tokens in and write them out
        # Position tables are derived from the config, so they are buffers that checkpoints don't store.
        for name, table in self.position_tables().items():
            self.register_buffer(name, table, persistent=False)
        self.reset_parameters()

    def position_tables(self) -> dict[str, torch.Tensor]:
        """The fixed position tables (float32), computed from the config: the rotary tables of the global
        layers, and of the sliding ones where they have their own base (Gemma 3: 10k local, 1M global).
        LongRoPE past its original context (Phi-3.5/4) has a second, short table over that original context:
        its short divisors, used while a call's positions all fit in it (`forward`)."""
        cfg = self.config
        if cfg.positions == "rope":
            dim = cfg.rope_dim or cfg.head_dim
            cos, sin = rope_tables(dim, cfg.rope_theta, cfg.rope_scaling, cfg.context_length)
            tables = {"rope_cos": cos, "rope_sin": sin}
            short = longrope_short_length(cfg.rope_scaling, cfg.context_length)
            if short is not None:
                tables["rope_short_cos"], tables["rope_short_sin"] = rope_tables(
                    dim, cfg.rope_theta, cfg.rope_scaling, cfg.context_length, rows=short)
            if cfg.rope_local_theta is not None and cfg.sliding_window is not None:
                tables["rope_local_cos"], tables["rope_local_sin"] = rope_tables(dim, cfg.rope_local_theta, None, cfg.context_length)
            return tables
        if cfg.positions == "sinusoidal":
            return {"pos_table": sinusoidal_table(cfg.context_length, cfg.d_model)}
        return {}

    def reset_position_tables(self) -> None:
        """Recompute the tables in place (after loading onto a device, or after a cast that rounded them)."""
        for name, table in self.position_tables().items():
            buf = getattr(self, name)
            setattr(self, name, table.to(device=buf.device, dtype=torch.float32))

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, init_std) weights, zero biases, and the two projections that write
        into the residual stream scaled by 1/sqrt(2 * n_layers) so its variance doesn't grow with depth."""
        std = self.config.init_std
        norms = {f"{n}.weight": m for n, m in self.named_modules() if isinstance(m, (RMSNorm, nn.LayerNorm))}
        for name, p in self.named_parameters():
            if p.dim() == 1:
                norms[name].reset_parameters() if isinstance(norms.get(name), RMSNorm) else \
                    nn.init.ones_(p) if name in norms else nn.init.zeros_(p)
            elif name.endswith(("attn.proj.weight", "mlp.proj.weight", "mlp.shared.proj.weight")) or \
                    re.search(r"experts\.\d+\.proj\.weight$", name):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def num_params(self) -> int:
        """Real parameter count (tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
        output_positions: torch.Tensor | None = None,
        output_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids `idx` (B, T); (B, 1, V) with `last_only`.

        Without a cache this is ordinary causal training/scoring: positions 0..T-1. With a `cache`, the new
        tokens' keys and values are written at `slots` of the cache ((T,), or (B, T) for per-row timelines;
        default: right after what the cache holds) and attention reads every slot written so far.

        Which of those slots a query may see is the caller's to say, as in gpt-fast: `mask` (B|1, 1, T, S),
        True = may attend, built with `KVCache.mask` (causal over slots, padding, per-row timelines). Without
        one, a single new token sees every cached slot, and a chunk that fills an empty cache from slot 0 is
        plain causal; anything else needs a mask, and its absence is an error rather than a silent leak.

        `positions` (T,) or (B, T) give each token's position when they differ from its slot (left-padded
        batches). `output_positions` (B,) computes the logits of one chosen place per row, (B, 1, V): the
        last real token of right-padded prompts in a batched prefill (the output head over every place of
        32 prompts would be the biggest tensor of the step). `output_mask` (B, T) bool computes logits only
        where it is True, as (N, V) in row-major order: fine-tuning and preference losses count only the
        reply's places, and the output head over every place of a long grounded prompt is most of its cost.
        """
        B, T = idx.shape
        cfg = self.config
        causal = mask is None
        if cache is not None:
            if slots is None:
                slots = torch.arange(cache.length, cache.length + T, device=idx.device)
            S = cache.advance(slots)
            if mask is None and (slots.dim() == 2 or (T > 1 and S != T)):
                raise ValueError("writing these slots of a KV cache needs an attention mask (KVCache.mask)")
            causal = mask is None and T > 1
        if positions is None and slots is None:  # training and scoring: 0..T-1, the last known without a sync
            positions, last = torch.arange(T, device=idx.device), T - 1  # (int(max) broke torch.compile's graph)
        else:
            positions = slots if positions is None else positions
            last = int(positions.max())
        if last >= cfg.context_length:
            raise ValueError(f"position {last} is beyond the context length {cfg.context_length}")
        pos2d = positions if positions.dim() == 2 else positions[None, :]  # (B or 1, T)

        x = self.embed(idx, pos2d)
        ctx = self.attention_inputs(pos2d, last, mask, causal, cache, slots, T)
        for block in self.blocks:
            x = self.run_block(block, x, ctx, cache, slots)
        if output_mask is not None:
            x = x[output_mask]  # (N, C)
        elif output_positions is not None:
            x = x[torch.arange(B, device=x.device), output_positions][:, None]
        elif last_only:
            x = x[:, -1:]
        return self.head(x)

    # The pieces of `forward`, in order: a pipeline stage (lmforge.train.pipeline) runs some of them on its
    # share of the blocks, so each exists once.
    def embed(self, idx: torch.Tensor, pos2d: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) at positions `pos2d` (B|1, T) -> the residual stream (B, T, C)."""
        cfg = self.config
        x = self.tok_emb(idx)  # (B, T, C)
        if cfg.embed_scale:  # Gemma: embeddings times sqrt(C), rounded to their dtype as transformers does
            x = x * torch.tensor(cfg.d_model ** 0.5, dtype=x.dtype)
        if cfg.positions == "learned":
            x = x + self.pos_emb(pos2d)
        elif cfg.positions == "sinusoidal":
            x = x + self.pos_table[pos2d]
        return self.drop(x)

    def attention_inputs(self, pos2d: torch.Tensor, last: int, mask: torch.Tensor | None, causal: bool, cache: KVCache | None,
                         slots: torch.Tensor | None, T: int) -> AttentionInputs:
        """What every block's attention needs besides the residual stream: the rotary tables at these
        positions (the furthest `last`) and the mask, for global layers and for sliding-window layers."""
        cfg = self.config
        rope = local_rope = None
        if cfg.positions == "rope":
            cos, sin = self.rope_cos, self.rope_sin
            # LongRoPE: the short divisors while this call's positions fit the original context, the long ones
            # once any goes past it - per call, as transformers does. Keys cached by earlier calls keep the
            # rotation they were written with, so a cached decode that crosses the boundary differs from a full
            # recomputation from there on (transformers' generate recomputes everything at that step).
            if hasattr(self, "rope_short_cos") and last < self.rope_short_cos.shape[0]:
                cos, sin = self.rope_short_cos, self.rope_short_sin
            rope = local_rope = (cos[pos2d][:, None], sin[pos2d][:, None])  # (B|1, 1, T, D)
            if hasattr(self, "rope_local_cos"):
                local_rope = (self.rope_local_cos[pos2d][:, None], self.rope_local_sin[pos2d][:, None])
        # Sliding layers see only the last `sliding_window` keys: the same mask, narrowed. Distances are
        # counted in slots, which within a row are distances in positions (padding never sits between real tokens).
        # A cache that keeps sliding layers in rings hands them their ring: the mask is then over ring indices.
        local_mask, local_causal = mask, causal
        n_keys = cache.length if cache is not None else T
        if cache is not None and cache.ring is not None:
            local_mask, local_causal = ring_mask(cfg.sliding_window, slots, cache.ring_slots(slots), mask), False
        elif cfg.sliding_window is not None and n_keys > cfg.sliding_window:
            q_slots = slots if slots is not None else torch.arange(T, device=pos2d.device)
            local_mask, local_causal = window_mask(cfg.sliding_window, q_slots, n_keys, mask), False
        return AttentionInputs(rope, mask, causal, local_rope, local_mask, local_causal)

    @staticmethod
    def run_block(block: nn.Module, x: torch.Tensor, ctx: AttentionInputs, cache: KVCache | None = None,
                  slots: torch.Tensor | None = None) -> torch.Tensor:
        """One block on the residual stream, with the global or the sliding-window attention inputs."""
        if block.slides:
            return block(x, ctx.local_rope, ctx.local_mask, ctx.local_causal, cache, slots)
        return block(x, ctx.rope, ctx.mask, ctx.causal, cache, slots)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream -> logits: final norm, output head, and Gemma 2's soft cap."""
        cfg = self.config
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if cfg.final_softcap is not None:  # Gemma 2: logits bounded smoothly to (-cap, cap)
            logits = cfg.final_softcap * torch.tanh(logits / cfg.final_softcap)
        return logits


def window_mask(window: int, q_slots: torch.Tensor, n_keys: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention mask (B|1, 1, T, S) of a sliding layer: a query at slot q sees keys at slots
    q - window < k <= q (itself and the window - 1 before it), within what `mask` allows (None: causal).
    `q_slots` are the queries' slots, (T,) shared by every row or (B, T) per row."""
    keys = torch.arange(n_keys, device=q_slots.device)
    q = q_slots[..., None]  # (T, 1) or (B, T, 1)
    near = (keys > q - window) & (keys <= q)
    near = near[None, None] if q_slots.dim() == 1 else near[:, None]
    return near if mask is None else mask & near


def ring_mask(window: int, q_slots: torch.Tensor, held: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`window_mask` over the indices of a sliding layer's ring (`KVCache.ring_slots`: `held` (B|1, R) is the
    slot each index holds, -1 for none): (B|1, 1, T, R). `mask` (B|1, 1, T, S), over slots, is read at the
    slot each index holds."""
    q = q_slots[..., None]  # (T, 1) or (B, T, 1)
    k = held[:, None, :]  # (B|1, 1, R)
    near = ((k > q - window) & (k <= q) & (k >= 0))[:, None]  # (B|1, 1, T, R)
    if mask is None:
        return near
    B = max(mask.shape[0], near.shape[0])
    index = held.clamp(min=0)[:, None, None, :].expand(B, 1, mask.shape[2], held.shape[-1])
    return near & torch.gather(mask.expand(B, -1, -1, -1), 3, index)


# ---------------------------------------------------------------------------------------------------
# The fused projections, and the model under its wrappers
# ---------------------------------------------------------------------------------------------------
# Our per-block projections, by path under blocks.N. ("mlp.fc" is gate|up for SwiGLU/GeGLU, up for GELU.)
PROJECTIONS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


def projection_parts(cfg, module: str) -> list[tuple[str, int, int]]:
    """The named row slices of one of our projections, in row order: (part, start, stop)."""
    if module == "attn.qkv":
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        return [("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv)]
    if module == "attn.proj":
        return [("o", 0, cfg.d_model)]
    if module == "mlp.fc":
        if cfg.mlp in GATED_MLPS:
            return [("gate", 0, cfg.d_ff), ("up", cfg.d_ff, 2 * cfg.d_ff)]
        return [("up", 0, cfg.d_ff)]
    if module == "mlp.proj":
        return [("down", 0, cfg.d_model)]
    if module == "mlp.shared.fc":  # the shared expert (MoE.shared): SwiGLU of its own width
        w = cfg.shared_expert_d_ff
        return [("gate", 0, w), ("up", w, 2 * w)]
    if module == "mlp.shared.proj":
        return [("down", 0, cfg.d_model)]
    raise ValueError(f"{module!r} is not one of our projections ({', '.join(PROJECTIONS)})")


def router_logits(model: nn.Module) -> list[torch.Tensor]:
    """Each mixture-of-experts layer's router logits (N, E) from the model's last call; [] for a dense model."""
    return [m.router_logits for m in unwrap(model).modules() if isinstance(m, MoE) and m.router_logits is not None]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under torch.compile / DDP / FSDP wrappers (what LoRA, checkpoints and the trainer
    read and change)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model
