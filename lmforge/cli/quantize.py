"""`lmforge quantize`: write a model as a quantized GGUF (a file or a store entry), with its quality cost measured.

The last step of the model's life before serving: train -> fine-tune -> align -> quantize -> serve. The
per-tensor types are llama.cpp's mixes (`lmforge.quant.mix`), the K-quants are our own quantizers
(`lmforge.quant.kquant`), and the written file is loaded back and compared with the original on held-out
text (`lmforge.quant.report`): perplexity before/after, KL divergence, top-1 agreement, sizes, decode speed.

Which held-out text: `--eval-data` when given (a builtin: corpus means its validation split; a file or
directory is used whole), else the validation split of the data the model was pretrained on when its
lmforge.json records it, else the validation split of builtin:pydocs. Splits are the pretrainer's own
(`prepare_data`, val_fraction 0.05, seed 0), so a model trained here is scored on text it never saw.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.cli.common import Formatter, add_device_flag, add_progress_flag, human_size, para, positive_int
from lmforge.errors import UserError

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def _source_quantization(src: Path) -> tuple[str | None, set[str]]:
    """(llama.cpp file type of the source, e.g. "Q4_K_M", or None if it is not a GGUF; the quantized GGML
    types its matrices hold, empty for float weights)."""
    from lmforge.loaders.auto import gguf_file
    from lmforge.loaders.gguf import describe_file_type, read_gguf_header
    from lmforge.loaders.peft import adapter_base, is_adapter_dir
    from lmforge.paths import resolve

    if is_adapter_dir(src):  # what counts is the base the adapter is merged into
        try:
            src = resolve(adapter_base(src))
        except UserError:
            return None, set()  # the load that follows says what is missing
    g = gguf_file(src)
    if g is None:
        return None, set()
    meta, tensors = read_gguf_header(g)
    quantized = {t.type_name for t in tensors if len(t.shape) >= 2} - {"F32", "F16", "BF16"}
    return describe_file_type(meta, tensors), quantized


def check_requantize(model: str, label: str | None, quantized: set[str], ftype: str, allow: bool) -> str | None:
    """None for a float source; else the line that says from what to what. Refused (UserError) without
    `allow` when it would re-quantize a K-quant into a K-quant, or into a type with no more bits than the
    source's lowest: the new rounding lands on top of the old one, and the result is worse than
    quantizing the original."""
    from lmforge.quant.mix import BITS_PER_VALUE, base_type, display_name

    if not quantized:
        return None
    target = display_name(ftype)
    src = label or ", ".join(sorted(quantized))
    base = base_type(ftype)
    lowest = min(BITS_PER_VALUE.get(t, 0.0) for t in quantized)
    k_to_k = any(t.endswith("_K") for t in quantized) and base.endswith("_K")
    if (k_to_k or BITS_PER_VALUE[base] <= lowest) and not allow:
        raise UserError(f"{model} is already quantized ({src}); re-quantizing {src} -> {target} adds a second "
                        f"rounding error to the first: quantize the original F16/F32 model instead, or pass "
                        f"--allow-requantize to do it anyway")
    return f"{model} is already quantized: re-quantizing {src} -> {target} (its {src} rounding errors stay)"


def _weights_size(src: Path) -> int | None:
    """Bytes of the source's weights as stored: the file, or the weight files of a model directory."""
    if src.is_file():
        return src.stat().st_size
    sizes = [f.stat().st_size for f in src.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES)]
    return sum(sizes) or None


def _lineage(src: Path) -> dict[str, Any]:
    from lmforge.loaders.model_dir import read_lmforge_meta

    if not src.is_dir():
        return {}
    try:
        return read_lmforge_meta(src).get("lineage") or {}
    except UserError:
        return {}


def _validation_tokens(spec: str, tokenizer, progress: bool):
    from lmforge.data.shards import prepare_data
    from lmforge.paths import cache_dir

    return prepare_data(spec, tokenizer, cache_dir("data"), val_fraction=0.05, seed=0, errors="strict",
                        show_progress=progress).val


def eval_tokens(eval_data: str | None, lineage: dict[str, Any], tokenizer, max_tokens: int, *, progress: bool = False):
    """(token ids, where they came from) of the held-out text; see the module docstring for the order."""
    import numpy as np

    if eval_data and not eval_data.startswith("builtin:"):
        from lmforge.data.corpus import load_documents

        ids: list[int] = []
        for doc in load_documents(eval_data):
            ids += tokenizer.encode_batch([doc], allow_special=False)[0]
            if tokenizer.eos_id is not None:
                ids.append(tokenizer.eos_id)
            if len(ids) > max_tokens + 1:
                break
        return np.asarray(ids, dtype=np.int64), eval_data
    recorded = lineage.get("data") if lineage.get("objective") == "pretrain" else None
    spec = eval_data or recorded or "builtin:pydocs"
    try:
        return _validation_tokens(spec, tokenizer, progress), f"the validation split of {spec}"
    except UserError as e:
        if eval_data or spec == "builtin:pydocs":
            raise
        print(f"note: the model's own data ({spec}) cannot be read ({e}); evaluating on builtin:pydocs",
              file=sys.stderr)
        return _validation_tokens("builtin:pydocs", tokenizer, progress), "the validation split of builtin:pydocs"


def _decode_tok_s(model, tokenizer, prompt: list[int], n_tokens: int) -> float | None:
    from lmforge.engine.generate import Engine
    from lmforge.engine.sampling import SamplingParams
    from lmforge.quant.report import decode_speed

    engine = Engine(model, tokenizer, fast=True)
    n = min(n_tokens, engine.config.context_length - len(prompt) - 1)
    if n < 2:
        return None
    params = SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
    return decode_speed(engine.generate([prompt], params))


def quality_report(ref_model, written: Path, tokenizer, tokens, source: str, ftype: str, *, max_tokens: int,
                   device, progress: bool = False, decode_tokens: int = 64):
    """Load the written GGUF back (weights kept packed) and compare it with `ref_model` on `tokens`."""
    import torch
    from tqdm.auto import tqdm

    from lmforge.loaders.auto import load
    from lmforge.quant.mix import display_name
    from lmforge.quant.report import QualityReport, compare_models, eval_windows

    quant = load(written, device=device, dtype="auto").model.eval()
    ref_model.eval()
    cfg = ref_model.config
    windows = eval_windows(tokens, min(cfg.context_length, 512), max_tokens)
    batch = max(1, (1 << 21) // (windows.shape[1] * cfg.vocab_size))
    with tqdm(total=windows.shape[0], unit="window", desc="evaluating", disable=not progress, leave=False) as bar:
        r = compare_models(ref_model, quant, windows, batch_size=batch, device=device, on_batch=bar.update)
    with torch.inference_mode():
        tok_s = _decode_tok_s(quant, tokenizer, windows[0, :16].tolist(), decode_tokens)
    return QualityReport(type=display_name(ftype), eval_source=source, eval_tokens=int(r["eval_tokens"]),
                         ppl_before=r["ppl_before"], ppl_after=r["ppl_after"], kld=r["kld"], top1=r["top1"],
                         size_after=written.stat().st_size, decode_tok_s=tok_s)


def cmd_quantize(args) -> int:
    from lmforge.cli.common import progress_enabled
    from lmforge.device import resolve_device
    from lmforge.loaders.auto import load
    from lmforge.loaders.gguf import write_gguf
    from lmforge.loaders.peft import is_adapter_dir
    from lmforge.quant.mix import check_ftype, display_name, type_counts
    from lmforge.quant.report import format_report
    from lmforge.store import model_path, resolve, validate_name

    ftype = check_ftype(args.type)
    if ftype in ("f32", "f16"):
        raise UserError(f"--type {args.type} is not a quantization; use lmforge export --format gguf --type {ftype}")
    progress = progress_enabled(args)
    out = Path(args.out).expanduser() if args.out else None
    if out is not None:
        if out.is_dir():
            raise UserError(f"{out} is a directory; --out names the .gguf file to write")
        if out.suffix.lower() != ".gguf":
            raise UserError(f"--out {out}: the file name must end in .gguf")
        if out.exists() and not args.overwrite:
            raise UserError(f"{out} already exists; pass --overwrite to replace it")
    else:
        norm = validate_name(args.name)
        if model_path(norm).exists() and not args.overwrite:
            raise UserError(f"model {norm} already exists (remove it first with lmforge rm, or pass --overwrite)")
    src = resolve(args.model)
    label, quantized = _source_quantization(src)
    note = check_requantize(args.model, label, quantized, ftype, args.allow_requantize)
    if note:
        print(f"note: {note}", file=sys.stderr)
    device = resolve_device(args.device)
    loaded = load(src, device=device, allow_pickle=args.allow_pickle)  # float32; LoRA adapters merged in
    if is_adapter_dir(src):
        print(f"note: {args.model} is a LoRA adapter: quantizing it merged into its base model", file=sys.stderr)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    lineage = _lineage(src)
    tokens, source = None, None
    if not args.no_report:  # the held-out text is found (and any mistake in it reported) before any writing
        tokens, source = eval_tokens(args.eval_data, lineage, tokenizer, args.eval_tokens, progress=progress)

    def write_and_measure(path: Path) -> tuple[dict[str, str], Any]:
        t0 = time.perf_counter()
        types = write_gguf(path, model.config, model.state_dict(), tokenizer, qtype=ftype,
                           name=model.config.name or src.name, eos_token_ids=list(tokenizer.eos_ids),
                           progress=progress)
        counts = ", ".join(f"{n} {t}" for t, n in type_counts(types).items())
        print(f"quantized {args.model} ({label or loaded.format}) -> {display_name(ftype)} in "
              f"{time.perf_counter() - t0:.1f} s: {counts}; {human_size(path.stat().st_size)}")
        report = None
        if tokens is not None:
            report = quality_report(model, path, tokenizer, tokens, source, ftype, max_tokens=args.eval_tokens,
                                    device=device, progress=progress)
            report.size_before = _weights_size(src) if not is_adapter_dir(src) else None
            print(format_report(report))
        return types, report

    if out is not None:
        write_and_measure(out)
        print(f"wrote {out}")
        return 0

    from lmforge.io import atomic_write_json
    from lmforge.paths import GGUF_IN_STORE
    from lmforge.store import new_entry

    with new_entry(norm, overwrite=args.overwrite) as tmp:
        types, report = write_and_measure(tmp / GGUF_IN_STORE)
        record = {"type": display_name(ftype), "tensor_types": type_counts(types), "source": str(src),
                  "source_format": loaded.format, "quantized_at": time.time(),
                  "report": report.to_dict() if report else None}
        lin = {**lineage, "parent": str(src), "quantized_from": str(src), "source_format": loaded.format}
        atomic_write_json(tmp / "lmforge.json", {"format_version": 1, "lineage": lin, "quantization": record})
    print(f"added {norm} to the store ({model_path(norm)})")
    return 0


_TYPES_HELP = ("q8_0 (8.5 bits/weight, near lossless), q4_0 (4.5), q4_k_m (~4.8: Q4_K with Q6_K for the output "
               "and for attn_v/ffn_down in some layers), q5_k_m (~5.7), q6_k (6.6); llama.cpp's mixes")


def register(sub) -> list[argparse.ArgumentParser]:
    """Add `quantize` to `sub`; returns the parsers whose numeric flags get short metavars."""
    from lmforge.cli.common import MODEL_HELP
    from lmforge.quant.report import DEFAULT_EVAL_TOKENS

    q = sub.add_parser("quantize", help="write a model as a quantized GGUF (file or store entry) with a quality report",
                       formatter_class=Formatter,
                       description=para("Quantize any model lmforge can load (a store name, a model directory, a "
                                         "training run, a .gguf file; a LoRA adapter is merged into its base "
                                         "first) to a GGUF that llama.cpp, Ollama and lmforge run, with llama.cpp's "
                                         "per-tensor mixes. Then load it back and measure what it costs on "
                                         "held-out text: perplexity before/after, mean KL divergence, top-1 "
                                         "agreement, file size and decode speed. Held-out text: --eval-data, else "
                                         "the validation split of the data the model was pretrained on (when "
                                         "recorded), else that of builtin:pydocs."),
                       epilog="examples:\n  lmforge quantize runs/small --type q4_k_m --out small-q4.gguf\n"
                              "  lmforge quantize smol --type q8_0 --name smol:q8 && lmforge show smol:q8")
    q.add_argument("model", metavar="MODEL", help=MODEL_HELP + ", or a training run directory")
    q.add_argument("--type", required=True, metavar="TYPE", help=f"{_TYPES_HELP} (required)")
    where = q.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="FILE.gguf", help="write a GGUF file here (one of --out / --name is required)")
    where.add_argument("--name", metavar="NAME[:TAG]", help="add the quantized model to the store under this name, "
                       "with its report in lmforge.json (one of --out / --name is required)")
    q.add_argument("--eval-data", metavar="SPEC", help="held-out text for the report: builtin:pydocs (its validation "
                   "split), or a .txt/.md/.jsonl file or directory, used whole (default: the model's own validation "
                   "data when its lmforge.json records it, else builtin:pydocs)")
    q.add_argument("--eval-tokens", type=positive_int, default=DEFAULT_EVAL_TOKENS, help="most tokens to score, in "
                   f"windows of the model's context (at most 512) (default: {DEFAULT_EVAL_TOKENS})")
    q.add_argument("--no-report", action="store_true", help="only write the file, without the quality report "
                   "(default: measure it)")
    q.add_argument("--allow-requantize", action="store_true", help="allow quantizing an already-quantized model "
                   "to a K-quant from a K-quant, or to no more bits than it has (default: refuse)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out file or --name model "
                   "(default: refuse)")
    q.add_argument("--allow-pickle", action="store_true", help="load pytorch_model.bin weights (only with "
                   "torch.load(weights_only=True)) (default: refuse pickles)")
    add_device_flag(q)
    add_progress_flag(q)
    q.set_defaults(func=cmd_quantize)
    return [q]
