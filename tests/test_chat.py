"""`lmforge run`: the chat session, the REPL commands, context trimming, and the pipe mode."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from lmforge.chat import ChatSession
from lmforge.engine.sampling import SamplingParams
from conftest import drive, load_engine, save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("chatmodel"), tiny_tokenizer, context_length=128)


@pytest.fixture
def session(model_dir):
    return ChatSession(load_engine(model_dir), system="You are terse.",
                       params=SamplingParams(max_new_tokens=8, seed=0))


def test_rendered_prompt_matches_the_template_without_double_bos(session):
    session.messages = [{"role": "user", "content": "hi"}]
    ids, dropped = session.prompt_ids()
    tok = session.engine.tokenizer
    expected = tok.apply_chat_template([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}],
                                       add_generation_prompt=True)
    assert tok.decode(ids) == expected and dropped == 0
    assert expected.endswith("<|im_start|>assistant\n") and ids[0] != ids[1]


def test_repl_commands(session):
    code, out = drive(session, ["/set temperature 0.3", "/set top_k 7", "/set temperature hot", "/set bogus 1",
                                "/show", "hello there", "/clear", "/show", '"""', "two", 'lines"""', "/bye"])
    assert code == 0
    assert "Set parameter 'temperature' to '0.3'" in out and session.params.top_k == 7
    assert "temperature needs a float" in out and "unknown setting 'bogus'" in out
    assert "temperature=0.3" in out and "top_k=7" in out
    assert "Cleared the conversation." in out
    assert session.messages[0] == {"role": "user", "content": "two\nlines"}  # multi-line message, after /clear


def test_bad_setting_value_keeps_previous(session):
    _, out = drive(session, ["/set top_p 1.5"])
    assert "top_p" in out and session.params.top_p == 0.9


def test_ctrl_c_stops_the_answer_but_not_the_chat(session, monkeypatch):
    real = session.engine.generate

    def interrupted(*a, **k):
        for i, ev in enumerate(real(*a, **k)):
            if i == 2:
                raise KeyboardInterrupt
            yield ev

    monkeypatch.setattr(session.engine, "generate", interrupted)
    code, out = drive(session, ["first question", "/show"])
    assert code == 0 and "(stopped)" in out and "turns: 2 messages" in out


def test_long_conversations_drop_the_oldest_turns(session):
    session.params = SamplingParams(max_new_tokens=8, seed=0)
    notes = []
    for i in range(6):
        session.reply(f"question number {i} about the model and the data", lambda t: None, notes.append)
    assert notes and "dropped" in notes[0]
    ids, _ = session.prompt_ids()
    assert len(ids) <= session.engine.config.context_length
    assert session.messages[-1]["role"] == "assistant"
    assert "question number 5" in session.messages[-2]["content"]


def test_run_through_a_pipe(model_dir):
    env = {**os.environ, "LMFORGE_NO_KERNELS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmforge", "run", str(model_dir), "--max-new-tokens", "5", "--seed", "1"],
                          input="hello\n", capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() != "" or proc.stdout == "\n"
    assert "Traceback" not in proc.stderr
    empty = subprocess.run([sys.executable, "-m", "lmforge", "run", str(model_dir)], input="", capture_output=True,
                           text=True, env=env, timeout=120)
    assert empty.returncode == 2 and "no input" in empty.stderr


# -- thinking models: the thought apart (dimmed on a terminal), /set think ----------------------------------
SAID = 'root ::= "<think>" "\\nadd two and two\\n" "</think>" "\\n\\nIt is four."'  # the model's whole output


@pytest.fixture(scope="module")
def thinking_dir(tmp_path_factory, tiny_tokenizer):
    from tests.serve.tool_templates import family_tokenizer
    from tests.tokenizer.family_templates import FAMILIES

    return save_tiny_model(tmp_path_factory.mktemp("thinking"), family_tokenizer(tiny_tokenizer, "qwen3", FAMILIES),
                           context_length=256)


@pytest.fixture
def thinker(thinking_dir):
    """A session over a model with a Qwen3-style template, made to write a known thought and answer (a tiny
    random model writes no tags of its own)."""
    from lmforge.engine.constrain import Grammar

    return ChatSession(load_engine(thinking_dir), params=SamplingParams(max_new_tokens=40, seed=0,
                                                                        grammar=Grammar.gbnf(SAID)))


class Terminal(__import__("io").StringIO):
    def isatty(self) -> bool:
        return True


def test_the_thought_is_shown_apart_and_only_the_answer_kept(thinker, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    code, out = drive(thinker, ["What is 2 + 2?"])
    assert code == 0 and "Thinking...\nadd two and two\n\n...done thinking.\n\nIt is four." in out
    assert "\x1b[" not in out  # not a terminal: no escape codes
    assert thinker.messages[-1] == {"role": "assistant", "content": "It is four."}


@pytest.mark.parametrize("no_color", ["", "1"])
def test_the_thought_is_dimmed_on_a_terminal_unless_no_color(thinker, monkeypatch, no_color):
    from lmforge.chat import repl

    monkeypatch.setenv("NO_COLOR", no_color) if no_color else monkeypatch.delenv("NO_COLOR", raising=False)
    lines = iter(["What is 2 + 2?"])
    out = Terminal()

    def read_line(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    repl(thinker, out=out, read_line=read_line)
    dimmed = "\x1b[2madd two and two\n\x1b[0m\n\nIt is four."
    assert (dimmed in out.getvalue()) == (not no_color)
    assert ("Thinking..." in out.getvalue()) == bool(no_color)


def test_set_think_off_and_on(thinker):
    tok = thinker.engine.tokenizer
    thinker.messages = [{"role": "user", "content": "hi"}]
    _, out = drive(thinker, ["/set think off", "/show"])
    assert "Set 'nothink' mode" in out and "thinking: off" in out and thinker.think is False
    ids, _ = thinker.prompt_ids()
    assert tok.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # the template's own way
    answer = thinker.reply("What is 2 + 2?", lambda t: None)
    assert answer.startswith("<think>")  # thinking off: nothing is taken for a thought
    _, out = drive(thinker, ["/set think on", "/set nothink", "/set think maybe"])
    assert "Set 'think' mode" in out and thinker.think is False and "use /set think on" in out
    drive(thinker, ["/set think"])
    assert thinker.think is True
    ids, _ = thinker.prompt_ids()
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_set_think_on_a_model_that_does_not_think(session):
    _, out = drive(session, ["/set think off", "/show", "/help"])
    assert "error: this model's chat template has no thinking to turn on or off" in out
    assert session.think is None and "thinking: (this model does not think)" in out
    assert "/set think on|off" in out


def test_run_shows_the_thought_alike_in_process_and_through_a_server(tmp_path_factory, tiny_tokenizer, monkeypatch,
                                                                       capsys):
    """`lmforge run MODEL PROMPT` prints a thought the same way whether it loads the model or a running server
    answers (asked with Ollama's `think`). The template opens the thought itself, so the whole output is
    thought: what is checked is where it goes, not what it says (sampled, with a seed: greedily this tiny
    random model repeats the newline after `<think>`, which is not shown)."""
    from conftest import run_cli
    from tests.serve.live import start_server
    from tests.serve.tool_templates import family_tokenizer
    from tests.tokenizer.family_templates import FAMILIES

    path = save_tiny_model(tmp_path_factory.mktemp("opens") / "opens", family_tokenizer(tiny_tokenizer,
                           "opens-thought", FAMILIES), context_length=128)
    argv = ("What is 2 + 2?", "--temperature", "1", "--seed", "3", "--max-new-tokens", "6")
    monkeypatch.setenv("LMFORGE_HOST", "http://127.0.0.1:9")  # nothing listens: in-process
    code, local, _ = run_cli(capsys, "run", path, *argv)
    assert code == 0 and re.fullmatch(r"Thinking\.\.\.\n\S.*\n\.\.\.done thinking\.\n\n\n", local, re.S), local
    s = start_server({"opens": path})
    try:
        monkeypatch.setenv("LMFORGE_HOST", f"127.0.0.1:{s.server.port}")
        code, served, _ = run_cli(capsys, "run", "opens", *argv)
        assert code == 0 and served == local and "opens" in s.registry.loaded  # the server answered
    finally:
        s.stop()
