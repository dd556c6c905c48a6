"""SFT, LoRA and DPO through the one fit(): runs that learn, save, resume and merge; mistakes named."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import save_tiny_model
from lmforge.errors import UserError
from lmforge.train.finetune import REFERENCE_FILE, FinetuneOptions, finetune


def _chat_file(path, n=60):
    names = ["alpha", "beta", "gamma", "delta"]
    with open(path, "w") as f:
        for i in range(n):
            w = names[i % 4]
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                             {"role": "assistant", "content": f"the model reads {w}."}]}) + "\n")
    return path


def _pref_file(path, n=60):
    names = ["alpha", "beta", "gamma", "delta"]
    with open(path, "w") as f:
        for i in range(n):
            w, other = names[i % 4], names[(i + 1) % 4]
            f.write(json.dumps({"prompt": f"say {w}", "chosen": f"the model reads {w}.",
                                "rejected": f"the model reads {other}."}) + "\n")
    return path


@pytest.fixture()
def base(tmp_path, tiny_tokenizer):
    return save_tiny_model(tmp_path / "base", tiny_tokenizer, context_length=64)


def _opts(model, data, out, **kw):
    recipe = {"max_steps": 12, "batch_size": 4, "lr": 3e-3, "eval_interval": 12, **kw.pop("recipe", {})}
    return FinetuneOptions(model=str(model), data=str(data), out=out, progress=False, recipe=recipe, **kw)


def test_full_sft_learns_the_replies(tmp_path, base):
    data = _chat_file(tmp_path / "chat.jsonl")
    result, summary = finetune(_opts(base, data, tmp_path / "sft", recipe={"max_steps": 30}))
    first = next(h for h in result.history if "loss" in h)["loss"]
    assert result.train_loss < first - 1.0
    assert (tmp_path / "sft" / "config.json").is_file() and summary["trainable"] == summary["total"]


def test_lora_sft_saves_an_adapter_that_loads_merges_and_resumes(tmp_path, base, capsys):
    from lmforge.cli import main
    from lmforge.loaders.auto import load

    data = _chat_file(tmp_path / "chat.jsonl")
    same_schedule = {"warmup_steps": 1, "lr_decay_steps": 6}
    result, summary = finetune(_opts(base, data, tmp_path / "lora", lora=True, lora_rank=4,
                                     recipe={"max_steps": 6, **same_schedule}))
    run = tmp_path / "lora"
    assert (run / "adapter_config.json").is_file() and not (run / "config.json").exists()
    assert summary["trainable"] < summary["total"] / 2
    base_model = load(base).model
    adapted = load(run).model  # base + adapter, merged for inference
    ids = torch.randint(0, base_model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(adapted(ids), base_model(ids))
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged = load(tmp_path / "merged").model
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted(ids), atol=1e-5, rtol=0)
    # Resume: 3 steps + resume to 6 gives the uninterrupted run's weights.
    finetune(_opts(base, data, tmp_path / "half", lora=True, lora_rank=4, recipe={"max_steps": 3, **same_schedule}))
    finetune(_opts(base, data, tmp_path / "half", lora=True, lora_rank=4, resume=True, recipe={"max_steps": 6}))
    a, b = load(tmp_path / "half", merge=False).model, load(run, merge=False).model
    for (n1, p1), (_, p2) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=0, msg=n1)


def test_dpo_caches_reference_and_raises_preference_accuracy(tmp_path, base):
    data = _pref_file(tmp_path / "prefs.jsonl")
    sft, _ = finetune(_opts(base, _chat_file(tmp_path / "chat.jsonl"), tmp_path / "sft", recipe={"max_steps": 20}))
    result, _ = finetune(_opts(tmp_path / "sft", data, tmp_path / "dpo", method="dpo", beta=0.5,
                               recipe={"max_steps": 20, "lr": 1e-3, "eval_interval": 10}))
    assert (tmp_path / "dpo" / REFERENCE_FILE).is_file()
    val = [h for h in result.history if "val_loss" in h]
    assert val[-1]["val_rewards_accuracy"] > 0.6 and val[-1]["val_rewards_margin"] > 0
    assert val[-1]["val_loss"] < 0.69  # below -log(sigmoid(0)), the loss of the reference itself


def test_mistakes_are_named(tmp_path, base):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    with pytest.raises(UserError, match="bad.jsonl"):
        finetune(_opts(base, bad, tmp_path / "x"))
    with pytest.raises(UserError, match="available"):
        finetune(_opts(base, _chat_file(tmp_path / "c.jsonl"), tmp_path / "y", lora=True, lora_targets="wq,wk"))
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}) + "\n")
    with pytest.raises(UserError, match="line 1"):
        finetune(_opts(base, same, tmp_path / "z", method="dpo"))


def test_adapter_for_another_base_is_refused(tmp_path, base, tiny_tokenizer):
    from lmforge.loaders.auto import load
    from lmforge.loaders.peft import load_adapter

    finetune(_opts(base, _chat_file(tmp_path / "chat.jsonl"), tmp_path / "lora", lora=True, lora_rank=4,
                   recipe={"max_steps": 2}))
    other = save_tiny_model(tmp_path / "other", tiny_tokenizer, context_length=64, embedding_scale=3.0)
    with pytest.raises(UserError, match="another model|trained on"):
        load_adapter(load(other).model, tmp_path / "lora")


def test_qlora_trains_adapters_on_a_base_that_stays_quantized(tmp_path, base):
    """LoRA on a Q8_0 GGUF: the base's projections stay packed GGML blocks while the adapters learn, and the
    saved adapter loads back onto the quantized base (kept beside it, not folded into the blocks)."""
    from lmforge.loaders.auto import load
    from lmforge.loaders.export import export_gguf
    from lmforge.model.lora import lora_modules
    from lmforge.quant.linear import GGMLLinear

    gguf = tmp_path / "base-q8.gguf"
    export_gguf(load(base), gguf, qtype="q8_0")
    data = _chat_file(tmp_path / "chat.jsonl")
    result, summary = finetune(_opts(gguf, data, tmp_path / "qlora", lora=True, lora_rank=4,
                                     recipe={"max_steps": 20, "lr": 1e-2}))
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert losses[-1] < losses[0] - 0.5
    adapted = load(tmp_path / "qlora", dtype="auto").model
    wrapped = dict(lora_modules(adapted))
    assert wrapped and all(isinstance(m.base, GGMLLinear) for m in wrapped.values())
    plain = load(gguf, dtype="auto").model
    ids = torch.randint(0, plain.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(adapted(ids), plain(ids))


def test_finetune_does_not_compile_unless_asked(tmp_path):
    """SFT/DPO batches come in many lengths (a recompile each) and the runs are short: TrainConfig's "auto"
    resolves to off here, also for a resumed run that saved "auto"; an explicit "on" is kept."""
    from lmforge.train.finetune import _recipe

    opts = FinetuneOptions(model="m", data="d", out=tmp_path)
    assert _recipe(opts, 100, None).compile == "off"
    assert _recipe(opts, 100, {"max_steps": 5, "compile": "auto"}).compile == "off"
    assert _recipe(FinetuneOptions(model="m", data="d", out=tmp_path, recipe={"compile": "on"}), 100, None).compile == "on"
    with pytest.raises(UserError, match="auto, on or off"):
        _recipe(FinetuneOptions(model="m", data="d", out=tmp_path, recipe={"compile": "maybe"}), 100, None)
