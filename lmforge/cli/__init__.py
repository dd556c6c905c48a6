"""The `lmforge` command: one table of subcommands, each a thin layer over a library function.

The commands come in groups, one module each: `train` (tokenizer, pretrain, finetune, align, merge,
quickstart), `use` (generate, score, run, and ps/stop for a running server), `store` (import, pull, list, show, rm, cp, create, export),
`quantize`, `retrieval` (index, search), `serve` and `bench`; `common` holds what they share. `GROUPS` below is the table: the order of `lmforge --help`.

User mistakes surface as `UserError` and become one line on stderr with exit code 2; a diverged run
exits 1 with its one-line reason; an interrupted run saves and exits 0. Only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Callable

from lmforge import __version__
from lmforge.cli import bench, plan, quantize, retrieval, serve, store, sweep, train, use
from lmforge.cli.common import PROG, Formatter, Parser, fail, float_arg, nonneg_int, para, positive_int
from lmforge.errors import UserError

GROUPS = (train, plan, sweep, use, store, quantize, retrieval, serve, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG, formatter_class=Formatter,
        description=para("Own a language model on your own machine: train a tokenizer, pretrain, fine-tune and "
                          "align, evaluate, chat and serve, with your models and the open-weight ones people run."),
        epilog="Run 'lmforge COMMAND --help' for the flags of a command.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    short = [p for group in GROUPS for p in group.register(sub)]
    for p in short:  # short metavars keep the usage lines readable
        for action in p._actions:
            if action.metavar is None and action.type in (positive_int, nonneg_int, int):
                action.metavar = "N"
            elif action.metavar is None and action.type is float_arg:
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
        return fail(str(e))
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

