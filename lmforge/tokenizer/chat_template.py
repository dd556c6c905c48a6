"""Chat templates, rendered exactly as transformers renders them: Hugging Face Jinja2 templates run in a
sandbox, because they travel with downloaded checkpoints and are untrusted code.

`render_chat_template` renders one conversation the way `transformers`' `apply_chat_template` does;
`compile_chat_template` compiles (and so checks) a template. `lmforge.tokenizer.Tokenizer` renders its
own template through them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from lmforge.errors import UserError, one_line

__all__ = ["compile_chat_template", "render_chat_template"]


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> Any:
    """Compile a chat template once per distinct source (cached), in transformers' sandboxed environment.

    Chat templates travel with downloaded checkpoints, so they are untrusted code: the
    `ImmutableSandboxedEnvironment` refuses access to dunder/internal attributes (`''.__class__...`) and
    mutation of the inputs. Options, filters and globals match `transformers.utils.chat_template_utils`
    so that any template renders to the same string here and there. A template that is not valid Jinja is a
    one-line `UserError`.
    """
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(jinja2.ext.Extension):
        """Accept transformers' `{% generation %}...{% endgeneration %}` (assistant-mask markers) and
        render the body unchanged, so templates that use it still compile here."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_passthrough"), [], [], body).set_lineno(lineno)

        def _passthrough(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # Jinja's own tojson HTML-escapes (<, >, &, '), which would corrupt prompts.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class _TemplateDict:
        # `dict(...)` for templates without exposing the real type object.
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class _TemplateNamespace(jinja2.utils.Namespace):
        # Namespaces reject underscore-prefixed attributes, as in transformers.
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})"
                )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"chat template is not valid Jinja (line {e.lineno}): {one_line(e.message)}") from None


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
    **kwargs: Any,
) -> str:
    """Render `template` for one conversation the way `transformers`' `apply_chat_template` does.

    Like transformers: keys whose value is None are dropped from each message, the template sees
    `messages`, `tools`/`documents` (None unless given), `add_generation_prompt`, the named special tokens
    and then the caller's kwargs (which win). Template errors (`raise_exception`, sandbox violations,
    undefined values) become a one-line `UserError`.
    """
    import jinja2

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
        return compiled.render(**context)
    except jinja2.exceptions.TemplateError as e:
        kind = "blocked by the sandbox" if isinstance(e, jinja2.exceptions.SecurityError) else "failed"
        raise UserError(f"chat template {kind}: {one_line(e.message or e)}") from None
    except (TypeError, ValueError) as e:  # e.g. 'str' + list inside the template
        raise UserError(f"chat template failed: {one_line(e)}") from None
