"""The local model store: hostile names never escape it; add/list/show/rm/cp; damaged entries; resolve()."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge import paths, store
from lmforge.errors import UserError


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    from lmforge.train.checkpointer import Checkpointer
    from lmforge.model.gpt import GPT
    from lmforge.presets import get_preset

    d = tmp_path_factory.mktemp("src") / "tiny-model"
    Checkpointer(d, tokenizer=tiny_tokenizer, lineage={"parent": "scratch"}).save(
        GPT(get_preset("tiny", vocab_size=tiny_tokenizer.vocab_size)), None, [], {})
    return d


# ---------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(), st.text(alphabet="abc.:/\\-_~0\x00 ", max_size=12),
                 st.from_regex(store.NAME_RE, fullmatch=True)))
def test_fuzz_names_never_escape_the_store(name):
    try:
        store.validate_name(name)
    except UserError:
        return
    root = store.models_root().resolve()
    path = store.model_path(name)
    assert path.is_relative_to(root) and path != root
    assert path.parent.parent == root  # exactly models/NAME/TAG, nothing deeper or shallower


@pytest.mark.parametrize("name", [
    "../x", "/etc/passwd", "a/b", "a\\b", "..", ".", ".hidden", "x" * 65, "A", "Tiny", "na\x00me", "con:",
    "x:", "x:y:z", "", " ", "x\n", "a..b", "x:..", "x:.", "x:.hidden", "x:" + "t" * 33, "con", "nul.txt",
    "x:aux", "-x", "_x", "~", "~root", "é", "x y",
])
def test_hostile_names_are_refused_before_touching_disk(name, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("file-system call before the name was checked")

    monkeypatch.setattr(paths, "models_root", boom)  # where model_path looks the store up
    with pytest.raises(UserError, match="invalid model name"):
        store.validate_name(name)
    with pytest.raises(UserError, match="invalid model name"):
        store.model_path(name)


@pytest.mark.parametrize("name, norm", [
    ("tiny", "tiny:latest"), ("tiny:latest", "tiny:latest"), ("llama-3.2_1b:q4", "llama-3.2_1b:q4"),
    ("x" * 64 + ":" + "t" * 32, "x" * 64 + ":" + "t" * 32), ("0", "0:latest"),
])
def test_valid_names_are_normalised(name, norm):
    assert store.validate_name(name) == norm
    base, tag = norm.split(":")
    assert store.model_path(name) == store.models_root().resolve() / base / tag


def test_invalid_name_error_states_the_rule():
    with pytest.raises(UserError) as e:
        store.validate_name("Bad/Name")
    assert "a-z 0-9" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------------
def test_add_list_show_cp_rm_round_trip(tiny_model_dir):
    assert store.list_models() == []
    path = store.add("tiny", tiny_model_dir)
    assert path == store.model_path("tiny:latest") and (path / "config.json").is_file()
    assert tiny_model_dir.is_dir()  # copied, not moved
    assert not [p for p in store.models_root().iterdir() if p.name.startswith(".")]  # no temp dirs left

    (entry,) = store.list_models()
    assert entry.name == "tiny:latest" and entry.path == path and entry.error is None
    assert entry.architecture != "?" and entry.parameters and entry.parameters > 0
    assert entry.size_bytes >= sum(f.stat().st_size for f in tiny_model_dir.rglob("*") if f.is_file()) > 0
    assert entry.modified > 0

    (path / "modelfile.json").write_text(json.dumps({"system": "You are terse.", "parameters": {"temperature": 0.2}}))
    (path / "LICENSE").write_text("MIT")
    (path / "README.md").write_text("# tiny")
    info = store.show("tiny")
    assert info["name"] == "tiny:latest" and info["error"] is None
    assert info["config"]["architectures"] == [entry.architecture]
    assert info["system"] == "You are terse." and info["defaults"] == {"temperature": 0.2}
    assert info["lineage"].get("parent") == "scratch"
    assert info["license"] == "MIT" and info["readme"] == "# tiny"
    assert info["chat_template"] is None or isinstance(info["chat_template"], str)

    cp = store.copy("tiny", "tiny:v2")
    assert cp == store.model_path("tiny:v2") and (cp / "README.md").read_text() == "# tiny"
    assert [e.name for e in store.list_models()] == ["tiny:latest", "tiny:v2"]
    with pytest.raises(UserError, match="already exists"):
        store.copy("tiny", "tiny:v2")
    with pytest.raises(UserError, match="no model named"):
        store.copy("absent", "other")

    store.remove("tiny")
    assert [e.name for e in store.list_models()] == ["tiny:v2"]
    store.remove("tiny:v2")
    assert store.list_models() == [] and not (store.models_root() / "tiny").exists()
    with pytest.raises(UserError, match="no model named tiny:latest"):
        store.remove("tiny")
    with pytest.raises(UserError, match="no model named"):
        store.show("tiny")


def test_show_gives_the_shape_the_loaders_read(tiny_model_dir, tmp_path):
    from lmforge.loaders.model_dir import load_config

    store.add("tiny", tiny_model_dir)
    cfg = load_config(tiny_model_dir)
    info = store.show("tiny")
    assert (info["context_length"], info["embedding_length"], info["layers"]) == (cfg.context_length, cfg.d_model,
                                                                                   cfg.n_layers)
    # Whatever the file calls them: a sliding-window Mistral keeps its whole context, each layer attending
    # over its window, which show says too.
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    (mistral / "config.json").write_text(json.dumps({
        "architectures": ["MistralForCausalLM"], "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "sliding_window": 512}))
    info = store.show(str(mistral))
    assert (info["context_length"], info["embedding_length"], info["layers"]) == (4096, 64, 3)
    assert info["sliding_window"] == "512" and info["experts"] is None
    (mistral / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "hidden_size": 64}))
    info = store.show(str(mistral))
    assert info["error"] and (info["context_length"], info["embedding_length"], info["layers"]) == (None, None, None)


def test_chat_template_from_tokenizer_config_or_jinja(tiny_model_dir):
    path = store.add("t", tiny_model_dir)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert store.show("t")["chat_template"] == "{{ messages }}"
    (path / "tokenizer_config.json").write_text(json.dumps({}))
    (path / "chat_template.jinja").write_text("J")
    assert store.show("t")["chat_template"] == "J"


def test_add_refuses_existing_name_unless_overwrite(tiny_model_dir):
    store.add("m", tiny_model_dir)
    with pytest.raises(UserError, match="already exists"):
        store.add("m:latest", tiny_model_dir)
    (store.model_path("m") / "marker").write_text("old")
    path = store.add("m", tiny_model_dir, overwrite=True)
    assert not (path / "marker").exists() and (path / "config.json").is_file()
    assert [e.name for e in store.list_models()] == ["m:latest"]
    assert not [p for p in store.models_root().iterdir() if p.name.startswith(".")]


def test_add_refuses_non_model_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model directory"):
        store.add("x", tmp_path / "empty")
    with pytest.raises(UserError, match="not a model directory"):
        store.add("x", tmp_path / "missing")
    (tmp_path / "f.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="not a model directory"):
        store.add("x", tmp_path / "f.gguf")
    with pytest.raises(UserError, match="invalid model name"):
        store.add("../x", tmp_path)
    assert store.list_models() == []


def test_add_move(tiny_model_dir, tmp_path):
    import shutil

    src = tmp_path / "to-move"
    shutil.copytree(tiny_model_dir, src)
    path = store.add("moved", src, move=True)
    assert not src.exists() and (path / "config.json").is_file()


# ---------------------------------------------------------------------------------------------------
# Damaged entries
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["delete", "garble", "not-an-object", "unknown-arch"])
def test_damaged_entry_is_listed_with_error_and_removable(tiny_model_dir, damage):
    store.add("good", tiny_model_dir)
    bad = store.add("bad", tiny_model_dir)
    cfg = bad / "config.json"
    if damage == "delete":
        cfg.unlink()
    elif damage == "garble":
        cfg.write_bytes(b"{not json\xff")
    elif damage == "not-an-object":
        cfg.write_text("[1, 2]")
    else:
        cfg.write_text(json.dumps({"architectures": ["NoSuchForCausalLM"]}))

    entries = {e.name: e for e in store.list_models()}
    assert list(entries) == ["bad:latest", "good:latest"]
    assert entries["good:latest"].error is None
    assert entries["bad:latest"].error and "\n" not in entries["bad:latest"].error
    assert entries["bad:latest"].parameters is None
    assert store.show("bad")["error"]

    store.remove("bad")
    assert [e.name for e in store.list_models()] == ["good:latest"]


def test_list_ignores_temp_dirs_and_strays(tiny_model_dir):
    store.add("good", tiny_model_dir)
    root = store.models_root()
    (root / ".tmp-123").mkdir()
    (root / "README").write_text("stray file")
    (root / "UPPER" / "latest").mkdir(parents=True)
    (root / "good" / ".partial").mkdir()
    assert [e.name for e in store.list_models()] == ["good:latest"]


def test_list_on_missing_store_is_empty():
    assert not store.models_root().exists()
    assert store.list_models() == []


def test_model_path_refuses_planted_symlink_escape(tmp_path):
    (store.models_root()).mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    try:
        os.symlink(outside, store.models_root() / "evil")
    except (OSError, NotImplementedError):
        pytest.skip("no symlinks here")
    with pytest.raises(UserError, match="outside the model store"):
        store.model_path("evil")


# ---------------------------------------------------------------------------------------------------
# resolve()
# ---------------------------------------------------------------------------------------------------
def test_resolve_precedence(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    stored = store.add("tiny", tiny_model_dir)
    assert store.resolve("tiny") == stored
    assert store.resolve("tiny:latest") == stored
    assert store.resolve(str(tiny_model_dir)) == tiny_model_dir

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "tiny")
    assert store.resolve("tiny") == Path("tiny")  # a model directory here wins over the store name
    assert store.resolve("./tiny") == Path("./tiny")
    assert store.resolve("tiny:latest") == stored  # ":" is not a path separator; no such dir here

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert store.resolve("m.gguf") == Path("m.gguf")
    assert store.resolve(str(tmp_path / "m.gguf")) == tmp_path / "m.gguf"

    (tmp_path / "plain").mkdir()  # a directory that is not a model does not shadow anything
    store.add("plain", tiny_model_dir)
    assert store.resolve("plain") == store.model_path("plain")


def test_resolve_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for ref in ["nothing", "Bad", "x:y:z", "", "na\x00me"]:
        with pytest.raises(UserError, match="no model named .* \\(see lmforge list\\)"):
            store.resolve(ref)
    for ref in ["./nothing", "../nothing", "~/no-such-model-here", "a/b", str(tmp_path / "missing")]:
        with pytest.raises(UserError, match="no such file or directory"):
            store.resolve(ref)
    (tmp_path / "notmodel").mkdir()
    with pytest.raises(UserError, match="not a model directory"):
        store.resolve("./notmodel")
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="not a model directory"):
        store.resolve("./f.bin")


def test_resolve_path_like_ref_never_falls_back_to_store(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store.add("tiny", tiny_model_dir)
    with pytest.raises(UserError, match="no such file or directory"):
        store.resolve("./tiny")


# ---------------------------------------------------------------------------------------------------
# import / create / pull
# ---------------------------------------------------------------------------------------------------
def test_import_copies_only_model_files_and_records_lineage(tiny_model_dir, tmp_path):
    import shutil

    src = tmp_path / "download"
    shutil.copytree(tiny_model_dir, src)
    (src / "pytorch_model.bin").write_bytes(b"not a pickle we will ever open")
    (src / "original").mkdir()
    (src / "original" / "consolidated.00.pth").write_bytes(b"x")
    (src / "LICENSE").write_text("Apache-2.0\n")
    path = store.import_model(src, "tiny")
    names = {p.name for p in path.iterdir()}
    assert "pytorch_model.bin" not in names and "original" not in names and "trainer_state" not in names
    assert {"config.json", "model.safetensors", "tokenizer.json", "LICENSE", "lmforge.json"} <= names
    info = store.show("tiny")
    assert info["lineage"]["parent"] == "scratch"  # the model's own lineage is kept
    assert info["lineage"]["imported_from"] == str(src.resolve()) and info["lineage"]["source_format"] == "hf"
    assert info["license"].startswith("Apache")
    from lmforge.loaders.auto import load

    loaded = load(store.resolve("tiny"))
    assert loaded.model.config.vocab_size == loaded.tokenizer.vocab_size


def test_import_validates_before_copying(tiny_model_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="mlp.gate_proj.weight.*has shape"):
        store.import_model(bad, "bad")
    cfg["architectures"] = ["FalconForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="not supported.*Llama/Mistral"):
        store.import_model(bad, "bad")
    assert store.list_models() == []
    assert not any(p.name.startswith(".import") for p in store.models_root().iterdir())


def test_pickle_only_model_is_refused_then_converted_with_allow_pickle(tiny_model_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    src = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, src)
    tensors = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    torch.save(tensors, src / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickled weights.*--allow-pickle"):
        store.import_model(src, "p")
    path = store.import_model(src, "p", allow_pickle=True)
    assert (path / "model.safetensors").is_file() and not (path / "pytorch_model.bin").exists()
    assert all(torch.equal(load_file(path / "model.safetensors")[k], v) for k, v in tensors.items())


def test_allow_pickle_never_unpickles_code(tiny_model_dir, tmp_path):
    import pickle
    import shutil

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    src = tmp_path / "evil"
    shutil.copytree(tiny_model_dir, src)
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(UserError, match="refused or unreadable as a weights-only pickle"):
        store.import_model(src, "evil", allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_create_from_modelfile_inherits_and_hard_links(tiny_model_dir, tmp_path):
    store.import_model(tiny_model_dir, "base")
    mf = tmp_path / "Modelfile"
    mf.write_text('FROM base\nSYSTEM """Be brief."""\nPARAMETER temperature 0.3\nPARAMETER stop "END"\n')
    path = store.create("brief", mf)
    info = store.show("brief")
    assert info["system"] == "Be brief." and info["defaults"] == {"temperature": 0.3, "stop": ["END"]}
    assert info["lineage"]["parent"] == "base"
    base_weights = store.model_path("base") / "model.safetensors"
    if os.stat(base_weights).st_ino == os.stat(path / "model.safetensors").st_ino:
        assert os.stat(base_weights).st_nlink == 2  # hard-linked, no copy
    # A model created from a created model inherits and overrides.
    mf2 = tmp_path / "Modelfile2"
    mf2.write_text("FROM brief\nPARAMETER top_k 5\n")
    store.create("brief2", mf2)
    info2 = store.show("brief2")
    assert info2["system"] == "Be brief." and info2["defaults"] == {"temperature": 0.3, "stop": ["END"], "top_k": 5}
    # Removing the parent leaves the child whole (hard links keep the data).
    store.remove("base")
    from lmforge.loaders.auto import load

    loaded = load(store.resolve("brief"))
    assert loaded.modelfile.system == "Be brief."


def test_create_template_replaces_chat_template(tiny_model_dir, tmp_path):
    mf = tmp_path / "Modelfile"
    mf.write_text(f'FROM {tiny_model_dir}\nTEMPLATE """{{% for m in messages %}}[{{{{ m.role }}}}] {{{{ m.content }}}}\n'
                  f'{{% endfor %}}"""\n')
    store.create("templated", mf)
    from lmforge.loaders.auto import load

    tok = load(store.resolve("templated")).tokenizer
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"


@pytest.mark.parametrize("text, message", [
    ("FROM nosuchmodel\n", "no model named nosuchmodel"),
    ("FROM ./missing-dir\n", "no such file or directory"),
    ("FROM base\nADAPTER ./nowhere\n", "is not an adapter directory"),
])
def test_create_errors(tiny_model_dir, tmp_path, text, message):
    store.import_model(tiny_model_dir, "base", overwrite=True)
    mf = tmp_path / "Modelfile"
    mf.write_text(text)
    with pytest.raises(UserError, match=message):
        store.create("x", mf)


def test_pull_offline_points_to_import(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="lmforge import PATH --name smollm2-135m"):
        store.pull("HuggingFaceTB/SmolLM2-135M")


@pytest.mark.parametrize("repo", ["../etc", "a/b/c", "", "a/..", "/abs"])
def test_pull_refuses_bad_repo_ids(repo):
    with pytest.raises(UserError, match="not a Hugging Face repo id"):
        store.pull(repo)


def test_pull_imports_what_huggingface_hub_downloads(tiny_model_dir, monkeypatch):
    """pull's own logic around the download, offline: the download itself is replaced by a local model."""
    import huggingface_hub
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub, even if the stub were bypassed
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)

    calls = {}

    def fake_snapshot(repo_id, revision=None, allow_patterns=None, cache_dir=None):
        calls.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    path = store.pull("Org/Tiny-Model")
    assert path == store.model_path("tiny-model:latest")
    assert not any(p.endswith(".bin") or p == "*" for p in calls["allow_patterns"])  # never fetches pickles
    assert store.show("tiny-model")["lineage"]["pulled_from"] == "hf://Org/Tiny-Model"


# ---------------------------------------------------------------------------------------------------
# Concurrent changes (issue 13 #9): check-and-rename under the store lock; killed imports cleaned up
# ---------------------------------------------------------------------------------------------------


def test_import_refuses_a_chat_template_that_hangs_or_fails(tiny_model_dir, tmp_path):
    """Issue 13 #2: a model whose template would freeze or fail every chat never enters the store; the check
    renders a sample chat once, under the template limits."""
    import shutil

    from test_modelfile import HOSTILE_TEMPLATES

    for i, (template, says) in enumerate(HOSTILE_TEMPLATES[:2] + HOSTILE_TEMPLATES[-2:]):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(tiny_model_dir, bad)
        (bad / "chat_template.jinja").write_text(template)
        with pytest.raises(UserError) as e:
            store.import_model(bad, f"bad{i}")
        assert says in str(e.value) and "\n" not in str(e.value)
        assert not store.model_path(f"bad{i}").exists()
