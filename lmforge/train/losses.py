"""Loss functions: pure functions of tensors, no model and no state, so each is unit-testable by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token negative log-likelihood in nats over the targets that are not `ignore_index`.

    logits (B, T, V), targets (B, T). Computed in float32 whatever the autocast dtype, because a bf16
    log-softmax over a large vocabulary loses the small probabilities the loss is made of.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_t | context) for every position: (B, T). The building block of scoring and DPO."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
