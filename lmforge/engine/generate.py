"""The generation engine shared by the CLI, the HTTP server and the web UI.

`Engine.generate(prompts, params)` prefills every prompt in one forward pass over a preallocated KV cache,
then decodes one token per step for the whole batch, yielding a `TokenEvent` per sequence and step: the
token, its text delta (always whole UTF-8 characters), its log-probability and the top alternatives, and a
finish reason when the sequence ends (EOS, a stop string, max_new_tokens, or the context limit).

Prompts of different lengths are left-padded into one batch: each sequence gets its own positions, and
the attention mask (`KVCache.mask` over a per-row key mask) hides every row's padding, so the padded batch
computes exactly what each prompt would alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from lmforge.engine.beam import Cancelled, beam_search, finish_beams
from lmforge.engine.constrain import Constraint, FailedConstraint, apply_constraints
from lmforge.engine.detokenize import IncrementalDetokenizer, StopMatcher
from lmforge.engine.sampling import SamplingParams, penalty_window, sample_from, token_logprobs
from lmforge.model.kv_cache import KVCache


@dataclass
class TokenEvent:
    """One step of one sequence. `token_id` is None only for a final event that carries no token."""

    seq: int
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" (EOS or stop string) | "length" (max tokens or context)


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.ids),
                "total_tokens": len(self.prompt_ids) + len(self.ids)}


@dataclass
class ScoreResult:
    ids: list[int]
    logprobs: list[float]  # log p(ids[i] | ids[:i]) for every scored token (the first is conditioned on BOS)
    n_chars: int
    top_logprobs: list[list[tuple[int, float]]] | None = None  # the k most likely tokens at each scored place

    @property
    def total_logprob(self) -> float:
        return float(sum(self.logprobs))

    @property
    def perplexity(self) -> float:
        return math.exp(-self.total_logprob / max(1, len(self.logprobs)))


def choose_tokens(logits: torch.Tensor, params: SamplingParams, states: Sequence["SequenceState"]) -> torch.Tensor:
    """The next token of every row of `logits` (B, V), all under one `params`, by `sample_from`: each row's
    own history for the penalties (built only when a penalty is on) and its own random generator. With a
    grammar, each unfinished row's disallowed ids are masked off first (on a copy: the caller's logits stay
    raw for the logprobs); rows without one never pay for it."""
    if params.grammar is not None:
        logits = apply_constraints(logits, [None if s.finished else s.constraint for s in states])
    prev = penalty_window([s.history for s in states], params.repeat_last_n, logits.device) if params.penalized else None
    return sample_from(logits, params, prev, [s.generator for s in states])


class SequenceState:
    """One sequence being decoded: its token history (what penalties look at), its random generator, the
    incremental detokenizer and stop-string matcher, its token budget, and its place in the grammar when the
    request has one (`constraint`). `push(token)` turns the chosen token into a `TokenEvent` and decides
    whether the sequence is finished. The batch engine and the server's continuous-batching scheduler share
    it, so both stop, stream and count exactly alike.

    A grammar ends a sequence too: its EOS (allowed when the grammar accepts) is an EOS even under
    `ignore_eos`, and once nothing more can follow (the closing brace of a JSON object) the sequence stops
    with "stop" at once, without a step spent on an EOS token."""

    def __init__(self, tokenizer, prompt_ids: list[int], params: SamplingParams, budget: int, seq: int = 0,
                 eos: set[int] | None = None, device: torch.device | str = "cpu", seed_offset: int | None = None) -> None:
        self.params, self.budget, self.seq = params, budget, seq
        self.eos = eos if eos is not None else set()
        self.history = list(prompt_ids)
        self.n_prompt = len(prompt_ids)
        self.n_out = 0
        self.finished = False
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = StopMatcher(params.stop) if params.stop else None
        # a fresh copy of the grammar the handler compiled (constrain.py); one that cannot be started fails at
        # this row's first mask, inside the per-row error handling, never in a prefill other requests share
        self.constraint: Constraint | FailedConstraint | None = None
        if params.grammar is not None:
            try:
                self.constraint = params.grammar.constraint(tokenizer)
            except Exception as e:
                self.constraint = FailedConstraint(e)
        if self.constraint is not None:
            self.eos = self.eos | self.constraint.eos
        self.generator = torch.Generator(device=device)
        offset = seq if seed_offset is None else seed_offset
        # seed + offset, wrapped into the 64 bits a generator takes (any int the API accepts stays valid)
        self.generator.manual_seed((params.seed + offset) % 2**64 if params.seed is not None
                                   else int(torch.randint(0, 2**62, ()).item()))

    def push(self, tok: int, logprob: float | None = None, top: list[tuple[int, float]] | None = None) -> TokenEvent:
        self.n_out += 1
        self.history.append(tok)
        ev = TokenEvent(seq=self.seq, token_id=tok, text="", logprob=logprob, top_logprobs=top)
        if self.constraint is not None:
            self.constraint.advance(tok)
        if tok in self.eos:
            ev.text, _ = self._finish_text()
            ev.finish_reason = "stop"
        else:
            delta = self.detok.add(tok)
            if self.stop is not None:
                delta, hit = self.stop.push(delta)
                if hit:
                    ev.finish_reason = "stop"
            ev.text = delta
            if ev.finish_reason is None and self.constraint is not None and self.constraint.done:
                tail, _ = self._finish_text()  # the grammar is complete: nothing may follow
                ev.text += tail
                ev.finish_reason = "stop"
            if ev.finish_reason is None and self.n_out >= self.budget:
                tail, stopped = self._finish_text()
                ev.text += tail
                ev.finish_reason = "stop" if stopped else "length"
        self.finished = ev.finish_reason is not None
        return ev

    def _finish_text(self) -> tuple[str, bool]:
        """The text still held back at the end of the sequence, and whether a stop string ended it."""
        tail = self.detok.flush()
        if self.stop is None:
            return tail, False
        text, hit = self.stop.push(tail)
        if hit:
            return text, True
        text += self.stop.flush()
        return text, self.stop.stopped


class Engine:
    """A loaded model plus its tokenizer, ready to generate and score.

    `fast=True` swaps the linear layers for `FastLinear` (a bandwidth-bound matrix-vector kernel for the
    batch-1 decode step, see engine/fastpath.py) when that kernel can be built on this machine.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, fast: bool = True) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        p = next(self.model.parameters())
        if fast and p.device.type == "cpu":
            from lmforge.engine import fastpath

            if fastpath.available():
                low = p.dtype if p.dtype in (torch.bfloat16, torch.float16) else None
                if low is not None:
                    # Weight-only low precision, as llama.cpp does: matrices stay bf16/fp16 (half the bytes to
                    # stream per token) while activations, norms and the KV cache run in fp32 -- CPUs without
                    # native bf16 arithmetic compute fp32 much faster, and nothing is rounded twice.
                    self.model.float()
                    self.model.reset_position_tables()
                fastpath.accelerate(self.model, dtype=low)
        self.device = p.device
        # the activations' dtype, which the KV cache follows: the embedding's, or float32 when it stays packed
        emb = getattr(self.model.tok_emb, "weight", None)
        self.dtype = emb.dtype if isinstance(emb, torch.Tensor) else torch.float32
        # Models often have more embedding rows than their tokenizer has tokens (Qwen2: 151,936 for 151,665,
        # rounded up for speed). Those ids have no text: they are never chosen, nor offered as alternatives.
        self.text_vocab = min(self.config.vocab_size, tokenizer.vocab_size)

    def text_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (..., V) as float32 with the ids past the tokenizer's vocabulary ruled out (-inf)."""
        logits = logits.float()
        if self.text_vocab < logits.shape[-1]:
            logits[..., self.text_vocab:] = float("-inf")
        return logits

    # ------------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt. Text gets the tokenizer's BOS when it uses one; an empty prompt starts from
        BOS, and is refused when the tokenizer has none (there would be nothing to condition on)."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
            bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        if not ids:
            if self.tokenizer.bos_id is None:
                raise ValueError("the prompt is empty and this model has no BOS token to start from")
            ids = [self.tokenizer.bos_id]
        if len(ids) >= self.config.context_length:
            raise ValueError(f"the prompt is {len(ids)} tokens; the context is {self.config.context_length} tokens, "
                             f"which leaves no room to generate")
        return ids

    def eos_ids(self, params: SamplingParams) -> set[int]:
        """The token ids that end a sequence under `params`: the tokenizer's EOS ids (unless `ignore_eos`)
        and the request's `stop_token_ids`."""
        eos = set() if params.ignore_eos else set(self.tokenizer.eos_ids)
        return eos | set(params.stop_token_ids)

    # ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Stream events for a batch of prompts (sampling or greedy; beam search is `beam_search`)."""
        params = (params or SamplingParams()).validate()
        if params.num_beams > 1:
            raise ValueError("beam search returns whole hypotheses, not a token stream; use Engine.beam_search")
        if not prompts:
            return
        encoded = [self.encode_prompt(p) for p in prompts]
        yield from self._generate_ids(encoded, params)

    def _generate_ids(self, encoded: list[list[int]], params: SamplingParams) -> Iterator[TokenEvent]:
        cfg, dev = self.config, self.device
        B, P = len(encoded), max(map(len, encoded))
        budgets = [min(params.max_new_tokens, cfg.context_length - len(ids)) for ids in encoded]
        S = P + max(budgets)
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0

        idx = torch.full((B, P), pad, dtype=torch.long)
        positions = torch.zeros((B, P), dtype=torch.long)
        key_mask = torch.zeros((B, S), dtype=torch.bool)
        for b, ids in enumerate(encoded):
            n = len(ids)
            idx[b, P - n:] = torch.tensor(ids)
            positions[b, P - n:] = torch.arange(n)
            key_mask[b, P - n:P] = True
        padded = any(len(ids) != P for ids in encoded)
        idx, positions, key_mask = idx.to(dev), positions.to(dev), key_mask.to(dev)
        cache = KVCache.for_model(cfg, B, S, max_write=P, dtype=self.dtype, device=dev)  # (rings: window + P - 1)

        eos = self.eos_ids(params)
        seqs = [SequenceState(self.tokenizer, ids, params, budgets[b], b, eos, dev) for b, ids in enumerate(encoded)]
        k_top = params.logprobs or 0

        prefill_mask = cache.mask(torch.arange(P, device=dev), key_mask) if padded else None
        logits = self.model(idx, positions=positions if padded else None, cache=cache, mask=prefill_mask,
                            last_only=True)[:, -1]
        logits = self.text_logits(logits)
        next_pos = positions[:, -1] + 1
        step_slot = P
        all_slots = torch.arange(S, device=dev)  # slices of it feed each step, no per-step allocation
        while True:
            chosen = choose_tokens(logits, params, seqs)
            if params.logprobs is not None:
                lp, top_ids, top_lp = token_logprobs(logits, chosen, k_top)
                lp, top_ids, top_lp = lp.tolist(), top_ids.tolist(), top_lp.tolist()
            chosen_list = chosen.tolist()
            for b, seq in enumerate(seqs):
                if not seq.finished:
                    yield seq.push(chosen_list[b], *((lp[b], list(zip(top_ids[b], top_lp[b])))
                                                     if params.logprobs is not None else ()))
            if all(seq.finished for seq in seqs):
                return
            # Feed every row its new token (finished rows too: their output is ignored, and keeping the
            # batch shape fixed avoids reshuffling the cache).
            slot = all_slots[step_slot:step_slot + 1]
            key_mask[:, step_slot] = True
            logits = self.model(chosen[:, None], positions=next_pos[:, None] if padded else None, cache=cache,
                                slots=slot, mask=cache.mask(slot, key_mask) if padded else None)[:, -1]
            logits = self.text_logits(logits)
            next_pos = next_pos + 1
            step_slot += 1

    # ------------------------------------------------------------------------------------------------
    def complete(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None) -> list[Completion]:
        """Run `generate` to the end and collect one `Completion` per prompt."""
        params = (params or SamplingParams()).validate()
        encoded = [self.encode_prompt(p) for p in prompts]
        out = [Completion(prompt_ids=ids) for ids in encoded]
        if params.prompt_logprobs:
            for c in out:
                c.prompt_logprobs = [None] + self.score_ids(c.prompt_ids).logprobs
        for ev in self._generate_ids(encoded, params):
            c = out[ev.seq]
            if ev.token_id is not None:
                c.ids.append(ev.token_id)
            c.text += ev.text
            if ev.logprob is not None:
                c.logprobs.append(ev.logprob)
                c.top_logprobs.append(ev.top_logprobs or [])
            if ev.finish_reason:
                c.finish_reason = ev.finish_reason
        return out

    def beam_search(self, prompt: str | Sequence[int], params: SamplingParams, n_best: int = 1,
                    should_stop: Callable[[], bool] | None = None):
        """The `n_best` best hypotheses of a beam search (`params.num_beams` wide), finished for the user
        by `finish_beams`: EOS dropped, text cut at `params.stop`. A list of `BeamResult`, best first.
        `should_stop` is asked at every step (beam.Cancelled when it says yes)."""
        params = params.validate()
        ids = self.encode_prompt(prompt)
        eos = self.eos_ids(params)
        hyps = beam_search(self.model, ids, num_beams=params.num_beams, max_new_tokens=params.max_new_tokens,
                           length_penalty=params.length_penalty, early_stopping=params.early_stopping,
                           eos_ids=tuple(eos), n_best=n_best, should_stop=should_stop, vocab=self.text_vocab)
        return finish_beams(self.tokenizer, hyps, stop=params.stop, eos_ids=eos)

    # ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score_ids(self, ids: list[int], top_k: int = 0, should_stop: Callable[[], bool] | None = None) -> ScoreResult:
        """log p(ids[i] | ids[:i]) for i >= 1 (and the `top_k` most likely alternatives at each place), in
        windows of the context length that overlap by half, so that every token after the first window
        still sees at least half a context of history. `should_stop` is asked before every window
        (beam.Cancelled when it says yes)."""
        C = self.config.context_length
        logprobs: list[float] = []
        tops: list[list[tuple[int, float]]] = []
        start = 0  # first token of the current window
        scored = 1  # tokens [0, scored) are done (token 0 has no context)
        while scored < len(ids):
            if should_stop is not None and should_stop():
                raise Cancelled("scoring was cancelled")
            window = ids[start:start + C]
            logits = self.text_logits(self.model(torch.tensor([window], device=self.device)))
            logp = torch.log_softmax(logits[0, :-1], dim=-1)
            targets = torch.tensor(window[1:], device=self.device)
            first = scored - start - 1  # index in the window's targets of the first not-yet-scored one
            logprobs.extend(logp.gather(-1, targets[:, None])[first:, 0].tolist())
            if top_k:
                top_lp, top_ids = logp[first:].topk(top_k, dim=-1)
                tops.extend([list(zip(i, lp)) for i, lp in zip(top_ids.tolist(), top_lp.tolist())])
            scored = start + len(window)
            start = max(start + 1, scored - C // 2)
        return ScoreResult(ids=ids, logprobs=logprobs, n_chars=0, top_logprobs=tops if top_k else None)

    def score(self, text: str) -> ScoreResult:
        """Score a text: every token is conditioned on BOS (when the tokenizer has one) and what precedes it."""
        ids = self.tokenizer.encode(text, allow_special=False)
        if not ids:
            raise ValueError("nothing to score: the text is empty")
        bos = self.tokenizer.bos_id
        if bos is not None:
            ids = [bos] + ids
        result = self.score_ids(ids)  # without a BOS the first token has no context and is not scored
        result.n_chars = len(text)
        return result
