"""Pure loss functions (lmforge/train/losses.py), each checked against a computation written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.errors import UserError
from lmforge.train.losses import cross_entropy, dpo_loss, sequence_logprobs

BETA = 0.1


def t(*xs: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32, requires_grad=grad)


def logsigmoid(x: float) -> float:
    return -math.log(1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------------
# sequence_logprobs
# ---------------------------------------------------------------------------------------------------
def test_sequence_logprobs_is_a_masked_gather():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.5, -1.0, 2.0]],
                           [[3.0, 0.0, -3.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]])  # (B=2, T=3, V=3)
    labels = torch.tensor([[2, 0, -100],
                           [-100, 1, 0]])

    def logp(row: list[float], k: int) -> float:  # log softmax(row)[k], by hand
        return row[k] - math.log(sum(math.exp(x) for x in row))

    want = [logp([0, 0, 0], 2) + logp([1, 2, 3], 0),  # = log(1/3) + (1 - log(e + e^2 + e^3))
            logp([0, 0, 0], 1) + logp([1, 1, 0], 0)]
    got = sequence_logprobs(logits, labels)
    assert got.shape == (2,) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-6, rtol=0)
    torch.testing.assert_close(sequence_logprobs(logits, labels, average=True), torch.tensor(want) / 2)

    # What sits at an ignored position makes no difference, however large.
    noisy = logits.clone()
    noisy[0, 2] = torch.tensor([1e4, -1e4, 0.0])
    noisy[1, 0] = torch.tensor([-1e4, 0.0, 1e4])
    torch.testing.assert_close(sequence_logprobs(noisy, labels), got)
    # Another ignore index (e.g. a pad id), and a sequence with nothing counted.
    labels_pad = torch.where(labels == -100, torch.tensor(7), labels)
    torch.testing.assert_close(sequence_logprobs(logits, labels_pad, ignore_index=7), got)
    empty = torch.full((1, 3), -100)
    assert sequence_logprobs(logits[:1], empty).item() == 0.0
    assert sequence_logprobs(logits[:1], empty, average=True).item() == 0.0


def test_sequence_logprobs_upcasts_half_precision():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    got = sequence_logprobs(logits.to(torch.bfloat16), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sequence_logprobs(logits.to(torch.bfloat16).float(), labels))


# ---------------------------------------------------------------------------------------------------
# dpo_loss
# ---------------------------------------------------------------------------------------------------
def test_dpo_loss_by_hand():
    # Policy: chosen -1, rejected -2. Reference: -1.5 for both. h = (-1 + 1.5) - (-2 + 1.5) = 1.
    loss, metrics = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), BETA)
    assert loss.item() == pytest.approx(-logsigmoid(0.1), abs=1e-6)
    assert loss.item() == pytest.approx(0.644397, abs=1e-6)  # log(1 + e^-0.1)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.05, abs=1e-7)
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.05, abs=1e-7)
    assert metrics["rewards/margin"].item() == pytest.approx(0.1, abs=1e-7)
    assert metrics["rewards/accuracy"].item() == 1.0
    assert all(not m.requires_grad and m.dim() == 0 for m in metrics.values())

    # A batch: the mean of the pairs' losses; the second pair is preferred the wrong way round
    # (h = (-3 + 2) - (-1 + 1) = -1, beta 0.5).
    loss, metrics = dpo_loss(t(-1.0, -3.0), t(-2.0, -1.0), t(-1.5, -2.0), t(-1.5, -1.0), 0.5)
    assert loss.item() == pytest.approx((-logsigmoid(0.5) - logsigmoid(-0.5)) / 2, abs=1e-6)
    assert metrics["rewards/accuracy"].item() == 0.5
    assert metrics["rewards/chosen"].item() == pytest.approx((0.5 * 0.5 + 0.5 * -1.0) / 2)
    assert metrics["rewards/margin"].item() == pytest.approx((0.5 * 1 + 0.5 * -1) / 2)


def test_label_smoothing_by_hand():
    eps = 0.2
    loss, _ = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), BETA, label_smoothing=eps)
    assert loss.item() == pytest.approx(-(1 - eps) * logsigmoid(0.1) - eps * logsigmoid(-0.1), abs=1e-6)


def test_ipo_loss_by_hand():
    loss, metrics = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), BETA, loss_type="ipo")
    assert loss.item() == pytest.approx((1.0 - 1 / (2 * BETA)) ** 2, abs=1e-5)  # (1 - 5)^2
    assert loss.item() == pytest.approx(16.0, abs=1e-5)
    assert metrics["rewards/margin"].item() == pytest.approx(0.1, abs=1e-7)
    # At the target margin h = 1 / (2 beta) the loss is zero.
    loss, _ = dpo_loss(t(-1.0), t(-6.0), t(-1.0), t(-1.0), BETA, loss_type="ipo")
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_gradient_pushes_chosen_up_and_rejected_down(loss_type):
    pc, pr = t(-1.0, -4.0, -2.0, grad=True), t(-2.0, -1.0, -2.0, grad=True)
    rc, rr = t(-1.5, -3.0, -2.0), t(-1.5, -1.5, -2.0)
    loss, _ = dpo_loss(pc, pr, rc, rr, BETA, loss_type=loss_type)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # a descent step raises pc and lowers pr
    torch.testing.assert_close(pc.grad, -pr.grad)  # the loss depends on pc - pr only
    if loss_type == "sigmoid":  # first pair: d loss/d pc = -beta sigmoid(-beta h) / B with h = 1, B = 3
        assert pc.grad[0].item() == pytest.approx(-BETA / (1 + math.exp(0.1)) / 3, abs=1e-7)

    with torch.no_grad():  # ... and one step of descent does lower the loss
        new_loss, _ = dpo_loss(pc - 0.1 * pc.grad, pr - 0.1 * pr.grad, rc, rr, BETA, loss_type=loss_type)
    assert new_loss < loss


def test_reference_gets_no_gradient():
    # Reference log-probs computed by a "model" with autograd on: dpo_loss detaches them.
    ref_weight = torch.tensor(2.0, requires_grad=True)
    rc, rr = ref_weight * t(-0.75), ref_weight * t(-0.75)
    pc, pr = t(-1.0, grad=True), t(-2.0, grad=True)
    loss, _ = dpo_loss(pc, pr, rc, rr, BETA)
    loss.backward()
    assert ref_weight.grad is None
    assert pc.grad is not None and pr.grad is not None
    assert loss.item() == pytest.approx(0.644397, abs=1e-6)  # rc = rr = -1.5: the worked example


def test_bad_arguments():
    args = (t(-1.0), t(-2.0), t(-1.5), t(-1.5))
    with pytest.raises(UserError, match="unknown preference loss 'kto'"):
        dpo_loss(*args, BETA, loss_type="kto")
    with pytest.raises(UserError, match="beta must be positive"):
        dpo_loss(*args, 0.0)
    with pytest.raises(UserError, match="label_smoothing"):
        dpo_loss(*args, BETA, label_smoothing=0.5)
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(t(-1.0, -2.0), *args[1:], BETA)


def test_losses_over_the_counted_places_only_equal_the_full_ones():
    """GPT(..., output_mask=) computes logits only where labels count; the losses are the same numbers."""
    from lmforge.model.gpt import GPT
    from lmforge.presets import get_preset

    torch.manual_seed(0)
    m = GPT(get_preset("tiny", vocab_size=100, context_length=16)).eval()
    ids, labels = torch.randint(0, 100, (3, 10)), torch.randint(0, 100, (3, 10))
    labels[:, :4] = -100
    labels[1, 8:] = -100
    labels[2] = -100  # a row with nothing to count
    keep = labels != -100
    full, sel = m(ids), m(ids, output_mask=keep)
    assert sel.shape == (int(keep.sum()), 100)
    torch.testing.assert_close(sequence_logprobs(sel, labels), sequence_logprobs(full, labels))
    torch.testing.assert_close(sequence_logprobs(sel, labels, average=True), sequence_logprobs(full, labels, average=True))
    torch.testing.assert_close(cross_entropy(sel, labels[keep]), cross_entropy(full, labels))
