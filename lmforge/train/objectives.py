"""Training objectives: each maps (model, batch) -> (loss, metrics) and plugs into the one `fit()`.

An objective knows what a batch means and which loss to apply; it knows nothing of optimisers,
accumulation or checkpoints, which is what lets pretraining, SFT and DPO share one loop. Metrics are
scalar tensors or floats; `fit()` logs them (prefixed with `val_` for validation).
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.model.gpt import router_logits, unwrap
from lmforge.train.losses import (
    IGNORE_INDEX,
    cross_entropy,
    dpo_loss,
    load_balancing_loss,
    router_z_loss,
    sequence_logprobs,
)


class Pretrain:
    """Next-token prediction on every position of a window: batch = (inputs, targets shifted by one).

    A mixture of experts also learns, while training, to spread its tokens over its experts:
    loss = cross-entropy + aux_coef * load-balancing loss (+ z_coef * router z-loss), as Mixtral's
    `router_aux_loss_coef` does (its default, 0.001, is TrainConfig's). The metrics then say what each term
    was (lm_loss, aux_loss, z_loss). Validation scores the cross-entropy alone, so validation losses and
    perplexities compare with those of dense models.
    """

    def __init__(self, aux_coef: float = 0.001, z_coef: float = 0.0) -> None:
        self.aux_coef, self.z_coef = aux_coef, z_coef

    def __call__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x, y = batch
        return with_router_losses(model, cross_entropy(model(x), y), self.aux_coef, self.z_coef)


pretrain = Pretrain()


def with_router_losses(model: torch.nn.Module, loss: torch.Tensor, aux_coef: float, z_coef: float) -> tuple[torch.Tensor, dict]:
    """`loss` plus the router losses of the model's last forward pass, when it has experts and is training."""
    logits = router_logits(model)
    if not logits or not unwrap(model).training:
        return loss, {}
    cfg = unwrap(model).config
    aux = load_balancing_loss(logits, cfg.n_experts, cfg.experts_per_token)
    metrics = {"lm_loss": loss.detach(), "aux_loss": aux.detach()}
    total = loss + aux_coef * aux
    if z_coef:
        z = router_z_loss(logits)
        total, metrics["z_loss"] = total + z_coef * z, z.detach()
    return total, metrics


def sft(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Supervised fine-tuning: next-token loss on the assistant tokens only.

    The batch comes from `lmforge.data.sft.SFTBatches`: `labels` are the shifted targets with -100 on
    system/user turns, role headers and padding, so the mean runs over exactly the reply tokens (and the
    end-of-turn token that teaches the model to stop). Right padding needs no attention mask: under the
    causal mask no real token ever attends to a pad that comes after it. The output head runs only at the
    reply's places (`output_mask`): on a grounded prompt that is a tenth of them.
    """
    labels = batch["labels"]
    keep = labels != IGNORE_INDEX
    return cross_entropy(model(batch["input_ids"], output_mask=keep), labels[keep]), {}


def policy_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the chosen and the rejected completions, in one (2B, T) forward pass."""
    b = batch["chosen_input_ids"].shape[0]
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    logps = sequence_logprobs(model(ids, output_mask=labels != IGNORE_INDEX), labels)
    return logps[:b], logps[b:]


class DPO:
    """Direct preference optimisation (or IPO) against reference log-probs carried in the batch.

    The reference model is the policy before alignment; its log-probs are computed once, before training,
    and looked up per example (`ref_chosen_logps`, `ref_rejected_logps`), so no second model sits in
    memory and the reference can never receive a gradient.
    """

    def __init__(self, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> None:
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        pc, pr = policy_logps(model, batch)
        loss, metrics = dpo_loss(pc, pr, batch["ref_chosen_logps"], batch["ref_rejected_logps"], self.beta,
                                 loss_type=self.loss_type, label_smoothing=self.label_smoothing)
        # Also the plain likelihood preference: does the policy itself give the chosen answer more probability?
        metrics["pref_accuracy"] = (pc.detach() > pr.detach()).float().mean()
        return loss, metrics
