"""Activation checkpointing: trade compute for memory by recomputing each block's activations in the backward.

Without it the backward pass needs every intermediate tensor of every block (attention inputs, MLP
hidden states, norms: most of training memory at long contexts, see `lmforge.plan.training_memory`).
With it each transformer block keeps only its input; in the backward the block's forward runs once more
to rebuild what its gradient needs (`torch.utils.checkpoint`, non-reentrant). Cost: one extra forward
per block, about a third more compute per step; gain: activation memory of one block instead of all.

Applied from outside the model (`model/gpt.py` does not know): each block's `forward` is replaced, on that
instance only, by one that runs the original under `checkpoint`. The module tree is unchanged, so
parameter names, state dicts, checkpoints and LoRA are the same with and without it, and a run may be
resumed with the flag switched on or off. As torchtitan does, apply it BEFORE wrapping for several
processes: DDP and tensor parallelism see ordinary blocks, and FSDP2's hooks (on each block's `__call__`)
gather the weights before the recomputation needs them.

Dropout stays exact: `checkpoint` restores the RNG state for the recomputation, so losses and gradients are
those of the run without it (tests/train/test_hardware.py checks both, and that fewer bytes are saved).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["apply_activation_checkpointing", "is_checkpointed"]

_MARK = "_lmforge_checkpointed_forward"


def _checkpointed(block: torch.nn.Module, forward):
    def run(x, *args, **kwargs):
        cache = args[3] if len(args) > 3 else kwargs.get("cache")
        # Only a training forward that will be differentiated needs it; inference (a KV cache, no_grad,
        # evaluation) runs the block as it is.
        if cache is None and block.training and torch.is_grad_enabled():
            return checkpoint(forward, x, *args, use_reentrant=False, **kwargs)
        return forward(x, *args, **kwargs)

    return run


def apply_activation_checkpointing(model: torch.nn.Module) -> int:
    """Recompute each of `model.blocks` in the backward. Idempotent; returns how many blocks are checkpointed.
    `model` is the bare model (`lmforge.model.gpt.unwrap` of a wrapper)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("activation checkpointing works per transformer block, and this model has no .blocks")
    for block in blocks:
        if not getattr(block, _MARK, False):
            block.forward = _checkpointed(block, block.forward)
            setattr(block, _MARK, True)
    return len(blocks)


def is_checkpointed(model: torch.nn.Module) -> bool:
    blocks = getattr(model, "blocks", None) or []
    return bool(blocks) and all(getattr(b, _MARK, False) for b in blocks)
