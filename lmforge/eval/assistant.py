"""How good an assistant is: answers scored against references, and preferences between two answers.

* `token_f1` is SQuAD's answer score: lower-case, drop punctuation and articles, then the F1 of the bag
  of words of the answer against the reference. It rewards the right content in other words, and is 0
  for a model that does not answer at all (a base model continuing the prompt as text).
* `preference_scores` / `preference_wins` / `preference_accuracy`: the share of pairs for which the model gives the chosen reply a higher
  log-likelihood than the rejected one (summed, or per token with `normalize=True`), both scored as the
  assistant's reply to the same prompt through the model's own chat template. It needs no reference
  model, so base, SFT and DPO models compare on the same footing.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> list[str]:
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return text.split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between two strings (1.0 when both are empty)."""
    p, r = normalize_answer(prediction), normalize_answer(reference)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


@dataclass
class QAResult:
    f1: float
    answers: list[str]
    n: int


def qa_f1(engine, conversations: Sequence[list[dict]], references: Sequence[str], *, max_new_tokens: int = 48,
          batch_size: int = 32) -> QAResult:
    """Greedy answers to each conversation (ending with a user turn) and their mean token F1."""
    from lmforge.engine.prompt import chat_prompt_ids
    from lmforge.engine.sampling import SamplingParams

    tok = engine.tokenizer
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    answers: list[str] = []
    for i in range(0, len(conversations), batch_size):
        prompts = [chat_prompt_ids(tok, c) for c in conversations[i:i + batch_size]]
        ctx = engine.config.context_length - max_new_tokens
        prompts = [p[-ctx:] for p in prompts]
        answers += [c.text.strip() for c in engine.complete(prompts, params)]
    scores = [token_f1(a, r) for a, r in zip(answers, references)]
    return QAResult(sum(scores) / max(1, len(scores)), answers, len(scores))


@dataclass(frozen=True)
class PairScores:
    """The model's log-likelihood of a pair's two replies: summed over their tokens and per token."""

    chosen_sum: float
    rejected_sum: float
    chosen_mean: float
    rejected_mean: float

    @property
    def margin(self) -> float:
        return self.chosen_sum - self.rejected_sum


@torch.no_grad()
def preference_scores(model, tokenizer, examples, *, batch_size: int = 32) -> list[PairScores]:
    """For each encoded preference example (`lmforge.data.preferences.PreferenceExample`), the log-likelihood
    of the chosen and the rejected reply under `model`, summed and per token."""
    from lmforge.data.preferences import PreferenceBatches
    from lmforge.train.losses import IGNORE_INDEX, sequence_logprobs

    if not examples:
        return []
    device = next(model.parameters()).device
    data = PreferenceBatches(examples[:1], batch_size=batch_size, val_examples=list(examples), device=device,
                             pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    model.eval()
    out: list[PairScores] = []
    for batch in data.val_batches():
        b = batch["chosen_input_ids"].shape[0]
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        logits = model(ids, output_mask=labels != IGNORE_INDEX)  # the replies' places only
        total = sequence_logprobs(logits, labels).tolist()
        mean = sequence_logprobs(logits, labels, average=True).tolist()
        out += [PairScores(total[i], total[b + i], mean[i], mean[b + i]) for i in range(b)]
    return out


def preference_wins(model, tokenizer, examples, *, batch_size: int = 32) -> list[tuple[bool, bool]]:
    """For each encoded preference example: whether the chosen reply has the higher log-likelihood (summed
    over its tokens), and whether it has the higher mean log-likelihood per token (length-normalised, as
    lm-evaluation-harness's acc_norm normalises by length).

    Both are reported because they answer different questions: the sum is the probability of the whole
    reply, which always favours a reply cut short (fewer tokens to pay for); the mean asks which reply
    reads better token for token, which is fair to replies of different lengths."""
    return [(s.chosen_sum > s.rejected_sum, s.chosen_mean > s.rejected_mean)
            for s in preference_scores(model, tokenizer, examples, batch_size=batch_size)]


def implicit_reward_wins(policy: Sequence[PairScores], reference: Sequence[PairScores]) -> list[bool]:
    """DPO's implicit reward r = beta * (log pi(y|x) - log pi_ref(y|x)) ranks the chosen reply first exactly
    when the policy's margin (chosen minus rejected log-likelihood) exceeds the reference's; beta > 0 does
    not change the order. This is the "reward accuracy" TRL logs during DPO, here on held-out pairs."""
    return [p.margin > r.margin for p, r in zip(policy, reference, strict=True)]


def preference_accuracy(model, tokenizer, examples, *, batch_size: int = 32, normalize: bool = False) -> float:
    """Share of encoded preference examples where the model prefers the chosen reply: by summed
    log-likelihood, or with `normalize` by mean log-likelihood per token (see `preference_wins`)."""
    wins = preference_wins(model, tokenizer, examples, batch_size=batch_size)
    if not wins:
        return float("nan")
    return sum(w[1] if normalize else w[0] for w in wins) / len(wins)
