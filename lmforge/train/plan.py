"""Plan a run before paying for it: parameters, FLOPs per token, memory, and how much data a run sees.

What `lmforge pretrain --dry-run` prints. The formulas live in `lmforge.plan` (one home, shared with
`lmforge plan`): the memory figure is `plan.training_memory` for one process - weights, gradients and
two AdamW moments in fp32 (16 bytes a parameter) plus the activations kept for the backward pass, counted
tensor by tensor after Korthikanti et al. 2022 (at 4 bytes a value for fp32 training, 2 under bf16
autocast), plus the logits and their gradient (the largest single tensor for small models with big
vocabularies). `lmforge plan` adds parallelism, checkpointing, inference, time, cost and CO2.

Of a mixture of experts the plan shows both counts: all the parameters (what memory holds) and the active
ones, those a token runs through (what FLOPs per token are computed from).
"""

from __future__ import annotations

from lmforge.config import ModelConfig
from lmforge.plan import human, human_bytes, training_memory

__all__ = ["estimate", "format_plan", "human", "human_bytes"]


def estimate(cfg: ModelConfig, *, batch_size: int, grad_accum: int, max_steps: int, train_tokens: int | None = None,
             bytes_per_act: int = 4) -> dict:
    T = cfg.context_length
    params = cfg.num_params()
    tokens_per_step = batch_size * grad_accum * T
    flops_tok = cfg.flops_per_token(T)
    memory = training_memory(cfg, batch=batch_size, seq=T, precision="bf16" if bytes_per_act == 2 else "fp32",
                             micro_batches=grad_accum)
    state = int(sum(memory[k].value for k in ("weights", "gradients", "optimizer")))
    activations = memory["activations"].value
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
