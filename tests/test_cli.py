"""The command line: the happy path end to end, and one clear line with exit code 2 for every user mistake."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main
from conftest import save_tiny_model, run_cli


run = run_cli  # (code, out, err) of an in-process lmforge run, from conftest


def assert_user_error(capsys, argv, *fragments):
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


TINY = ["--preset", "tiny", "--max-steps", "3", "--batch-size", "2", "--eval-interval", "3", "--samples", "1",
        "--sample-tokens", "5", "--no-progress"]


def test_pretrain_dry_run_resume_and_shape_check(capsys, tmp_path, corpus_file):
    code, out, _ = run(capsys, "pretrain", "--data", corpus_file, "--out", tmp_path / "m", "--dry-run", *TINY)
    assert code == 0
    for word in ("parameters", "FLOPs/token", "memory (est.)", "training tokens"):
        assert word in out
    assert not (tmp_path / "m").exists()  # a dry run writes nothing

    code, out, _ = run(capsys, "pretrain", "--data", corpus_file, "--out", tmp_path / "m", *TINY)
    assert code == 0 and "validation loss" in out and "nats/char" in out and "sample 1" in out
    assert json.loads((tmp_path / "m" / "trainer_state" / "state.json").read_text())["step"] == 3

    assert_user_error(capsys, ["pretrain", "--data", corpus_file, "--out", tmp_path / "m", *TINY], "already holds a model",
                      "--resume")

    code, out, _ = run(capsys, "pretrain", "--resume", tmp_path / "m", "--max-steps", "5", "--no-progress", "--samples", "0")
    assert code == 0 and "step 5" in out

    assert_user_error(capsys, ["pretrain", "--resume", tmp_path / "m", "--preset", "small", "--max-steps", "6"],
                      "different model shape", "d_model: 64 -> 256")


def test_tokenizer_train(capsys, tmp_path, corpus_file):
    code, out, _ = run(capsys, "tokenizer", "train", "--data", corpus_file, "--vocab-size", "300", "--out", tmp_path / "t",
                       "--no-progress")
    assert code == 0 and "characters/token" in out
    assert (tmp_path / "t" / "tokenizer.json").is_file() and (tmp_path / "t" / "tokenizer_config.json").is_file()


@pytest.fixture
def bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "latin1.txt").write_bytes("hello caf".encode() + b"\xe9 au lait\n" * 50)
    (tmp_path / "short.txt").write_text("just a few words\n")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "not_a_model").mkdir()
    return tmp_path


def test_missing_data(capsys, bad_inputs):
    assert_user_error(capsys, ["pretrain", "--data", bad_inputs / "nope.txt", "--out", bad_inputs / "o", *TINY], "nope.txt")


def test_empty_data(capsys, bad_inputs):
    assert_user_error(capsys, ["pretrain", "--data", bad_inputs / "empty.txt", "--out", bad_inputs / "o", *TINY], "empty")


def test_non_utf8_names_file_and_offset(capsys, bad_inputs):
    line = assert_user_error(capsys, ["tokenizer", "train", "--data", bad_inputs / "latin1.txt", "--vocab-size", "300",
                                      "--out", bad_inputs / "t"], "latin1.txt", "9", "--errors replace")
    assert "offset" in line or "byte" in line
    code, _, _ = run(capsys, "tokenizer", "train", "--data", bad_inputs / "latin1.txt", "--vocab-size", "300",
                     "--out", bad_inputs / "t", "--errors", "replace", "--no-progress")
    assert code == 0


def test_corpus_shorter_than_context(capsys, bad_inputs):
    assert_user_error(capsys, ["pretrain", "--data", bad_inputs / "short.txt", "--out", bad_inputs / "o", *TINY], "too short")


def test_vocab_below_byte_alphabet(capsys, bad_inputs, corpus_file):
    assert_user_error(capsys, ["pretrain", "--data", corpus_file, "--out", bad_inputs / "o", "--vocab-size", "100", *TINY],
                      "100", "260")
    assert_user_error(capsys, ["tokenizer", "train", "--data", corpus_file, "--vocab-size", "200", "--out", bad_inputs / "t"],
                      "200", "260")


def test_unknown_preset_lists_known_ones(capsys, bad_inputs, corpus_file):
    assert_user_error(capsys, ["pretrain", "--data", corpus_file, "--out", bad_inputs / "o", "--preset", "huge"],
                      "huge", "tiny", "small", "base")


def test_resume_from_a_directory_that_is_not_a_checkpoint(capsys, bad_inputs):
    assert_user_error(capsys, ["pretrain", "--resume", bad_inputs / "not_a_model"], "not_a_model", "config.json")
    assert_user_error(capsys, ["pretrain", "--resume", bad_inputs / "missing"], "missing")


def test_unwritable_output_directory(capsys, bad_inputs, corpus_file):
    assert_user_error(capsys, ["pretrain", "--data", corpus_file, "--out", bad_inputs / "a_file" / "sub", *TINY], "cannot write")
    assert_user_error(capsys, ["tokenizer", "train", "--data", corpus_file, "--vocab-size", "300",
                               "--out", bad_inputs / "a_file" / "sub"], "cannot write")


def test_tokenizer_dir_that_is_not_a_tokenizer(capsys, bad_inputs, corpus_file):
    assert_user_error(capsys, ["pretrain", "--data", corpus_file, "--out", bad_inputs / "o",
                               "--tokenizer", bad_inputs / "not_a_model", *TINY], "not_a_model")


def test_every_flag_documents_its_default():
    from lmforge.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("pretrain",):
        for action in sub.choices[name]._actions:
            if action.option_strings and action.dest not in ("help", "out", "resume", "tokenizer", "dry_run", "progress", "overwrite"):
                assert "default" in (action.help or ""), action.option_strings


def test_a_reader_that_goes_away_is_no_traceback():
    """`lmforge ... | head`: when the pipe closes, stop quietly with the SIGPIPE status, no traceback."""
    import subprocess
    import sys

    code = ("import lmforge.cli as c, lmforge.cli.store as s\n"
            "def flood(args):\n"
            "    for i in range(10**6): print('line', i)\n"
            "    return 0\n"
            "s.cmd_list = flood\n"
            "raise SystemExit(c.main(['list']))\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline() == b"line 0\n"
    p.stdout.close()  # the reader leaves, as `head -1` does
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


# --- generate / score ------------------------------------------------------------------------------------
@pytest.fixture()
def model_dir(tmp_path, tiny_tokenizer):
    return save_tiny_model(tmp_path / "tiny-src", tiny_tokenizer, embedding_scale=8.0)


def test_generate_streams_text_and_shows_probabilities(capsys, model_dir):
    code, out, _ = run(capsys, "generate", model_dir, "--prompt", "the model", "--max-new-tokens", "6", "--seed", "1", "--no-fast")
    assert code == 0 and out.endswith("\n")
    code, out, _ = run(capsys, "generate", model_dir, "--prompt", "the", "--max-new-tokens", "4", "--temperature", "0",
                       "--show-probs", "--top-logprobs", "3", "--no-fast")
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].startswith("token") and len(lines) == 1 + 4 + 1 and "%" in lines[1]
    code, out, _ = run(capsys, "generate", model_dir, "--prompt", "the", "--max-new-tokens", "4", "--beams", "3",
                       "--n-best", "2", "--no-fast")
    assert code == 0 and "beam 1: score" in out and "beam 2: score" in out


def test_generate_beams_cut_at_stop_strings_as_the_server_does(capsys, model_dir):
    """The CLI prints what the one beam finalisation (`finish_beams`) makes of the hypotheses."""
    from conftest import load_engine
    from lmforge.engine.sampling import SamplingParams

    params = SamplingParams(temperature=0, num_beams=3, max_new_tokens=8)
    best = load_engine(model_dir).beam_search("the", params)[0]
    stop = best.text[3:5]
    code, out, _ = run(capsys, "generate", model_dir, "--prompt", "the", "--max-new-tokens", "8", "--beams", "3",
                       "--stop", stop, "--no-fast")
    want = load_engine(model_dir).beam_search("the", SamplingParams(temperature=0, num_beams=3, max_new_tokens=8,
                                                                    stop=[stop]))[0]
    head, text = out.split("\n", 1)
    assert code == 0 and text == want.text + "\n" and stop not in text
    assert head.endswith(f"{want.n_tokens} tokens, stop)")


def test_score_reports_likelihood(capsys, model_dir):
    code, out, _ = run(capsys, "score", model_dir, "--text", "the model reads the next word.", "--no-fast")
    assert code == 0 and "perplexity" in out and "total log-likelihood" in out and "most surprising" in out


@pytest.mark.parametrize("argv, fragment", [
    (["--max-new-tokens", "0"], "expected a number >= 1"),
    (["--temperature", "-1"], "temperature"),
    (["--temperature", "nan"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-p", "0"], "top_p"),
    (["--min-p", "2"], "min_p"),
    (["--beams", "2", "--temperature", "0.7"], "beam"),
])
def test_generate_bad_sampling_values(capsys, model_dir, argv, fragment):
    code, out, err = run(capsys, "generate", model_dir, "--prompt", "the", "--no-fast", *argv)
    assert code == 2 and fragment in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_generate_prompt_longer_than_context(capsys, model_dir):
    assert_user_error(capsys, ["generate", model_dir, "--prompt", "the model reads the value. " * 40, "--no-fast"],
                      "context")


def test_generate_on_a_directory_that_is_not_a_model(capsys, tmp_path):
    assert_user_error(capsys, ["generate", tmp_path, "--prompt", "x"], "config.json")


# ---------------------------------------------------------------------------------------------------
# The model store and export through the CLI
# ---------------------------------------------------------------------------------------------------
def test_store_commands_end_to_end(capsys, tmp_path, model_dir):
    code, out, _ = run(capsys, "list")
    assert code == 0 and "no models yet" in out
    code, out, _ = run(capsys, "import", model_dir, "--name", "tiny")
    assert code == 0 and "imported" in out and "tiny:latest" in out
    code, out, _ = run(capsys, "list")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ARCHITECTURE", "PARAMETERS", "DTYPE/QUANT", "SIZE", "MODIFIED"]
    assert lines[1].split()[:4] == ["tiny:latest", "Llama", "119.1K", "float32"]
    code, out, _ = run(capsys, "show", "tiny")
    assert code == 0 and "architecture" in out and "LlamaForCausalLM" in out and "Lineage" in out
    code, out, _ = run(capsys, "show", "tiny", "--json")
    assert json.loads(out)["name"] == "tiny:latest"

    (tmp_path / "Modelfile").write_text('FROM tiny\nSYSTEM """Be brief."""\nPARAMETER temperature 0\n'
                                        'PARAMETER num_predict 6\n')
    code, out, _ = run(capsys, "create", "brief", "-f", tmp_path / "Modelfile")
    assert code == 0 and "created brief:latest" in out
    code, out, _ = run(capsys, "show", "brief", "--modelfile")
    assert 'SYSTEM """Be brief."""' in out and "PARAMETER temperature 0" in out
    code, out, _ = run(capsys, "show", "brief", "--system")
    assert out.strip() == "Be brief."

    # The Modelfile's defaults apply (greedy, 6 tokens); a flag overrides them.
    code, out1, _ = run(capsys, "generate", "brief", "--prompt", "the model", "--no-fast")
    code, out2, _ = run(capsys, "generate", "tiny", "--prompt", "the model", "--temperature", "0",
                        "--max-new-tokens", "6", "--no-fast")
    assert code == 0 and out1 == out2
    code, out3, _ = run(capsys, "generate", "brief", "--prompt", "the model", "--max-new-tokens", "2", "--no-fast")
    assert len(out3) < len(out1)

    assert run(capsys, "cp", "tiny", "tiny:copy")[0] == 0
    code, out, _ = run(capsys, "rm", "tiny", "tiny:copy")
    assert code == 0 and "deleted tiny:latest" in out and "deleted tiny:copy" in out
    code, out, _ = run(capsys, "list")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["brief:latest"]


def test_store_command_mistakes(capsys, tmp_path, model_dir):
    assert_user_error(capsys, ["import", tmp_path / "nowhere"], "no such file or directory")
    assert_user_error(capsys, ["import", model_dir, "--name", "../evil"], "invalid model name")
    assert run(capsys, "import", model_dir, "--name", "tiny")[0] == 0
    assert_user_error(capsys, ["import", model_dir, "--name", "tiny"], "already exists", "--overwrite")
    assert_user_error(capsys, ["show", "nosuch"], "no model named nosuch")
    assert_user_error(capsys, ["rm", "nosuch"], "no model named nosuch:latest")
    assert_user_error(capsys, ["cp", "tiny", "tiny"], "already exists")
    assert_user_error(capsys, ["generate", "nosuch", "--prompt", "x"], "no model named nosuch")
    (tmp_path / "Modelfile").write_text("FROM tiny\nPARAMETER temperature hot\n")
    assert_user_error(capsys, ["create", "x", "-f", tmp_path / "Modelfile"], "Modelfile:2", "needs a number")
    assert_user_error(capsys, ["export", "tiny", "--format", "hf", "--out", tmp_path / "o", "--type", "q8_0"], "--type is for")


def test_export_hf_loads_in_transformers_with_identical_logits(capsys, tmp_path, model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.loaders.model_dir import load_model

    code, out, err = run(capsys, "export", model_dir, "--format", "hf", "--out", tmp_path / "hf")
    assert code == 0, err
    ours = load_model(model_dir)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=0)
    capsys.readouterr()  # transformers' own progress bar
    assert_user_error(capsys, ["export", model_dir, "--format", "hf", "--out", tmp_path / "hf"], "already exists")


def test_export_refuses_shapes_transformers_cannot_hold(capsys, tmp_path, tiny_tokenizer):
    from lmforge.train.checkpointer import Checkpointer
    from lmforge.model.gpt import GPT
    from lmforge.presets import get_preset

    cfg = get_preset("tiny", vocab_size=tiny_tokenizer.vocab_size, positions="sinusoidal")
    Checkpointer(tmp_path / "sin", tokenizer=tiny_tokenizer).save(GPT(cfg), None, [], {})
    assert_user_error(capsys, ["export", tmp_path / "sin", "--format", "hf", "--out", tmp_path / "o"],
                      "sinusoidal positions")


def test_pretrain_name_adds_the_model_to_the_store(capsys, tmp_path, corpus_file):
    code, out, err = run(capsys, "pretrain", "--data", corpus_file, "--out", tmp_path / "m", "--name", "mine", *TINY)
    assert code == 0, err
    from lmforge import store

    info = store.show("mine")
    assert info["lineage"]["objective"] == "pretrain" and info["lineage"]["data"] == str(corpus_file)
    assert_user_error(capsys, ["pretrain", "--data", corpus_file, "--out", tmp_path / "n", "--name", "Bad Name", *TINY],
                      "invalid model name")


def test_gguf_export_import_run_in_place_and_in_the_store(capsys, tmp_path, model_dir):
    import torch

    from lmforge.loaders.model_dir import load_model
    from lmforge.loaders.auto import load

    out = tmp_path / "tiny.gguf"
    code, text, err = run(capsys, "export", model_dir, "--format", "gguf", "--type", "f32", "--out", out)
    assert code == 0 and "gguf f32" in text, err
    ours, back = load_model(model_dir), load(out).model
    ids = torch.randint(0, ours.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), ours(ids), atol=1e-5, rtol=0)
    # A .gguf path runs in place, and gives the same greedy text as the directory it came from.
    argv = ["--prompt", "the model", "--temperature", "0", "--max-new-tokens", "8", "--no-fast"]
    assert run(capsys, "generate", out, *argv)[1] == run(capsys, "generate", model_dir, *argv)[1]
    assert run(capsys, "export", model_dir, "--format", "gguf", "--type", "q8_0", "--out", tmp_path / "q8.gguf")[0] == 0
    code, text, err = run(capsys, "import", tmp_path / "q8.gguf")
    assert code == 0 and "as q8:latest" in text, err
    code, text, _ = run(capsys, "list")
    row = text.splitlines()[1].split()
    assert row[:4] == ["q8:latest", "llama", "119.1K", "Q8_0"]
    code, text, _ = run(capsys, "show", "q8")
    assert "Template" in text and "<|im_start|>" in text
    code, text, _ = run(capsys, "generate", "q8", "--prompt", "the model", "--max-new-tokens", "3")
    assert code == 0
    # Hostile: a truncated GGUF in the store is listed as damaged and can be removed.
    f = store_path("q8") / "model.gguf"
    f.write_bytes(f.read_bytes()[:1000])
    code, text, _ = run(capsys, "list")
    assert "DAMAGED" in text
    assert_user_error(capsys, ["generate", "q8", "--prompt", "x"], "model.gguf")
    assert run(capsys, "rm", "q8")[0] == 0
    assert_user_error(capsys, ["import", tmp_path / "nope.gguf"], "no such file")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\xff" * 20)
    assert_user_error(capsys, ["import", tmp_path / "bad.gguf"], "bad.gguf")
    assert_user_error(capsys, ["export", model_dir, "--format", "gguf", "--out", tmp_path], "is a directory")


def store_path(name):
    from lmforge import store

    return store.model_path(name)


# ---------------------------------------------------------------------------------------------------
# finetune / align / merge: the commands of the fine-tuning issue, end to end
# ---------------------------------------------------------------------------------------------------
def _chat_jsonl(path, n=24):
    words = ["alpha", "beta", "gamma"]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {words[i % 3]}"},
                                                     {"role": "assistant", "content": f"the model reads {words[i % 3]}."}]}) + "\n"
                            for i in range(n)))
    return path


def _prefs_jsonl(path, n=24):
    words = ["alpha", "beta", "gamma"]
    path.write_text("".join(json.dumps({"prompt": f"say {words[i % 3]}", "chosen": f"the model reads {words[i % 3]}.",
                                        "rejected": f"the data counts {words[(i + 1) % 3]}."}) + "\n" for i in range(n)))
    return path


def test_finetune_lora_merge_align_from_the_command_line(capsys, tmp_path, model_dir):
    import torch

    from lmforge.loaders.auto import load

    chat, prefs = _chat_jsonl(tmp_path / "chat.jsonl"), _prefs_jsonl(tmp_path / "prefs.jsonl")
    code, out, err = run(capsys, "finetune", str(model_dir), "--data", str(chat), "--out", str(tmp_path / "sft"),
                         "--max-steps", "3", "--batch-size", "4", "--no-progress")
    assert code == 0 and (tmp_path / "sft" / "model.safetensors").is_file()
    code, out, err = run(capsys, "finetune", str(model_dir), "--data", str(chat), "--out", str(tmp_path / "lora"),
                         "--lora", "--lora-rank", "4", "--max-steps", "3", "--batch-size", "4", "--no-progress")
    assert code == 0 and (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert "with LoRA rank 4" in out + err
    code, out, err = run(capsys, "merge", str(tmp_path / "lora"), "--out", str(tmp_path / "merged"))
    assert code == 0
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        adapted = load(tmp_path / "lora", merge=False).model.eval()(ids)
        merged = load(tmp_path / "merged").model.eval()(ids)
    assert torch.allclose(adapted, merged, atol=1e-5)
    code, out, err = run(capsys, "align", str(tmp_path / "sft"), "--data", str(prefs), "--out", str(tmp_path / "dpo"),
                         "--method", "dpo", "--beta", "0.1", "--max-steps", "2", "--batch-size", "4", "--no-progress",
                         "--name", "cli-dpo")
    assert code == 0 and (tmp_path / "dpo" / "reference_logps.safetensors").is_file()
    assert "rewards" in out + err
    code, out, err = run(capsys, "show", "cli-dpo", "--json")
    assert code == 0 and json.loads(out)["lineage"]["objective"] == "dpo"


def test_finetune_and_align_mistakes_are_one_line(capsys, tmp_path, model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}\n'
                   "not json\n")
    assert_user_error(capsys, ["finetune", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "x")],
                      "no usable", "line 1", "line 2")
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}) + "\n")
    assert_user_error(capsys, ["align", str(model_dir), "--data", str(same), "--out", str(tmp_path / "y")],
                      "line 1", "chosen")
    chat = _chat_jsonl(tmp_path / "chat.jsonl")
    assert_user_error(capsys, ["finetune", str(model_dir), "--data", str(chat), "--out", str(tmp_path / "z"), "--lora",
                               "--lora-targets", "no_such_proj"], "no_such_proj", "q_proj")
    assert_user_error(capsys, ["merge", str(model_dir), "--out", str(tmp_path / "m")], "adapter")


@pytest.mark.parametrize("argv", [
    ["import", "some/dir"],
    ["pull", "owner/repo"],
    ["pretrain", "--data", "x.txt", "--out", "o"],
    ["finetune", "m", "--data", "d.jsonl", "--out", "o"],
    ["align", "m", "--data", "d.jsonl", "--out", "o"],
    ["merge", "adapter", "--out", "o"],
])
@pytest.mark.parametrize("bad", ["", "Bad Name", "../up"])
def test_an_invalid_store_name_is_refused_before_any_work(capsys, tmp_path, argv, bad):
    """`--name ''` used to be taken as 'no name' (exit 0, a default name); every command refuses it, and
    any other invalid name, with the name rule, before it reads a file or trains a step."""
    line = assert_user_error(capsys, [*argv, "--name", bad], f"invalid model name {bad!r}")
    assert "model names are NAME or NAME:TAG" in line or "'..' is not allowed" in line  # the rule itself


from test_modelfile import HOSTILE_TEMPLATES  # noqa: E402 - kept with the tests it belongs to, at the end


@pytest.mark.parametrize("template, says", HOSTILE_TEMPLATES)
def test_create_refuses_a_template_that_fails_or_breaks_the_limits(capsys, tmp_path, model_dir, template, says):
    """Before: `lmforge create` hung compiling the gigabyte templates and stored the others (exit 0), which then
    froze, flooded or failed every chat with the model. Now: exit 2, one line, nothing stored."""
    (tmp_path / "Modelfile").write_text(f'FROM {model_dir}\nTEMPLATE """{template}"""\n')
    assert_user_error(capsys, ["create", "hostile", "-f", tmp_path / "Modelfile"], "Modelfile:2: TEMPLATE refused", says)
    assert "no models yet" in run(capsys, "list")[1]  # nothing was stored


def test_a_model_that_does_not_fit_is_refused_before_loading(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    """One line with what it needs and what there is, exit 2, nothing loaded (issue 14)."""
    import lmforge.footprint as footprint
    from lmforge.loaders import auto

    model = save_tiny_model(tmp_path / "m", tiny_tokenizer)
    monkeypatch.setattr(footprint, "free_memory", lambda device="cpu": 1 << 20)
    monkeypatch.setattr(auto, "load", lambda *a, **k: pytest.fail("loaded a model that does not fit"))
    assert main(["generate", str(model), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not fit in memory" in err and "1.0 MiB" not in err and "GiB" in err


def test_export_of_a_gguf_reads_its_blocks_as_float(tmp_path, tiny_tokenizer, capsys):
    from lmforge.loaders.auto import load
    from lmforge.loaders.export import export_gguf

    model = save_tiny_model(tmp_path / "m", tiny_tokenizer)
    export_gguf(load(model), tmp_path / "m.gguf", qtype="q8_0")
    assert main(["export", str(tmp_path / "m.gguf"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
