"""The encoder against `transformers.BertModel`, the oracle: same weights, same hidden states, padding included."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import UserError
from lmforge.loaders.bert import tensor_map
from lmforge.model.bert import Encoder, EncoderConfig

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=16)


def _pair(pooling: str = "mean", normalize: bool = True) -> tuple[Encoder, torch.nn.Module]:
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(**TINY, initializer_range=0.5, hidden_dropout_prob=0.0,
                                                        attention_probs_dropout_prob=0.0)).eval()
    ours = Encoder(EncoderConfig(**TINY, pooling=pooling, normalize=normalize)).eval()
    theirs = hf.state_dict()
    ours.load_state_dict({k: theirs[v] for k, v in tensor_map(ours.cfg).items()})
    return ours, hf


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[2, 5, 17, 40, 9, 3], [2, 8, 3, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    return ids, mask


def test_hidden_states_match_transformers_with_padding() -> None:
    ours, hf = _pair()
    ids, mask = _batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=1e-5), (got[real] - want[real]).abs().max()
    # the padded row must equal the same sequence without padding (padding changes nothing real)
    with torch.no_grad():
        alone = ours(ids[1:, :3], mask[1:, :3])
    assert torch.allclose(got[1, :3], alone[0], atol=1e-5)


def test_mean_pooling_is_masked_and_normalised() -> None:
    ours, hf = _pair("mean", True)
    ids, mask = _batch()
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.embed(ids, mask)
    m = mask[..., None].float()
    manual = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    assert got.shape == (2, 32)
    assert torch.allclose(got, manual, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_cls_pooling_without_normalisation() -> None:
    ours, hf = _pair("cls", False)
    ids, mask = _batch()
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.embed(ids, mask)
    assert torch.allclose(got, hidden[:, 0], atol=1e-5)


def test_bad_config_and_too_long_input_are_one_line_errors() -> None:
    with pytest.raises(UserError, match="pooling"):
        EncoderConfig(**TINY, pooling="max")
    with pytest.raises(UserError, match="divisible"):
        EncoderConfig(**{**TINY, "num_attention_heads": 5})
    enc = Encoder(EncoderConfig(**TINY))
    with pytest.raises(UserError, match="exceed"):
        enc(torch.zeros((1, 17), dtype=torch.long))
