"""Load any model lmforge can run, given a path: a model directory, a .gguf file, or a store entry.

A store entry is a model directory, or a directory holding `model.gguf` (imported GGUF files are kept
as they are, quantized, and dequantized when loaded). Either may carry a `modelfile.json` written by
`lmforge create` (system prompt, chat template, sampling defaults, adapter): its template replaces the
tokenizer's, the rest travels in `Loaded.modelfile` for the chat and the server to apply.

Store *names* are resolved by `lmforge.store.resolve` before they get here: this module only sees paths.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.checkpoint import build_model, is_model_dir, load_model
from lmforge.errors import UserError
from lmforge.model.gpt import GPT
from lmforge.modelfile import FILE as MODELFILE_JSON
from lmforge.modelfile import Modelfile
from lmforge.tokenizer import Tokenizer

GGUF_IN_STORE = "model.gguf"


@dataclass
class Loaded:
    model: GPT
    tokenizer: Tokenizer
    source: Path  # the directory or .gguf file the weights came from
    format: str  # "safetensors", "pickle" or "gguf:<file type>"
    modelfile: Modelfile = field(default_factory=Modelfile)


def gguf_file(path: str | os.PathLike) -> Path | None:
    """The GGUF file `path` stands for (a .gguf file, or a store entry holding model.gguf), else None."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").is_file() and (p / GGUF_IN_STORE).is_file():
        return p / GGUF_IN_STORE
    return None


def is_loadable(path: str | os.PathLike) -> bool:
    return gguf_file(path) is not None or is_model_dir(path)


def read_modelfile(directory: Path) -> Modelfile:
    f = directory / MODELFILE_JSON
    if not f.is_file():
        return Modelfile()
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        return Modelfile.from_json(d)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{f}: unreadable ({e})") from None


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         allow_pickle: bool = False) -> Loaded:
    """Model + tokenizer (+ Modelfile settings) from a path. `dtype=None` means float32."""
    p = Path(path)
    gguf = gguf_file(p)
    if gguf is not None:
        from lmforge.loaders.gguf import read_gguf

        g = read_gguf(gguf, dtype=dtype or torch.float32)
        model = build_model(g.config, g.state_dict, source=str(gguf), device=device)
        loaded = Loaded(model, g.tokenizer, gguf, f"gguf:{g.file_type}")
    else:
        from lmforge.tokenizer import load_hf_tokenizer

        model = load_model(p, device=device, dtype=dtype, allow_pickle=allow_pickle)
        fmt = "safetensors" if any(p.glob("*.safetensors")) else "pickle"
        loaded = Loaded(model, load_hf_tokenizer(p), p, fmt)
    directory = p if p.is_dir() else p.parent
    if p.is_dir():
        loaded.modelfile = read_modelfile(directory)
    mf = loaded.modelfile
    if mf.template is not None:
        loaded.tokenizer.chat_template = mf.template
    if mf.adapter:
        # LoRA adapters are applied by lmforge.model.lora (issue 5); until then a model that needs one is
        # refused rather than run without it.
        raise UserError(f"{directory} carries a LoRA adapter ({mf.adapter}); this version of lmforge cannot apply "
                        f"adapters yet (merge it first, or use the base model)")
    return loaded
