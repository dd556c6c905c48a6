"""`lmforge import`, `pull`, `list`, `show`, `rm`, `cp`, `create` and `export`: the local model store
(lmforge.store) and writing models back out for other tools. `list` and `show` include the quantization
(`lmforge quantize`'s record in lmforge.json, or an imported GGUF's file type)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.cli.common import (
    DTYPES, MODEL_HELP, Formatter, add_model_flags, ago, human_count, human_size, load_model,
    name_from_path, para,
)
from lmforge.errors import UserError


# ---------------------------------------------------------------------------------------------------
# The model store: import / pull / list / show / rm / cp / create, and export
# ---------------------------------------------------------------------------------------------------


def cmd_import(args) -> int:
    from lmforge.store import import_model, validate_name

    src = Path(args.source).expanduser()
    name = validate_name(args.name if args.name is not None else name_from_path(src.resolve()))
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
        arch += " (embedding)" if e.embedding else ""
        rows.append((e.name, arch if not e.error else f"DAMAGED: {e.error}"[:60], human_count(e.parameters),
                     e.quantization or e.dtype or "?", human_size(e.size_bytes), ago(e.modified)))
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
    rows = [("architecture", info.get("architecture")),
            *([("kind", "embedding model (for lmforge index --embed and /v1/embeddings; cannot generate)")]
              if info.get("kind") == "embedding" else []),
            ("parameters", human_count(info.get("parameters"))),
            ("context length", known("context_length")), ("embedding length", known("embedding_length")),
            ("layers", known("layers")),
            *[(label, info[key]) for key, label in (("sliding_window", "sliding window"), ("experts", "experts"))
              if info.get(key)],
            ("dtype/quantization", info.get("dtype") or "?"), ("size on disk", human_size(info.get("size_bytes") or 0)),
            ("path", info.get("path"))]
    if info.get("quantization"):
        from lmforge.quant.report import summary_line

        rows.append(("quantization", summary_line(info["quantization"])))
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
    loaded = load_model(args, dtype=torch.float32)  # export writes float (or re-quantizes from float)
    if args.format == "hf":
        export_hf(loaded, out, dtype=getattr(torch, DTYPES[args.out_dtype] or "float32"))
    else:
        export_gguf(loaded, out, qtype=args.type or "f16")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size
    print(f"exported {args.model} to {out} ({args.format}{'' if args.format == 'hf' else ' ' + (args.type or 'f16')}, "
          f"{human_size(size)})")
    return 0


def register(sub) -> list[argparse.ArgumentParser]:
    """Add this group's subcommands to `sub`; returns those whose numeric flags get short metavars."""
    # the model store
    im = sub.add_parser("import", help="add a Hugging Face model directory or a .gguf file to the model store",
                        formatter_class=Formatter,
                        description=para("Validate a model (config, tokenizer, weight names and shapes, or the GGUF "
                                          "header) and copy it into the store under $LMFORGE_HOME/models, so that "
                                          "every command can use it by name. Supported: Llama 2/3.x, Mistral, Mixtral, "
                                          "Qwen2, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3 (text, and the language model of "
                                          "the multimodal one), Phi-3/3.5/4, GPT-2 and lmforge's own models; GGUF files "
                                          "of the llama (Mixtral's experts too), qwen2, qwen3, qwen3moe, gemma2, gemma3 "
                                          "and phi3 architectures (kept quantized as they are)."),
                        epilog="examples:\n  lmforge import ~/Downloads/SmolLM2-135M-Instruct --name smol\n"
                               "  lmforge import ~/models/qwen2.5-0.5b-instruct-q8_0.gguf --name qwen\n"
                               "  lmforge import runs/small --name small")
    im.add_argument("source", metavar="PATH", help="a model directory (config.json + safetensors + tokenizer.json) or a .gguf file")
    im.add_argument("--name", help="store name, NAME or NAME:TAG (default: from the directory or file name)")
    im.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin weights: read with "
                    "torch.load(weights_only=True) and stored as safetensors (default: refuse pickles)")
    im.add_argument("--overwrite", action="store_true", help="replace a model of the same name (default: refuse)")
    im.set_defaults(func=cmd_import)

    pl = sub.add_parser("pull", help="download a model from the Hugging Face Hub into the store", formatter_class=Formatter,
                        description=para("Download a model repo (its safetensors, configs and tokenizer; never its "
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

    ls = sub.add_parser("list", aliases=["ls"], help="list the models in the store", formatter_class=Formatter,
                        description=para("Name, architecture, parameters, dtype or quantization, size on disk and "
                                          "when it was added, for every model in the store. Damaged entries are "
                                          "listed as such (and can still be removed)."))
    ls.set_defaults(func=cmd_list)

    sh = sub.add_parser("show", help="show a model's config, template, system prompt, defaults, lineage and license",
                        formatter_class=Formatter)
    sh.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    for flag, what in (("--modelfile", "a Modelfile that recreates it"), ("--template", "the full chat template"),
                       ("--system", "the system prompt"), ("--parameters", "the sampling defaults"),
                       ("--license", "the license text"), ("--json", "everything, as JSON")):
        sh.add_argument(flag, action="store_true", help=f"print only {what}")
    sh.set_defaults(func=cmd_show)

    rm = sub.add_parser("rm", help="remove models from the store", formatter_class=Formatter)
    rm.add_argument("names", metavar="NAME", nargs="+", help="store names (NAME or NAME:TAG)")
    rm.set_defaults(func=cmd_rm)

    cp = sub.add_parser("cp", help="copy a model in the store to a new name", formatter_class=Formatter)
    cp.add_argument("source", metavar="SOURCE", help="existing store name")
    cp.add_argument("destination", metavar="DESTINATION", help="new store name")
    cp.set_defaults(func=cmd_cp)

    cr = sub.add_parser("create", help="create a model from a Modelfile (FROM, SYSTEM, TEMPLATE, PARAMETER, ...)",
                        formatter_class=Formatter,
                        description=para("Make a new store model from a base model plus a system prompt, a chat "
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

    ex = sub.add_parser("export", help="write a model as a Hugging Face directory or a GGUF file", formatter_class=Formatter,
                        description=para("Export any model lmforge can load to the tools people already use: --format "
                                          "hf for transformers and vLLM (Llama, Mistral, Mixtral, Qwen2, Qwen3, Qwen3-MoE, "
                                          "Gemma 2, Gemma 3, Phi-3 or GPT-2 architecture), --format gguf for llama.cpp, "
                                          "Ollama and LM Studio (llama, llama with experts, qwen2, qwen3, qwen3moe, "
                                          "gemma2, gemma3 or phi3 architecture)."),
                        epilog="examples:\n  lmforge export runs/small --format gguf --type q8_0 --out small.gguf\n"
                               "  lmforge export runs/small --format hf --out small-hf")
    add_model_flags(ex)
    ex.add_argument("--format", choices=["hf", "gguf"], required=True, help="hf (a directory) or gguf (one file) (required)")
    ex.add_argument("--out", required=True, help="output directory (hf) or file (gguf) (required)")
    ex.add_argument("--type", choices=["f32", "f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"], help="GGUF file "
                    "type: f32, f16, or the llama.cpp quantizations q8_0 / q4_0 / q4_k_m / q5_k_m / q6_k with "
                    "llama.cpp's per-tensor mixes; norms stay f32; lmforge quantize adds a quality report "
                    "(default: f16)")
    ex.add_argument("--out-dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="dtype of the exported "
                    "HF weights (default: fp32)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: refuse)")
    ex.set_defaults(func=cmd_export)
    return [ex]
