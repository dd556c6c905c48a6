"""What every group of `lmforge` commands shares: the parser classes and argument types (one-line mistakes,
exit code 2), the model and sampling flags, loading the MODEL argument, and the small formatters.

Nothing here knows a particular command; the groups (train, use, store, serve) import from here, never
from each other.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from dataclasses import fields
from pathlib import Path
from typing import Callable

from lmforge.errors import UserError

PROG = "lmforge"


def fail(msg: str, code: int = 2) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return code


def train_default(name: str):
    from lmforge.train.loop import TrainConfig

    return {f.name: f.default for f in fields(TrainConfig)}[name]


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= minimum, with a one-line message otherwise."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {v}")
        return v
    return parse


positive_int, nonneg_int = int_at_least(1), int_at_least(0)


def float_arg(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def para(text: str) -> str:
    """Wrap a description paragraph (the formatter keeps line breaks so that examples stay as written)."""
    return textwrap.fill(text, 100)


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (no usage dump), still exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


def progress_enabled(args) -> bool:
    return args.progress if args.progress is not None else sys.stderr.isatty()


def add_data_flags(p: argparse.ArgumentParser, data_default_help: str) -> None:
    p.add_argument("--data", metavar="SPEC", help=f"text to train on: builtin:pydocs (the Python docs), a .txt/.md file, "
                   f"a .jsonl file with a 'text' field, a directory of those, or several joined by commas "
                   f"(default: {data_default_help})")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="what to do with bytes that are not UTF-8: stop and name the file and offset, or replace "
                        "them with U+FFFD (default: strict)")


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU, else Apple's MPS, else the CPU), cpu, cuda, "
                   "cuda:N or mps (default: auto)")


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show progress bars (default: when stderr is a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress bars")


SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "repeat_last_n", "seed")
MODEL_HELP = "a model in the store (see lmforge list), a model directory, or a .gguf file"
DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
          "f32": "float32", "f16": "float16"}  # llama.cpp's spellings too


def sampling_params(args, defaults: dict | None = None, **extra):
    """SamplingParams from the flags, over the model's Modelfile defaults, over lmforge's defaults."""
    from lmforge.engine.sampling import SamplingParams

    given = {**(defaults or {})}
    given.update({k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k, None) is not None})
    if "stop" in extra:  # --stop adds to the Modelfile's stop strings
        extra["stop"] = [*given.pop("stop", []), *extra["stop"]]
    given.update(extra)
    try:
        return SamplingParams(**given).validate()
    except ValueError as e:
        raise UserError(str(e)) from None


CHECK_TOKENS = 2048  # KV cache positions counted when checking that a model fits before loading it


def load_model(args, *, dtype=None):
    """MODEL (store name, directory or .gguf) -> `Loaded` (model, tokenizer, Modelfile settings), at
    `--dtype` unless the command needs another `dtype`. A model that will not fit in the memory available
    is refused before loading, with what it needs and what there is (a mapped file that does not fit would
    otherwise thrash, or the OOM killer would end the process without a word)."""
    from lmforge.device import resolve_device
    from lmforge.loaders.auto import load
    from lmforge.store import resolve

    path, device = resolve(args.model), resolve_device(args.device)
    dtype = torch_dtype(args.dtype) if dtype is None else dtype
    check_fits(args.model, path, dtype, device)
    return load(path, device=device, dtype=dtype, allow_pickle=args.allow_pickle)


def check_fits(name: str, path, dtype, device) -> None:
    """A one-line UserError when the model at `path` needs more memory than `device` has free."""
    from lmforge.footprint import estimate, free_memory, gib

    free = free_memory(device)
    if free is None:
        return
    try:
        need = estimate(path, dtype=dtype, device=device, tokens=CHECK_TOKENS)
    except UserError:
        return  # the loader names what is wrong with the files
    if need.total > free:
        raise UserError(f"{name} does not fit in memory: it needs about {need.describe()}, and {gib(free)} is "
                        f"available on {device}")


def torch_dtype(flag: str):
    """A --dtype value -> what `loaders.auto.load` takes: "auto" (stored precision) or a torch dtype."""
    import torch

    name = DTYPES[flag]
    return name if name == "auto" else getattr(torch, name)


def load_engine(args):
    from lmforge.engine.generate import Engine

    loaded = load_model(args)
    return Engine(loaded.model, loaded.tokenizer, fast=not args.no_fast), loaded.modelfile


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def human_count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if s >= size:
            n = int(s // size)
            return f"{n} {unit[:-1] if n == 1 else unit} ago"
    return "just now"


def name_from_path(path: Path) -> str:
    import re

    stem = path.name[:-5] if path.name.lower().endswith(".gguf") else path.name
    base = re.sub(r"[^a-z0-9._-]", "-", stem.lower()).lstrip("._-")[:64]
    if not base:
        raise UserError(f"cannot derive a model name from {path}; give one with --name")
    return base


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """MODEL and the flags of every command that loads one."""
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    add_device_flag(p)
    p.add_argument("--dtype", choices=list(DTYPES), default="auto", help="precision the weights are held in: auto "
                   "keeps what the file stores (a GGUF's quantized blocks, 16-bit safetensors) and computes in fp32; "
                   "fp32/bf16/fp16 (or f32/f16) convert on load (default: auto)")
    p.add_argument("--allow-pickle", action="store_true", help="load pytorch_model.bin weights (only with "
                   "torch.load(weights_only=True)); default: refuse pickles, which can run code")
    p.add_argument("--no-fast", action="store_true", help="don't use lmforge's CPU matrix-vector kernel for batch-1 "
                   "decoding (default: use it when it builds)")

def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The decoding flags, their defaults read from SamplingParams."""
    from lmforge.engine.sampling import SamplingParams

    d = SamplingParams()
    p.add_argument("--max-new-tokens", type=positive_int, help=f"most tokens to generate (default: {d.max_new_tokens})")
    p.add_argument("--temperature", type=float_arg, help=f"softmax temperature; 0 = greedy (default: {d.temperature})")
    p.add_argument("--top-k", type=nonneg_int, help=f"sample among the k most likely tokens; 0 = off (default: {d.top_k})")
    p.add_argument("--top-p", type=float_arg, help=f"nucleus: the smallest set with this much probability; 1 = off (default: {d.top_p})")
    p.add_argument("--min-p", type=float_arg, help=f"drop tokens below min-p x the top probability; 0 = off (default: {d.min_p})")
    p.add_argument("--repetition-penalty", type=float_arg, help=f"divide the logits of recent tokens (HF); 1 = off (default: {d.repetition_penalty})")
    p.add_argument("--presence-penalty", type=float_arg, help=f"subtract from tokens already present (OpenAI) (default: {d.presence_penalty})")
    p.add_argument("--frequency-penalty", type=float_arg, help=f"subtract per occurrence (OpenAI) (default: {d.frequency_penalty})")
    p.add_argument("--repeat-last-n", type=int, help=f"tokens the penalties look back over; 0 = off, -1 = all (default: {d.repeat_last_n})")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling (default: random)")
