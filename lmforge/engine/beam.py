"""Beam search over the KV cache, with the semantics of Hugging Face transformers' `generate(num_beams=k)`.

One step, for k running beams (each a token sequence with a running sum of log-probabilities):

1. score every continuation: running sum + log_softmax(logits) -> k * V candidates;
2. keep the best `max(2, 1 + n_eos) * k` of them across all beams; that many guarantees k candidates that
   do not end in EOS (each beam contributes at most one candidate per EOS id), so k beams always run on;
3. candidates that end in EOS and rank among the best k become finished hypotheses, scored
   `sum_logprob / len(ids) ** length_penalty` (len counts the EOS token); the finished set keeps the k best.
   EOS candidates ranked below the best k are dropped, exactly as transformers does;
4. the best k candidates that did not end become the next running beams, and the cache rows follow them.

At the last allowed step every candidate "ends" (transformers' max-length criterion), so the best k
continuations join the finished set with finish_reason "length" (or "stop" when that last token is EOS).

When to stop before the budget (`early_stopping`), once k hypotheses have finished:
- True: stop at once.
- False: stop when the best running beam, scored at its current length, cannot beat the worst finished one.
- "never": as False, but with a positive length penalty the running beam is scored at the longest length it
  could reach, which is the classical, exhaustive beam search.

Worked example (k=2, length_penalty=1): choosing the third token, the best candidate is beam 0 + EOS with
sum -2.4, so a hypothesis of 3 tokens joins the finished set with score -2.4 / 3 = -0.8; the other candidates
keep running. Once two hypotheses have finished (the worse scoring -0.9, say) and the best running beam has
sum -3.0 after 3 tokens, -3.0 / 3 = -1.0 <= -0.9 and search stops (early_stopping=False); with "never" it
would be scored -3.0 / max_new_tokens instead, and go on while that beats -0.9.

The prompt is prefilled once with batch 1; its keys and values are then copied to all k cache rows and never
move again: reordering beams only touches the generated slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from lmforge.model.kv_cache import KVCache

NEG_INF = -1.0e9  # transformers' "impossible" score: finite, so sums and topk stay well defined


class Cancelled(Exception):
    """Raised by long engine jobs (beam search, scoring) when their `should_stop()` says the caller left."""


@dataclass
class BeamResult:
    """A finished hypothesis as a user sees it: what `lmforge generate --beams` prints and the server returns."""

    ids: list[int]  # the generated ids, without the EOS that ended it
    text: str  # their text, cut before the first stop string
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    score: float  # sum_logprob / n_tokens ** length_penalty: what the search ranked by
    sum_logprob: float
    n_tokens: int  # tokens generated, the EOS included (what usage counts)


@dataclass
class BeamHypothesis:
    ids: list[int]  # generated token ids, without the prompt; ends with the EOS token when it stopped on one
    score: float  # sum_logprob / len(ids) ** length_penalty
    sum_logprob: float
    finish_reason: str  # "stop" (EOS) or "length"


def _check_args(model, prompt: list[int], num_beams: int, max_new_tokens: int, early_stopping, n_best: int) -> int:
    """Refuse what cannot be searched; return the token budget (max_new_tokens capped at the context)."""
    if not prompt:
        raise ValueError("the prompt is empty")
    if num_beams < 1:
        raise ValueError(f"num_beams must be at least 1, got {num_beams}")
    if not 1 <= n_best <= num_beams:
        raise ValueError(f"n_best must be between 1 and num_beams ({num_beams}), got {n_best}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    ctx = model.config.context_length
    budget = min(max_new_tokens, ctx - len(prompt))
    if budget <= 0:
        raise ValueError(f"the prompt ({len(prompt)} tokens) leaves no room in the context ({ctx})")
    return budget


@torch.inference_mode()
def beam_search(model, prompt: list[int], *, num_beams: int, max_new_tokens: int, length_penalty: float = 1.0,
                early_stopping: bool | str = False, eos_ids: tuple[int, ...] = (), n_best: int = 1,
                should_stop: Callable[[], bool] | None = None, vocab: int | None = None) -> list[BeamHypothesis]:
    """The `n_best` best hypotheses of a beam search of width `num_beams`, best score first. `should_stop`
    is asked before every step; when it says yes the search raises `Cancelled` (its client went away). Ids
    from `vocab` on (past the tokenizer's vocabulary) are never chosen."""
    budget = _check_args(model, prompt, num_beams, max_new_tokens, early_stopping, n_best)
    cfg = model.config
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    k, P = num_beams, len(prompt)
    if early_stopping != "never":
        early_stopping = bool(early_stopping)
    if k == 1:
        early_stopping = True  # transformers decodes greedily then: the first EOS ends the search
    eos = torch.tensor(sorted({int(e) for e in eos_ids}), dtype=torch.long, device=device)
    n_cand = max(2, 1 + eos.numel()) * k

    # Prefill once, then give every beam row the prompt's keys and values. The last token chosen is never fed
    # back, so P + budget - 1 slots suffice.
    cache = KVCache.for_model(cfg, k, P + budget - 1, dtype=dtype, device=device)
    prefill = KVCache.for_model(cfg, 1, P, dtype=dtype, device=device)
    logits = model(torch.tensor([prompt], device=device), cache=prefill, last_only=True)[:, -1]  # (1, V)
    cache.k[:, :, :, :P] = prefill.k  # broadcast over the beam dimension
    cache.v[:, :, :, :P] = prefill.v
    cache.length = P
    del prefill
    logits = logits.expand(k, -1)  # (k, V)
    V = logits.shape[-1]

    # Only beam 0 is live at first: k identical rows would otherwise fill the beam with k copies of one token.
    running = torch.full((k,), NEG_INF, dtype=torch.float32, device=device)
    running[0] = 0.0
    seqs = torch.zeros((k, budget), dtype=torch.long, device=device)  # (k, budget) generated ids per beam
    finished: list[BeamHypothesis] = []
    same_order = torch.arange(k, device=device)

    for t in range(budget):  # t tokens generated so far; this step picks token t
        if should_stop is not None and should_stop():
            raise Cancelled("the beam search was cancelled")
        logits = logits.float()
        if vocab is not None and vocab < logits.shape[-1]:
            logits = logits.clone()
            logits[:, vocab:] = NEG_INF
        scores = F.log_softmax(logits, dim=-1) + running[:, None]  # (k, V) sums if extended by each token
        cand_scores, flat = scores.view(-1).topk(min(n_cand, k * V))  # (n_cand,) best first
        src, tok = flat // V, flat % V  # the beam each candidate extends, and its new token
        cand_seqs = seqs[src]
        cand_seqs[:, t] = tok
        is_eos = torch.isin(tok, eos)
        last = t + 1 == budget
        ends = torch.ones_like(is_eos) if last else is_eos

        # Finished hypotheses: only candidates ranked among the best k may join (the rest are spares).
        n_len = t + 1
        for i in ends[:k].nonzero().flatten().tolist():
            s = cand_scores[i]
            if s <= NEG_INF / 2:  # an extension of a not-yet-live beam (vocabularies smaller than 2k)
                continue
            # Scores stay float32, as in transformers, so that rankings and the stopping test agree with it.
            score = float(s / n_len ** length_penalty)
            reason = "stop" if bool(is_eos[i]) else "length"
            finished.append(BeamHypothesis(cand_seqs[i, :n_len].tolist(), score, float(s), reason))
        finished.sort(key=lambda h: h.score, reverse=True)  # stable: earlier hypotheses win ties
        del finished[k:]
        if last:
            break

        # Next running beams: the best k candidates that did not just end.
        live_scores = cand_scores + ends.float() * NEG_INF
        keep = live_scores.topk(k).indices  # (k,) sorted, so running[0] is the best beam
        running, seqs, beam_idx = live_scores[keep], cand_seqs[keep], src[keep]

        if len(finished) == k:
            if early_stopping is True:
                break
            # Could the best running beam still beat the worst finished hypothesis? (transformers' heuristic)
            best_len = budget if (early_stopping == "never" and length_penalty > 0) else n_len
            if float(running[0] / best_len ** length_penalty) <= finished[-1].score:
                break

        # Each beam row of the cache now holds the history of the beam it extends. Prompt slots are equal in
        # every row, so only the generated ones [P, length) move.
        if t > 0 and not torch.equal(beam_idx, same_order):
            L = cache.length
            cache.k[:, :, :, P:L] = cache.k[:, :, :, P:L].index_select(1, beam_idx)
            cache.v[:, :, :, P:L] = cache.v[:, :, :, P:L].index_select(1, beam_idx)
        logits = model(tok[keep][:, None], cache=cache)[:, -1]  # (k, V)

    return finished[:n_best]


def finish_beams(tokenizer, hyps: list[BeamHypothesis], *, stop: tuple[str, ...] | list[str] = (),
                 eos_ids: tuple[int, ...] | set[int] = ()) -> list[BeamResult]:
    """THE finalisation of beam hypotheses, for the CLI and the server alike: the EOS that ended a
    hypothesis is dropped, the text is cut before the first stop string (which makes it a "stop"), and the
    ranking of the search is kept (cutting at a stop string does not re-rank: the score is the search's)."""
    out = []
    for h in hyps:
        ids = h.ids[:-1] if h.ids and h.ids[-1] in eos_ids else list(h.ids)
        # the continuation's bytes, as the streamed paths build it: `decode` would drop a SentencePiece
        # vocabulary's leading space, which belongs to a continuation (llama.cpp keeps it too)
        text = b"".join(tokenizer.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
        reason = h.finish_reason
        cuts = [text.find(s) for s in stop if s in text]
        if cuts:
            text, reason = text[:min(cuts)], "stop"
        out.append(BeamResult(ids, text, reason, h.score, h.sum_logprob, len(h.ids)))
    return out
