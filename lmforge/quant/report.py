"""The quality report of a quantization: what the quantized model loses against the original, on held-out text.

A quantized file is only worth its bytes if one can see what it costs. Perplexity alone hides a lot (two
models can have the same perplexity and disagree on many tokens), so the report follows llama.cpp's
`llama-perplexity --kl-divergence`: on the same token windows it compares

* perplexity before and after, and the change in percent (dPPL);
* the mean KL divergence KL(p_orig || p_quant) per token, in nats: how far the whole next-token
  distribution moved, not only the probability of the right token;
* top-1 agreement: how often both models rank the same token first (what greedy decoding sees);
* file sizes, and the quantized model's batch-1 decode speed (measured by the caller, who owns the engine).

The functions here are pure or take the models as arguments: choosing the text and loading models is the
CLI's job (`lmforge.cli.quantize`). The evaluated windows are the model's context length long (or less),
non-overlapping, and every position of a window is scored, as in the trainer's validation loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import UserError

DEFAULT_EVAL_TOKENS = 32_768  # enough for dPPL to about 0.1 %, a minute or so for a small model on a CPU


@dataclass
class QualityReport:
    """One quantization's cost. Sizes in bytes, KL in nats per token, percentages as 0..100."""

    type: str  # "Q4_K_M"
    eval_source: str  # where the held-out text came from ("validation split of builtin:pydocs", a path...)
    eval_tokens: int  # scored positions
    ppl_before: float
    ppl_after: float
    kld: float  # mean KL(p_orig || p_quant)
    top1: float  # % of positions where both models rank the same token first
    size_before: int | None = None  # the original as stored (all its weight files)
    size_after: int | None = None  # the quantized file
    decode_tok_s: float | None = None  # quantized model, batch 1, greedy
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dppl(self) -> float:
        """Change in perplexity, in percent of the original's."""
        return 100.0 * (self.ppl_after / self.ppl_before - 1.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dppl_percent"] = self.dppl
        return d


def eval_windows(tokens: np.ndarray | Sequence[int], window: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping windows of `window` + 1 token ids from the start of `tokens` (input = [:-1],
    target = [1:]), as many as give at most `max_tokens` scored positions (at least one window). A
    one-line UserError when `tokens` cannot fill even one window of 2 tokens."""
    ids = np.asarray(tokens, dtype=np.int64)
    if window < 1 or max_tokens < 1:
        raise UserError(f"evaluation needs a positive window and token budget, got {window} and {max_tokens}")
    window = min(window, max(1, len(ids) - 1))
    if len(ids) < 2:
        raise UserError(f"the evaluation text is {len(ids)} token(s) long; it needs at least 2")
    n = max(1, min((len(ids) - 1) // window, max_tokens // window))
    starts = np.arange(n) * window
    return torch.from_numpy(np.stack([ids[s:s + window + 1] for s in starts]))


@dataclass
class _Sums:
    nll_ref: float = 0.0
    nll_q: float = 0.0
    kld: float = 0.0
    agree: int = 0
    count: int = 0


def compare_logits(ref: torch.Tensor, quant: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Sums over all positions of two models' logits (..., V) for the same inputs: negative log-likelihood
    of `targets` under each, KL(softmax(ref) || softmax(quant)), top-1 agreements, and the count. Summed,
    not averaged, so batches add up exactly. In float64 (a Q8_0 model's KL is ~1e-3 of log-probabilities
    ~10), a bounded number of rows at a time."""
    V = ref.shape[-1]
    ref, quant, targets = ref.reshape(-1, V), quant.reshape(-1, V), targets.reshape(-1, 1).to(ref.device)
    out = {"nll_ref": 0.0, "nll_q": 0.0, "kld": 0.0, "agree": 0, "count": 0}
    rows = max(1, (1 << 22) // V)
    for i in range(0, ref.shape[0], rows):
        lr = F.log_softmax(ref[i:i + rows].double(), -1)
        lq = F.log_softmax(quant[i:i + rows].double(), -1)
        t = targets[i:i + rows]
        kld = (lr.exp() * (lr - lq)).sum(-1).clamp(min=0.0)  # >= 0 in exact arithmetic; rounding can dip below
        out["nll_ref"] += float(-lr.gather(1, t).sum())
        out["nll_q"] += float(-lq.gather(1, t).sum())
        out["kld"] += float(kld.sum())
        out["agree"] += int((lr.argmax(-1) == lq.argmax(-1)).sum())
        out["count"] += int(t.numel())
    return out


@torch.inference_mode()
def compare_models(ref: Callable[[torch.Tensor], torch.Tensor], quant: Callable[[torch.Tensor], torch.Tensor],
                   windows: torch.Tensor, *, batch_size: int = 4, device: str | torch.device = "cpu",
                   on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
    """Perplexity of both models, mean KL and top-1 agreement over `windows` (see `eval_windows`).
    `ref` and `quant` map input ids (B, T) to logits (B, T, V); `on_batch(n_windows)` reports progress."""
    s = _Sums()
    for i in range(0, windows.shape[0], batch_size):
        w = windows[i:i + batch_size].to(device)
        x, y = w[:, :-1], w[:, 1:]
        part = compare_logits(ref(x), quant(x), y)
        s.nll_ref += part["nll_ref"]
        s.nll_q += part["nll_q"]
        s.kld += part["kld"]
        s.agree += part["agree"]
        s.count += part["count"]
        if on_batch is not None:
            on_batch(w.shape[0])
    if s.count == 0:
        raise UserError("nothing to evaluate: no token windows")
    return {"ppl_before": math.exp(s.nll_ref / s.count), "ppl_after": math.exp(s.nll_q / s.count),
            "kld": s.kld / s.count, "top1": 100.0 * s.agree / s.count, "eval_tokens": s.count}


def decode_speed(events: Iterable[Any]) -> float | None:
    """Tokens per second of a stream of generated-token events, counted from the first token (so the
    prompt's prefill is not in it): (n - 1) / (time of last - time of first). None under 2 tokens."""
    first, n, last = None, 0, None
    for _ in events:
        last = time.perf_counter()
        if first is None:
            first = last
        n += 1
    if n < 2 or last is None or first is None or last <= first:
        return None
    return (n - 1) / (last - first)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def _kld(v: float) -> str:
    """KL divergences span orders of magnitude (Q8_0 ~1e-4, Q4_0 ~1e-2): fixed point, or two digits of
    mantissa below 1e-4 so a tiny one does not print as 0."""
    return f"{v:.5f}" if v >= 1e-4 or v == 0 else f"{v:.1e}"


def format_report(r: QualityReport) -> str:
    """The report as a small two-column table for the terminal."""
    rows = [
        ("type", r.type),
        ("evaluated on", f"{r.eval_tokens:,} tokens of {r.eval_source}"),
        ("perplexity", f"{r.ppl_before:.4f} -> {r.ppl_after:.4f}  ({r.dppl:+.2f} %)"),
        ("mean KL divergence", f"{_kld(r.kld)} nats/token"),
        ("top-1 agreement", f"{r.top1:.2f} %"),
        ("file size", f"{_size(r.size_before)} -> {_size(r.size_after)}"
                      + (f"  ({r.size_after / r.size_before:.1%})" if r.size_before and r.size_after else "")),
        ("decode (batch 1)", f"{r.decode_tok_s:.1f} tok/s" if r.decode_tok_s else "?"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def summary_line(quantization: dict[str, Any]) -> str:
    """One line for `lmforge show` from the `quantization` record of lmforge.json:
    "Q8_0, dPPL +0.20%, KLD 0.00100, top-1 99.1%" (just the type when there is no report)."""
    t = str(quantization.get("type") or "?")
    rep = quantization.get("report")
    if not isinstance(rep, dict):
        return t
    try:
        return (f"{t}, dPPL {float(rep['dppl_percent']):+.2f}%, KLD {_kld(float(rep['kld']))}, "
                f"top-1 {float(rep['top1']):.1f}%")
    except (KeyError, TypeError, ValueError):
        return t
