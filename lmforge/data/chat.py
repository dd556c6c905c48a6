"""The old home of chat and preference data, kept so that ``lmforge.data.chat.X`` still imports.

New code imports from where each name lives: :mod:`lmforge.data.records` (reading and validating
conversations and preference pairs), :mod:`lmforge.data.sft` (the chat template, the loss mask, SFT
batches), :mod:`lmforge.data.preferences` (preference examples and batches) and
:mod:`lmforge.data.batching` (what both kinds of batches share).
"""

from __future__ import annotations

from lmforge.data.preferences import (
    EncodedPreferences,
    PreferenceBatches,
    PreferenceExample,
    encode_preference,
    encode_preferences,
)
from lmforge.data.records import (
    ChatData,
    Preference,
    PreferenceData,
    check_conversation,
    read_conversations,
    read_preferences,
    train_val_split,
)
from lmforge.data.sft import EncodedSFT, SFTBatches, SFTExample, encode_conversations, encode_sft

__all__ = [
    "ChatData",
    "PreferenceData",
    "Preference",
    "SFTExample",
    "PreferenceExample",
    "EncodedSFT",
    "EncodedPreferences",
    "SFTBatches",
    "PreferenceBatches",
    "read_conversations",
    "read_preferences",
    "encode_sft",
    "encode_preference",
    "encode_conversations",
    "encode_preferences",
    "check_conversation",
    "train_val_split",
]
