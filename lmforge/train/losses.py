"""Loss functions: pure functions of tensors, no model and no state, so each is unit-testable by hand."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lmforge.data.batching import IGNORE_INDEX  # the label that masks a place: set by the batches, skipped here
from lmforge.errors import UserError


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token negative log-likelihood in nats over the targets that are not `ignore_index`.

    logits (B, T, V) and targets (B, T), or any (..., V) and (...) alike (the (N, V) logits of the counted
    places only, `GPT(..., output_mask=)`). Computed in float32 whatever the autocast dtype, because a bf16
    log-softmax over a large vocabulary loses the small probabilities the loss is made of.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, *,
                      average: bool = False) -> torch.Tensor:
    """log p(labels | context) of each sequence: (B,), the sum over positions whose label != ignore_index.

    logits (B, T, V) and labels (B, T) are already aligned (labels[:, t] is the token logits[:, t] predicts,
    i.e. the caller has shifted them). The log-softmax is in float32. `average` divides each sum by its
    number of counted tokens (length-normalised scores; a sequence with none gives 0).

    logits may also be (N, V): the logits of the counted places only, in row-major order, as
    `GPT(..., output_mask=labels != ignore_index)` computes them (the same sums, without the output head
    over the prompt).

    Example: V = 2, one sequence, logits [[0, 0], [0, ln 3]], labels [1, -100] -> log(1/2) = -0.6931 (the
    second position is ignored; with label 1 it would add log(3/4)).
    """
    mask = labels != ignore_index  # (B, T)
    if logits.dim() == 2:
        logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
        picked = logp.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)  # (N,)
        rows = mask.nonzero()[:, 0]
        total = torch.zeros(labels.shape[0], dtype=picked.dtype, device=picked.device).index_add(0, rows, picked)
        return total / mask.sum(-1).clamp_min(1) if average else total
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    picked = logp.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    total = torch.where(mask, picked, torch.zeros_like(picked)).sum(-1)  # (B,)
    if average:
        return total / mask.sum(-1).clamp_min(1)
    return total


DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    *,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Preference loss of a batch of (chosen, rejected) pairs from sequence log-probs, each (B,).

    With pc, pr the policy's and rc, rr the reference model's log-probs of the chosen and rejected answers,
    and h = (pc - rc) - (pr - rr) (how much more the policy prefers chosen over rejected than the reference
    does):

      sigmoid (DPO, Rafailov et al. 2023):  loss = -log sigmoid(beta * h)
          with label_smoothing eps (conservative DPO: each label is wrong with probability eps):
                                             loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
      ipo (IPO, Azar et al. 2023):           loss = (h - 1 / (2 beta))^2
          (a squared loss towards a fixed margin, which doesn't push h to infinity on deterministic
          preferences. The paper's h is over whole sequences; TRL feeds IPO length-averaged log-probs, which
          `sequence_logprobs(..., average=True)` gives: the caller chooses.)

    Returns the mean over the batch and metrics (detached 0-dim float32 tensors, so logging them costs no
    device sync until read): rewards/chosen = mean beta (pc - rc), rewards/rejected = mean beta (pr - rr),
    rewards/margin = the mean difference of the two, rewards/accuracy = share of pairs whose chosen reward
    is higher than the rejected one.

    The reference log-probs are constants of the objective: they are detached here, so no gradient reaches
    a reference model even if its log-probs were computed with autograd on.

    Worked example (one pair, beta = 0.1): pc = -1, pr = -2, rc = -1.5, rr = -1.5. Then
    h = (-1 + 1.5) - (-2 + 1.5) = 0.5 + 0.5 = 1, and
      sigmoid: loss = -log sigmoid(0.1) = log(1 + e^-0.1) = 0.644397;
               d loss / d pc = -beta sigmoid(-beta h) = -0.1 * 0.475021 = -0.0475021 (descent raises pc),
               d loss / d pr = +0.0475021 (descent lowers pr);
      ipo:     loss = (1 - 1 / 0.2)^2 = (1 - 5)^2 = 16;
      rewards: chosen 0.1 * 0.5 = 0.05, rejected 0.1 * -0.5 = -0.05, margin 0.1, accuracy 1.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise UserError(f"unknown preference loss {loss_type!r}; choose one of {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise UserError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise UserError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    shapes = {tuple(t.shape) for t in logps}
    if len(shapes) != 1:
        raise ValueError(f"dpo_loss needs four log-prob tensors of one shape, got shapes {sorted(shapes)}")

    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    rc, rr = ref_chosen_logps.detach().float(), ref_rejected_logps.detach().float()
    chosen_logratio, rejected_logratio = pc - rc, pr - rr  # (B,)
    h = chosen_logratio - rejected_logratio  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2

    chosen_rewards, rejected_rewards = beta * chosen_logratio.detach(), beta * rejected_logratio.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }
    return losses.mean(), metrics


def _layers(router_logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """One layer's (N, E) router logits, or a sequence of them, as one (L*N, E) float32 tensor."""
    if isinstance(router_logits, torch.Tensor):
        return router_logits.float().reshape(-1, router_logits.shape[-1])
    return torch.cat([r.float().reshape(-1, r.shape[-1]) for r in router_logits])


def load_balancing_loss(router_logits: torch.Tensor | Sequence[torch.Tensor], n_experts: int, top_k: int, *,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """The auxiliary loss that keeps a mixture of experts' routing balanced (Switch Transformer, Fedus et al.
    2021, eqs. 4-6, with top-k routing as in Mixtral): E * sum_e f_e * P_e, over all layers' tokens, where

      f_e = (tokens that chose expert e among their top k) / tokens   (no gradient: a count; sums to k)
      P_e = mean router probability of expert e                      (the gradient flows through this)

    Perfectly even routing gives f_e = k/E and P_e = 1/E, so the loss is k; routing every token to the
    same experts, with all the probability on one of them, gives E. This is transformers'
    `load_balancing_loss_func` (which Mixtral scales by `router_aux_loss_coef`), numerically.

    router_logits: (N, E) of one layer or a sequence of them (GPT's `MoE.router_logits`); `mask` (N,) bool
    leaves padding out (the same mask applies to every layer, as rows of one batch).

    Worked example (E = 2, k = 1, one layer, three tokens): logits [[ln 3, 0], [0, ln 3], [ln 3, 0]] give
    probabilities [[0.75, 0.25], [0.25, 0.75], [0.75, 0.25]]; top-1 picks experts 0, 1, 0, so f = [2/3, 1/3],
    P = [7/12, 5/12], and loss = 2 * (2/3 * 7/12 + 1/3 * 5/12) = 19/18 = 1.055556 (balanced: 1).
    """
    logits = _layers(router_logits)  # (L*N, E)
    probs = torch.softmax(logits, dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices  # (L*N, k)
    counts = F.one_hot(chosen, n_experts).sum(1).float()  # (L*N, E): 1 where the token chose the expert
    if mask is None:
        f, p = counts.mean(0), probs.mean(0)
    else:
        w = mask.reshape(-1).float().repeat(logits.shape[0] // mask.numel())[:, None]  # (L*N, 1)
        total = w.sum().clamp_min(1.0)
        f, p = (counts * w).sum(0) / total, (probs * w).sum(0) / total
    return n_experts * (f * p).sum()


def router_z_loss(router_logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, eq. 5): the mean over tokens of logsumexp(router logits)^2.

    It keeps the router's logits small, where the softmax (and bf16) stay accurate; it does not change which
    experts are chosen. Example: logits [[0, 0]] give (ln 2)^2 = 0.480453.
    """
    return torch.logsumexp(_layers(router_logits), dim=-1).pow(2).mean()
