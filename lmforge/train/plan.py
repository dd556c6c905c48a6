"""Plan a run before paying for it: parameters, FLOPs per token, memory, and how much data a run sees.

The memory figure is an estimate for fp32 training with AdamW: 16 bytes per trainable parameter
(weights 4 + gradients 4 + two Adam moments 8) plus activations kept for the backward pass. The activation
term follows Korthikanti et al. 2022 (per layer and token: 34*d + 5*heads*T values at 2 bytes in 16-bit
training), doubled for fp32, plus the logits and their gradient (the largest single tensor for small
models with big vocabularies).

Of a mixture of experts the plan shows both counts: all the parameters (what memory holds) and the active
ones, those a token runs through (what FLOPs per token are computed from).
"""

from __future__ import annotations

from lmforge.config import ModelConfig


def human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f} B"


def estimate(cfg: ModelConfig, *, batch_size: int, grad_accum: int, max_steps: int, train_tokens: int | None = None,
             bytes_per_act: int = 4) -> dict:
    T = cfg.context_length
    params = cfg.num_params()
    tokens_per_step = batch_size * grad_accum * T
    flops_tok = cfg.flops_per_token(T)
    act_per_layer_token = (34 * cfg.d_model + 5 * cfg.n_heads * T) * bytes_per_act / 2
    activations = batch_size * T * (cfg.n_layers * act_per_layer_token + 2 * cfg.vocab_size * 4)
    state = 16 * params
    out = {
        "parameters": params,
        "non_embedding_parameters": cfg.num_params(include_embeddings=False),
        "active_parameters": cfg.num_params(active=True),  # of a mixture of experts, those one token runs through
        "flops_per_token": flops_tok,
        "tokens_per_step": tokens_per_step,
        "total_tokens": tokens_per_step * max_steps,
        "total_flops": flops_tok * tokens_per_step * max_steps,
        "memory_weights_grads_adam": state,
        "memory_activations": int(activations),
        "memory_total": int(state + activations),
    }
    if train_tokens:
        out["train_tokens"] = train_tokens
        out["epochs"] = tokens_per_step * max_steps / train_tokens
    return out


def format_plan(cfg: ModelConfig, plan: dict) -> str:
    experts = f", {cfg.n_experts} experts ({cfg.experts_per_token} per token)" if cfg.n_experts else ""
    lines = [
        f"model          {cfg.name}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads "
        f"({cfg.n_kv_heads} kv), d_ff {cfg.d_ff}, context {cfg.context_length}, vocab {cfg.vocab_size}, "
        f"{cfg.positions}/{cfg.norm}/{cfg.mlp}{experts}",
        f"parameters     {plan['parameters']:,} ({human(plan['parameters'])}; {plan['non_embedding_parameters']:,} non-embedding)",
    ]
    if cfg.n_experts:
        lines.append(f"active/token   {plan['active_parameters']:,} ({human(plan['active_parameters'])}; "
                     f"the {cfg.experts_per_token} of {cfg.n_experts} experts a token runs through)")
    lines += [
        f"FLOPs/token    {human(plan['flops_per_token'])} (training, forward + backward)",
        f"tokens/step    {plan['tokens_per_step']:,}",
        f"run            {human(plan['total_tokens'])} tokens, {human(plan['total_flops'])}FLOPs",
        f"memory (est.)  {human_bytes(plan['memory_total'])} = weights+grads+AdamW {human_bytes(plan['memory_weights_grads_adam'])}"
        f" + activations {human_bytes(plan['memory_activations'])}",
    ]
    if "train_tokens" in plan:
        lines.append(f"data           {plan['train_tokens']:,} training tokens; this run covers {plan['epochs']:.2f} epochs")
    return "\n".join(lines)
