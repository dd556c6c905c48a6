"""Chat templates in the manner of the families people run in 2026, written for the tests (not copied from
the model repositories) from what the real ones do: Qwen3's thinking (`enable_thinking`, `<think>` kept
only for the turns after the latest user message), Gemma's system prompt folded into the first user turn,
`raise_exception` on roles out of order and `<start_of_turn>model`, and Phi-3 / Phi-4-mini's
`<|user|>...<|end|>` turns. Each entry has the shape of `tests.serve.tool_templates.FAMILIES`:
(template, special tokens, plain added tokens, bos, eos, end-of-turn), for `family_tokenizer`."""

from __future__ import annotations

# Qwen3: ChatML turns; tools (Hermes style) in the system turn, calls as <tool_call> JSON. An assistant turn's thought comes from `reasoning_content` or from a
# `<think>...</think>` at the head of its content; it is written back only after the latest user message
# (earlier thoughts are dropped, as Qwen3's template does). `enable_thinking: false` writes an empty
# thought into the generation prompt, so the model answers at once.
QWEN3 = """{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}
    {%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- if tools %}
    {{- '<|im_start|>system\\n' + (messages[0].content + '\\n\\n' if messages[0].role == 'system' else '') }}
    {{- '# Tools\\n\\nThe functions you may call, one JSON signature a line:\\n<tools>' }}
    {%- for t in tools %}{{- '\\n' + t | tojson }}{%- endfor %}
    {{- '\\n</tools>\\n\\nTo call one, write <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call><|im_end|>\\n' }}
{%- endif %}
{%- for m in messages %}
    {%- if m.role == 'system' and tools %}
    {%- elif m.role == 'system' or m.role == 'user' %}
        {{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
    {%- elif m.role == 'assistant' %}
        {%- set answer = m.content if m.content is string else '' %}
        {%- set thought = m.reasoning_content if m.reasoning_content is string else '' %}
        {%- if '</think>' in answer %}
            {%- set thought = answer.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
            {%- set answer = answer.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_user and thought %}
            {{- '<|im_start|>assistant\\n<think>\\n' + thought.strip('\\n') + '\\n</think>\\n\\n' + answer }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + answer }}
        {%- endif %}
        {%- for c in m.tool_calls or [] %}
            {{- ('\\n' if answer or not loop.first else '') + '<tool_call>\\n' + {'name': c.function.name, 'arguments': c.function.arguments} | tojson + '\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif m.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- else %}
        {{- raise_exception('unknown role: ' + m.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# A reasoning template whose generation prompt opens the thought itself (as DeepSeek-R1's does): the
# model's first token is already inside `<think>`.
OPENS_THOUGHT = QWEN3.replace("""    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}""", """    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- else %}
        {{- '<think>\\n' }}
    {%- endif %}""")

# Gemma 3: BOS, a leading system message folded into the first user turn, strict user/model alternation
# (anything else is raise_exception), the assistant called "model".
GEMMA3 = """{{- bos_token }}
{%- if messages[0].role == 'system' %}
    {%- set folded = messages[0].content + '\\n\\n' %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set folded = '' %}
    {%- set turns = messages %}
{%- endif %}
{%- for m in turns %}
    {%- if (m.role == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- set role = 'model' if m.role == 'assistant' else m.role %}
    {{- '<start_of_turn>' + role + '\\n' + (folded if loop.first else '') + m.content | trim + '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\\n' }}
{%- endif %}"""

# Gemma 2: the same turns, but a system message is refused outright.
GEMMA2 = """{{- bos_token }}
{%- if messages[0].role == 'system' %}
    {{- raise_exception('System role not supported') }}
{%- endif %}
{%- for m in messages %}
    {%- if (m.role == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<start_of_turn>' + ('model' if m.role == 'assistant' else m.role) + '\\n' + m.content | trim + '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\\n' }}
{%- endif %}"""

# Phi-3: each turn `<|role|>\\n...<|end|>\\n`; the generation prompt `<|assistant|>\\n`, else EOS.
PHI3 = """{%- for m in messages %}
    {%- if m.role in ['system', 'user', 'assistant'] %}
        {{- '<|' + m.role + '|>\\n' + m.content + '<|end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\\n' }}
{%- else %}
    {{- eos_token }}
{%- endif %}"""

# Phi-4-mini: the turns run together, and the system turn carries the tools between <|tool|> tags.
PHI4 = """{%- for m in messages %}
    {%- if m.role == 'system' and tools %}
        {{- '<|system|>' + m.content + '<|tool|>' + tools | tojson + '<|/tool|><|end|>' }}
    {%- else %}
        {{- '<|' + m.role + '|>' + m.content + '<|end|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>' }}
{%- else %}
    {{- eos_token }}
{%- endif %}"""

_QWEN_PLAIN = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
_PHI = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>", "<|endoftext|>"]
FAMILIES = {
    # Qwen3's <think> and </think> are added tokens but not special ones: they stay in decoded text
    "qwen3": (QWEN3, ["<|im_start|>", "<|im_end|>"], _QWEN_PLAIN, None, "<|im_end|>", None),
    "opens-thought": (OPENS_THOUGHT, ["<|im_start|>", "<|im_end|>"], _QWEN_PLAIN, None, "<|im_end|>", None),
    "gemma3": (GEMMA3, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], [], "<bos>", "<eos>", "<end_of_turn>"),
    "gemma2": (GEMMA2, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], [], "<bos>", "<eos>", "<end_of_turn>"),
    "phi3": (PHI3, _PHI, [], None, "<|endoftext|>", "<|end|>"),
    "phi4": (PHI4, _PHI, [], None, "<|endoftext|>", "<|end|>"),
}
