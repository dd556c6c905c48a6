"""The `lmforge` command: one table of subcommands, each a thin layer over a library function.

User mistakes surface as `UserError` and become one line on stderr with exit code 2; a diverged run
exits 1 with its one-line reason; an interrupted run saves and exits 0. Only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import textwrap
import time
from dataclasses import fields
from pathlib import Path
from typing import Callable

from lmforge import __version__
from lmforge.errors import UserError

PROG = "lmforge"


def _fail(msg: str, code: int = 2) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return code


def _train_default(name: str):
    from lmforge.train.loop import TrainConfig

    return {f.name: f.default for f in fields(TrainConfig)}[name]


def _int_at_least(minimum: int) -> Callable[[str], int]:
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


_positive_int, _nonneg_int = _int_at_least(1), _int_at_least(0)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _para(text: str) -> str:
    """Wrap a description paragraph (the formatter keeps line breaks so that examples stay as written)."""
    return textwrap.fill(text, 100)


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (no usage dump), still exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=100)


def _progress_enabled(args) -> bool:
    return args.progress if args.progress is not None else sys.stderr.isatty()


# ---------------------------------------------------------------------------------------------------
# tokenizer train
# ---------------------------------------------------------------------------------------------------
def cmd_tokenizer_train(args) -> int:
    from lmforge.data.corpus import load_documents
    from lmforge.tokenizer import train_tokenizer
    from lmforge.io import check_writable

    out = Path(args.out)
    check_writable(out)
    docs = load_documents(args.data, errors=args.errors)
    t0 = time.perf_counter()
    tok = train_tokenizer(docs, args.vocab_size, min_frequency=args.min_frequency, show_progress=_progress_enabled(args))
    tok.save(out)
    sample = docs[0][:2000]
    ids = tok.encode(sample, allow_special=False)
    print(f"trained a {tok.vocab_size:,}-token byte-level BPE on {sum(map(len, docs)):,} characters "
          f"in {time.perf_counter() - t0:.1f}s -> {out}")
    print(f"compression on the first document: {len(sample) / max(1, len(ids)):.2f} characters/token")
    return 0


# ---------------------------------------------------------------------------------------------------
# pretrain
# ---------------------------------------------------------------------------------------------------
RECIPE_FLAGS = ("max_steps", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "lr_decay_steps",
                "weight_decay", "grad_clip", "eval_interval", "save_interval", "log_interval", "seed", "precision",
                "compile")


def cmd_pretrain(args) -> int:
    from lmforge.train.loop import TrainingDiverged, print_evaluations
    from lmforge.train.pretrain import PretrainOptions, pretrain

    if args.resume and args.out and Path(args.out) != Path(args.resume):
        return _fail("--resume continues in its own directory; leave out --out")
    out = args.resume or args.out
    if not out:
        return _fail("say where the model goes with --out DIR (or continue a run with --resume DIR)")
    progress = _progress_enabled(args)
    opts = PretrainOptions(
        out=Path(out), data=args.data, preset=args.preset, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        context_length=args.context_length, dropout=args.dropout, val_fraction=args.val_fraction, errors=args.errors,
        eval_tokens=args.eval_tokens, resume=bool(args.resume), dry_run=args.dry_run, overwrite=args.overwrite, device=args.device,
        progress=progress, recipe={k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k) is not None},
    )
    if not progress:  # no terminal: a line per evaluation instead of a progress bar
        opts.on_log = print_evaluations
    try:
        result, summary = pretrain(opts)
    except TrainingDiverged as e:
        return _fail(str(e), code=1)
    if result is None:
        print(summary["plan_text"])
        meta = summary["data_meta"]
        print(f"tokens         {meta['train_tokens']:,} train / {meta['val_tokens']:,} validation from {summary['data']} "
              f"({meta['chars'] / max(1, meta['train_tokens'] + meta['val_tokens']):.2f} characters/token)")
        print(f"recipe         {summary['recipe'].max_steps} steps x {summary['plan']['tokens_per_step']:,} tokens on "
              f"{summary['device']} (dry run: nothing was trained or written)")
        return 0
    status = "stopped early (signal)" if result.interrupted else "done"
    line = f"{status}: step {result.step}, {result.tokens_seen:,} tokens, {result.tokens_per_s:,.0f} tokens/s, {result.elapsed_s:.0f}s"
    if result.val_loss is not None:
        import math
        line += f"; validation loss {result.val_loss:.4f} nats/token (ppl {math.exp(result.val_loss):.2f}, " \
                f"{summary['val_nats_per_char']:.4f} nats/char)"
    print(line)
    print(f"model: {out}   loss curve: {summary['plot']}")
    if args.name is not None and not result.interrupted:
        from lmforge.store import import_model

        import_model(out, args.name, overwrite=True)  # lineage (data, config, recipe) travels in lmforge.json
        print(f"added to the store as {args.name}: lmforge run {args.name}")
    if args.samples and not result.interrupted:
        from lmforge.engine.generate import Engine
        from lmforge.engine.sampling import SamplingParams

        engine = Engine(summary["model"], summary["tokenizer"], fast=False)
        for i in range(args.samples):
            params = SamplingParams(max_new_tokens=args.sample_tokens, temperature=0.8, top_k=40, top_p=0.95, min_p=0.0,
                                    seed=args.seed_sample + i)
            text = engine.complete([""], params)[0].text.strip()
            print(f"--- sample {i + 1} ---\n{text}")
    return 0


# ---------------------------------------------------------------------------------------------------
# generate / score / run
# ---------------------------------------------------------------------------------------------------
SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "repeat_last_n", "seed")
MODEL_HELP = "a model in the store (see lmforge list), a model directory, or a .gguf file"
DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _sampling_params(args, defaults: dict | None = None, **extra):
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


def _load(args):
    """MODEL (store name, directory or .gguf) -> `Loaded` (model, tokenizer, Modelfile settings)."""
    import torch

    from lmforge.loaders.auto import load
    from lmforge.store import resolve
    from lmforge.device import resolve_device

    dtype = DTYPES[args.dtype]
    return load(resolve(args.model), device=resolve_device(args.device),
                dtype=getattr(torch, dtype) if dtype else None, allow_pickle=args.allow_pickle)


def _load_engine(args):
    from lmforge.engine.generate import Engine

    loaded = _load(args)
    return Engine(loaded.model, loaded.tokenizer, fast=not args.no_fast), loaded.modelfile


def cmd_generate(args) -> int:
    import math

    engine, mf = _load_engine(args)
    tok = engine.tokenizer
    prompt = args.prompt
    if args.chat:
        from lmforge.engine.prompt import chat_prompt_ids

        try:
            prompt = chat_prompt_ids(tok, [{"role": "user", "content": prompt}], examples=mf.messages,
                                     system=args.system if args.system is not None else mf.system)
        except ValueError as e:
            raise UserError(str(e)) from None
    if args.beams > 1:
        params = _sampling_params(args, mf.parameters, num_beams=args.beams, length_penalty=args.length_penalty,
                                  early_stopping=args.early_stopping, stop=args.stop or [],
                                  **({} if args.temperature is not None else {"temperature": 0.0}))
        try:
            beams = engine.beam_search(prompt, params, n_best=args.n_best)
        except ValueError as e:
            raise UserError(str(e)) from None
        for rank, b in enumerate(beams, 1):
            print(f"--- beam {rank}: score {b.score:.4f} (log-prob {b.sum_logprob:.3f}, {b.n_tokens} tokens, {b.finish_reason})")
            print(b.text)
        return 0
    params = _sampling_params(args, mf.parameters, stop=args.stop or [],
                              logprobs=args.top_logprobs if args.show_probs else None)
    try:
        events = engine.generate([prompt], params)
        if not args.show_probs:
            if isinstance(prompt, str) and args.echo:
                print(prompt, end="", flush=True)
            finish = None
            for ev in events:
                print(ev.text, end="", flush=True)
                finish = ev.finish_reason or finish
            print()
            if args.verbose:
                print(f"[finish_reason: {finish}]", file=sys.stderr)
            return 0
        print(f"{'token':<20} {'prob':>7}   top alternatives")
        for ev in events:
            shown = repr(tok.token_text(ev.token_id))  # quoted, so spaces and newlines are visible
            alts = "  ".join(f"{tok.token_text(i)!r} {math.exp(lp):.1%}" for i, lp in (ev.top_logprobs or [])
                             if i != ev.token_id)
            print(f"{shown:<20} {math.exp(ev.logprob):>7.1%}   {alts}")
            if ev.finish_reason:
                print(f"[finish_reason: {ev.finish_reason}]")
    except ValueError as e:
        raise UserError(str(e)) from None
    return 0


def cmd_score(args) -> int:
    import math

    if (args.file is None) == (args.text is None):
        raise UserError("give exactly one of --file PATH or --text TEXT")
    if args.file is not None:
        from lmforge.data.corpus import load_documents

        text = "\n".join(load_documents(str(args.file), errors=args.errors))
    else:
        text = args.text
    engine, _ = _load_engine(args)
    try:
        r = engine.score(text)
    except ValueError as e:
        raise UserError(str(e)) from None
    tok = engine.tokenizer
    n = len(r.logprobs)
    print(f"tokens scored        {n:,} ({r.n_chars:,} characters)")
    print(f"total log-likelihood {r.total_logprob:,.3f} nats")
    print(f"mean surprisal       {-r.total_logprob / n:.4f} nats/token = {-r.total_logprob / n / math.log(2):.4f} bits/token")
    print(f"per character        {-r.total_logprob / max(1, r.n_chars):.4f} nats/char")
    print(f"perplexity           {r.perplexity:.3f}")
    offset = len(r.ids) - n  # ids[offset + i] is the token of logprobs[i]
    worst = sorted(range(n), key=lambda i: r.logprobs[i])[: args.top]
    if worst:
        print("\nmost surprising tokens (surprisal in bits, with the text before them):")
        for i in worst:
            j = offset + i
            before = tok.decode(r.ids[max(offset, j - 8):j], skip_special_tokens=True)[-40:]
            print(f"  {-r.logprobs[i] / math.log(2):6.2f}  ...{before!r} -> {tok.token_text(r.ids[j])!r}")
    return 0


def cmd_run(args) -> int:
    from lmforge.chat import ChatSession, answer_once, repl

    loaded = _load(args)
    try:
        session = ChatSession.from_loaded(loaded, system=args.system, fast=not args.no_fast,
                                          params=_sampling_params(args, loaded.modelfile.parameters))
    except ValueError as e:
        raise UserError(str(e)) from None
    if not sys.stdin.isatty():
        try:
            return answer_once(session, sys.stdin.read())
        except ValueError as e:
            raise UserError(str(e)) from None
    return repl(session)


# ---------------------------------------------------------------------------------------------------
# The model store: import / pull / list / show / rm / cp / create, and export
# ---------------------------------------------------------------------------------------------------
def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _human_count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if s >= size:
            n = int(s // size)
            return f"{n} {unit[:-1] if n == 1 else unit} ago"
    return "just now"


def _name_from_path(path: Path) -> str:
    import re

    stem = path.name[:-5] if path.name.lower().endswith(".gguf") else path.name
    base = re.sub(r"[^a-z0-9._-]", "-", stem.lower()).lstrip("._-")[:64]
    if not base:
        raise UserError(f"cannot derive a model name from {path}; give one with --name")
    return base


def cmd_import(args) -> int:
    from lmforge.store import import_model, validate_name

    src = Path(args.source).expanduser()
    name = validate_name(args.name if args.name is not None else _name_from_path(src.resolve()))
    path = import_model(src, name, allow_pickle=args.allow_pickle, overwrite=args.overwrite)
    print(f"imported {src} as {name} ({path})")
    return 0


def cmd_pull(args) -> int:
    from lmforge.store import pull

    path = pull(args.repo, name=args.name, filename=args.file, revision=args.revision, overwrite=args.overwrite)
    print(f"pulled {args.repo} into {path}")
    return 0


def cmd_list(args) -> int:
    from lmforge.store import list_models

    entries = list_models()
    if not entries:
        print("no models yet: add one with lmforge import PATH, lmforge pull REPO, or lmforge pretrain --name NAME")
        return 0
    rows = [("NAME", "ARCHITECTURE", "PARAMETERS", "DTYPE/QUANT", "SIZE", "MODIFIED")]
    for e in entries:
        arch = e.architecture.removesuffix("ForCausalLM").removesuffix("LMHeadModel")
        rows.append((e.name, arch if not e.error else f"DAMAGED: {e.error}"[:60], _human_count(e.parameters),
                     e.dtype or "?", _human_size(e.size_bytes), _ago(e.modified)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_show(args) -> int:
    import json

    from lmforge.store import show

    info = show(args.model)
    mf = info.get("modelfile") or {}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    if args.template:
        print(info.get("chat_template") or "(no chat template)")
        return 0
    if args.system:
        print(info.get("system") or "(no system prompt)")
        return 0
    if args.parameters:
        for k, v in (info.get("defaults") or {}).items():
            for item in v if isinstance(v, list) else [v]:
                print(f"{k:<20} {json.dumps(item) if isinstance(item, str) else item}")
        return 0
    if args.license:
        print(info.get("license") or "(no license file)")
        return 0
    if args.modelfile:
        print(f"# Modelfile of {info['name']}\nFROM {info['path']}")
        if info.get("system"):
            print(f'SYSTEM """{info["system"]}"""')
        if mf.get("template"):
            print(f'TEMPLATE """{mf["template"]}"""')
        for k, v in (info.get("defaults") or {}).items():
            for item in v if isinstance(v, list) else [v]:
                print(f"PARAMETER {k} {json.dumps(item) if isinstance(item, str) else item}")
        for m in mf.get("messages") or []:
            print(f'MESSAGE {m["role"]} """{m["content"]}"""')
        return 0
    def known(key):
        return "?" if info.get(key) is None else info[key]

    print(f"  {info['name']}" + (f"   [DAMAGED: {info['error']}]" if info.get("error") else ""))
    print("  Model")
    rows = [("architecture", info.get("architecture")), ("parameters", _human_count(info.get("parameters"))),
            ("context length", known("context_length")), ("embedding length", known("embedding_length")),
            ("layers", known("layers")),
            ("dtype/quantization", info.get("dtype") or "?"), ("size on disk", _human_size(info.get("size_bytes") or 0)),
            ("path", info.get("path"))]
    for k, v in rows:
        print(f"    {k:<20} {v}")
    if info.get("defaults"):
        print("\n  Parameters")
        for k, v in info["defaults"].items():
            print(f"    {k:<20} {v}")
    if info.get("system"):
        print("\n  System\n    " + "\n    ".join(info["system"].splitlines()))
    if info.get("chat_template"):
        t = info["chat_template"].splitlines()
        print("\n  Template\n    " + "\n    ".join(t[:6]) + (f"\n    ... ({len(t) - 6} more lines: --template)" if len(t) > 6 else ""))
    if info.get("lineage"):
        print("\n  Lineage")
        for k, v in info["lineage"].items():
            print(f"    {k:<20} {v}")
    if info.get("license"):
        lic = info["license"].strip().splitlines()
        print("\n  License\n    " + "\n    ".join(lic[:4]) + ("\n    ... (--license)" if len(lic) > 4 else ""))
    return 0


def cmd_rm(args) -> int:
    from lmforge.store import remove, validate_name

    for name in args.names:
        remove(name)
        print(f"deleted {validate_name(name)}")
    return 0


def cmd_cp(args) -> int:
    from lmforge.store import copy, validate_name

    copy(args.source, args.destination)
    print(f"copied {validate_name(args.source)} to {validate_name(args.destination)}")
    return 0


def cmd_create(args) -> int:
    from lmforge.store import create, validate_name

    path = create(args.name, args.file, overwrite=args.overwrite)
    print(f"created {validate_name(args.name)} ({path})")
    return 0


def cmd_export(args) -> int:
    import torch

    from lmforge.loaders.export import export_gguf, export_hf

    if args.format == "hf" and args.type is not None:
        raise UserError("--type is for --format gguf; for --format hf choose the weights' dtype with --out-dtype")
    out = Path(args.out).expanduser()
    if args.format == "gguf" and out.is_dir():
        raise UserError(f"{out} is a directory; --format gguf writes one file (e.g. --out model.gguf)")
    if out.exists() and not args.overwrite and (out.is_file() or any(out.iterdir())):
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    loaded = _load(args)
    if args.format == "hf":
        export_hf(loaded, out, dtype=getattr(torch, DTYPES[args.out_dtype] or "float32"))
    else:
        export_gguf(loaded, out, qtype=args.type or "f16")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size
    print(f"exported {args.model} to {out} ({args.format}{'' if args.format == 'hf' else ' ' + (args.type or 'f16')}, "
          f"{_human_size(size)})")
    return 0


# ---------------------------------------------------------------------------------------------------
# finetune / align / merge
# ---------------------------------------------------------------------------------------------------
FT_RECIPE = ("max_steps", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip",
             "eval_interval", "save_interval", "log_interval", "seed")


def _run_finetune(args, method: str) -> int:
    from lmforge.store import resolve
    from lmforge.train.finetune import FinetuneOptions, finetune
    from lmforge.train.loop import TrainingDiverged, print_evaluations

    out = Path(args.out)
    model_path = out if args.resume else resolve(args.model)
    opts = FinetuneOptions(
        model=str(model_path), data=args.data, out=out, method=method, val_data=args.val_data,
        lora=getattr(args, "lora", False), lora_rank=getattr(args, "lora_rank", 16),
        lora_alpha=getattr(args, "lora_alpha", 32.0), lora_dropout=getattr(args, "lora_dropout", 0.05),
        lora_targets=getattr(args, "lora_targets", None) or "all-linear",
        beta=getattr(args, "beta", 0.1), epochs=args.epochs, resume=args.resume, overwrite=args.overwrite,
        device=args.device, progress=_progress_enabled(args), limit=args.limit, base_ref=args.model,
        recipe={k: getattr(args, k) for k in FT_RECIPE if getattr(args, k, None) is not None},
        on_info=lambda line: print(line, flush=True))  # what data, how much of the model: before training
    if not opts.progress:  # no terminal: a line per evaluation instead of a progress bar
        opts.on_log = print_evaluations
    try:
        result, summary = finetune(opts)
    except TrainingDiverged as e:
        return _fail(str(e), code=1)
    status = "stopped early (signal)" if result.interrupted else "done"
    line = f"{status}: step {result.step}, {result.tokens_seen:,} tokens, {result.tokens_per_s:,.0f} tokens/s, {result.elapsed_s:.0f}s"
    if result.val_loss is not None:
        line += f"; validation loss {result.val_loss:.4f}"
    for k, v in result.val_metrics.items():
        line += f", {k} {v:.3f}"
    print(line)
    kind = "adapter" if (out / "adapter_config.json").is_file() else "model"
    print(f"{kind}: {out}   loss curve: {summary['plot']}")
    if args.name is not None and not result.interrupted:
        from lmforge.store import import_model

        if kind == "adapter":
            print(f"not added to the store: {out} is an adapter; lmforge merge {out} --out DIR first, or use it "
                  f"from a Modelfile (ADAPTER)")
        else:
            import_model(out, args.name, overwrite=True)
            print(f"added to the store as {args.name}: lmforge run {args.name}")
    return 0


def cmd_finetune(args) -> int:
    return _run_finetune(args, "sft")


def cmd_align(args) -> int:
    return _run_finetune(args, args.method)


def cmd_merge(args) -> int:
    from lmforge.loaders.export import merge_adapter

    out = Path(args.out)
    src, base = merge_adapter(args.adapter, out, overwrite=args.overwrite)
    print(f"merged {src} into its base ({base}): {out}")
    if args.name is not None:
        from lmforge.store import import_model

        import_model(out, args.name, overwrite=True)
        print(f"added to the store as {args.name}")
    return 0


def cmd_quickstart(args) -> int:
    from lmforge.quickstart import quickstart

    quickstart(out=Path(args.out), budget=args.budget, device=args.device, progress=_progress_enabled(args),
               register=not args.no_store, chat=not args.no_chat)
    return 0


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------
def _add_data_flags(p: argparse.ArgumentParser, data_default_help: str) -> None:
    p.add_argument("--data", metavar="SPEC", help=f"text to train on: builtin:pydocs (the Python docs), a .txt/.md file, "
                   f"a .jsonl file with a 'text' field, a directory of those, or several joined by commas "
                   f"(default: {data_default_help})")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="what to do with bytes that are not UTF-8: stop and name the file and offset, or replace "
                        "them with U+FFFD (default: strict)")


def _add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show progress bars (default: when stderr is a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress bars")


# ---------------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from lmforge.serve.app import ServerOptions
    from lmforge.serve.models import ModelRegistry
    from lmforge.serve.server import build_server, is_loopback, keep_alive_loop
    from lmforge.store import resolve, validate_name
    from lmforge.device import resolve_device

    fixed = None
    if args.models:
        fixed = {}
        for ref in args.models:
            path = resolve(ref)
            try:
                name = validate_name(ref)
                name = name[: -len(":latest")] if name.endswith(":latest") else name
            except UserError:
                name = _name_from_path(path)
            if name in fixed:
                raise UserError(f"two models would be served as {name!r}; serve one of them from the store under another name")
            fixed[name] = path
    api_key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None  # an empty key means none, never ""
    loopback = is_loopback(args.host)
    if not loopback and api_key is None:
        print(f"{PROG}: WARNING: serving on {args.host} with no API key: anyone who can reach this machine can use "
              f"these models and write feedback files. Use --api-key (or bind 127.0.0.1).", file=sys.stderr)
    registry = ModelRegistry(fixed, device=str(resolve_device(args.device)), max_batch=args.max_concurrency,
                             max_queue=args.max_queue, max_context=args.max_context, keep_alive=args.keep_alive,
                             fast=not args.no_fast, prefill_chunk=args.prefill_chunk)
    opts = ServerOptions(api_key=api_key, loopback=loopback, allowed_hosts=tuple(h.lower() for h in args.allowed_host),
                         cors_origins=tuple(args.cors_origin), max_body=args.max_body_kb * 1024,
                         feedback_dir=Path(args.feedback_dir).expanduser() if args.feedback_dir else None)
    names = [n for n, _ in registry.ids()]
    server = build_server(registry, opts, host=args.host, port=args.port, grace=args.grace)
    keep_alive_loop(registry, server)

    async def announce() -> None:
        import asyncio

        while not server.started:
            await asyncio.sleep(0.05)
        where = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{server.port}"
        print(f"serving {', '.join(names) if names else 'the model store (empty so far)'}\n"
              f"  API: {where}/v1   web UI: {where}/   (Ctrl-C to stop)", flush=True)

    import asyncio

    async def run() -> None:
        task = asyncio.create_task(announce())
        await server.serve()
        task.cancel()

    try:
        asyncio.run(run())
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    finally:
        registry.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lmforge.presets import preset_names

    parser = _Parser(
        prog=PROG, formatter_class=_Formatter,
        description=_para("Own a language model on your own machine: train a tokenizer, pretrain, and (soon) "
                          "fine-tune, evaluate, chat and serve."),
        epilog="Run 'lmforge COMMAND --help' for the flags of a command.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # tokenizer train
    tok = sub.add_parser("tokenizer", help="train byte-level BPE tokenizers", formatter_class=_Formatter)
    tok.set_defaults(group_parser=tok)
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
    tt = tok_sub.add_parser("train", help="train a BPE tokenizer on text and save it (tokenizer.json + config)",
                            formatter_class=_Formatter,
                            description=_para("Train a byte-level BPE tokenizer with Hugging Face tokenizers. Any UTF-8 "
                                              "text round-trips exactly; special tokens <|endoftext|>, <|im_start|>, "
                                              "<|im_end|>, <|pad|> have ids 0-3; a ChatML chat template is included."))
    _add_data_flags(tt, "builtin:pydocs")
    tt.set_defaults(data="builtin:pydocs")
    tt.add_argument("--vocab-size", type=_positive_int, default=8192, help="tokens in the vocabulary, specials included (default: 8192)")
    tt.add_argument("--min-frequency", type=_positive_int, default=2, help="merge only pairs seen at least this often (default: 2)")
    tt.add_argument("--out", required=True, metavar="DIR", help="directory to write the tokenizer files to (required)")
    _add_progress_flag(tt)
    tt.set_defaults(func=cmd_tokenizer_train)

    # pretrain
    pt = sub.add_parser(
        "pretrain", help="pretrain a model from raw text (or resume a run)", formatter_class=_Formatter,
        description=_para("Train a decoder-only transformer on raw text. Trains a tokenizer on the data unless --tokenizer "
                    "is given, tokenizes once into cached shards, then trains with AdamW, warmup + cosine decay, "
                    "periodic validation and checkpoints. Writes a Hugging Face model directory (config.json, "
                    "model.safetensors, tokenizer files), metrics.jsonl and loss.png into --out. Ctrl-C saves and "
                    "stops; --resume continues exactly where a run stopped."),
        epilog="examples:\n  lmforge pretrain --preset small --data builtin:pydocs --out runs/small --max-steps 3000\n"
               "  lmforge pretrain --resume runs/small --max-steps 6000\n"
               "  lmforge pretrain --preset small --data shakespeare.txt --out runs/shakes --dry-run")
    pt.add_argument("--preset", metavar="NAME", help=f"model shape, one of: {', '.join(preset_names())} "
                    f"(default: small; on --resume, the checkpoint's shape)")
    _add_data_flags(pt, "builtin:pydocs; on --resume, the run's data")
    pt.add_argument("--out", metavar="DIR", help="output model directory (required unless --resume)")
    pt.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (same data order, optimizer and RNG state)")
    pt.add_argument("--name", help="also add the finished model to the store under this name (default: don't)")
    pt.add_argument("--dry-run", action="store_true", help="print parameters, FLOPs/token, a memory estimate and token "
                    "counts, then stop without training")
    pt.add_argument("--overwrite", action="store_true", help="start a new run in an --out that already holds a model "
                    "(default: refuse, so a finished model is never lost by accident)")
    pt.add_argument("--tokenizer", metavar="DIR", type=Path, help="use this tokenizer instead of training one on the data")
    pt.add_argument("--vocab-size", type=_positive_int, help="vocabulary of the tokenizer trained on the data "
                    "(default: the preset's)")
    pt.add_argument("--context-length", type=_positive_int, help="tokens per training window = the model's context "
                    "(default: the preset's)")
    pt.add_argument("--dropout", type=_float, help="dropout probability (default: the preset's, 0)")
    g = pt.add_argument_group("training recipe (on --resume, defaults come from the checkpoint)")
    g.add_argument("--max-steps", type=_positive_int, help=f"optimizer steps to train to (default: {_train_default('max_steps')})")
    g.add_argument("--batch-size", type=_positive_int, help=f"sequences per micro-batch (default: {_train_default('batch_size')})")
    g.add_argument("--grad-accum", type=_positive_int, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--lr", type=_float, help=f"peak learning rate (default: {_train_default('lr')})")
    g.add_argument("--min-lr", type=_float, help="learning rate at the end of the cosine decay (default: lr/10)")
    g.add_argument("--warmup-steps", type=_nonneg_int, help="linear warmup steps (default: 100, at most a tenth of max-steps)")
    g.add_argument("--lr-decay-steps", type=_positive_int, help="step at which the cosine reaches min-lr (default: max-steps)")
    g.add_argument("--weight-decay", type=_float, help=f"AdamW weight decay on matrices (default: {_train_default('weight_decay')})")
    g.add_argument("--grad-clip", type=_float, help=f"clip the gradient norm to this; 0 disables (default: {_train_default('grad_clip')})")
    g.add_argument("--eval-interval", type=_positive_int, help=f"steps between validation runs (default: {_train_default('eval_interval')})")
    g.add_argument("--save-interval", type=_nonneg_int, help=f"steps between checkpoints; 0 = only at the end (default: {_train_default('save_interval')})")
    g.add_argument("--log-interval", type=_positive_int, help=f"steps between metrics lines (default: {_train_default('log_interval')})")
    g.add_argument("--seed", type=int, help=f"seed for initialisation, data order and dropout (default: {_train_default('seed')})")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="autocast precision; auto = bf16 on "
                   "GPUs that support it, fp32 on CPU (default: auto)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (default: off)")
    pt.add_argument("--val-fraction", type=_float, default=0.05, help="share of the data held out for validation (default: 0.05)")
    pt.add_argument("--eval-tokens", type=_positive_int, default=131072, help="validation tokens scored per evaluation (default: 131072)")
    pt.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    pt.add_argument("--samples", type=_nonneg_int, default=2, help="text samples to print when training ends (default: 2)")
    pt.add_argument("--sample-tokens", type=_positive_int, default=80, help="tokens per printed sample (default: 80)")
    pt.add_argument("--seed-sample", type=int, default=0, help="seed of the printed samples (default: 0)")
    _add_progress_flag(pt)
    pt.set_defaults(func=cmd_pretrain)

    # generate / score / run
    def add_model_flags(p):
        p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
        p.add_argument("--dtype", choices=list(DTYPES), default="auto", help="dtype the weights are loaded in; auto = "
                       "fp32, whatever the file stores (default: auto)")
        p.add_argument("--allow-pickle", action="store_true", help="load pytorch_model.bin weights (only with "
                       "torch.load(weights_only=True)); default: refuse pickles, which can run code")
        p.add_argument("--no-fast", action="store_true", help="don't use lmforge's CPU matrix-vector kernel for batch-1 "
                       "decoding (default: use it when it builds)")

    def add_sampling_flags(p):
        from lmforge.engine.sampling import SamplingParams

        d = SamplingParams()
        p.add_argument("--max-new-tokens", type=_positive_int, help=f"most tokens to generate (default: {d.max_new_tokens})")
        p.add_argument("--temperature", type=_float, help=f"softmax temperature; 0 = greedy (default: {d.temperature})")
        p.add_argument("--top-k", type=_nonneg_int, help=f"sample among the k most likely tokens; 0 = off (default: {d.top_k})")
        p.add_argument("--top-p", type=_float, help=f"nucleus: the smallest set with this much probability; 1 = off (default: {d.top_p})")
        p.add_argument("--min-p", type=_float, help=f"drop tokens below min-p x the top probability; 0 = off (default: {d.min_p})")
        p.add_argument("--repetition-penalty", type=_float, help=f"divide the logits of recent tokens (HF); 1 = off (default: {d.repetition_penalty})")
        p.add_argument("--presence-penalty", type=_float, help=f"subtract from tokens already present (OpenAI) (default: {d.presence_penalty})")
        p.add_argument("--frequency-penalty", type=_float, help=f"subtract per occurrence (OpenAI) (default: {d.frequency_penalty})")
        p.add_argument("--repeat-last-n", type=int, help=f"tokens the penalties look back over; 0 = off, -1 = all (default: {d.repeat_last_n})")
        p.add_argument("--seed", type=int, help="seed for reproducible sampling (default: random)")

    gen = sub.add_parser("generate", help="continue a prompt with any decoding strategy", formatter_class=_Formatter,
                         description=_para("Generate a continuation of --prompt with the KV-cached engine: greedy, "
                                           "sampling (temperature, top-k, top-p, min-p, penalties) or beam search, "
                                           "streamed as it is produced. --show-probs prints every token with its "
                                           "probability and the top alternatives."),
                         epilog='examples:\n  lmforge generate runs/small --prompt "The with statement" --temperature 0.7 --seed 1\n'
                                '  lmforge generate runs/small --prompt "def " --beams 4 --length-penalty 1.0\n'
                                '  lmforge generate runs/small --prompt "Return the" --show-probs')
    add_model_flags(gen)
    gen.add_argument("--prompt", default="", help="text to continue (default: empty = start from BOS)")
    gen.add_argument("--chat", action="store_true", help="wrap --prompt as a user message in the chat template")
    gen.add_argument("--system", help="system prompt, with --chat")
    add_sampling_flags(gen)
    gen.add_argument("--stop", action="append", metavar="TEXT", help="stop before this text; repeatable (default: none)")
    gen.add_argument("--beams", type=_positive_int, default=1, help="beam search with this many beams; 1 = off (default: 1)")
    gen.add_argument("--length-penalty", type=_float, default=1.0, help="beam score = log-prob / length^this (default: 1.0)")
    gen.add_argument("--early-stopping", action="store_true", help="stop beam search once enough beams ended (default: off)")
    gen.add_argument("--n-best", type=_positive_int, default=1, help="beam hypotheses to print (default: 1)")
    gen.add_argument("--show-probs", action="store_true", help="print each token with its probability and alternatives")
    gen.add_argument("--top-logprobs", type=_nonneg_int, metavar="N", default=5, help="alternatives shown by --show-probs, up to 20 (default: 5)")
    gen.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    gen.add_argument("--verbose", action="store_true", help="report the finish reason on stderr")
    gen.set_defaults(func=cmd_generate)

    sc = sub.add_parser("score", help="log-likelihood, perplexity and the most surprising tokens of a text",
                        formatter_class=_Formatter,
                        description=_para("Score a text under the model: total log-likelihood, perplexity, nats per "
                                          "character and the tokens the model found most surprising. Texts longer than "
                                          "the context are scored in half-overlapping windows."))
    add_model_flags(sc)
    sc.add_argument("--file", type=Path, help="text file to score")
    sc.add_argument("--text", help="text to score")
    sc.add_argument("--errors", choices=["strict", "replace"], default="strict", help="non-UTF-8 bytes in --file (default: strict)")
    sc.add_argument("--top", type=_nonneg_int, default=10, help="surprising tokens to list (default: 10)")
    sc.set_defaults(func=cmd_score)

    rn = sub.add_parser("run", help="chat with a model in the terminal", formatter_class=_Formatter,
                        description=_para("A multi-turn chat through the model's chat template, like `ollama run`. "
                                          "Type /? for commands (/set, /show, /clear, /bye); wrap multi-line messages "
                                          "in triple quotes; Ctrl-C stops an answer. Without a terminal, reads one "
                                          "message from stdin and prints the answer."))
    add_model_flags(rn)
    rn.add_argument("--system", help="system prompt (default: none)")
    add_sampling_flags(rn)
    rn.set_defaults(func=cmd_run)

    # the model store
    im = sub.add_parser("import", help="add a Hugging Face model directory or a .gguf file to the model store",
                        formatter_class=_Formatter,
                        description=_para("Validate a model (config, tokenizer, weight names and shapes, or the GGUF "
                                          "header) and copy it into the store under $LMFORGE_HOME/models, so that "
                                          "every command can use it by name. Supported: Llama 2/3.x, Mistral, Qwen2, "
                                          "GPT-2 and lmforge's own models; GGUF files of the llama and qwen2 "
                                          "architectures (kept quantized as they are)."),
                        epilog="examples:\n  lmforge import ~/Downloads/SmolLM2-135M-Instruct --name smol\n"
                               "  lmforge import ~/models/qwen2.5-0.5b-instruct-q8_0.gguf --name qwen\n"
                               "  lmforge import runs/small --name small")
    im.add_argument("source", metavar="PATH", help="a model directory (config.json + safetensors + tokenizer.json) or a .gguf file")
    im.add_argument("--name", help="store name, NAME or NAME:TAG (default: from the directory or file name)")
    im.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin weights: read with "
                    "torch.load(weights_only=True) and stored as safetensors (default: refuse pickles)")
    im.add_argument("--overwrite", action="store_true", help="replace a model of the same name (default: refuse)")
    im.set_defaults(func=cmd_import)

    pl = sub.add_parser("pull", help="download a model from the Hugging Face Hub into the store", formatter_class=_Formatter,
                        description=_para("Download a model repo (its safetensors, configs and tokenizer; never its "
                                          "pickles) with huggingface_hub, then import it. Needs internet; offline, use "
                                          "lmforge import on a downloaded copy."),
                        epilog="examples:\n  lmforge pull HuggingFaceTB/SmolLM2-135M-Instruct --name smol\n"
                               "  lmforge pull Qwen/Qwen2.5-0.5B-Instruct-GGUF --file qwen2.5-0.5b-instruct-q8_0.gguf --name qwen")
    pl.add_argument("repo", metavar="OWNER/NAME", help="the Hugging Face repo id")
    pl.add_argument("--name", help="store name (default: the repo name, lower-cased)")
    pl.add_argument("--file", help="for GGUF repos: which .gguf file to download")
    pl.add_argument("--revision", help="branch, tag or commit (default: main)")
    pl.add_argument("--overwrite", action="store_true", help="replace a model of the same name (default: refuse)")
    pl.set_defaults(func=cmd_pull)

    ls = sub.add_parser("list", aliases=["ls"], help="list the models in the store", formatter_class=_Formatter,
                        description=_para("Name, architecture, parameters, dtype or quantization, size on disk and "
                                          "when it was added, for every model in the store. Damaged entries are "
                                          "listed as such (and can still be removed)."))
    ls.set_defaults(func=cmd_list)

    sh = sub.add_parser("show", help="show a model's config, template, system prompt, defaults, lineage and license",
                        formatter_class=_Formatter)
    sh.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    for flag, what in (("--modelfile", "a Modelfile that recreates it"), ("--template", "the full chat template"),
                       ("--system", "the system prompt"), ("--parameters", "the sampling defaults"),
                       ("--license", "the license text"), ("--json", "everything, as JSON")):
        sh.add_argument(flag, action="store_true", help=f"print only {what}")
    sh.set_defaults(func=cmd_show)

    rm = sub.add_parser("rm", help="remove models from the store", formatter_class=_Formatter)
    rm.add_argument("names", metavar="NAME", nargs="+", help="store names (NAME or NAME:TAG)")
    rm.set_defaults(func=cmd_rm)

    cp = sub.add_parser("cp", help="copy a model in the store to a new name", formatter_class=_Formatter)
    cp.add_argument("source", metavar="SOURCE", help="existing store name")
    cp.add_argument("destination", metavar="DESTINATION", help="new store name")
    cp.set_defaults(func=cmd_cp)

    cr = sub.add_parser("create", help="create a model from a Modelfile (FROM, SYSTEM, TEMPLATE, PARAMETER, ...)",
                        formatter_class=_Formatter,
                        description=_para("Make a new store model from a base model plus a system prompt, a chat "
                                          "template, sampling defaults, example messages and an adapter, written as "
                                          "in Ollama's Modelfile. TEMPLATE is a Jinja chat template (the format of "
                                          "tokenizer_config.json). The base model's files are hard-linked, not copied."),
                        epilog='example Modelfile:\n  FROM smol\n  SYSTEM """You answer in one short sentence."""\n'
                               '  PARAMETER temperature 0.2\n  PARAMETER stop "<|im_end|>"\n\n'
                               "  lmforge create smol-terse -f Modelfile && lmforge run smol-terse")
    cr.add_argument("name", metavar="NAME", help="store name for the new model")
    cr.add_argument("-f", "--file", required=True, metavar="MODELFILE", help="the Modelfile (required)")
    cr.add_argument("--overwrite", action="store_true", help="replace a model of the same name (default: refuse)")
    cr.set_defaults(func=cmd_create)

    ex = sub.add_parser("export", help="write a model as a Hugging Face directory or a GGUF file", formatter_class=_Formatter,
                        description=_para("Export any model lmforge can load to the tools people already use: --format "
                                          "hf for transformers and vLLM (Llama, Qwen2 or GPT-2 architecture), --format "
                                          "gguf for llama.cpp, Ollama and LM Studio (llama or qwen2 architecture)."),
                        epilog="examples:\n  lmforge export runs/small --format gguf --type q8_0 --out small.gguf\n"
                               "  lmforge export runs/small --format hf --out small-hf")
    add_model_flags(ex)
    ex.add_argument("--format", choices=["hf", "gguf"], required=True, help="hf (a directory) or gguf (one file) (required)")
    ex.add_argument("--out", required=True, help="output directory (hf) or file (gguf) (required)")
    ex.add_argument("--type", choices=["f32", "f16", "q8_0", "q4_0"], help="GGUF tensor type: f32, f16, or the "
                    "llama.cpp quantizations q8_0 / q4_0; norms stay f32 (default: f16)")
    ex.add_argument("--out-dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="dtype of the exported "
                    "HF weights (default: fp32)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: refuse)")
    ex.set_defaults(func=cmd_export)

    # finetune / align / merge
    def add_ft_flags(p, what: str, data_help: str):
        p.add_argument("model", metavar="MODEL", help=MODEL_HELP + " (ignored with --resume)")
        p.add_argument("--data", required=True, help=data_help)
        p.add_argument("--val-data", help="validation data (default: the held-out split of builtin data, else 5%% of --data)")
        p.add_argument("--out", required=True, metavar="DIR", help="run directory to write (required)")
        p.add_argument("--name", help="also add the finished model to the store under this name (default: don't)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
        p.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a model")
        p.add_argument("--epochs", type=_float, default=1.0, help="passes over the data when --max-steps is not given (default: 1)")
        p.add_argument("--limit", type=_positive_int, help="use at most this many records (default: all)")
        g = p.add_argument_group("training recipe")
        g.add_argument("--max-steps", type=_positive_int, help="optimizer steps (default: --epochs over the data)")
        g.add_argument("--batch-size", type=_positive_int, help=f"{what} per micro-batch (default: 8)")
        g.add_argument("--grad-accum", type=_positive_int, help="micro-batches per optimizer step (default: 1)")
        g.add_argument("--lr", type=_float, help="peak learning rate (default: 2e-4 with LoRA, 2e-5 full SFT, 5e-6 DPO)")
        g.add_argument("--min-lr", type=_float, help="learning rate at the end of the cosine decay (default: lr/10)")
        g.add_argument("--warmup-steps", type=_nonneg_int, help="linear warmup steps (default: a tenth of the steps, at most 100)")
        g.add_argument("--weight-decay", type=_float, help="AdamW weight decay (default: 0)")
        g.add_argument("--grad-clip", type=_float, help="clip the gradient norm; 0 disables (default: 1.0)")
        g.add_argument("--eval-interval", type=_positive_int, help="steps between validations (default: a fifth of the steps)")
        g.add_argument("--save-interval", type=_nonneg_int, help="steps between checkpoints; 0 = at the end (default: 0)")
        g.add_argument("--log-interval", type=_positive_int, help="steps between metrics lines (default: 10)")
        g.add_argument("--seed", type=int, help="seed for data order and dropout (default: 1337)")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
        _add_progress_flag(p)

    ft = sub.add_parser("finetune", help="supervised fine-tuning on conversations (full or LoRA)", formatter_class=_Formatter,
                        description=_para("Teach a model to answer: train on chat conversations rendered through its "
                                          "own chat template, with the loss on the assistant replies only (and the "
                                          "end-of-turn token, so it learns to stop). Full fine-tuning, or LoRA adapters "
                                          "(saved in PEFT's format) with --lora. Conversations longer than the context "
                                          "are dropped and counted."),
                        epilog="data: JSONL lines {\"messages\": [{\"role\": \"user\", \"content\": ...}, "
                               "{\"role\": \"assistant\", ...}]}, or builtin:pydocs-qa\n"
                               "examples:\n  lmforge finetune runs/small --data chat.jsonl --out runs/small-sft\n"
                               "  lmforge finetune smol --data chat.jsonl --lora --lora-rank 16 --out runs/smol-lora")
    add_ft_flags(ft, "conversations", "chat JSONL file, or builtin:pydocs-qa (required)")
    lg = ft.add_argument_group("LoRA")
    lg.add_argument("--lora", action="store_true", help="train LoRA adapters on a frozen model (default: full fine-tuning)")
    lg.add_argument("--lora-rank", type=_positive_int, default=16, help="adapter rank r (default: 16)")
    lg.add_argument("--lora-alpha", type=_float, default=32.0, help="scale alpha; updates are scaled by alpha/r (default: 32)")
    lg.add_argument("--lora-dropout", type=_float, default=0.05, help="dropout on the adapter input (default: 0.05)")
    lg.add_argument("--lora-targets", help="comma-separated projections, PEFT names (q_proj, ..., down_proj; c_attn, "
                    "c_proj, c_fc for GPT-2 shapes) or all-linear (default: all attention and MLP projections)")
    ft.set_defaults(func=cmd_finetune)

    al = sub.add_parser("align", help="preference alignment (DPO, IPO) on chosen/rejected pairs", formatter_class=_Formatter,
                        description=_para("Align a model with preference pairs: raise the likelihood of the chosen answer "
                                          "relative to the rejected one, measured against the starting model (the "
                                          "reference, whose log-probs are computed once and cached in the run "
                                          "directory). Logs reward margins and preference accuracy on held-out pairs."),
                        epilog="data: JSONL lines {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}, or builtin:pydocs-prefs\n"
                               "example:\n  lmforge align runs/small-sft --data prefs.jsonl --method dpo --beta 0.1 --out runs/small-dpo")
    add_ft_flags(al, "pairs", "preference JSONL file, or builtin:pydocs-prefs (required)")
    al.add_argument("--method", choices=["dpo", "ipo"], default="dpo", help="loss: dpo (sigmoid) or ipo (default: dpo)")
    al.add_argument("--beta", type=_float, default=0.1, help="strength of the tie to the reference model (default: 0.1)")
    al.set_defaults(func=cmd_align)

    mg = sub.add_parser("merge", help="fold a LoRA adapter into its base model's weights", formatter_class=_Formatter,
                        description=_para("Write base model + adapter as one plain model directory (same outputs, base-"
                                          "model speed, loadable by transformers)."))
    mg.add_argument("adapter", metavar="ADAPTER", help="a LoRA run directory (lmforge finetune --lora) or PEFT adapter")
    mg.add_argument("--out", required=True, metavar="DIR", help="output model directory (required)")
    mg.add_argument("--name", help="also add the merged model to the store under this name")
    mg.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    mg.set_defaults(func=cmd_merge)

    qs = sub.add_parser("quickstart", help="pretrain -> SFT -> DPO -> evaluate -> chat, on the built-in data, offline",
                        formatter_class=_Formatter,
                        description=_para("Grow a Python-docs assistant from scratch: pretrain `small` on builtin:pydocs, "
                                          "fine-tune on builtin:pydocs-qa, align with DPO on builtin:pydocs-prefs, "
                                          "evaluate each stage on held-out modules (perplexity, QA token-F1, preference "
                                          "accuracy), register quickstart-base/-sft/-dpo in the store, then chat. About "
                                          "15 minutes on a 2-core CPU; re-running skips finished stages."))
    qs.add_argument("--out", default="runs/quickstart", help="where the three runs go (default: runs/quickstart)")
    qs.add_argument("--budget", type=_float, default=15.0, help="minutes the default plan is sized for; steps of every "
                    "stage scale with it (default: 15)")
    qs.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    qs.add_argument("--no-store", action="store_true", help="don't register the models in the store")
    qs.add_argument("--no-chat", action="store_true", help="don't start the chat at the end (default: start it when "
                    "a terminal is attached)")
    _add_progress_flag(qs)
    qs.set_defaults(func=cmd_quickstart)

    sv = sub.add_parser("serve", help="serve models over an OpenAI-compatible API, with a web chat UI at /",
                        formatter_class=_Formatter,
                        description=_para("Serve models to the openai SDK, Open WebUI, LangChain or lm-evaluation-harness "
                                          "(/v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize, "
                                          "/tokenizer_info, /health) and a chat UI in the browser at /, which collects "
                                          "ratings and better answers as fine-tuning data under $LMFORGE_HOME/feedback. "
                                          "Concurrent requests share one forward pass per step (continuous batching). "
                                          "Models load on first use and unload after --keep-alive seconds idle. SIGTERM "
                                          "or Ctrl-C finishes the requests in flight (new ones get 503), then exits."),
                        epilog="examples:\n  lmforge serve\n"
                               "  lmforge serve quickstart-dpo smol --port 8000 --api-key \"$KEY\" --max-concurrency 8\n"
                               "  python -c \"from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:11435/v1', "
                               "api_key='x'); print(c.chat.completions.create(model='quickstart-dpo', messages=[{'role': "
                               "'user', 'content': 'What does os.getcwd do?'}]).choices[0].message.content)\"")
    sv.add_argument("models", nargs="*", metavar="MODEL", help="store names, model directories or .gguf files to serve "
                    "(default: every model in the store, by name)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback exposes the server to "
                    "your network (default: 127.0.0.1)")
    sv.add_argument("--port", type=_nonneg_int, default=11435, help="TCP port; 0 picks a free one (default: 11435)")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the API (default: $LMFORGE_API_KEY, "
                    "else no key)")
    sv.add_argument("--max-concurrency", type=_positive_int, default=8, help="requests decoded together in one batch, "
                    "per model (default: 8)")
    sv.add_argument("--max-queue", type=_nonneg_int, default=64, help="requests that may wait for a batch slot; more "
                    "get 429 (default: 64)")
    sv.add_argument("--max-context", type=_positive_int, default=4096, help="tokens per request at most (prompt + "
                    "answer), capped at the model's context; the KV cache holds max-concurrency of these (default: 4096)")
    sv.add_argument("--prefill-chunk", type=_positive_int, default=512, help="while requests are decoding, read "
                    "about this many prompt tokens per step, longer prompts in chunks between decode steps, so new "
                    "prompts do not stall the running streams (default: 512)")
    sv.add_argument("--keep-alive", type=_float, default=300.0, help="seconds an unused model stays loaded (default: 300)")
    sv.add_argument("--grace", type=_float, default=30.0, help="seconds to finish requests in flight on shutdown "
                    "(default: 30)")
    sv.add_argument("--max-body-kb", type=_positive_int, default=1024, help="largest request body in KiB; more gets 413 "
                    "(default: 1024)")
    sv.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN", help="allow browser pages from "
                    "this origin to call the API (repeatable; default: no CORS)")
    sv.add_argument("--allowed-host", action="append", default=[], metavar="NAME", help="also accept this Host header "
                    "name on a loopback bind, e.g. behind a reverse proxy (repeatable; default: loopback names only)")
    sv.add_argument("--feedback-dir", help="where UI feedback is written (default: $LMFORGE_HOME/feedback)")
    sv.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    sv.add_argument("--no-fast", action="store_true", help="don't use lmforge's CPU kernel for batch-1 decoding")
    sv.set_defaults(func=cmd_serve)

    for p in (tt, pt, gen, sc, rn, ex, ft, al, sv):  # short metavars keep the usage lines readable
        for action in p._actions:
            if action.metavar is None and action.type in (_positive_int, _nonneg_int, int):
                action.metavar = "N"
            elif action.metavar is None and action.type is _float:
                action.metavar = "X"
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        func: Callable | None = getattr(args, "func", None)
        if func is None:  # a command group without its subcommand, or nothing at all
            print((getattr(args, "group_parser", None) or parser).format_help(), file=sys.stderr)
            return 2
        if getattr(args, "name", None) is not None:  # every --name, checked before any work ("" included)
            from lmforge.store import validate_name

            validate_name(args.name)
        return func(args)
    except UserError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_went_away()


def _reader_went_away() -> int:
    """The reader of our output left (`lmforge ... | head`): stop quietly, as `cat` would, instead of a
    traceback. Later writes (Python flushing stdout at exit) go to /dev/null so they cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # stdout is not a file descriptor (captured in a test): nothing will flush to a closed pipe
    return 128 + 13  # what a shell reports for a command ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
