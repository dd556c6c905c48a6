"""Chat templates, rendered exactly as transformers renders them: Hugging Face Jinja2 templates run in a
sandbox, because they travel with downloaded checkpoints and are untrusted code.

`render_chat_template` renders one conversation the way `transformers`' `apply_chat_template` does;
`compile_chat_template` compiles (and so checks the syntax of) a template; `check_chat_template` renders a
sample conversation once, for `lmforge create` and `lmforge import` to refuse a template before it is stored.
`lmforge.tokenizer.Tokenizer` renders its own template through them.

Every render is bounded (:mod:`.template_limits`): by default it stops after 2 s, 1,000,000 loop steps and
calls, or 1,000,000 characters of output or of any one value it builds, with a one-line `TemplateLimitError`.
Every other failure inside a template (`raise_exception`, sandbox violations, RecursionError...) is a
one-line `UserError` too.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.utils import Namespace

from lmforge.errors import UserError, one_line
from lmforge.tokenizer.template_limits import (
    DEFAULT_LIMITS,
    BoundedSandbox,
    TemplateLimitError,
    TemplateLimits,
    check_size,
    render_bounded,
)

__all__ = ["TemplateLimitError", "TemplateLimits", "check_chat_template", "compile_chat_template",
           "render_chat_template"]


class _GenerationTag(jinja2.ext.Extension):
    """Accept transformers' `{% generation %}...{% endgeneration %}` (assistant-mask markers) and render the
    body unchanged, so templates that use it still compile here."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_passthrough"), [], [], body).set_lineno(lineno)

    def _passthrough(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    # `dict(...)` for templates without exposing the real type object.
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    # Namespaces reject underscore-prefixed attributes, as in transformers; what they hold must fit the size limit.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)
        check_size(self, "a namespace")

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:  # noqa: A002 - transformers' name
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str) -> Any:
    """Compile a chat template once per distinct source (cached), in transformers' sandboxed environment.

    Chat templates travel with downloaded checkpoints, so they are untrusted code: the
    `ImmutableSandboxedEnvironment` refuses access to dunder/internal attributes (`''.__class__...`) and
    mutation of the inputs. Options, filters and globals match `transformers.utils.chat_template_utils`
    so that any template renders to the same string here and there (the rewriting that bounds its renders
    leaves what they produce unchanged). A template that is not valid Jinja is a one-line `UserError`.
    Render the result through `render_chat_template` only: rendered directly it refuses to run unbounded.
    """
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    try:
        return env.compile_bounded(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"chat template is not valid Jinja (line {e.lineno}): {one_line(e.message)}") from None
    except (RecursionError, MemoryError, SyntaxError) as e:  # nesting too deep for Jinja's parser or Python's
        raise UserError(f"chat template cannot be compiled ({type(e).__name__}): {one_line(e)}") from None


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON-like types (as transformers does), so the sandbox never sees
    rich objects whose methods it does not know to be dangerous; anything else becomes "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and callable(getattr(value, "item", None)) and getattr(value, "ndim", 1) == 0:
        return _plain(value.item())  # numpy scalars: np.bool_(False) must stay falsy
    return f"<{type(value).__name__}>"


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, str] | None = None,
    limits: TemplateLimits = DEFAULT_LIMITS,
    **kwargs: Any,
) -> str:
    """Render `template` for one conversation the way `transformers`' `apply_chat_template` does.

    Like transformers: keys whose value is None are dropped from each message, the template sees
    `messages`, `tools`/`documents` (None unless given), `add_generation_prompt`, the named special tokens
    and then the caller's kwargs (which win). The render runs under `limits` (time, steps, size; see the
    module docstring): past one it stops with `TemplateLimitError`. Every other template error
    (`raise_exception`, sandbox violations, undefined values, RecursionError...) is a one-line `UserError`.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise UserError("a chat must be a list of messages like {'role': 'user', 'content': '...'}")
    if len(messages) == 0:
        raise UserError("cannot apply the chat template to an empty conversation; give at least one message")
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise UserError(f"chat messages must be dicts with 'role' and 'content', got {type(message).__name__}")
        chat.append(_plain({k: v for k, v in message.items() if v is not None}))
    compiled = compile_chat_template(template)
    context: dict[str, Any] = {"tools": None, "documents": None}
    context.update(_plain(dict(special_tokens or {})))
    context.update(_plain(kwargs))
    context["messages"] = chat
    context["add_generation_prompt"] = add_generation_prompt
    try:
        return render_bounded(compiled, context, limits)
    except TemplateLimitError:
        raise
    except jinja2.exceptions.TemplateError as e:
        kind = "blocked by the sandbox" if isinstance(e, jinja2.exceptions.SecurityError) else "failed"
        raise UserError(f"chat template {kind}: {one_line(e.message or e)}") from None
    except (TypeError, ValueError) as e:  # e.g. 'str' + list inside the template
        raise UserError(f"chat template failed: {one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - RecursionError, OverflowError, ZeroDivisionError...: the template's
        raise UserError(f"chat template failed: {type(e).__name__}: {one_line(e)}") from None


# A conversation with every role, as `lmforge create`/`import` render once to vet a template.
SAMPLE_CONVERSATION = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "What is 2 + 2?"},
)
_SAMPLE_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def check_chat_template(
    source: str, *, special_tokens: Mapping[str, str] | None = None, limits: TemplateLimits = DEFAULT_LIMITS
) -> None:
    """Refuse, with a one-line `UserError`, a template that does not compile or that fails or breaks a limit
    rendering `SAMPLE_CONVERSATION` with a generation prompt; for `lmforge create` and `lmforge import`.

    A template that refuses system messages (`raise_exception`, as Gemma's does) is tried again without
    one. Passing says only that a plain chat renders: every render is bounded whatever the conversation.
    `special_tokens` default to placeholders (<s>, </s>...) for templates that write them.
    """
    compile_chat_template(source)
    tokens = _SAMPLE_TOKENS if special_tokens is None else special_tokens
    first: UserError | None = None
    for chat in (SAMPLE_CONVERSATION, SAMPLE_CONVERSATION[1:]):
        try:
            render_chat_template(source, chat, add_generation_prompt=True, special_tokens=tokens, limits=limits)
            return
        except TemplateLimitError as e:
            raise TemplateLimitError(f"{e} (rendering a sample conversation)") from None
        except UserError as e:
            first = first or e
    raise UserError(f"{first} (rendering a sample conversation: system, user, assistant, user)")
