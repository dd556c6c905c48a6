"""The quality report's pure parts, against hand-made logits and direct computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import UserError
from lmforge.quant.report import (
    QualityReport, compare_logits, compare_models, decode_speed, eval_windows, format_report, summary_line,
)


def test_eval_windows_are_consecutive_and_bounded():
    ids = np.arange(100)
    w = eval_windows(ids, 10, 35)  # 35 tokens -> 3 windows of 10 scored positions
    assert w.shape == (3, 11)
    assert w[0].tolist() == list(range(11)) and w[1, 0].item() == 10 and w[2, -1].item() == 30
    assert eval_windows(ids, 10, 5).shape == (1, 11)  # at least one window
    assert eval_windows(ids, 1000, 10_000).shape == (1, 100)  # a window never longer than the text
    assert eval_windows(ids, 10, 10_000).shape == (9, 11)  # no more windows than the text holds
    with pytest.raises(UserError, match="at least 2"):
        eval_windows([7], 10, 10)


def test_compare_logits_against_direct_formulas():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 5, 7, generator=g)
    quant = ref + 0.1 * torch.randn(2, 5, 7, generator=g)
    quant[0, 0] = ref[0, 0].flip(-1)  # a position where the top token surely changes
    y = torch.randint(0, 7, (2, 5), generator=g)
    s = compare_logits(ref, quant, y)
    p, lp, lq = F.softmax(ref.double(), -1), F.log_softmax(ref.double(), -1), F.log_softmax(quant.double(), -1)
    assert s["count"] == 10
    assert s["nll_ref"] == pytest.approx(-lp.gather(-1, y[..., None]).sum().item())
    assert s["nll_q"] == pytest.approx(-lq.gather(-1, y[..., None]).sum().item())
    assert s["kld"] == pytest.approx(F.kl_div(lq, lp, reduction="sum", log_target=True).item())
    assert s["agree"] == int((ref.argmax(-1) == quant.argmax(-1)).sum()) < 10
    same = compare_logits(ref, ref.clone(), y)
    assert same["kld"] == 0.0 and same["agree"] == 10 and same["nll_q"] == same["nll_ref"]


def test_compare_models_adds_batches_up():
    torch.manual_seed(0)
    emb = torch.randn(11, 11)

    def ref(x):
        return emb[x]

    def quant(x):
        return emb[x] * 0.9

    windows = torch.randint(0, 11, (5, 9))
    whole = compare_models(ref, quant, windows, batch_size=5)
    parts = compare_models(ref, quant, windows, batch_size=2)
    for k in whole:
        assert whole[k] == pytest.approx(parts[k])
    x, y = windows[:, :-1], windows[:, 1:]
    nll = F.cross_entropy(emb[x].reshape(-1, 11), y.reshape(-1)).item()
    assert whole["ppl_before"] == pytest.approx(math.exp(nll))
    assert whole["top1"] == 100.0 and whole["eval_tokens"] == 40 and whole["kld"] > 0


def test_decode_speed_counts_from_the_first_token():
    import time

    def events():
        for _ in range(4):
            time.sleep(0.01)
            yield object()

    rate = decode_speed(events())
    assert rate is not None and 0 < rate <= 3 / 0.03 * 1.01  # 3 intervals of at least 10 ms
    assert decode_speed(iter([object()])) is None


def test_format_and_summary():
    r = QualityReport(type="Q8_0", eval_source="the validation split of builtin:pydocs", eval_tokens=4096,
                      ppl_before=10.0, ppl_after=10.02, kld=0.00123, top1=99.12, size_before=4_000_000,
                      size_after=1_062_500, decode_tok_s=55.5)
    assert r.dppl == pytest.approx(0.2)
    text = format_report(r)
    for s in ("Q8_0", "4,096 tokens", "10.0000 -> 10.0200", "+0.20 %", "0.00123", "99.12 %", "4.0 MB -> 1.1 MB",
              "55.5 tok/s"):
        assert s in text, s
    d = r.to_dict()
    assert d["dppl_percent"] == pytest.approx(0.2)
    assert summary_line({"type": "Q8_0", "report": d}) == "Q8_0, dPPL +0.20%, KLD 0.00123, top-1 99.1%"
    assert summary_line({"type": "Q8_0", "report": {**d, "kld": 3.2e-6}}) == "Q8_0, dPPL +0.20%, KLD 3.2e-06, top-1 99.1%"
    assert summary_line({"type": "Q4_K_M", "report": None}) == "Q4_K_M"
    assert summary_line({"type": "Q4_K_M", "report": {"kld": "x"}}) == "Q4_K_M"
