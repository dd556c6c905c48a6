"""Shared fixtures: an isolated LMFORGE_HOME for every test, a tiny trained tokenizer, a tiny corpus."""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def _kernel_cache(tmp_path_factory):
    """One compiled-kernel directory for the whole session: a fresh home per test would otherwise make
    every process that loads a model with the fast path (a CLI subprocess, say) compile it again."""
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch, _kernel_cache):
    """Caches and the model store of a test never touch the user's ~/.lmforge (the compiled kernels, which
    no test changes, are shared by the session); `--precision auto` is pinned to fp32."""
    home = tmp_path_factory.mktemp("lmforge_home")
    (home / "cache").mkdir()
    (home / "cache" / "kernels").symlink_to(_kernel_cache, target_is_directory=True)
    monkeypatch.setenv("LMFORGE_HOME", str(home))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    # `--precision auto` on a CPU measures fp32 against bf16; no test may depend on what a timing picks
    monkeypatch.setenv("LMFORGE_PRECISION_AUTO", "fp32")


def wait_until(condition, timeout: float = 5.0, poll: float = 0.01) -> bool:
    """Poll `condition()` until it holds or `timeout` seconds pass (a bound on waiting for another thread,
    not a speed check); returns its last value, for the caller to assert on."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(poll)
    return bool(condition())


def free_port() -> int:
    """A TCP port nothing listens on now, for a process group's rendezvous on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_of_rank(marker: str, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` in the job whose environment has LMFORGE_TEST_RUN=marker."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
        except OSError:
            continue
        if env.get("LMFORGE_TEST_RUN") == marker and env.get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in env:
            return int(entry.name)
    return None


def make_corpus(n_lines: int = 3000, seed: int = 0) -> str:
    """Repetitive but structured English-like text: learnable in a few dozen steps by a tiny model."""
    rng = random.Random(seed)
    subjects = ["the model", "a token", "the cache", "our loss", "each layer", "the data"]
    verbs = ["reads", "writes", "predicts", "learns", "counts", "returns"]
    objects = ["the next word", "a long sentence", "the value", "every byte", "some text", "the answer"]
    return "\n".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(n_lines)) + "\n"


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_corpus())
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from lmforge.tokenizer import train_tokenizer

    return train_tokenizer([make_corpus()], 320, show_progress=False)


def save_tiny_model(directory, tokenizer, *, context_length: int = 64, embedding_scale: float = 1.0, **config):
    """Save a seeded random `tiny` model with `tokenizer` as a model directory; returns the directory.
    `embedding_scale` > 1 sharpens the (tied) output distribution, so greedy text varies across prompts;
    `config` overrides fields of the preset (a sliding window, say)."""
    import torch

    from lmforge.train.checkpointer import Checkpointer
    from lmforge.model.gpt import GPT
    from lmforge.presets import get_preset

    torch.manual_seed(0)
    model = GPT(get_preset("tiny", vocab_size=tokenizer.vocab_size, context_length=context_length, **config))
    with torch.no_grad():
        model.tok_emb.weight.mul_(embedding_scale)
    Checkpointer(directory, tokenizer=tokenizer).save(model, None, [], {"step": 0})
    return directory


def load_engine(path, *, fast: bool = False):
    """An `Engine` for the model at `path` (a model directory or .gguf file), as the CLI and server build one."""
    from lmforge.engine.generate import Engine
    from lmforge.loaders.auto import load

    loaded = load(path)
    return Engine(loaded.model, loaded.tokenizer, fast=fast)


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `lmforge ARGV` run in-process, argparse's own exits included."""
    from lmforge.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own checks
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# A tiny BERT-family encoder for the embedding tests (loaders, retrieval, server): its WordPiece vocabulary
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "dog", "ran", "a",
              "##s", ".", "logs", "rotate", "backup", "night", "purr"]
TINY_BERT = dict(vocab_size=len(BERT_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=16)


def save_tiny_bert(path, *, cls_pooling: bool = False, seed: int = 1, **config):
    """A seeded random HF `BertModel` directory (safetensors, WordPiece tokenizer.json, and with
    `cls_pooling` sentence-transformers' modules.json + 1_Pooling/config.json choosing the CLS token)."""
    import json

    import torch
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    torch.manual_seed(seed)
    hf = transformers.BertModel(transformers.BertConfig(**{**TINY_BERT, **config}, initializer_range=0.5)).eval()
    path = Path(path)
    hf.save_pretrained(path, safe_serialization=True)
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(BERT_VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path / "tokenizer.json"))
    if cls_pooling:
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": TINY_BERT["hidden_size"], "pooling_mode_cls_token": True,
             "pooling_mode_mean_tokens": False}))
        (path / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    return path


def drive(session, lines):
    """Run `lmforge.chat.repl` on `session` with `lines` as the user's input (then EOF): (exit code, output)."""
    import io

    from lmforge.chat import repl

    it = iter(lines)

    def read_line(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    return repl(session, out=out, read_line=read_line), out.getvalue()


@contextlib.contextmanager
def writer_killed_midway(script: str, path, first_line: str):
    """Run `script` (python -c, argv[1] = `path`) until it prints a line starting with `first_line` from
    inside its write transaction (its WAL file exists), let the caller look while it writes, then SIGKILL it."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        line = proc.stdout.readline()
        assert line.startswith(first_line), line
        assert Path(f"{path}-wal").exists()  # the update really is writing when it dies
        yield
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
