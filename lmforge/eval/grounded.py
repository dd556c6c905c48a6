"""How well an assistant answers from sources: the open-book scores of the quickstart's table.

Given the model's answers to grounded prompts and, per question, which source held the answer (or None
when none did) and the reference summary:

* **token F1, answerable** -- SQuAD token F1 of the answer (citations removed) against the reference, on the
  questions whose sources hold the answer: does the model say what the right passage says?
* **token F1, all** -- the same over every question, the reference being the expected reply (the summary,
  or `NOT_IN_SOURCES` when the sources lack it);
* **citation accuracy** -- on the answerable questions, the share of answers whose first citation is
  the source that holds the answer (an answer without a citation counts as wrong);
* **"not in the sources"** precision and recall -- does the model say so exactly when it should
  (an answer says so when it contains "not in the sources").

Pure functions of strings and numbers: the generation is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from lmforge.eval.assistant import token_f1
from lmforge.retrieval.grounding import NOT_IN_SOURCES, cited, strip_citations

__all__ = ["GroundedScores", "says_not_in_sources", "score_grounded"]


def says_not_in_sources(answer: str) -> bool:
    return "not in the sources" in " ".join(answer.lower().split())


@dataclass(frozen=True)
class GroundedScores:
    f1_answerable: float
    f1_all: float
    citation_accuracy: float
    nis_precision: float  # nan when the model never said "not in the sources"
    nis_recall: float  # nan when every question was answerable
    n: int
    n_answerable: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def score_grounded(answers: Sequence[str], answer_sources: Sequence[int | None], references: Sequence[str],
                   n_sources: Sequence[int]) -> GroundedScores:
    """Scores of `answers` (see the module docstring); per question: the 1-based source holding the answer
    (None: absent), the reference summary, and how many sources were shown."""
    if not len(answers) == len(answer_sources) == len(references) == len(n_sources):
        raise ValueError("answers, answer_sources, references and n_sources must have the same length")
    f1_ans, f1_all, cite = [], [], []
    said = should = both = 0
    for answer, src, ref, k in zip(answers, answer_sources, references, n_sources):
        nis = says_not_in_sources(answer)
        said += nis
        if src is None:
            should += 1
            both += nis
            f1_all.append(token_f1(strip_citations(answer), NOT_IN_SOURCES))
            continue
        f1 = token_f1(strip_citations(answer), ref)
        f1_ans.append(f1)
        f1_all.append(f1)
        c = cited(answer, k)
        cite.append(bool(c) and c[0] == src)
    return GroundedScores(_mean(f1_ans), _mean(f1_all), _mean(cite),
                          both / said if said else float("nan"), both / should if should else float("nan"),
                          len(answers), len(f1_ans))
