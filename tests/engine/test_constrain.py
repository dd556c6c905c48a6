"""Structured output (engine/constrain.py): the grammar's mask against references computed from the token
bytes, the grammar ending a sequence, JSON valid under its schema from a tiny random model, and constrained
rows in a batch equal to their solo runs."""

from __future__ import annotations

import dataclasses
import json
import threading

import jsonschema
import pytest
import torch

from conftest import load_engine, run_cli, save_tiny_model
from lmforge.engine.constrain import Constraint, Grammar, GrammarError, apply_constraints
from lmforge.engine.sampling import SamplingParams, token_logprobs
from lmforge.engine.scheduler import Request, Scheduler

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3}},
    "required": ["name", "age", "tags"]}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("constrain") / "m", tiny_tokenizer, context_length=128,
                           embedding_scale=8.0)


@pytest.fixture(scope="module")
def engine(model_dir):
    return load_engine(model_dir)


def allowed_ids(constraint) -> set[int]:
    return set(constraint.allowed().nonzero().flatten().tolist())


def walk(constraint, tok, text: str) -> None:
    for t in tok.encode(text, allow_special=False):
        constraint.advance(t)


# ----------------------------------------------------------------------------------------------------
# Grammars: built, refused with one line naming what is wrong
# ----------------------------------------------------------------------------------------------------
def test_grammars_are_immutable_values():
    assert Grammar.json_object() == Grammar.json_object()
    assert hash(Grammar.gbnf('root ::= "a"')) == hash(Grammar.gbnf('root ::= "a"'))
    assert Grammar.json_schema(PERSON) != Grammar.json_schema(PERSON, strict=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Grammar.json_object().spec = "x"  # type: ignore[misc]
    assert Grammar.from_text('root ::= "a"').kind == "gbnf"
    assert Grammar.from_text('start: "a"').kind == "lark"


@pytest.mark.parametrize("build, message", [
    (lambda: Grammar.json_schema({"type": "object", "not": {"required": ["a"]}}), "unsupported keyword 'not'"),
    (lambda: Grammar.json_schema({"if": {}, "then": {}}), "unsupported keywords 'if', 'then'"),
    (lambda: Grammar.json_schema({"type": "array", "uniqueItems": True}), "unsupported keyword 'uniqueItems'"),
    (lambda: Grammar.json_schema({"type": "objekt"}), "Invalid type: objekt"),
    (lambda: Grammar.json_schema({"$ref": "#/nope"}), "Pointer '/nope' does not exist"),
    (lambda: Grammar.json_schema([1]), "the schema must be a JSON object, got list"),  # type: ignore[arg-type]
    (lambda: Grammar.lark("start: foo("), "line 1, column 12: Expected token ')'"),
    (lambda: Grammar.lark("start: bar"), 'line 1, column 8: unknown name: "bar"'),
    (lambda: Grammar.lark("start: /[a-/"), "unclosed character class"),
    (lambda: Grammar.lark("  "), "the grammar is empty"),
    (lambda: Grammar.gbnf('root ::= ("yes" | '), "GBNF syntax error: Expected ')'"),
    (lambda: Grammar.gbnf("root ::= x"), "GBNF syntax error: Rule 'x' not found"),
])
def test_bad_grammars_are_one_line(build, message):
    with pytest.raises(GrammarError) as info:
        build()
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_check_refuses_a_special_token_the_tokenizer_lacks(tok):
    g = Grammar.lark("start: <|nope|>")  # fine without a tokenizer: any special token might exist
    with pytest.raises(GrammarError, match="unknown special token"):
        g.check(tok)
    Grammar.lark("start: <|im_end|>").check(tok)  # one it has


# ----------------------------------------------------------------------------------------------------
# The mask, against references computed from the token bytes
# ----------------------------------------------------------------------------------------------------
def prefixes_of(tok, words: list[bytes]) -> set[int]:
    """Every id whose bytes are a non-empty prefix of one of `words` (the reference for a choice grammar)."""
    return {i for i in range(tok.vocab_size) if tok.token_bytes(i) and i not in tok.eos_ids
            and tok.token_bytes(i) not in {b"<|im_start|>", b"<|im_end|>", b"<|pad|>"}
            and any(w.startswith(tok.token_bytes(i)) for w in words)}


def test_a_choice_grammar_allows_exactly_the_prefixes_then_stops(tok):
    g = Grammar.gbnf('root ::= "yes" | "no"')
    g.check(tok)
    c = g.constraint(tok)
    assert allowed_ids(c) == prefixes_of(tok, [b"yes", b"no"])
    c.advance(tok.encode("y", allow_special=False)[0])
    assert allowed_ids(c) == prefixes_of(tok, [b"es"])
    assert not c.done
    walk(c, tok, "es")
    assert c.done  # nothing may follow: the sequence ends here, no EOS step needed


def test_eos_is_allowed_exactly_where_the_grammar_accepts(tok):
    c = Grammar.lark('start: "a"+').constraint(tok)
    assert not set(tok.eos_ids) & allowed_ids(c)  # nothing yet: "a" must come first
    walk(c, tok, "a")
    assert set(tok.eos_ids) <= allowed_ids(c) and tok.encode("a", allow_special=False)[0] in allowed_ids(c)
    assert not c.done


def test_strict_closes_objects(tok):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["a"]}
    comma, close = tok.encode(",", allow_special=False)[0], tok.encode("}", allow_special=False)[0]
    loose, strict = Grammar.json_schema(schema).constraint(tok), Grammar.json_schema(schema, strict=True).constraint(tok)
    for c in (loose, strict):
        walk(c, tok, '{"a": 1')
    assert {comma, close} <= allowed_ids(loose)  # JSON Schema's default: more properties may follow
    assert close in allowed_ids(strict) and comma not in allowed_ids(strict)
    # values are not schemas: an object inside `const` is kept exactly as written
    const = {"type": "object", "properties": {"k": {"const": {"properties": 1}}}, "required": ["k"]}
    c = Grammar.json_schema(const, strict=True).constraint(tok)
    walk(c, tok, '{"k": {"properties": 1}}')
    assert c.done
    c = Grammar.json_schema({"type": ["object", "null"]}, strict=True).constraint(tok)  # a list of types too
    walk(c, tok, "{")
    assert allowed_ids(c) == {close}


def test_control_tokens_never_enter_a_json_string(tok):
    c = Grammar.json_object().constraint(tok)
    walk(c, tok, '{"k": "')
    specials = {tok.backend.token_to_id(t) for t in tok.control_token_texts()}
    allowed = allowed_ids(c)
    assert not specials & allowed and len(allowed) > 100  # any ordinary character may come


def test_masking_leaves_other_rows_alone_and_rules_out_extra_embedding_rows(tok):
    logits = torch.randn(3, tok.vocab_size + 7)
    c = Grammar.gbnf('root ::= "no"').constraint(tok)
    assert apply_constraints(logits, [None, None, None]) is logits  # nothing constrained: no work, no copy
    out = apply_constraints(logits, [None, c, None])
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    finite = set(torch.isfinite(out[1]).nonzero().flatten().tolist())
    assert finite == prefixes_of(tok, [b"no"])  # ids past the tokenizer's vocabulary are -inf too
    assert torch.isfinite(logits).all()  # the caller's logits stay raw (for logprobs)


# ----------------------------------------------------------------------------------------------------
# Sampling settings
# ----------------------------------------------------------------------------------------------------
def test_a_grammar_row_is_never_plain_greedy_and_refuses_beams():
    g = Grammar.json_object()
    assert SamplingParams(temperature=0).plain_greedy
    assert not SamplingParams(temperature=0, grammar=g).plain_greedy
    with pytest.raises(ValueError, match="beam search cannot follow a grammar"):
        SamplingParams(temperature=0, num_beams=2, grammar=g).validate()
    with pytest.raises(ValueError, match="grammar must be a constrain.Grammar"):
        SamplingParams(grammar="root ::= x").validate()  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------
def test_sampled_outputs_validate_and_finish(engine):
    g = Grammar.json_schema(PERSON, strict=True)
    outs = engine.complete(["the model"] * 8, SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3,
                                                             max_new_tokens=100, grammar=g))
    for c in outs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), PERSON)
        assert set(json.loads(c.text)) == {"name", "age", "tags"}  # strict: no extra keys
    assert len({c.text for c in outs}) > 1  # sampled: the rows differ


def test_logprobs_stay_those_of_the_raw_model(engine):
    g = Grammar.gbnf('root ::= "yes" | "no"')
    c = engine.complete(["each layer"], SamplingParams(temperature=0, max_new_tokens=8, logprobs=0, grammar=g))[0]
    assert c.text in ("yes", "no") and c.finish_reason == "stop"
    scored = engine.score_ids(c.prompt_ids + c.ids).logprobs[-len(c.ids):]
    torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(scored), rtol=1e-4, atol=1e-4)


def test_a_complete_grammar_stops_even_when_eos_is_ignored(engine):
    g = Grammar.gbnf('root ::= "no"')
    c = engine.complete(["the data"], SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True, grammar=g))[0]
    assert (c.text, c.finish_reason) == ("no", "stop")


def _run(sched: Scheduler, prompts, params) -> list[list[int]]:
    """Submit every (prompt, params) at once, so they share the batch; each one's token ids."""
    out = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def emit_for(i):
        return lambda ev: done.release() if ev is None else out[i].append(ev.token_id)

    reqs = [Request(prompt_ids=p, params=sp, emit=emit_for(i)) for i, (p, sp) in enumerate(zip(prompts, params))]
    for r in reqs:
        sched.submit(r)
    for _ in reqs:
        assert done.acquire(timeout=120), "a request never finished"
    assert all(r.error is None for r in reqs), [r.error for r in reqs]
    return out


def test_constrained_and_free_rows_in_one_batch_equal_their_solo_runs(engine, monkeypatch):
    g = Grammar.json_schema(PERSON, strict=True)
    enc = engine.tokenizer.encode
    prompts = [enc(p) for p in ["the model", "a token reads", "each layer", "our loss", "the cache", "some text"]]
    params = [SamplingParams(temperature=0, max_new_tokens=60, grammar=g),
              SamplingParams(temperature=0, max_new_tokens=12),
              SamplingParams(temperature=1.0, seed=7, max_new_tokens=60, grammar=g),
              SamplingParams(temperature=0.8, seed=5, max_new_tokens=12),
              SamplingParams(temperature=0, max_new_tokens=30, grammar=Grammar.gbnf('root ::= "yes" | "no"')),
              SamplingParams(temperature=1.0, seed=11, max_new_tokens=60, grammar=Grammar.json_object())]
    masks = []  # every mask computed: the free rows of the batch must cause none
    real = Constraint._allowed
    monkeypatch.setattr(Constraint, "_allowed", lambda self: masks.append(1) or real(self))
    sched = Scheduler(engine, max_batch=6, max_queue=16)
    try:
        together = _run(sched, prompts, params)
        constrained_tokens = sum(len(ids) for ids, sp in zip(together, params) if sp.grammar is not None)
        assert len(masks) == constrained_tokens  # one mask per token of a constrained row, nothing else
        steps_together = sched.steps
        solo = [_run(sched, [p], [sp])[0] for p, sp in zip(prompts, params)]
        assert sched.steps - steps_together > steps_together  # the first run did share decode steps
    finally:
        sched.stop(10)
    assert together == solo
    for i in (0, 2):
        jsonschema.validate(json.loads(engine.tokenizer.decode(together[i])), PERSON)
    assert engine.tokenizer.decode(together[4]) in ("yes", "no")
    assert engine.tokenizer.decode(together[5]).startswith("{")  # any object: it may ramble past 60 tokens
    # the engine's own batch (no scheduler) agrees with the scheduler
    assert [c.ids for c in engine.complete([engine.tokenizer.decode(prompts[0])], params[0])] == [together[0]]


def test_a_checked_grammar_is_never_compiled_again(tok, monkeypatch):
    """check() (the server's handler, on its worker pool) attaches the compiled grammar; the scheduler's rows
    only copy it, even once the LRU has evicted it (more than COMPILED_CACHE grammars in use)."""
    from lmforge.engine import constrain

    g = Grammar.json_schema(PERSON, strict=True)
    g.check(tok)
    constrain._compiled_cache.clear()

    def no_compiling(*args):
        raise AssertionError("compiled again")

    monkeypatch.setattr(constrain, "_compiled", no_compiling)
    c = g.constraint(tok)
    walk(c, tok, '{"name": "ab"')
    assert Grammar.json_schema(PERSON, strict=True) == g  # the attached result is no part of the value


def test_a_grammar_that_cannot_start_fails_only_its_own_request(engine, monkeypatch):
    """A grammar whose matcher cannot be made (here: made to fail) ends its own request with the error; the
    requests prefilled in the same group, free or constrained, are untouched."""
    bad, good = Grammar.gbnf('root ::= "x"'), Grammar.gbnf('root ::= "yes" | "no"')
    real = Grammar.constraint

    def constraint(self, tokenizer):
        if self.spec == bad.spec:
            raise GrammarError("too complex")
        return real(self, tokenizer)

    monkeypatch.setattr(Grammar, "constraint", constraint)
    enc = engine.tokenizer.encode
    params = [SamplingParams(temperature=0, max_new_tokens=8), SamplingParams(temperature=0, max_new_tokens=8, grammar=bad),
              SamplingParams(temperature=0, max_new_tokens=8, grammar=good)]
    done, out = threading.Semaphore(0), [[] for _ in params]
    sched = Scheduler(engine, max_batch=4, max_queue=8)
    try:
        with sched._wake:  # the scheduler admits all three together: one prefill group
            reqs = [sched.submit(Request(prompt_ids=enc("the model"), params=sp,
                                         emit=lambda ev, i=i: done.release() if ev is None else out[i].append(ev)))
                    for i, sp in enumerate(params)]
        for _ in reqs:
            assert done.acquire(timeout=120)
    finally:
        sched.stop(10)
    assert isinstance(reqs[1].error, GrammarError) and "too complex" in str(reqs[1].error)
    assert reqs[0].error is None and out[0][-1].finish_reason is not None
    assert reqs[2].error is None and "".join(ev.text for ev in out[2]) in ("yes", "no")


def test_raw_logits_logprob_reference():
    """token_logprobs is what a constrained row reports (on the raw logits, not the masked ones)."""
    raw = torch.tensor([[0.0, 1.0, 2.0]])
    lp, _, _ = token_logprobs(raw, torch.tensor([0]))
    torch.testing.assert_close(lp, torch.log_softmax(raw, -1)[:, 0])


# ----------------------------------------------------------------------------------------------------
# lmforge generate --json-schema / --grammar
# ----------------------------------------------------------------------------------------------------
def test_generate_cli_follows_a_schema_or_a_grammar(capsys, tmp_path, model_dir):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    code, out, err = run_cli(capsys, "generate", model_dir, "--prompt", "the model", "--json-schema", schema,
                             "--temperature", "1", "--seed", "2", "--max-new-tokens", "100", "--no-fast")
    assert code == 0, err
    jsonschema.validate(json.loads(out), PERSON)
    yes_no = tmp_path / "yn.gbnf"
    yes_no.write_text('root ::= "yes" | "no"\n')
    code, out, err = run_cli(capsys, "generate", model_dir, "--prompt", "the", "--grammar", yes_no, "--no-fast")
    assert code == 0 and out.strip() in ("yes", "no"), err


@pytest.mark.parametrize("flag, text, message", [
    ("--json-schema", "{not json", "is not JSON"),
    ("--json-schema", '{"type": "object", "not": {}}', "unsupported keyword 'not'"),
    ("--grammar", 'root ::= ("a"', "GBNF syntax error"),
    ("--grammar", "start: <|nope|>", "unknown special token"),
])
def test_generate_cli_refuses_bad_files_in_one_line(capsys, tmp_path, model_dir, flag, text, message):
    path = tmp_path / "g.txt"
    path.write_text(text)
    code, out, err = run_cli(capsys, "generate", model_dir, "--prompt", "x", flag, path, "--no-fast")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(capsys, "generate", model_dir, "--grammar", tmp_path / "missing.gbnf", "--no-fast")
    assert code == 2 and "cannot read" in err


@pytest.mark.parametrize("flag", ["--json-schema", "--grammar"])
def test_generate_cli_refuses_beams_with_a_grammar_before_loading(capsys, tmp_path, flag):
    """Beam search cannot follow a grammar: said in one line before any model is loaded (the model named
    here does not even exist, so a refusal after loading would be a different error)."""
    path = tmp_path / "g.txt"
    path.write_text('{"type": "object"}' if flag == "--json-schema" else 'root ::= "a"')
    code, out, err = run_cli(capsys, "generate", tmp_path / "no-such-model", "--prompt", "x", flag, path,
                             "--beams", "2", "--no-fast")
    assert code == 2 and "--beams cannot be combined with " + flag in err and len(err.strip().splitlines()) == 1, err
