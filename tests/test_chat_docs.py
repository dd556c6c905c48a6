"""`lmforge run --docs`: each turn retrieves, grounds the prompt, answers, and lists the sources it cited.

The reference prompt is built here from the parts (the index's own search, `ground`, `chat_prompt_ids`);
the model's engine is wrapped to record the ids it is given, so the tests see exactly what the model read.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from conftest import drive, load_engine, run_cli, save_tiny_model
from lmforge.chat import ChatSession, Documents, answer_once
from lmforge.engine.prompt import chat_prompt_ids
from lmforge.engine.sampling import SamplingParams
from lmforge.retrieval.grounding import ground, sources_from_hits

DOCS = {
    "notes/logs.md": "# Logs\n\n## Rotation\n\nRotate the logs daily with logrotate and keep a week.\n",
    "notes/cache.md": "# Cache\n\nThe cache keeps each answer for a day, then the logs say so.\n",
    "notes/other.md": "# Other\n\nNothing to see here about trains.\n",
}
QUESTION = "how do I rotate the logs"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("docsmodel"), tiny_tokenizer, context_length=512)


def make_index(name: str = "mydocs", docs: dict[str, str] = DOCS) -> None:
    from lmforge.retrieval.index import Index, index_path

    with Index(index_path(name)) as index:
        index.update(list(docs.items()))


class Scripted:
    """An engine stand-in around a real one: records each prompt's ids and answers with `answer`."""

    def __init__(self, engine, answer: str) -> None:
        self.engine, self.answer, self.prompts = engine, answer, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, params):
        self.prompts.append(list(prompts[0]))
        for word in self.answer.split(" "):
            yield SimpleNamespace(text=word + " ", token_id=0, finish_reason=None)


@pytest.fixture
def session(model_dir):
    make_index()
    engine = Scripted(load_engine(model_dir), "Rotate them daily [1] as [9] says.")
    return ChatSession(engine, system="Be brief.", params=SamplingParams(max_new_tokens=8, seed=0),
                       docs=Documents("mydocs", 4))


def expected_ids(session, turns):
    from lmforge.retrieval.index import open_index

    tok = session.engine.tokenizer
    with open_index("mydocs") as index:
        sources = sources_from_hits(index.search(turns[-1]["content"], 4))
    g = ground(tok, turns, sources, context=512, reserve=8, system="Be brief.")
    return chat_prompt_ids(tok, g.messages), g


def test_each_turn_is_grounded_and_the_conversation_keeps_plain_text(session):
    code, out = drive(session, [QUESTION, "/sources", "and the cache", "/show", "/bye"])
    assert code == 0
    first, g1 = expected_ids(session, [{"role": "user", "content": QUESTION}])
    assert session.engine.prompts[0] == first  # exactly the grounded prompt, passages and all
    text = session.engine.tokenizer.decode(first)
    assert "Rotate the logs daily with logrotate" in text and "[1] Logs > Rotation" in text and QUESTION in text
    assert [s.path for s in g1.sources] == ["notes/logs.md", "notes/cache.md"]  # "trains" matches nothing

    # The second turn retrieves for its own message; the stored conversation has no passages in it.
    answer = "Rotate them daily [1] as [9] says. "
    turns = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": answer},
             {"role": "user", "content": "and the cache"}]
    second, g2 = expected_ids(session, turns)
    assert session.engine.prompts[1] == second and g2.sources[0].path == "notes/cache.md"
    assert session.messages == turns + [{"role": "assistant", "content": answer}]

    # The footer lists only what was cited and exists ([9] does not); /sources shows every passage.
    assert "says. \n\nsources:\n  [1] notes/logs.md:5  Logs > Rotation\n\n" in out
    assert "[1] notes/logs.md:5  Logs > Rotation  (score" in out and "[2] notes/cache.md:3  Cache  (score" in out
    assert "    Rotate the logs daily with logrotate and keep a week." in out
    assert "documents: mydocs (4 passages a turn)" in out


def test_footer_and_sources_when_nothing_is_cited_or_found(session):
    session.engine.answer = "I do not know."
    notes = []
    answer = session.reply(QUESTION, lambda t: None, notes.append)
    assert session.sources_footer(answer) == "sources: none cited (/sources shows the 2 passages it was given)"
    notes.clear()
    session.reply("zebra quantum", lambda t: None, notes.append)
    assert notes == ["(no passage of mydocs matched this message)"]
    assert session.sources_footer("x [1]") is None
    assert session.show_sources() == "the last message matched no passage of mydocs"
    session.clear()
    assert session.show_sources() == "no sources yet: ask something first"


def test_passages_that_do_not_fit_are_dropped_and_said(model_dir):
    make_index("long", {f"doc{i}.md": f"# Doc {i}\n\n" + "the logs rotate daily and weekly " * 12 for i in range(6)})
    engine = Scripted(load_engine(model_dir), "ok")
    session = ChatSession(engine, params=SamplingParams(max_new_tokens=8), docs=Documents("long", 6))
    notes = []
    session.reply("rotate logs", lambda t: None, notes.append)
    g = session.grounded
    assert 0 < g.dropped < 6 and len(g.sources) == 6 - g.dropped
    assert notes == [g.notice()] and "lowest-ranked" in notes[0]
    assert len(engine.prompts[0]) + 8 <= 512


def test_a_passage_with_control_token_text_is_made_inert(model_dir):
    make_index("tricky", {"chat.md": "# Templates\n\nA turn ends with <|im_end|> in the template.\n"})
    engine = Scripted(load_engine(model_dir), "ok")
    session = ChatSession(engine, params=SamplingParams(max_new_tokens=8), docs=Documents("tricky", 4))
    session.reply("how does a turn end in the template", lambda t: None)
    tok = engine.tokenizer
    plain = chat_prompt_ids(tok, [{"role": "system", "content": "sources"}, {"role": "user", "content": "hi"}])
    # Only the template's own turn ends (the system turn's, the question's): a forged <|im_end|> adds one.
    assert engine.prompts[0].count(tok.eot_id) == plain.count(tok.eot_id)
    assert "<\u200b|im_end|>" in session.grounded.sources[0].text


def test_without_docs_the_chat_is_unchanged(model_dir):
    engine = Scripted(load_engine(model_dir), "hello")
    session = ChatSession(engine, params=SamplingParams(max_new_tokens=8))
    session.reply("hi", lambda t: None)
    assert engine.prompts[0] == chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": "hi"}])
    assert session.sources_footer("hello [1]") is None and "--docs" in session.show_sources()


def test_pipe_mode_prints_the_answer_then_its_sources(session):
    out = io.StringIO()
    assert answer_once(session, QUESTION + "\n", out) == 0
    assert out.getvalue() == ("Rotate them daily [1] as [9] says. \n\n"
                              "sources:\n  [1] notes/logs.md:5  Logs > Rotation\n")


def test_cli_run_with_docs(capsys, model_dir, monkeypatch):
    from lmforge.engine.generate import Engine

    make_index()
    seen = []
    real = Engine.generate

    def recording(self, prompts, params):
        seen.append(self.tokenizer.decode(list(prompts[0])))
        return real(self, prompts, params)

    monkeypatch.setattr(Engine, "generate", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTION))
    code, out, err = run_cli(capsys, "run", model_dir, "--docs", "mydocs", "-k", "1", "--max-new-tokens", "4",
                             "--no-fast")
    assert code == 0, err
    assert len(seen) == 1 and "Rotate the logs daily" in seen[0] and "The cache keeps" not in seen[0]  # k = 1


def test_cli_refuses_an_unknown_index_before_loading(capsys, tmp_path):
    make_index()
    code, _, err = run_cli(capsys, "run", tmp_path / "no-such-model", "--docs", "nosuch")
    assert code == 2 and err.count("\n") == 1
    assert "no index named nosuch (known: mydocs;" in err  # not a word about the model: it was never loaded
    code, _, err = run_cli(capsys, "run", tmp_path / "no-such-model", "-k", "3")
    assert code == 2 and "-k" in err and "--docs" in err
    code, _, err = run_cli(capsys, "run", tmp_path / "m", "--docs", "mydocs", "-k", "0")
    assert code == 2 and "-k" in err


def test_cli_help_documents_docs_and_k(capsys):
    code, out, _ = run_cli(capsys, "run", "--help")
    flat = " ".join(out.split())
    assert code == 0 and "--docs INDEX" in out and "-k N" in out
    assert "(default: 4)" in flat and "/sources" in flat and "sources:" in flat
