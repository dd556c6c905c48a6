"""Preference (DPO) data: encode each pair's chosen and rejected completion after its shared prompt,
labelled only on the completion, and batch the pairs for `fit()`.

The pairs come from :mod:`lmforge.data.records`. A completion is rendered and closed by the chat template
exactly as an SFT reply is (:mod:`lmforge.data.sft`: the reply and the token(s) closing the turn, plus an
EOS if the template has none); pairs that do not fit the context are dropped and counted, as
conversations are. Batching is :mod:`lmforge.data.batching`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from lmforge.data.batching import IGNORE_INDEX, ExampleBatches, shift_and_pad
from lmforge.data.records import Preference, PreferenceData
from lmforge.data.sft import Encoded, check_max_len, encode_completion, fits_context

__all__ = [
    "PreferenceExample",
    "EncodedPreferences",
    "PreferenceBatches",
    "encode_preference",
    "encode_preferences",
]


@dataclass(frozen=True)
class PreferenceExample:
    """One encoded pair. Both sequences start with the same `prompt_len` prompt tokens; labels are aligned
    with the ids and are `IGNORE_INDEX` on the prompt, the ids themselves on the completion."""

    prompt_len: int
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]


def encode_preference(tokenizer: Any, pair: Preference, max_len: int) -> PreferenceExample | None:
    """Encode a preference pair: the prompt rendered with the generation prompt, then each completion (the
    reply and the token(s) closing the turn, plus an EOS if the template has none), labelled only on the
    completion.

    The prompt and the completions are tokenized separately, exactly as at inference (the engine encodes
    the prompt, the model then produces the reply), so both sequences share the same prompt ids. Returns
    None when either sequence does not fit `max_len`.
    """
    check_max_len(max_len)
    if not isinstance(pair, Preference):
        raise TypeError(f"encode_preference wants a Preference, got {type(pair).__name__}")
    prompt_text, chosen = encode_completion(tokenizer, pair.prompt, pair.chosen)
    _, rejected = encode_completion(tokenizer, pair.prompt, pair.rejected)
    prompt_ids = tokenizer.encode(prompt_text, add_bos=False)
    if not fits_context(len(prompt_ids) + max(len(chosen), len(rejected)), max_len):
        return None
    p = len(prompt_ids)
    ignore = [IGNORE_INDEX] * p
    return PreferenceExample(p, prompt_ids + chosen, ignore + chosen, prompt_ids + rejected, ignore + rejected)


EncodedPreferences = Encoded  # list[PreferenceExample], what="preference pairs"


def encode_preferences(tokenizer: Any, pairs: PreferenceData | Iterable[Preference], max_len: int) -> EncodedPreferences:
    """`encode_preference` over many pairs; too-long ones are dropped and counted."""
    items = pairs.pairs if isinstance(pairs, PreferenceData) else list(pairs)
    examples = [ex for ex in (encode_preference(tokenizer, p, max_len) for p in items) if ex is not None]
    return Encoded(examples, len(items), max_len, "preference pairs")


# ----------------------------------------------------------------------------------------------------
# Batches for fit()
# ----------------------------------------------------------------------------------------------------


class PreferenceBatches(ExampleBatches):
    """`DataSource` of preference batches for DPO-style objectives; sampled like `SFTBatches`.

    ``train_batch(step, micro)`` -> dict with ``chosen_input_ids``, ``chosen_labels``,
    ``rejected_input_ids``, ``rejected_labels`` (all (B, T) long, one common T so chosen and rejected can be
    concatenated into one (2B, T) forward pass; labels shifted and IGNORE_INDEX on the prompt and padding),
    ``chosen_attention_mask``/``rejected_attention_mask`` (B, T), ``chosen_lengths``/``rejected_lengths``,
    ``prompt_lens`` (B,) and ``index`` (B,) (row positions in `examples`/`val_examples`, e.g. to look up
    reference log-probs computed once).
    """

    what = "preference pairs"

    @staticmethod
    def input_tokens(example: PreferenceExample) -> int:
        return len(example.chosen_ids) + len(example.rejected_ids) - 2

    def _collate(self, items: Sequence[PreferenceExample], index: Sequence[int]) -> dict[str, torch.Tensor]:
        width = max(max(len(e.chosen_ids), len(e.rejected_ids)) for e in items) - 1
        batch: dict[str, torch.Tensor] = {}
        for side in ("chosen", "rejected"):
            ids, labels, lengths = shift_and_pad([getattr(e, f"{side}_ids") for e in items],
                                                 [getattr(e, f"{side}_labels") for e in items], self.pad_id, width)
            batch[f"{side}_input_ids"], batch[f"{side}_labels"], batch[f"{side}_lengths"] = ids, labels, lengths
            batch[f"{side}_attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        batch["prompt_lens"] = torch.tensor([e.prompt_len for e in items], dtype=torch.long)
        batch["index"] = torch.tensor(list(index), dtype=torch.long)
        return batch
