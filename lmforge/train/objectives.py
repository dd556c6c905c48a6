"""Training objectives: each maps (model, batch) -> (loss, metrics) and plugs into the one `fit()`.

An objective knows what a batch means and which loss to apply; it knows nothing of optimisers,
accumulation or checkpoints, which is what lets pretraining, SFT and DPO share one loop.
"""

from __future__ import annotations

import torch

from lmforge.train.losses import cross_entropy


def pretrain(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Next-token prediction on every position of a window: batch = (inputs, targets shifted by one)."""
    x, y = batch
    return cross_entropy(model(x), y), {}
