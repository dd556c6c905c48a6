"""`merge_adapter` (lmforge/loaders/export.py), what `lmforge merge` calls: a LoRA run folded into its base and
written as a plain model directory in one transaction, with the lineage of both. (`export_hf` and
`export_gguf` are tested end to end through the CLI in tests/test_cli.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import save_tiny_model
from lmforge.errors import UserError
from lmforge.loaders.auto import load
from lmforge.loaders.export import merge_adapter
from lmforge.loaders.model_dir import is_model_dir, read_lmforge_meta
from lmforge.loaders.peft import apply_lora
from lmforge.model.lora import lora_modules
from lmforge.train.checkpointer import Checkpointer


def test_merge_adapter_writes_the_merged_model_with_its_lineage(tmp_path, tiny_tokenizer):
    base = save_tiny_model(tmp_path / "base", tiny_tokenizer)
    model = load(base).model
    apply_lora(model, targets="q_proj,v_proj,down_proj", rank=2, alpha=4)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    Checkpointer(tmp_path / "run", tokenizer=tiny_tokenizer, lineage={"data": "chats.jsonl"},
                 base_model=str(base)).save(model, None, [], {"step": 7})

    src, base_ref = merge_adapter(tmp_path / "run", tmp_path / "merged")
    assert src == tmp_path / "run" and base_ref == str(base) and is_model_dir(tmp_path / "merged")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "merged").model(ids), load(tmp_path / "run").model(ids))
    lineage = read_lmforge_meta(tmp_path / "merged")["lineage"]
    assert lineage["data"] == "chats.jsonl" and lineage["step"] == 7
    assert lineage["merged_from_adapter"] == str(tmp_path / "run") and lineage["base"] == str(base)

    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        merge_adapter(tmp_path / "run", tmp_path / "merged")
    merge_adapter(tmp_path / "run", tmp_path / "merged", overwrite=True)
    with pytest.raises(UserError, match=r"is not a LoRA adapter directory \(it needs adapter_config.json"):
        merge_adapter(base, tmp_path / "other")
    assert not (tmp_path / "other").exists()
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
