"""`lmforge tokenizer train`, `pretrain`, `finetune`, `align`, `merge` and `quickstart`: making and teaching
models. Each handler turns flags into the options of a library function and prints its result."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

from lmforge.cli.common import (
    MODEL_HELP, Formatter, add_data_flags, add_device_flag, add_progress_flag, fail, float_arg, nonneg_int,
    para, positive_int, progress_enabled, train_default,
)
from lmforge.presets import preset_names


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
    tok = train_tokenizer(docs, args.vocab_size, min_frequency=args.min_frequency, show_progress=progress_enabled(args))
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
                "compile", "activation_checkpointing")


def _forwarded_argv(parser: argparse.ArgumentParser, args) -> list[str]:
    """The `lmforge pretrain` flags the user gave (everything that differs from the defaults), less --nproc:
    what each torchrun worker is started with."""
    argv = ["pretrain"]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "nproc"):
            continue
        value = getattr(args, action.dest, None)
        if isinstance(action, argparse.BooleanOptionalAction):  # --x / --no-x: whichever was given
            if value is not None and value != action.default:
                argv.append(action.option_strings[0 if value else 1])
        elif action.nargs == 0:  # store_true / store_false: the flag whose constant the value is
            if value is not None and value == action.const and value != action.default:
                argv.append(action.option_strings[0])
        elif value is not None and value != action.default:
            argv += [action.option_strings[0], str(value)]
    return argv


def _launch_torchrun(args, opts) -> int:
    """`--nproc N`: prepare the tokenizer and token shards once here (a dry run, which also reports the
    user's mistakes in one line before anything starts), then run N workers under torchrun on this machine."""
    import signal
    import subprocess

    from lmforge.checkpoint import TRAINER_STATE
    from lmforge.train.distributed import parse_parallel, torchrun_command
    from lmforge.train.pretrain import pretrain

    par = parse_parallel(args.parallel, args.nproc)
    if par is None:
        return fail(f"--nproc {args.nproc} starts {args.nproc} processes; say how they share the work with "
                    f"--parallel ddp, fsdp, tp={args.nproc} or pp={args.nproc}")
    from lmforge.train.precision import pinned

    pinned()  # a bad LMFORGE_PRECISION_AUTO is one line here, not one per worker and torchrun's report
    _, summary = pretrain(dataclasses.replace(opts, dry_run=True, world=args.nproc))
    batch = summary["recipe"].batch_size
    if batch % par.data_parallel:  # (tensor-parallel ranks and pipeline stages share their slice)
        return fail(f"--batch-size {batch} is the global micro-batch and must divide evenly among "
                    f"{par.data_parallel} data-parallel processes")
    cmd = torchrun_command(args.nproc, _forwarded_argv(args.pretrain_parser, args))
    child = subprocess.Popen(cmd)
    # Ctrl-C or SIGTERM to this launcher goes on to torchrun, which hands it to every worker: they save at the
    # next step boundary and stop together, as one process does. Without this torchrun would be orphaned.
    signalled: list[float] = []

    def forward(signum, frame) -> None:
        signalled.append(time.time())
        child.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    saved = Path(opts.out) / TRAINER_STATE / "state.json"
    if code and signalled and saved.is_file() and saved.stat().st_mtime >= signalled[0]:
        # torchrun exits 1 whenever it is signalled; the workers saved together after the signal: a clean stop
        print(f"stopped by a signal; the workers saved the run in {opts.out} (continue it with --resume)")
        return 0
    if code:  # torchrun's report above says which rank failed first, and how
        return fail(f"the {args.nproc}-process training job failed (torchrun exit {code}); see \"Root Cause\" "
                    f"above for the rank that failed first", code=code)
    return code


def cmd_pretrain(args) -> int:
    from lmforge.train.distributed import launched_by_torchrun, lost_peer
    from lmforge.train.loop import TrainingDiverged, print_evaluations
    from lmforge.train.pretrain import PretrainOptions, pretrain

    if args.resume and args.out and Path(args.out) != Path(args.resume):
        return fail("--resume continues in its own directory; leave out --out")
    out = args.resume or args.out
    if not out:
        return fail("say where the model goes with --out DIR (or continue a run with --resume DIR)")
    progress = progress_enabled(args)
    opts = PretrainOptions(
        out=Path(out), data=args.data, preset=args.preset, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        context_length=args.context_length, dropout=args.dropout, val_fraction=args.val_fraction, errors=args.errors,
        eval_tokens=args.eval_tokens, resume=bool(args.resume), dry_run=args.dry_run, overwrite=args.overwrite, device=args.device,
        progress=progress, recipe={k: getattr(args, k) for k in RECIPE_FLAGS if getattr(args, k) is not None},
        parallel=args.parallel, backend=args.backend, on_info=lambda line: print(line, flush=True),
    )
    if args.nproc is not None:
        if launched_by_torchrun():
            return fail("--nproc starts torchrun itself; under torchrun, leave it out")
        if args.nproc > 1 and not args.dry_run:
            return _launch_torchrun(args, opts)
    if not progress:  # no terminal: a line per evaluation instead of a progress bar
        opts.on_log = print_evaluations
    try:
        result, summary = pretrain(opts)
    except TrainingDiverged as e:
        return fail(str(e), code=1)
    except RuntimeError as e:
        if launched_by_torchrun() and lost_peer(e):  # another rank died or hung: say so instead of a C++ trace
            return fail(f"rank {os.environ.get('RANK', '?')}: lost contact with the other processes, so this one "
                        f"stops too ({str(e).splitlines()[0][:200]})", code=1)
        raise
    if summary["rank"] != 0:  # torchrun's other workers: rank 0 reports
        return 0
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
# finetune / align / merge
# ---------------------------------------------------------------------------------------------------
FT_RECIPE = ("max_steps", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip",
             "eval_interval", "save_interval", "log_interval", "seed", "group_by_length")


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
        device=args.device, progress=progress_enabled(args), limit=args.limit, base_ref=args.model,
        recipe={k: getattr(args, k) for k in FT_RECIPE if getattr(args, k, None) is not None},
        on_info=lambda line: print(line, flush=True))  # what data, how much of the model: before training
    if not opts.progress:  # no terminal: a line per evaluation instead of a progress bar
        opts.on_log = print_evaluations
    try:
        result, summary = finetune(opts)
    except TrainingDiverged as e:
        return fail(str(e), code=1)
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

    quickstart(out=Path(args.out), budget=args.budget, device=args.device, progress=progress_enabled(args),
               register=not args.no_store, chat=not args.no_chat)
    return 0


def register(sub) -> list[argparse.ArgumentParser]:
    """Add this group's subcommands to `sub`; returns those whose numeric flags get short metavars."""
    # tokenizer train
    tok = sub.add_parser("tokenizer", help="train byte-level BPE tokenizers", formatter_class=Formatter)
    tok.set_defaults(group_parser=tok)
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
    tt = tok_sub.add_parser("train", help="train a BPE tokenizer on text and save it (tokenizer.json + config)",
                            formatter_class=Formatter,
                            description=para("Train a byte-level BPE tokenizer with Hugging Face tokenizers. Any UTF-8 "
                                              "text round-trips exactly; special tokens <|endoftext|>, <|im_start|>, "
                                              "<|im_end|>, <|pad|> have ids 0-3; a ChatML chat template is included."))
    add_data_flags(tt, "builtin:pydocs")
    tt.set_defaults(data="builtin:pydocs")
    tt.add_argument("--vocab-size", type=positive_int, default=8192, help="tokens in the vocabulary, specials included (default: 8192)")
    tt.add_argument("--min-frequency", type=positive_int, default=2, help="merge only pairs seen at least this often (default: 2)")
    tt.add_argument("--out", required=True, metavar="DIR", help="directory to write the tokenizer files to (required)")
    add_progress_flag(tt)
    tt.set_defaults(func=cmd_tokenizer_train)

    # pretrain
    pt = sub.add_parser(
        "pretrain", help="pretrain a model from raw text (or resume a run)", formatter_class=Formatter,
        description=para("Train a decoder-only transformer on raw text. Trains a tokenizer on the data unless --tokenizer "
                    "is given, tokenizes once into cached shards, then trains with AdamW, warmup + cosine decay, "
                    "periodic validation and checkpoints. Writes a Hugging Face model directory (config.json, "
                    "model.safetensors, tokenizer files), metrics.jsonl and loss.png into --out. Ctrl-C saves and "
                    "stops; --resume continues exactly where a run stopped."),
        epilog="examples:\n  lmforge pretrain --preset small --data builtin:pydocs --out runs/small --max-steps 3000\n"
               "  lmforge pretrain --resume runs/small --max-steps 6000\n"
               "  lmforge pretrain --preset small --data shakespeare.txt --out runs/shakes --dry-run\n"
               "  lmforge pretrain --nproc 2 --parallel ddp --preset small --out runs/ddp\n"
               "  torchrun --nproc-per-node 8 -m lmforge pretrain --parallel fsdp --preset base --out runs/base")
    pt.add_argument("--preset", metavar="NAME", help=f"model shape, one of: {', '.join(preset_names())} "
                    f"(default: small; on --resume, the checkpoint's shape)")
    add_data_flags(pt, "builtin:pydocs; on --resume, the run's data")
    pt.add_argument("--out", metavar="DIR", help="output model directory (required unless --resume)")
    pt.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (same data order, optimizer and RNG state)")
    pt.add_argument("--name", help="also add the finished model to the store under this name (default: don't)")
    pt.add_argument("--dry-run", action="store_true", help="print parameters, FLOPs/token, a memory estimate and token "
                    "counts, then stop without training")
    pt.add_argument("--overwrite", action="store_true", help="start a new run in an --out that already holds a model "
                    "(default: refuse, so a finished model is never lost by accident)")
    pt.add_argument("--tokenizer", metavar="DIR", type=Path, help="use this tokenizer instead of training one on the data")
    pt.add_argument("--vocab-size", type=positive_int, help="vocabulary of the tokenizer trained on the data "
                    "(default: the preset's)")
    pt.add_argument("--context-length", type=positive_int, help="tokens per training window = the model's context "
                    "(default: the preset's)")
    pt.add_argument("--dropout", type=float_arg, help="dropout probability (default: the preset's, 0)")
    g = pt.add_argument_group("training recipe (on --resume, defaults come from the checkpoint)")
    g.add_argument("--max-steps", type=positive_int, help=f"optimizer steps to train to (default: {train_default('max_steps')})")
    g.add_argument("--batch-size", type=positive_int, help=f"sequences per micro-batch, all processes together "
                   f"(default: {train_default('batch_size')})")
    g.add_argument("--grad-accum", type=positive_int, help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--lr", type=float_arg, help=f"peak learning rate (default: {train_default('lr')})")
    g.add_argument("--min-lr", type=float_arg, help="learning rate at the end of the cosine decay (default: lr/10)")
    g.add_argument("--warmup-steps", type=nonneg_int, help="linear warmup steps (default: 100, at most a tenth of max-steps)")
    g.add_argument("--lr-decay-steps", type=positive_int, help="step at which the cosine reaches min-lr (default: max-steps)")
    g.add_argument("--weight-decay", type=float_arg, help=f"AdamW weight decay on matrices (default: {train_default('weight_decay')})")
    g.add_argument("--grad-clip", type=float_arg, help=f"clip the gradient norm to this; 0 disables (default: {train_default('grad_clip')})")
    g.add_argument("--eval-interval", type=positive_int, help=f"steps between validation runs (default: {train_default('eval_interval')})")
    g.add_argument("--save-interval", type=nonneg_int, help=f"steps between checkpoints; 0 = only at the end (default: {train_default('save_interval')})")
    g.add_argument("--log-interval", type=positive_int, help=f"steps between metrics lines (default: {train_default('log_interval')})")
    g.add_argument("--seed", type=int, help=f"seed for initialisation, data order and dropout (default: {train_default('seed')})")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="autocast precision. auto: bf16 on "
                   "GPUs that support it; on a CPU, bf16 only where a quick measurement at the start of the run shows "
                   "it clearly faster than fp32 (AMX or AVX-512-BF16 CPUs), cached per machine, model shape and batch, "
                   "and logged; LMFORGE_PRECISION_AUTO=fp32|bf16 pins it without measuring. The resolved precision is "
                   "recorded, so --resume keeps it (default: auto)")
    g.add_argument("--compile", nargs="?", const="on", choices=["auto", "on", "off"], metavar="auto|on|off",
                   help="torch.compile the model; --compile alone = on. auto: on for CUDA GPUs; on a CPU only when the "
                   "run is long enough to repay the compile (tens of seconds), from the measured step time; the "
                   "decision is logged (default: auto)")
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each transformer block's activations in the backward instead of keeping them: "
                   "much less activation memory (longer contexts, bigger batches) for about a third more compute; "
                   "--no-activation-checkpointing switches it off, also on --resume (default: off; on --resume, "
                   "the checkpoint's)")
    pt.add_argument("--val-fraction", type=float_arg, default=0.05, help="share of the data held out for validation (default: 0.05)")
    pt.add_argument("--eval-tokens", type=positive_int, default=131072, help="validation tokens scored per evaluation (default: 131072)")
    add_device_flag(pt)
    d = pt.add_argument_group("several processes (torchrun)", "--batch-size is the global micro-batch, divided evenly "
                              "among the processes, so the loss curve does not depend on how many there are")
    d.add_argument("--parallel", metavar="HOW", help="how the processes share the work: none (one process), ddp "
                   "(each holds the whole model, gradients averaged), fsdp (weights, gradients and optimizer state "
                   "sharded per block, FSDP2), tp=N (each block's projections split over N processes, alone or on a "
                   "2-D mesh with dp or fsdp: tp=2,dp=2; tp=2,fsdp) or pp=N (the blocks cut into N pipeline stages, "
                   "one a process, alone or with dp or fsdp: pp=2,dp=2; pp=2,fsdp); the same spec `lmforge plan` "
                   "reads (default: none)")
    d.add_argument("--nproc", type=positive_int, help="start this many processes on this machine through torchrun "
                   "(python -m torch.distributed.run --standalone); under torchrun itself, leave it out (default: one "
                   "process, or what torchrun started)")
    d.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto", help="how the processes talk: "
                   "gloo on CPUs, NCCL on CUDA GPUs (default: auto)")
    pt.add_argument("--samples", type=nonneg_int, default=2, help="text samples to print when training ends (default: 2)")
    pt.add_argument("--sample-tokens", type=positive_int, default=80, help="tokens per printed sample (default: 80)")
    pt.add_argument("--seed-sample", type=int, default=0, help="seed of the printed samples (default: 0)")
    add_progress_flag(pt)
    pt.set_defaults(func=cmd_pretrain, pretrain_parser=pt)

    # finetune / align / merge
    def add_ft_flags(p, what: str, data_help: str):
        p.add_argument("model", metavar="MODEL", help=MODEL_HELP + " (ignored with --resume)")
        p.add_argument("--data", required=True, help=data_help)
        p.add_argument("--val-data", help="validation data (default: the held-out split of builtin data, else 5%% of --data)")
        p.add_argument("--out", required=True, metavar="DIR", help="run directory to write (required)")
        p.add_argument("--name", help="also add the finished model to the store under this name (default: don't)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
        p.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a model")
        p.add_argument("--epochs", type=float_arg, default=1.0, help="passes over the data when --max-steps is not given (default: 1)")
        p.add_argument("--limit", type=positive_int, help="use at most this many records (default: all)")
        p.add_argument("--group-by-length", action="store_const", const=True, help="batch records of similar length together: "
                       "less padding, faster when lengths vary (default: random batches)")
        g = p.add_argument_group("training recipe")
        g.add_argument("--max-steps", type=positive_int, help="optimizer steps (default: --epochs over the data)")
        g.add_argument("--batch-size", type=positive_int, help=f"{what} per micro-batch (default: 8)")
        g.add_argument("--grad-accum", type=positive_int, help="micro-batches per optimizer step (default: 1)")
        g.add_argument("--lr", type=float_arg, help="peak learning rate (default: 2e-4 with LoRA, 2e-5 full SFT, 5e-6 DPO)")
        g.add_argument("--min-lr", type=float_arg, help="learning rate at the end of the cosine decay (default: lr/10)")
        g.add_argument("--warmup-steps", type=nonneg_int, help="linear warmup steps (default: a tenth of the steps, at most 100)")
        g.add_argument("--weight-decay", type=float_arg, help="AdamW weight decay (default: 0)")
        g.add_argument("--grad-clip", type=float_arg, help="clip the gradient norm; 0 disables (default: 1.0)")
        g.add_argument("--eval-interval", type=positive_int, help="steps between validations (default: a fifth of the steps)")
        g.add_argument("--save-interval", type=nonneg_int, help="steps between checkpoints; 0 = at the end (default: 0)")
        g.add_argument("--log-interval", type=positive_int, help="steps between metrics lines (default: 10)")
        g.add_argument("--seed", type=int, help="seed for data order and dropout (default: 1337)")
        add_device_flag(p)
        add_progress_flag(p)

    ft = sub.add_parser("finetune", help="supervised fine-tuning on conversations (full or LoRA)", formatter_class=Formatter,
                        description=para("Teach a model to answer: train on chat conversations rendered through its "
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
    lg.add_argument("--lora-rank", type=positive_int, default=16, help="adapter rank r (default: 16)")
    lg.add_argument("--lora-alpha", type=float_arg, default=32.0, help="scale alpha; updates are scaled by alpha/r (default: 32)")
    lg.add_argument("--lora-dropout", type=float_arg, default=0.05, help="dropout on the adapter input (default: 0.05)")
    lg.add_argument("--lora-targets", help="comma-separated projections, PEFT names (q_proj, ..., down_proj; c_attn, "
                    "c_proj, c_fc for GPT-2 shapes; w1, w3, w2 for Mixtral; an expert's name adapts every expert, and "
                    "gate the router, which is adapted only when named) or all-linear (default: all attention and MLP "
                    "projections, every expert's)")
    ft.set_defaults(func=cmd_finetune)

    al = sub.add_parser("align", help="preference alignment (DPO, IPO) on chosen/rejected pairs", formatter_class=Formatter,
                        description=para("Align a model with preference pairs: raise the likelihood of the chosen answer "
                                          "relative to the rejected one, measured against the starting model (the "
                                          "reference, whose log-probs are computed once and cached in the run "
                                          "directory). Logs reward margins and preference accuracy on held-out pairs."),
                        epilog="data: JSONL lines {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}, or builtin:pydocs-prefs\n"
                               "example:\n  lmforge align runs/small-sft --data prefs.jsonl --method dpo --beta 0.1 --out runs/small-dpo")
    add_ft_flags(al, "pairs", "preference JSONL file, or builtin:pydocs-prefs (required)")
    al.add_argument("--method", choices=["dpo", "ipo"], default="dpo", help="loss: dpo (sigmoid) or ipo (default: dpo)")
    al.add_argument("--beta", type=float_arg, default=0.1, help="strength of the tie to the reference model (default: 0.1)")
    al.set_defaults(func=cmd_align)

    mg = sub.add_parser("merge", help="fold a LoRA adapter into its base model's weights", formatter_class=Formatter,
                        description=para("Write base model + adapter as one plain model directory (same outputs, base-"
                                          "model speed, loadable by transformers)."))
    mg.add_argument("adapter", metavar="ADAPTER", help="a LoRA run directory (lmforge finetune --lora) or PEFT adapter")
    mg.add_argument("--out", required=True, metavar="DIR", help="output model directory (required)")
    mg.add_argument("--name", help="also add the merged model to the store under this name")
    mg.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    mg.set_defaults(func=cmd_merge)

    qs = sub.add_parser("quickstart", help="pretrain -> SFT -> DPO -> evaluate -> chat, on the built-in data, offline",
                        formatter_class=Formatter,
                        description=para("Grow a Python-docs assistant that answers from the documentation, with "
                                          "sources: pretrain `small` on builtin:pydocs, index builtin:pydocs, fine-tune "
                                          "on builtin:pydocs-qa-open (each question with passages retrieved by the "
                                          "index; answers cite them, or say they are not in the sources), align with DPO "
                                          "on builtin:pydocs-prefs-open, evaluate each stage on held-out modules "
                                          "(retrieval recall, open- and closed-book QA token-F1, citation accuracy, "
                                          "preference accuracy), register quickstart-base/-sft/-dpo and the `pydocs` "
                                          "index, then chat with --docs pydocs. On a CPU it first measures whether bf16 "
                                          "autocast trains faster than fp32 there, and uses the faster. About 15 "
                                          "minutes on a 2-core CPU; re-running skips finished stages."))
    qs.add_argument("--out", default="runs/quickstart", help="where the three runs go (default: runs/quickstart)")
    qs.add_argument("--budget", type=float_arg, default=15.0, help="minutes the default plan is sized for; steps of every "
                    "stage scale with it (default: 15)")
    add_device_flag(qs)
    qs.add_argument("--no-store", action="store_true", help="don't register the models in the store")
    qs.add_argument("--no-chat", action="store_true", help="don't start the chat at the end (default: start it when "
                    "a terminal is attached)")
    add_progress_flag(qs)
    qs.set_defaults(func=cmd_quickstart)
    return [tt, pt, ft, al]
