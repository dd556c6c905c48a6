"""The `lmforge` command: one table of subcommands, each a thin layer over a library function.

User mistakes surface as `UserError` and become one line on stderr with exit code 2; a diverged run
exits 1 with its one-line reason; an interrupted run saves and exits 0. Only bugs show a traceback.
"""

from __future__ import annotations

import argparse
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
    from lmforge.train.pretrain import check_writable

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
    from lmforge.train.loop import TrainingDiverged
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
        def on_log(rec: dict) -> None:
            if "val_loss" in rec:
                print(f"step {rec['step']}: val loss {rec['val_loss']:.4f} (ppl {rec['val_ppl']:.2f})", flush=True)
        opts.on_log = on_log
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
DTYPES = {"auto": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _sampling_params(args, **extra):
    from lmforge.engine.sampling import SamplingParams

    given = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k, None) is not None}
    try:
        return SamplingParams(**given, **extra).validate()
    except ValueError as e:
        raise UserError(str(e)) from None


def _load_engine(args):
    import torch

    from lmforge.engine.generate import Engine
    from lmforge.train.pretrain import resolve_device

    dtype = DTYPES[args.dtype]
    return Engine.load(args.model, device=resolve_device(args.device), dtype=getattr(torch, dtype) if dtype else None,
                       fast=not args.no_fast)


def _token_text(tok, token_id: int) -> str:
    """A token shown on its own: its bytes as text, with incomplete UTF-8 bytes as \\x escapes."""
    raw = tok.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(chr(b) if b < 128 else f"\\x{b:02x}" for b in raw)


def cmd_generate(args) -> int:
    import math

    engine = _load_engine(args)
    tok = engine.tokenizer
    prompt = args.prompt
    if args.chat:
        msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        prompt = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))
    if args.beams > 1:
        params = _sampling_params(args, num_beams=args.beams, length_penalty=args.length_penalty,
                                  early_stopping=args.early_stopping, **({} if args.temperature is not None else {"temperature": 0.0}))
        try:
            hyps = engine.beam_search(prompt, params, n_best=args.n_best)
        except ValueError as e:
            raise UserError(str(e)) from None
        for rank, h in enumerate(hyps, 1):
            text = tok.decode([i for i in h.ids if i not in tok.eos_ids])
            print(f"--- beam {rank}: score {h.score:.4f} (log-prob {h.sum_logprob:.3f}, {len(h.ids)} tokens, {h.finish_reason})")
            print(text)
        return 0
    params = _sampling_params(args, stop=args.stop or [], logprobs=args.top_logprobs if args.show_probs else None)
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
            shown = repr(_token_text(tok, ev.token_id))  # quoted, so spaces and newlines are visible
            alts = "  ".join(f"{_token_text(tok, i)!r} {math.exp(lp):.1%}" for i, lp in (ev.top_logprobs or [])
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
    engine = _load_engine(args)
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
            print(f"  {-r.logprobs[i] / math.log(2):6.2f}  ...{before!r} -> {_token_text(tok, r.ids[j])!r}")
    return 0


def cmd_run(args) -> int:
    from lmforge.chat import ChatSession, answer_once, repl

    engine = _load_engine(args)
    if engine.tokenizer.chat_template is None:
        raise UserError(f"{args.model} has no chat template (tokenizer_config.json chat_template); "
                        f"use `lmforge generate` for plain text completion")
    session = ChatSession(engine, system=args.system, params=_sampling_params(args))
    if not sys.stdin.isatty():
        try:
            return answer_once(session, sys.stdin.read())
        except ValueError as e:
            raise UserError(str(e)) from None
    return repl(session)


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
        p.add_argument("model", metavar="MODEL", help="a model directory (config.json, model.safetensors, tokenizer files)")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
        p.add_argument("--dtype", choices=list(DTYPES), default="auto", help="weights dtype; auto keeps the checkpoint's "
                       "(default: auto)")
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

    for p in (tt, pt, gen, sc, rn):  # short metavars keep the usage lines readable
        for action in p._actions:
            if action.metavar is None and action.type in (_positive_int, _nonneg_int, int):
                action.metavar = "N"
            elif action.metavar is None and action.type is _float:
                action.metavar = "X"
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable | None = getattr(args, "func", None)
    if func is None:  # a command group without its subcommand, or nothing at all
        print((getattr(args, "group_parser", None) or parser).format_help(), file=sys.stderr)
        return 2
    try:
        return func(args)
    except UserError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
