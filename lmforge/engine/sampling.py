"""Decoding strategies as small pure functions on logits: (B, V) float tensors in, tensors out.

Why this design
---------------
* **Every step is a pure function of a tensor.** Penalties, bias, temperature and the three truncation
  filters each take logits and return new logits, so each can be unit-tested on four hand-made numbers,
  and `process_logits` is just their composition in one documented order.
* **Filters exclude by setting a logit to -inf.** The final softmax then renormalises over whatever is
  left, so filters compose, and an excluded token has probability exactly 0 (never "almost never").
* **Vectorised over the batch and the vocabulary.** No Python loop ever runs over the V logits: counts
  come from one `scatter_add`, thresholds from one sort or one max. Python only loops over the few
  entries of a `logit_bias` dict.
* **One `SamplingParams` for everything a request can ask.** The server translates OpenAI requests into
  it, the CLI fills it from flags, and `validate()` rejects a bad value with one line naming the field,
  before any model work is done.

Pipeline order (`process_logits`)
---------------------------------
1. repetition penalty (HF), 2. presence/frequency penalties (OpenAI), 3. logit bias -- all on the raw
logits; then 4. temperature; then 5. top-k, 6. top-p, 7. min-p; then softmax and draw.

* Penalties first, on the raw logits, because their definitions are about the model's raw scores: HF's
  repetition penalty divides a *positive* logit and multiplies a *negative* one, which only makes sense
  before anything else has shifted or scaled them. Bias comes last of the three so that it is exactly
  what the user asked: -100 bans a token and +100 forces it whatever the penalties did.
* Temperature before truncation (the order of Hugging Face `generate` and of vLLM): top-p's "90% of the
  mass" and min-p's "5% of the top probability" then refer to the distribution that is actually sampled.
  llama.cpp's default chain instead applies temperature *last* (top-k, top-p, min-p on T=1 probabilities),
  so at T > 1 it keeps fewer tokens than we do, and at T < 1 more. We follow HF/vLLM because our server
  speaks their API and the same request should mean the same distribution. Top-k is unaffected by the
  order (dividing by T > 0 preserves the ranking); top-p and min-p are not.
* top-k, then top-p, then min-p: each filter only removes tokens and always keeps the most likely one,
  so the result never becomes empty.
* Greedy (temperature 0) is the argmax of the penalised, biased logits: the truncation filters always
  keep the top token, so they cannot change an argmax and are skipped.

Log-probabilities (`token_logprobs`) are computed from the RAW model logits, before any penalty,
temperature or filter: that is what OpenAI and vLLM report by default, and it makes a token's reported
logprob a property of the model, not of the sampling settings.

Structured output (`SamplingParams.grammar`, see `constrain.py`) is one more exclusion, applied by the
caller (`generate.choose_tokens`) BEFORE this pipeline: the ids the grammar forbids are -inf from the start,
so penalties and bias cannot revive them, top-p's mass is that of the tokens that can actually come, and a
forbidden token has probability exactly 0. Its logprobs stay raw, like every other filter's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lmforge.engine.constrain import Grammar

__all__ = [
    "SamplingParams",
    "apply_repetition_penalty",
    "apply_presence_frequency",
    "apply_logit_bias",
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
    "token_counts",
    "penalty_window",
    "process_logits",
    "sample",
    "sample_from",
    "make_generator",
    "token_logprobs",
    "MAX_LOGPROBS",
]

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (see SamplingParams.greedy)
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs; also keeps the per-token response small


# ----------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    """Everything that decides which token comes next, and when generation stops.

    Defaults follow Ollama/llama.cpp (temperature 0.8, top_k 40, top_p 0.9, min_p 0.05, repeat_last_n 64).
    Every "off" value leaves the logits untouched: temperature 0 (greedy), top_k 0, top_p 1.0, min_p 0,
    repetition_penalty 1.0, presence/frequency 0, repeat_last_n 0.

    Beam search (`num_beams > 1`) is deterministic, so it requires `temperature == 0`; `validate()` refuses
    beams combined with sampling instead of silently ignoring the sampling settings. (With temperature 0
    the top-k/top-p/min-p values are irrelevant whatever they are: they never change an argmax.)
    """

    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.9  # 1.0 = off
    min_p: float = 0.05  # 0 = off
    repetition_penalty: float = 1.0  # HF: in the window, logit > 0 -> logit / penalty, < 0 -> logit * penalty
    presence_penalty: float = 0.0  # OpenAI: logit -= presence * (count > 0)
    frequency_penalty: float = 0.0  # OpenAI: logit -= frequency * count
    repeat_last_n: int = 64  # penalty window over prompt + generated tokens; 0 = off, -1 = whole context
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (after penalties)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k in 0..20: chosen token's logprob + top-k alternatives
    prompt_logprobs: bool = False
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    grammar: Grammar | None = None  # structured output: only the tokens this grammar allows (constrain.py)

    @property
    def greedy(self) -> bool:
        """True when decoding is deterministic argmax: temperature 0, or so close to it (below 1e-5, vLLM's
        threshold) that dividing by it would overflow the logits to inf and the softmax to NaN."""
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """True when a repetition, presence or frequency penalty looks at the recent tokens."""
        return self.repeat_last_n != 0 and (
            self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty))

    @property
    def plain_greedy(self) -> bool:
        """True when the next token is the argmax of the raw logits: greedy, no penalty, no logit bias, no
        grammar. Rows with these settings need no history and can share one argmax."""
        return self.greedy and not self.penalized and not self.logit_bias and self.grammar is None

    def validate(self) -> SamplingParams:
        """Raise ValueError with one line naming the bad field; return self so calls can chain."""
        _check_int("max_new_tokens", self.max_new_tokens, low=1)
        _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        _check_int("top_k", self.top_k, low=0, hint=" (0 = off)")
        _check_float("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        _check_float("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        _check_float("presence_penalty", self.presence_penalty)
        _check_float("frequency_penalty", self.frequency_penalty)
        _check_int("repeat_last_n", self.repeat_last_n, low=-1, hint=" (0 = off, -1 = whole context)")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
            for tid, bias in self.logit_bias.items():
                if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
                    raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {tid!r}")
                if not isinstance(bias, (int, float)) or math.isnan(bias) or bias == math.inf:
                    raise ValueError(f"logit_bias[{tid}] must be a finite number (or -inf to ban), got {bias!r}")
        if self.seed is not None:
            _check_int("seed", self.seed)
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError("stop must be a list of strings")
        if any(s == "" for s in self.stop):
            raise ValueError("stop strings must not be empty")
        for tid in self.stop_token_ids:
            _check_int("stop_token_ids", tid, low=0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        _check_int("num_beams", self.num_beams, low=1)
        _check_float("length_penalty", self.length_penalty)
        if self.grammar is not None:
            from lmforge.engine.constrain import Grammar

            if not isinstance(self.grammar, Grammar):
                raise ValueError(f"grammar must be a constrain.Grammar, got {type(self.grammar).__name__}")
            if self.num_beams > 1:
                raise ValueError("beam search cannot follow a grammar (structured output); use num_beams 1")
        if self.num_beams > 1 and self.temperature != 0.0:
            raise ValueError(
                f"beam search is deterministic; set temperature 0 (or 'greedy') with num_beams > 1 "
                f"(got num_beams={self.num_beams}, temperature={self.temperature})"
            )
        return self


def _check_int(name: str, value: object, *, low: int | None = None, high: int | None = None, hint: str = "") -> None:
    # bool is an int subclass; True as a token count is a caller bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}{hint}, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}{hint}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}{hint}, got {value}")


def _check_float(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


# ----------------------------------------------------------------------------------------------------
# Penalties and bias (on raw logits)
# ----------------------------------------------------------------------------------------------------


def token_counts(prev_ids: torch.Tensor, vocab_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """How often each token occurs in each row of `prev_ids` (B, W), -1 = padding: (B, V) counts.

    One `scatter_add` of ones onto a zero (B, V) tensor; padding adds 0 (to token 0), so it is never
    counted. Example: prev_ids [[5, 2, 5, -1]], V=6 -> [[0, 0, 1, 0, 0, 2]].
    """
    valid = prev_ids >= 0
    counts = torch.zeros(prev_ids.shape[0], vocab_size, dtype=dtype, device=prev_ids.device)
    return counts.scatter_add_(1, prev_ids.clamp(min=0), valid.to(dtype))


def apply_repetition_penalty(logits: torch.Tensor, prev_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL / Hugging Face repetition penalty: every token present in `prev_ids` (B, W; -1 = padding)
    gets `logit / penalty` if its logit is positive and `logit * penalty` if negative -- both make it
    less likely for penalty > 1. A token is penalised once however often it occurred.

    Example: logits [2.0, -1.0, 0.5], prev_ids [[0, 1, 0, -1]], penalty 2 -> [1.0, -2.0, 0.5].
    """
    if penalty == 1.0 or prev_ids.numel() == 0:
        return logits
    present = token_counts(prev_ids, logits.shape[-1], logits.dtype) > 0
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(present, penalised, logits)


def apply_presence_frequency(logits: torch.Tensor, prev_ids: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI presence and frequency penalties: `logit -= presence * (count > 0) + frequency * count`,
    counts taken over `prev_ids` (B, W; -1 = padding). Negative values encourage repetition instead.

    Example: logits [1.0, 1.0, 1.0], prev_ids [[2, 2, 1, -1]], presence 0.5, frequency 0.25
    -> counts [0, 1, 2] -> [1.0, 1.0 - 0.5 - 0.25, 1.0 - 0.5 - 0.5] = [1.0, 0.25, 0.0].
    """
    if (presence == 0.0 and frequency == 0.0) or prev_ids.numel() == 0:
        return logits
    counts = token_counts(prev_ids, logits.shape[-1], logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, bias: Mapping[int, float] | None) -> torch.Tensor:
    """Add `bias[token]` to that token's logit in every row (OpenAI `logit_bias`). A bias of -inf (or,
    in practice, -100) bans a token; +100 all but forces it. Ids outside 0..V-1 raise ValueError.

    Example: logits [[0.0, 1.0, 2.0]], bias {0: 5.0, 2: -1.0} -> [[5.0, 1.0, 1.0]].
    """
    if not bias:
        return logits
    vocab = logits.shape[-1]
    ids = [int(i) for i in bias]
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    index = torch.tensor(ids, dtype=torch.long, device=logits.device)
    values = torch.tensor([float(bias[i]) for i in bias], dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, index, values.expand(*logits.shape[:-1], len(ids)))


# ----------------------------------------------------------------------------------------------------
# Temperature and truncation filters
# ----------------------------------------------------------------------------------------------------


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by T: T < 1 sharpens the distribution, T > 1 flattens it.

    Example: logits [2, 1, 0] (probs [0.665, 0.245, 0.090]) at T=0.5 become [4, 2, 0]
    (probs [0.867, 0.117, 0.016]). T == 0 is greedy and is handled by the caller, since dividing by zero
    is not a distribution.
    """
    if temperature == 1.0:
        return logits
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits in each row; ties at the k-th value are all kept (so that the result
    does not depend on how `topk` orders equal values). k <= 0 or k >= V keeps all.

    Example: logits [2.0, 1.0, 1.0, 0.5], k=2 -> the k-th largest is 1.0, so
    [2.0, 1.0, 1.0, -inf] (three kept: the tie at 1.0).
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probability mass reaches p; the top token is always kept.

    Example: probs [0.5, 0.3, 0.15, 0.05]. Mass of the strictly more likely tokens before each one:
    [0, 0.5, 0.8, 0.95]. A token is kept while that mass is still below p, so p=0.75 keeps the first two
    (0.5 + 0.3 = 0.8 >= 0.75), p=0.85 keeps three, and p=0.4 keeps only the first. Equal probabilities
    are ranked by a stable sort (lower id first), so the choice at a tie is deterministic. p >= 1 keeps all.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V): mass of the tokens ranked above each one
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the top token survives any p (and rounding)
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least `min_p` times the top token's (Nguyen et al. 2024).
    The cut scales with the model's confidence: strict when it is sure, loose when it is not.

    Computed in log space without a softmax: p_i >= min_p * p_max  <=>  logit_i - logit_max >= log(min_p).
    Example: probs [0.5, 0.3, 0.15, 0.05], min_p=0.2 -> threshold 0.2 * 0.5 = 0.1 -> keeps the first
    three. min_p 0 keeps all; min_p 1 keeps only the top token (and exact ties with it).
    """
    if min_p <= 0.0:
        return logits
    top = logits.max(dim=-1, keepdim=True).values
    return logits.masked_fill(logits - top < math.log(min_p), float("-inf"))


# ----------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------


def penalty_window(histories: Sequence[Sequence[int]], repeat_last_n: int = -1,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Right-aligned (B, W) int64 tensor of each row's last `repeat_last_n` tokens, left-padded with -1.

    This is the `prev_ids` layout `process_logits` expects: the most recent token of every row is in the
    last column, so "the last n tokens" is the last n columns for every row at once. -1 = whole history;
    0 gives an empty (B, 0) tensor. Example: [[7, 8, 9], [4]], n=2 -> [[8, 9], [-1, 4]].
    """
    rows = [list(h) if repeat_last_n < 0 else (list(h)[-repeat_last_n:] if repeat_last_n > 0 else [])
            for h in histories]
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
    return out.to(device) if device is not None else out


def process_logits(logits: torch.Tensor, params: SamplingParams,
                   prev_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The whole pipeline (see the module docstring for the order and why): (B, V) -> (B, V) float32.

    `prev_ids` (B, W) int64 is the context the penalties look at (prompt + generated tokens), -1 padded
    and RIGHT-aligned (most recent token in the last column; build it with `penalty_window`); the
    penalties see only its last `params.repeat_last_n` columns (-1: all, 0: none). With
    `params.greedy` the result is the penalised, biased logits, unscaled and unfiltered: their argmax is
    the greedy token, which no filter could change.
    """
    logits = logits.float()
    if prev_ids is not None and params.repeat_last_n != 0:
        window = prev_ids if params.repeat_last_n < 0 else prev_ids[:, -params.repeat_last_n:]
        logits = apply_repetition_penalty(logits, window, params.repetition_penalty)
        logits = apply_presence_frequency(logits, window, params.presence_penalty, params.frequency_penalty)
    logits = apply_logit_bias(logits, params.logit_bias)
    if params.greedy:
        return logits
    return _truncate(logits, params.temperature, params.top_k, params.top_p, params.min_p)


def _truncate(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    logits = apply_temperature(logits, temperature)
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    return min_p_filter(logits, min_p)


def _draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id per row of (N, V) logits, drawn from their softmax."""
    if bool(torch.isneginf(logits).all(dim=-1).any()):
        raise ValueError("every token was excluded (check logit_bias and the penalties): nothing to sample")
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one request: seeded when `seed` is given (reproducible), else from OS entropy.

    Create it ONCE per request and pass it to every step: re-seeding at each step would replay the same
    random numbers at every position.
    """
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample_from(logits: torch.Tensor, params: SamplingParams, prev_ids: torch.Tensor | None = None,
                generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Next token ids (B,) for logits (B, V) under `params`: THE token choice of the engine, the server's
    scheduler and every test.

    Plain greedy settings take the argmax of the raw logits (no copy, no history needed). Otherwise the
    penalties look at `prev_ids` (build it with `penalty_window`, only when `params.penalized`), then greedy
    takes the argmax and sampling draws from the processed distribution: with one `generator` for the
    whole batch, or a sequence of generators, one per row (each request keeps its own random stream, so a
    seeded request draws the same tokens whatever else shares its batch).
    """
    if params.plain_greedy:
        return logits.argmax(dim=-1)
    processed = process_logits(logits, params, prev_ids)
    if params.greedy:
        return processed.argmax(dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        return _draw(processed, generator)
    if len(generator) != len(processed):
        raise ValueError(f"{len(generator)} generators for {len(processed)} rows of logits")
    return torch.cat([_draw(processed[b:b + 1], g) for b, g in enumerate(generator)])


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           min_p: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (...,) from logits (..., V) with only the truncation settings (no penalties).
    temperature 0 is greedy (argmax). Same order as `process_logits`: temperature, top-k, top-p, min-p."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    flat = logits.reshape(-1, logits.shape[-1]).float()
    ids = _draw(_truncate(flat, temperature, top_k, top_p, min_p), generator)
    return ids.reshape(logits.shape[:-1])


# ----------------------------------------------------------------------------------------------------
# Log-probabilities
# ----------------------------------------------------------------------------------------------------


def token_logprobs(raw_logits: torch.Tensor, chosen: torch.Tensor,
                   k: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities from the RAW model logits (B, V), before penalties, temperature or filters --
    what OpenAI and vLLM report by default, so the numbers describe the model, not the sampler.

    Returns (chosen_logprob (B,), top_ids (B, k), top_logprobs (B, k)), alternatives most likely first.
    Example: raw logits [[0, ln 3]] (probs [0.25, 0.75]), chosen [0], k=1
    -> ([ln 0.25], [[1]], [[ln 0.75]]).
    """
    if not 0 <= k <= raw_logits.shape[-1]:
        raise ValueError(f"k must be in 0..{raw_logits.shape[-1]}, got {k}")
    logp = torch.log_softmax(raw_logits.float(), dim=-1)
    chosen_lp = logp.gather(-1, chosen.long().unsqueeze(-1)).squeeze(-1)
    top_lp, top_ids = torch.topk(logp, k, dim=-1)
    return chosen_lp, top_ids, top_lp
