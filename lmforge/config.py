"""`ModelConfig`: every architectural choice of a decoder-only transformer, in one dataclass.

One config describes GPT-2-style models (learned positions, LayerNorm, GELU, biases) and Llama-style
models (RoPE, RMSNorm, SwiGLU, grouped-query attention) alike, so the same model file, trainer, engine and
exporters serve both. Presets live in `lmforge/presets.py` and are looked up by exact name only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import UserError

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "geglu", "gelu")  # gated (SiLU: Llama; tanh-GELU: Gemma) or GPT-2's plain tanh-GELU
GATED_MLPS = ("swiglu", "geglu")
POSITIONS = ("rope", "learned", "sinusoidal")
ROPE_SCALING_TYPES = ("linear", "llama3", "yarn", "longrope", "su")  # computed by lmforge.model.rope; su = longrope

# Ceilings on what a config may ask for. They are far above any released model (Llama-4 Scout attends over
# 10M tokens, the deepest LLMs have ~130 layers, vocabularies reach ~260k) and exist so that a damaged or
# hostile config.json / GGUF header is refused in one line instead of spending minutes and gigabytes
# building something no weight file backs. The weight file is the real check (loaders.model_dir.check_weights);
# these bound what is built before that check can run, and the position tables that no file stores.
MAX_CONTEXT = 1 << 24
MAX_LAYERS = 1 << 12
MAX_SIZE = 1 << 24  # vocabulary, widths, head counts
_SIZE_LIMITS = {"vocab_size": MAX_SIZE, "context_length": MAX_CONTEXT, "d_model": MAX_SIZE, "n_layers": MAX_LAYERS,
                "n_heads": MAX_SIZE, "n_kv_heads": MAX_SIZE, "head_dim": MAX_SIZE, "d_ff": MAX_SIZE}
_FLAGS = ("attention_bias", "qkv_bias", "mlp_bias", "tie_embeddings", "qk_norm", "norm_offset", "post_norms", "embed_scale")


def shown(v: Any, limit: int = 60) -> str:
    """repr(v) for an error message, on one line of about `limit` characters: a hostile file's value must
    not turn the error into a megabyte line (nor cost the repr of one)."""
    if isinstance(v, (str, list)) and len(v) > limit:
        v = v[:limit]
    elif isinstance(v, dict) and len(v) > 4:
        v = dict(list(v.items())[:4])
    r = " ".join(repr(v).split())
    return r if len(r) <= limit else r[:limit] + "..."


def is_int(v: Any) -> bool:
    """An integer, not a bool (JSON true would otherwise pass as 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def finite_number(v: Any) -> bool:
    """An int or float (not a bool, not a string) that is a finite float (10**400 is not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def rope_scaling_problem(sc: Any, rotary_dim: int | None = None) -> str | None:
    """What is wrong with a `rope_scaling` dict, in one line, or None when `lmforge.model.rope` can use it.
    `rotary_dim` (the dims RoPE turns) is the length LongRoPE's per-frequency lists must have, times 2."""
    if not isinstance(sc, dict):
        return f"rope_scaling must be an object, got {shown(sc)}"
    kind = sc.get("type", sc.get("rope_type"))
    if kind not in ROPE_SCALING_TYPES:
        return f"rope_scaling type must be one of {', '.join(ROPE_SCALING_TYPES)}, got {shown(kind)}"

    def positive(key: str, default: Any = None, required: bool = False) -> str | None:
        v = sc.get(key, default)
        if (v is not None or required) and not (finite_number(v) and v > 0):
            return f"rope_scaling {key} must be a positive number, got {shown(v)}"
        return None

    factor = sc.get("factor")  # LongRoPE's may be left out: the stretch from its original context to the model's
    if (factor is not None or kind not in ("longrope", "su")) and not (finite_number(factor) and factor > 0):
        return f"rope_scaling needs a positive factor, got {shown(factor)}"
    if kind == "llama3":  # the defaults are lmforge.model.rope's
        for key, default in (("low_freq_factor", 1.0), ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8192)):
            if problem := positive(key, default, required=True):
                return problem
        low, high = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        if high <= low:
            return f"rope_scaling high_freq_factor ({high}) must be above low_freq_factor ({low})"
    orig = sc.get("original_max_position_embeddings")
    if kind in ("yarn", "longrope", "su") and not (is_int(orig) and orig > 0) and (orig is not None or kind != "yarn"):
        return f"rope_scaling {kind} needs original_max_position_embeddings, a positive integer, got {shown(orig)}"
    if kind == "yarn":  # (None means the default, as in transformers)
        for key in ("beta_fast", "beta_slow", "attention_factor"):
            if problem := positive(key):
                return problem
        for key in ("mscale", "mscale_all_dim"):
            v = sc.get(key)
            if v is not None and not (finite_number(v) and v >= 0):
                return f"rope_scaling {key} must be a number >= 0, got {shown(v)}"
        if sc.get("truncate") not in (None, True, False):
            return f"rope_scaling truncate must be true or false, got {shown(sc.get('truncate'))}"
    if kind in ("longrope", "su"):
        if problem := positive("attention_factor"):
            return problem
        for key in ("short_factor", "long_factor"):
            v = sc.get(key)
            if not (isinstance(v, list) and all(finite_number(x) and x > 0 for x in v)):
                return f"rope_scaling {key} must be a list of positive numbers, got {shown(v)}"
            if is_int(rotary_dim) and len(v) != rotary_dim // 2:
                return f"rope_scaling {key} must have one number per rotated frequency ({rotary_dim // 2}), got {len(v)}"
    return None


# Settings of a ModelConfig that change neither what a model computes at inference nor its weights' shapes
# (Hugging Face configs have no keys for them; LoRA fingerprints of the base model leave them out).
TRAINING_ONLY_FIELDS = ("dropout", "init_std", "name", "hf_class")


@dataclass
class ModelConfig:
    """Shape of a decoder-only transformer. Defaults describe a small Llama-style model."""

    vocab_size: int = 8192
    context_length: int = 256  # longest sequence the model attends over (positions 0..context_length-1)
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None  # None = n_heads (MHA); 1 = MQA; in between = GQA
    head_dim: int | None = None  # None = d_model // n_heads
    d_ff: int | None = None  # MLP hidden width; None = 4*d_model (gelu) or Llama's 8/3*d_model rounded (swiglu)
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    mlp: str = "swiglu"  # swiglu | geglu (Gemma) | gelu (tanh approximation, as GPT-2)
    positions: str = "rope"  # rope | learned | sinusoidal
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "linear", "factor": f} or Llama-3's {"type": "llama3", ...}
    rope_dim: int | None = None  # dims of each head that RoPE rotates (the first ones); None = head_dim (Phi-4: 3/4)
    attention_bias: bool = False  # biases on q, k, v and the output projection
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2 style)
    mlp_bias: bool = False
    tie_embeddings: bool = True  # output projection shares the token embedding matrix
    qk_norm: bool = False  # RMSNorm of each query and key head over head_dim, before RoPE (Qwen3, Gemma 3)
    # Gemma: RMSNorm weights stored as w and applied as (1 + w); a second norm on the attention's and the MLP's
    # outputs before each residual add; token embeddings times sqrt(d_model); an attention scale of its own.
    norm_offset: bool = False
    post_norms: bool = False
    embed_scale: bool = False
    attn_scale: float | None = None  # scores = q.k * attn_scale; None = 1/sqrt(head_dim)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the softmax (Gemma 2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    # Sliding-window attention: a sliding layer's query sees itself and the sliding_window - 1 tokens before
    # it (Mistral: every layer; Gemma 2: every other; Gemma 3: five in six). Sliding layers may have their
    # own RoPE base, without the context-extension scaling of the global ones (Gemma 3).
    sliding_window: int | None = None
    sliding_layers: list[int] | None = None  # which layers slide; None = all of them
    rope_local_theta: float | None = None  # RoPE base of the sliding layers; None = as the global layers
    # Mixture of experts (Mixtral): n_experts SwiGLU MLPs of width d_ff per block in place of the one MLP,
    # each token routed to experts_per_token of them. 0 experts = the dense MLP.
    n_experts: int = 0
    experts_per_token: int = 2
    norm_topk_prob: bool = True  # renormalise the chosen experts' router probabilities to sum to 1 (Mixtral)
    # A shared expert (Qwen2-MoE): one more SwiGLU MLP of this width that every token runs through, its output
    # scaled per token by a sigmoid gate and added to the routed experts'. 0 = none.
    shared_expert_d_ff: int = 0
    dropout: float = 0.0
    init_std: float = 0.02
    name: str = field(default="custom", compare=False)
    # The transformers class the weights came from, where several compute the same (a Phi-3-mini is exactly a
    # Mistral): export and LoRA adapter names then keep the layout the user's other tools expect of it.
    hf_class: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # The sizes the defaults below are computed from are checked first, so that a string or a bool
        # from a file is refused by name rather than failing inside the arithmetic.
        for k in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
            if getattr(self, k) is not None:
                self._check_size(k)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.d_model // self.n_heads if self.n_heads else 0
        if self.d_ff is None:
            if self.mlp in GATED_MLPS:
                # Llama: 2/3 of 4*d keeps the parameter count of a 4*d GELU MLP; round up to a multiple of 64.
                self.d_ff = 64 * math.ceil(int(8 * self.d_model / 3) / 64)
            else:
                self.d_ff = 4 * self.d_model
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = dict(self.rope_scaling)
        if isinstance(self.sliding_layers, (list, tuple)):
            self.sliding_layers = list(self.sliding_layers)
        self.validate()

    def _check_size(self, k: str) -> None:
        v, limit = getattr(self, k), _SIZE_LIMITS[k]
        if not is_int(v) or v <= 0:
            raise UserError(f"invalid model config: {k} must be a positive integer, got {shown(v)}")
        if v > limit:
            raise UserError(f"invalid model config: {k} is {v}, beyond what lmforge supports ({limit})")

    def validate(self) -> None:
        """Refuse shapes that cannot be built and values of the wrong type, each with the reason in one line."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(f"invalid model config: {msg}")

        for k in _SIZE_LIMITS:
            self._check_size(k)
        need(self.n_heads % self.n_kv_heads == 0, f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        need(self.norm in NORMS, f"norm must be one of {', '.join(NORMS)}, got {shown(self.norm)}")
        need(self.mlp in MLPS, f"mlp must be one of {', '.join(MLPS)}, got {shown(self.mlp)}")
        need(self.positions in POSITIONS, f"positions must be one of {', '.join(POSITIONS)}, got {shown(self.positions)}")
        for k in _FLAGS:
            need(isinstance(getattr(self, k), bool), f"{k} must be true or false, got {shown(getattr(self, k))}")
        need(finite_number(self.dropout) and 0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {shown(self.dropout)}")
        need(finite_number(self.init_std) and self.init_std >= 0, f"init_std must be a finite number >= 0, got {shown(self.init_std)}")
        need(finite_number(self.norm_eps) and self.norm_eps > 0, f"norm_eps must be a positive number, got {shown(self.norm_eps)}")
        need(finite_number(self.rope_theta) and self.rope_theta > 0, f"rope_theta must be a positive number, got {shown(self.rope_theta)}")
        need(isinstance(self.name, str), f"name must be a string, got {shown(self.name)}")
        need(is_int(self.n_experts) and 0 <= self.n_experts <= MAX_SIZE, f"n_experts must be an integer >= 0, got {shown(self.n_experts)}")
        if self.n_experts:
            need(is_int(self.experts_per_token) and 1 <= self.experts_per_token <= self.n_experts,
                 f"experts_per_token must be between 1 and n_experts ({self.n_experts}), got {shown(self.experts_per_token)}")
            need(isinstance(self.norm_topk_prob, bool), f"norm_topk_prob must be true or false, got {shown(self.norm_topk_prob)}")
            need(self.mlp == "swiglu", f"experts are SwiGLU MLPs; mlp={self.mlp} with n_experts is not supported")
        need(is_int(self.shared_expert_d_ff) and 0 <= self.shared_expert_d_ff <= MAX_SIZE,
             f"shared_expert_d_ff must be an integer >= 0, got {shown(self.shared_expert_d_ff)}")
        need(not self.shared_expert_d_ff or self.n_experts, "a shared expert needs routed experts (n_experts > 0)")
        if self.positions == "rope":
            need(self.head_dim % 2 == 0, f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.positions == "sinusoidal":
            need(self.d_model % 2 == 0, f"sinusoidal positions need an even d_model, got {self.d_model}")
        if self.rope_scaling is not None:
            problem = rope_scaling_problem(self.rope_scaling, self.rope_dim or self.head_dim)
            need(problem is None, str(problem))
        if self.rope_dim is not None:
            need(is_int(self.rope_dim) and 0 < self.rope_dim <= self.head_dim and self.rope_dim % 2 == 0,
                 f"rope_dim must be an even number of dims up to head_dim ({self.head_dim}), got {shown(self.rope_dim)}")
        for k in ("attn_scale", "attn_softcap", "final_softcap", "rope_local_theta"):
            v = getattr(self, k)
            need(v is None or (finite_number(v) and v > 0), f"{k} must be a positive number or null, got {shown(v)}")
        if self.sliding_window is not None:
            need(is_int(self.sliding_window) and 0 < self.sliding_window <= MAX_CONTEXT,
                 f"sliding_window must be a positive integer, got {shown(self.sliding_window)}")
        if self.sliding_layers is not None:
            need(self.sliding_window is not None, "sliding_layers without a sliding_window")
            need(isinstance(self.sliding_layers, list) and all(is_int(i) and 0 <= i < self.n_layers for i in self.sliding_layers)
                 and len(set(self.sliding_layers)) == len(self.sliding_layers),
                 f"sliding_layers must list distinct layer indices below n_layers ({self.n_layers}), got {shown(self.sliding_layers)}")

    def slides(self, layer: int) -> bool:
        """True when `layer` attends through the sliding window."""
        return self.sliding_window is not None and (self.sliding_layers is None or layer in self.sliding_layers)

    # ----------------------------------------------------------------------------------------------
    def num_params(self, *, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameter count computed from the shape alone (equals `sum(p.numel())` of the built model).

        Used to plan a run (memory, FLOPs) before building anything. `include_embeddings=False` leaves out
        the token and position tables, which is the count that FLOPs-per-token estimates use. `active=True`
        counts, of a mixture of experts, only the experts_per_token experts each token runs through.
        """
        d, h, kv, hd, f = self.d_model, self.n_heads, self.n_kv_heads, self.head_dim, self.d_ff
        norm_p = 2 * d if self.norm == "layernorm" else d
        qkv_out = (h + 2 * kv) * hd
        attn = d * qkv_out + h * hd * d
        if self.attention_bias:
            attn += qkv_out + d
        elif self.qkv_bias:
            attn += qkv_out
        if self.qk_norm:
            attn += 2 * hd  # one weight vector for all query heads, one for all key heads
        if self.mlp in GATED_MLPS:
            mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        else:
            mlp = 2 * d * f + (f + d if self.mlp_bias else 0)
        if self.n_experts:  # n_experts MLPs (or the k a token uses) and the router
            mlp = mlp * (self.experts_per_token if active else self.n_experts) + d * self.n_experts
            if self.shared_expert_d_ff:  # every token's: its SwiGLU and its gate
                mlp += 3 * d * self.shared_expert_d_ff + d
        n = self.n_layers * (attn + mlp + (4 if self.post_norms else 2) * norm_p) + norm_p
        if not self.tie_embeddings:
            n += self.vocab_size * d  # separate output projection
        if include_embeddings:
            n += self.vocab_size * d
            if self.positions == "learned":
                n += self.context_length * d
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), the PaLM/Chinchilla estimate.

        6 * N for the matmuls with N the non-embedding parameters (of a mixture of experts, those a token
        runs through) plus the output projection (the token
        lookup is free; the output projection is a real matmul), plus 12 * layers * T * d_attn for attention
        scores and values.
        """
        T = seq_len or self.context_length
        n = self.num_params(include_embeddings=False, active=True) + (self.vocab_size * self.d_model if self.tie_embeddings else 0)
        return 6 * n + 12 * self.n_layers * T * self.n_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def diff(self, other: "ModelConfig") -> list[str]:
        """Human-readable differences (`field: mine -> theirs`), used to refuse resuming a different shape."""
        out = []
        for f in dataclasses.fields(self):
            if not f.compare:
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                out.append(f"{f.name}: {a!r} -> {b!r}")
        return out
