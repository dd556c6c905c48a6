"""Load any model lmforge can run, given a path: a model directory, a .gguf file, or a store entry.

A store entry is a model directory, or a directory holding `model.gguf` (imported GGUF files are kept
as they are, quantized, and dequantized when loaded). Either may carry a `modelfile.json` written by
`lmforge create` (system prompt, chat template, sampling defaults, adapter): its template replaces the
tokenizer's, the rest travels in `Loaded.modelfile` for the chat and the server to apply.

Store *names* are resolved by `lmforge.paths.resolve` (re-exported by `lmforge.store`) before they get
here; the one name this module resolves itself is the base model an adapter directory names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.errors import UserError, one_line
from lmforge.io import read_json
from lmforge.loaders.model_dir import build_model, check_tokenizer, is_encoder_dir, load_model
from lmforge.loaders.peft import adapter_base, is_adapter_dir, load_adapter
from lmforge.model.gpt import GPT
from lmforge.model.lora import merge_lora
from lmforge.modelfile import FILE as MODELFILE_JSON
from lmforge.modelfile import Modelfile
from lmforge.paths import GGUF_IN_STORE, resolve
from lmforge.tokenizer import Tokenizer, load_hf_tokenizer


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


def read_modelfile(directory: Path) -> Modelfile:
    f = directory / MODELFILE_JSON
    if not f.is_file():
        return Modelfile()
    d = read_json(f)
    try:
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        return Modelfile.from_json(d)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"{f}: unreadable ({one_line(e, 120)})") from None


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
         allow_pickle: bool = False, merge: bool = True) -> Loaded:
    """Model + tokenizer (+ Modelfile settings) from a path. `dtype=None` means float32; `dtype="auto"`
    (what the commands that run a model use) keeps the weights in their stored precision: a GGUF's
    matrices stay in their GGML types, 16-bit safetensors stay 16-bit (see `loaders/packed.py`).

    A LoRA adapter (an adapter directory, or a Modelfile ADAPTER) is applied and, with `merge=True`, folded
    into the weights, so inference runs at the base model's speed; `merge=False` keeps it as an adapter.
    """
    p = Path(path)
    if is_encoder_dir(p):  # an imported bge/e5/MiniLM: config_from_hf would call it unsupported, which misleads
        raise UserError(f"{p} is an embedding model (a BERT encoder): it turns text into vectors and cannot generate "
                        "text; use it with `lmforge index PATH --name N --embed MODEL` or the server's "
                        "POST /v1/embeddings, and run a chat model instead")
    if is_adapter_dir(p):
        return _load_adapter_dir(p, device=device, dtype=dtype, allow_pickle=allow_pickle, merge=merge)
    gguf = gguf_file(p)
    if gguf is not None:
        from lmforge.loaders.gguf import load_gguf_packed, read_gguf

        if dtype == "auto":
            model, g = load_gguf_packed(gguf, device=device)
        else:
            g = read_gguf(gguf, dtype=dtype or torch.float32)
            model = build_model(g.config, g.state_dict, source=str(gguf), device=device)
        loaded = Loaded(model, g.tokenizer, gguf, f"gguf:{g.file_type}")
    else:
        model = load_model(p, device=device, dtype=dtype, allow_pickle=allow_pickle)
        fmt = "safetensors" if any(p.glob("*.safetensors")) else "pickle"
        tokenizer = load_hf_tokenizer(p)
        check_tokenizer(model.config, tokenizer, source=str(p))
        loaded = Loaded(model, tokenizer, p, fmt)
    directory = p if p.is_dir() else p.parent
    if p.is_dir():
        loaded.modelfile = read_modelfile(directory)
    mf = loaded.modelfile
    if mf.template is not None:
        loaded.tokenizer.chat_template = mf.template
    if mf.adapter:  # Modelfile ADAPTER: copied into the store entry by `lmforge create`
        load_adapter(loaded.model, directory / mf.adapter)
        if merge:
            merge_lora(loaded.model)
    return loaded


def _load_adapter_dir(p: Path, *, device, dtype, allow_pickle: bool, merge: bool) -> Loaded:
    """Base model (named in adapter_config.json) + the adapter; merged unless `merge=False` (training on)."""
    base_ref = adapter_base(p)
    try:
        base_path = resolve(base_ref)
    except UserError as e:
        raise UserError(f"{p} is a LoRA adapter for base model {base_ref!r}, which cannot be found ({e})") from None
    loaded = load(base_path, device=device, dtype=dtype, allow_pickle=allow_pickle)
    load_adapter(loaded.model, p)
    if merge:
        merge_lora(loaded.model)
    if (p / "tokenizer.json").is_file():
        loaded.tokenizer = load_hf_tokenizer(p)
        check_tokenizer(loaded.model.config, loaded.tokenizer, source=str(p))
    loaded.source, loaded.format = p, f"lora on {loaded.format}"
    return loaded
