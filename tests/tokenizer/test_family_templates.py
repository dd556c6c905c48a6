"""Chat-template parity for the Qwen3, Gemma 2/3 and Phi-3/Phi-4-mini families: lmforge's renderer
(`tokenizer/chat_template.py`, through `Tokenizer.encode_chat` and the one chat-prompt builder) gives the
same token ids as transformers' `apply_chat_template(tokenize=True)` on the same tiny tokenizer, for
several conversations each (thinking on, off and unset; folded system prompts; tools); and a template's
`raise_exception` is one clear user error."""

from __future__ import annotations

import pytest

from lmforge.errors import UserError
from tests.serve.tool_templates import family_tokenizer, hf_tokenizer
from tests.tokenizer.family_templates import FAMILIES

SYSTEM = {"role": "system", "content": "You are terse."}
ASK = {"role": "user", "content": "What is 2 + 2?"}
AGAIN = {"role": "user", "content": "  And 3 + 3?  "}
THOUGHT_IN_CONTENT = {"role": "assistant", "content": "<think>\nadd two and two\n</think>\n\n4."}
THOUGHT_APART = {"role": "assistant", "content": "4.", "reasoning_content": "two and two make four"}
CALL = {"role": "assistant", "content": "",
        "tool_calls": [{"type": "function", "id": "c1", "function": {"name": "add", "arguments": {"a": 2}}}]}
RESULT = {"role": "tool", "content": "4", "tool_call_id": "c1"}
PLAIN_ANSWER = {"role": "assistant", "content": "4."}
TOOL = {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                         "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}

# family -> [(messages, add_generation_prompt, template kwargs)]
CASES = {
    "qwen3": [
        ([ASK], True, {}),
        ([ASK], True, {"enable_thinking": True}),
        ([ASK], True, {"enable_thinking": False}),
        ([SYSTEM, ASK, THOUGHT_IN_CONTENT, AGAIN], True, {}),  # the earlier thought is dropped
        ([SYSTEM, ASK, THOUGHT_APART], False, {}),  # after the latest user message: the thought is kept
        ([ASK, THOUGHT_IN_CONTENT], False, {"enable_thinking": False}),
        ([SYSTEM, ASK], True, {"tools": [TOOL]}),
        ([ASK, CALL, RESULT], True, {"tools": [TOOL]}),
    ],
    "opens-thought": [([ASK], True, {}), ([ASK], True, {"enable_thinking": False})],
    "gemma3": [
        ([ASK], True, {}),
        ([SYSTEM, ASK], True, {}),  # the system prompt folds into the first user turn
        ([SYSTEM, ASK, PLAIN_ANSWER, AGAIN], True, {}),
        ([ASK, PLAIN_ANSWER], False, {}),
    ],
    "gemma2": [([ASK], True, {}), ([ASK, PLAIN_ANSWER, AGAIN], True, {})],
    "phi3": [([ASK], True, {}), ([SYSTEM, ASK, PLAIN_ANSWER, AGAIN], True, {}), ([ASK, PLAIN_ANSWER], False, {})],
    "phi4": [([ASK], True, {}), ([SYSTEM, ASK, PLAIN_ANSWER, AGAIN], True, {}),
             ([SYSTEM, ASK], True, {"tools": [TOOL]})],
}


@pytest.fixture(scope="module")
def tokenizers_of(tiny_tokenizer):
    """family -> (lmforge Tokenizer, transformers' PreTrainedTokenizerFast) over the same vocabulary."""
    out = {}
    for name in FAMILIES:
        tok = family_tokenizer(tiny_tokenizer, name, FAMILIES)
        out[name] = (tok, hf_tokenizer(tok))
    return out


def _hf_ids(hf, messages, generation: bool, kwargs: dict) -> list[int]:
    ids = hf.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("family, case", [(f, i) for f, cases in CASES.items() for i in range(len(cases))])
def test_renders_token_identical_to_transformers(tokenizers_of, family, case):
    tok, hf = tokenizers_of[family]
    messages, generation, kwargs = CASES[family][case]
    text = hf.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False, **kwargs)
    assert tok.apply_chat_template(messages, add_generation_prompt=generation, **kwargs) == text
    assert tok.encode_chat(messages, add_generation_prompt=generation, **kwargs) == \
        _hf_ids(hf, messages, generation, kwargs)
    assert len(text) > 20  # not vacuous: something was rendered


def test_the_chat_prompt_builder_agrees_too(tokenizers_of):
    """The path every caller takes (engine/prompt.py), with tools and template kwargs as the server
    passes them."""
    from lmforge.engine.prompt import chat_prompt_ids

    tok, hf = tokenizers_of["qwen3"]
    got = chat_prompt_ids(tok, [ASK], system="You are terse.", template_kwargs={"enable_thinking": False})
    assert got == _hf_ids(hf, [SYSTEM, ASK], True, {"enable_thinking": False})
    tok, hf = tokenizers_of["phi4"]
    assert chat_prompt_ids(tok, [SYSTEM, ASK], tools=[TOOL]) == _hf_ids(hf, [SYSTEM, ASK], True, {"tools": [TOOL]})


def test_what_each_family_writes(tokenizers_of):
    """The features the templates exist to show, in our rendering."""
    qwen, _ = tokenizers_of["qwen3"]
    assert qwen.apply_chat_template([ASK], add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    history = qwen.apply_chat_template([ASK, THOUGHT_IN_CONTENT, AGAIN], add_generation_prompt=True)
    assert "add two" not in history and "<|im_start|>assistant\n4.<|im_end|>" in history
    gemma, _ = tokenizers_of["gemma3"]
    assert gemma.apply_chat_template([SYSTEM, ASK], add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2 + 2?<end_of_turn>\n<start_of_turn>model\n")
    phi, _ = tokenizers_of["phi4"]
    assert phi.apply_chat_template([ASK], add_generation_prompt=True) == "<|user|>What is 2 + 2?<|end|><|assistant|>"


@pytest.mark.parametrize("family, messages, says", [
    ("gemma3", [ASK, AGAIN], "Conversation roles must alternate"),
    ("gemma3", [PLAIN_ANSWER, ASK], "Conversation roles must alternate"),
    ("gemma2", [SYSTEM, ASK], "System role not supported"),
])
def test_raise_exception_is_one_clear_user_error(tokenizers_of, family, messages, says):
    from lmforge.engine.prompt import ChatPromptError, chat_prompt_ids

    tok, hf = tokenizers_of[family]
    with pytest.raises(Exception, match=says):  # transformers refuses the same conversation
        hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with pytest.raises(UserError, match=says) as e:
        tok.apply_chat_template(messages, add_generation_prompt=True)
    assert "\n" not in str(e.value)
    with pytest.raises(ChatPromptError, match=f"refused these messages: .*{says}") as e:
        chat_prompt_ids(tok, messages)
    assert e.value.param == "messages" and "\n" not in str(e.value)
