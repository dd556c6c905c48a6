"""Modelfiles, as in Ollama: a base model plus a system prompt, a chat template and sampling defaults.

    FROM smol                          # a store name, a model directory or a .gguf file (required, once)
    SYSTEM You answer in one sentence.
    SYSTEM \"\"\"A system prompt
    over several lines.\"\"\"
    TEMPLATE \"\"\"{% for m in messages %}...{% endfor %}\"\"\"   # a Jinja chat template (HF style)
    PARAMETER temperature 0.2
    PARAMETER stop "<|im_end|>"        # may repeat
    MESSAGE user Hi                    # an example conversation shown before the user's own turns
    MESSAGE assistant Hello!
    ADAPTER ./runs/smol-lora           # a LoRA adapter directory (PEFT layout)
    LICENSE \"\"\"...\"\"\"

Instructions are case-insensitive; `#` starts a comment line. Values may be bare (the rest of the line),
"quoted" (one line, backslash escapes) or \"\"\"triple-quoted\"\"\" (many lines, taken verbatim).

One deliberate difference from Ollama: TEMPLATE is a Jinja chat template, the format of
`tokenizer_config.json` that every Hugging Face model ships, not a Go template. A Go template is
recognised and refused with that explanation rather than rendered wrongly. A Jinja TEMPLATE is rendered
once on a sample conversation when the Modelfile is read, and refused if that fails or breaks the render
limits of `lmforge.tokenizer.chat_template` (2 s, 1,000,000 steps, 1,000,000 characters).

PARAMETER names are Ollama's (`repeat_penalty`, `num_predict`, ...) or lmforge's own
(`repetition_penalty`, `max_new_tokens`, ...); both map onto `SamplingParams` fields, and the values are
validated when the Modelfile is read, so a bad one is reported with its line number, not at chat time.
`PARAMETER num_ctx N` is kept apart (`Modelfile.num_ctx`): not a sampling setting but the context `lmforge
serve` loads the model with (its KV cache is sized for it), bounded by the model's own context.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import UserError

# Ollama's parameter names lmforge implements -> SamplingParams field. THE table of Ollama's names: the
# Modelfile's PARAMETERs, Ollama's request `options` (`serve/ollama_protocol`), the `parameters` /api/show
# prints and `lmforge run`'s options through a server (`cli/use`) all read it, so they cannot disagree.
OLLAMA_PARAMETERS: dict[str, str] = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repeat_penalty": "repetition_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "num_predict": "max_new_tokens",
    "stop": "stop",
}
OLLAMA_NAME: dict[str, str] = {f: name for name, f in OLLAMA_PARAMETERS.items()}  # SamplingParams field -> name
_KINDS = {"top_k": int, "repeat_last_n": int, "seed": int, "max_new_tokens": int, "stop": str}
# PARAMETER name -> (SamplingParams field, type): Ollama's spellings, and lmforge's own field names as aliases.
PARAMETERS: dict[str, tuple[str, type]] = {
    **{name: (f, _KINDS.get(f, float)) for name, f in OLLAMA_PARAMETERS.items()},
    "repetition_penalty": ("repetition_penalty", float),
    "max_new_tokens": ("max_new_tokens", int),
}
# Ollama parameters that describe its runtime (threads, GPU layers, context reuse, ...), not the answers:
# accepted, in a Modelfile and in a request's options, without a word.
RUNTIME_OPTIONS = frozenset({"numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "vocab_only", "use_mmap",
                             "use_mlock", "num_thread", "logits_all", "embedding_only", "f16_kv", "num_keep", "num_gqa",
                             "rope_frequency_base", "rope_frequency_scale"})
# Ollama's sampling parameters lmforge does not implement: accepted (existing Modelfiles and clients work) but
# they would change the answers, so they are named: in `Modelfile.ignored`, in a request's warning header.
UNSUPPORTED_OPTIONS = frozenset({"typical_p", "tfs_z", "mirostat", "mirostat_tau", "mirostat_eta",
                                 "penalize_newline"})
IGNORED_PARAMETERS = RUNTIME_OPTIONS | UNSUPPORTED_OPTIONS
INSTRUCTIONS = ("from", "system", "template", "parameter", "adapter", "license", "message")
ROLES = ("system", "user", "assistant")
FILE = "modelfile.json"  # what `lmforge create` writes into the store entry


@dataclass
class Modelfile:
    base: str | None = None  # FROM
    system: str | None = None
    template: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # SamplingParams field -> value
    messages: list[dict[str, str]] = field(default_factory=list)
    adapter: str | None = None
    license: str | None = None
    ignored: list[str] = field(default_factory=list)  # sampling parameters accepted but not used (UNSUPPORTED_OPTIONS)
    num_ctx: int | None = None  # PARAMETER num_ctx: the context the server loads the model with (its KV cache)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if v not in (None, [], {})}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Modelfile":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def merged_over(self, parent: "Modelfile") -> "Modelfile":
        """This Modelfile on top of the one of its FROM model: set values win, parameters merge."""
        return Modelfile(
            base=self.base, system=self.system if self.system is not None else parent.system,
            template=self.template if self.template is not None else parent.template,
            parameters={**parent.parameters, **self.parameters},
            messages=self.messages or parent.messages, adapter=self.adapter or parent.adapter,
            license=self.license if self.license is not None else parent.license, ignored=self.ignored,
            num_ctx=self.num_ctx if self.num_ctx is not None else parent.num_ctx)


def _value(text: str, lines: list[str], i: int, where: str) -> tuple[str, int]:
    """The value starting at `text` on line i: (value, index of the last line it used)."""
    text = text.strip()
    if text.startswith('"""'):
        rest = text[3:]
        if '"""' in rest:
            value, _, after = rest.partition('"""')
            if after.strip():
                raise UserError(f"{where}: text after the closing \"\"\"")
            return value, i
        parts = [rest]
        for j in range(i + 1, len(lines)):
            if '"""' in lines[j]:
                value, _, after = lines[j].partition('"""')
                if after.strip():
                    raise UserError(f"{where.rsplit(':', 1)[0]}:{j + 1}: text after the closing \"\"\"")
                parts.append(value)
                return "\n".join(parts).strip("\n"), j
            parts.append(lines[j])
        raise UserError(f"{where}: the \"\"\" opened here is never closed")
    if text.startswith('"'):
        try:
            value = json.loads(text)  # one line, JSON-style escapes
        except json.JSONDecodeError:
            raise UserError(f"{where}: unterminated or malformed quoted string {text!r}") from None
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a quoted string, got {text!r}")
        return value, i
    return text, i


def _parameter(text: str, where: str) -> tuple[str, Any] | None:
    name, _, raw = text.strip().partition(" ")
    name = name.lower()
    if name in IGNORED_PARAMETERS:
        return None
    if name == "num_ctx":  # not a sampling setting: the context the model is served with
        try:
            value = int(raw.strip())
        except ValueError:
            raise UserError(f"{where}: PARAMETER num_ctx needs an integer, got {raw.strip()!r}") from None
        if value < 1:
            raise UserError(f"{where}: PARAMETER num_ctx must be at least 1, got {value}")
        return "num_ctx", value
    if name not in PARAMETERS:
        raise UserError(f"{where}: unknown parameter {name!r}; known: {', '.join(PARAMETERS)}")
    attr, kind = PARAMETERS[name]
    raw = raw.strip()
    if not raw:
        raise UserError(f"{where}: PARAMETER {name} needs a value")
    if kind is str:
        value, _ = _value(raw, [raw], 0, where)
        return attr, value
    try:
        return attr, kind(raw)
    except ValueError:
        raise UserError(f"{where}: PARAMETER {name} needs {'an integer' if kind is int else 'a number'}, got {raw!r}") from None


def parse(text: str, *, source: str = "Modelfile") -> Modelfile:
    """Parse Modelfile text; UserError naming `source:line` for anything wrong."""
    from lmforge.engine.sampling import SamplingParams

    mf = Modelfile()
    stops: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line, where = lines[i].strip(), f"{source}:{i + 1}"
        if not line or line.startswith("#"):
            i += 1
            continue
        word, _, rest = line.partition(" ")
        kw = word.lower()
        if kw not in INSTRUCTIONS:
            raise UserError(f"{where}: unknown instruction {word!r}; known: {', '.join(k.upper() for k in INSTRUCTIONS)}")
        if kw == "parameter":
            p = _parameter(rest, where)
            if p is not None and p[0] == "num_ctx":
                mf.num_ctx = p[1]
            elif p is None:
                if rest.split()[0].lower() in UNSUPPORTED_OPTIONS:  # runtime ones change nothing worth a word
                    mf.ignored.append(rest.split()[0].lower())
            elif p[0] == "stop":
                stops.append(p[1])
            else:
                mf.parameters[p[0]] = p[1]
            i += 1
            continue
        if kw == "message":
            role, _, content = rest.strip().partition(" ")
            if role.lower() not in ROLES:
                raise UserError(f"{where}: MESSAGE role must be one of {', '.join(ROLES)}, got {role!r}")
            value, i = _value(content, lines, i, where)
            mf.messages.append({"role": role.lower(), "content": value})
            i += 1
            continue
        value, i = _value(rest, lines, i, where)
        if not value and kw in ("from", "adapter"):
            raise UserError(f"{where}: {kw.upper()} needs a value")
        if kw == "from":
            if mf.base is not None:
                raise UserError(f"{where}: a Modelfile has one FROM")
            mf.base = value
        elif kw == "system":
            mf.system = value
        elif kw == "template":
            _check_template(value, where)
            mf.template = value
        elif kw == "adapter":
            mf.adapter = value
        elif kw == "license":
            mf.license = value
        i += 1
    if mf.base is None:
        raise UserError(f"{source}: no FROM line (FROM names the base model: a store name, a directory or a .gguf file)")
    if stops:
        mf.parameters["stop"] = stops
    try:
        SamplingParams(**mf.parameters).validate()
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None
    return mf


def _check_template(template: str, where: str) -> None:
    """Refuse a TEMPLATE now rather than at chat time: an Ollama Go template, invalid Jinja, or one that fails or
    breaks the render limits (time, steps, size) on a sample conversation (see check_chat_template)."""
    from lmforge.tokenizer.chat_template import check_chat_template

    if re.search(r"\{\{-?\s*\.|\{\{-?\s*(if|range|end)\b", template):
        raise UserError(f"{where}: TEMPLATE looks like an Ollama Go template; lmforge takes a Jinja chat template "
                        f"(the chat_template of tokenizer_config.json)")
    try:
        check_chat_template(template)
    except UserError as e:
        raise UserError(f"{where}: TEMPLATE refused: {e}") from None
