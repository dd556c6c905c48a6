"""Listing and showing the store (lmforge/store_info.py) when entries are damaged: whatever is wrong with one
entry (a config nested 200,000 deep, values of the wrong type, a config its weights disagree with, any
exception at all while reading it) is that entry's `DAMAGED: reason` line; the other entries, `lmforge list`,
`lmforge show` and the server's model list keep working."""

from __future__ import annotations

import json

import pytest

from conftest import save_tiny_model
from lmforge import store
from lmforge.cli import main
from lmforge.model.gpt import GPT


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("src") / "tiny", tiny_tokenizer)


def _damaged(tiny_dir, name: str, config_text: str | None = None, **edits):
    path = store.add(name, tiny_dir)
    f = path / "config.json"
    if config_text is None:
        config_text = json.dumps({**json.loads(f.read_text()), **edits})
    f.write_text(config_text)
    return path


DEEP = "[" * 200_000 + "]" * 200_000  # before: RecursionError out of list_models, show, serve, /v1/models

DAMAGES = {
    "nested-200k-deep": (dict(config_text=DEEP), "config.json: not usable JSON (nested too deeply to parse)"),
    "nested-100-deep": (dict(config_text="[" * 100 + "]" * 100), "nested more than 64 levels deep"),
    "string-eps": (dict(rms_norm_eps="1e-5"), "config.json: rms_norm_eps must be a positive number, got '1e-5'"),
    "context-1e9": (dict(max_position_embeddings=10**9), "max_position_embeddings is 1000000000, beyond"),
    "layers-the-weights-lack": (dict(num_hidden_layers=4000),
                                "weights: config.json says 4000 layers, but the blocks in the weights are 2"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_entry_is_listed_as_damaged_beside_the_others(tiny_dir, monkeypatch, damage):
    store.add("good", tiny_dir)
    kwargs, reason = DAMAGES[damage]
    _damaged(tiny_dir, "bad", **kwargs)
    monkeypatch.setattr(GPT, "__init__", lambda self, cfg: pytest.fail("listing built a model"))
    entries = {e.name: e for e in store.list_models()}
    assert list(entries) == ["bad:latest", "good:latest"]
    assert entries["good:latest"].error is None and entries["good:latest"].parameters
    error = entries["bad:latest"].error
    assert reason in error and "\n" not in error and len(error) < 300, error
    info = store.show("bad")
    assert info["error"] == error and info["name"] == "bad:latest"
    json.dumps(info, indent=2, default=str)  # what `lmforge show --json` prints: nothing too deep to dump


@pytest.mark.parametrize("exc", [MemoryError("out of memory"), OverflowError("int too large"),
                                 RecursionError("maximum recursion depth exceeded"), TypeError("unhashable"),
                                 KeyError("x"), OSError(5, "Input/output error")])
def test_any_exception_while_reading_an_entry_is_its_damaged_line(tiny_dir, monkeypatch, exc):
    from lmforge.loaders import hf_read as hf

    store.add("good", tiny_dir)
    store.add("bad", tiny_dir)
    real = hf.config_from_hf

    def flaky(d, *, source):
        if d.get("_bad"):
            raise exc
        return real(d, source=source)

    f = store.models_root() / "bad" / "latest" / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "_bad": True}))
    monkeypatch.setattr(hf, "config_from_hf", flaky)
    entries = {e.name: e for e in store.list_models()}
    assert entries["good:latest"].error is None
    assert entries["bad:latest"].error.startswith(type(exc).__name__ + ": ")
    assert "\n" not in entries["bad:latest"].error


def test_cli_list_and_show_keep_working(tiny_dir, capsys):
    store.add("good", tiny_dir)
    _damaged(tiny_dir, "deep", config_text=DEEP)
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("deep:latest") and "DAMAGED: config.json: not usable JSON" in out[1]
    assert out[2].startswith("good:latest") and "Llama" in out[2]
    assert main(["show", "deep"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "  deep:latest   [DAMAGED: config.json: not usable JSON (nested too deeply to parse)]"
    assert "Traceback" not in err
    assert main(["show", "deep", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["error"].startswith("config.json: not usable JSON")


def test_the_server_starts_and_lists_the_good_entries(tiny_dir, caplog):
    """`lmforge serve` with no model serves the store: it lists it at start and on every GET /v1/models."""
    import httpx

    from lmforge.serve.models import ModelRegistry
    from tests.serve.live import start_server

    store.add("good", tiny_dir)
    _damaged(tiny_dir, "deep", config_text=DEEP)
    _damaged(tiny_dir, "eps", rms_norm_eps="1e-5")
    assert [n for n, _ in ModelRegistry(None).ids()] == ["good"]  # what `lmforge serve` does at start
    s = start_server(None, fast=False)
    try:
        r = httpx.get(s.base_url + "/v1/models")
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["good"]
        assert httpx.get(s.base_url + "/v1/models").status_code == 200
        r = httpx.post(s.base_url + "/v1/completions", json={"model": "deep", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 500 and r.json()["error"]["code"] == "model_load_failed"
        r = httpx.post(s.base_url + "/v1/completions", json={"model": "good", "prompt": "the", "max_tokens": 1})
        assert r.status_code == 200
    finally:
        s.stop()
    damaged_logs = [r.getMessage() for r in caplog.records if "damaged store entry" in r.getMessage()]
    names = sorted(m.split()[2].rstrip(",") for m in damaged_logs)
    assert names == ["deep:latest", "deep:latest", "eps:latest", "eps:latest"]  # once for each of the two registries


# ---------------------------------------------------------------------------------------------------
# The quantization an entry records (lmforge quantize) or its GGUF header states, in list and show
# ---------------------------------------------------------------------------------------------------
def test_quantization_record_and_gguf_file_type_are_listed_and_shown(tiny_dir, tiny_tokenizer, tmp_path, capsys):
    from lmforge.loaders.auto import load
    from lmforge.loaders.gguf import write_gguf

    model = load(tiny_dir).model
    gguf = tmp_path / "t.gguf"
    write_gguf(gguf, model.config, model.state_dict(), tiny_tokenizer, qtype="q4_k_m")
    store.import_model(gguf, "imported")
    path = store.add("recorded", tiny_dir)  # a model directory whose lmforge.json carries a quantization record
    meta = json.loads((path / "lmforge.json").read_text())
    report = {"dppl_percent": 0.25, "kld": 0.0012, "top1": 99.06}
    (path / "lmforge.json").write_text(json.dumps({**meta, "quantization": {"type": "Q8_0", "report": report}}))
    broken = store.add("broken", tiny_dir)
    (broken / "lmforge.json").write_text(json.dumps({"quantization": ["not", "an", "object"]}))

    entries = {e.name: e for e in store.list_models()}
    assert entries["imported:latest"].quantization == "Q4_K_M"
    assert entries["recorded:latest"].quantization == "Q8_0"
    assert entries["broken:latest"].quantization is None and entries["broken:latest"].error is None
    assert main(["list"]) == 0
    rows = {ln.split()[0]: ln.split() for ln in capsys.readouterr().out.splitlines()[1:]}
    assert rows["imported:latest"][3] == "Q4_K_M" and rows["recorded:latest"][3] == "Q8_0"
    assert rows["broken:latest"][3] == "float32"

    assert main(["show", "recorded"]) == 0
    out = capsys.readouterr().out
    assert "quantization         Q8_0, dPPL +0.25%, KLD 0.00120, top-1 99.1%" in out
    assert main(["show", "imported"]) == 0
    assert "quantization         Q4_K_M" in capsys.readouterr().out
    assert store.show(str(gguf))["quantization"] == {"type": "Q4_K_M"}  # a file outside the store too
    assert store.show("broken")["quantization"] is None
