"""Tensor parallelism splits the token embedding and the output head by vocabulary (2 CPU processes, gloo): the
weights are `Shard(0)` DTensors holding vocab/2 rows each, a tied pair stays one parameter, and the logits, the
embedding's gradient and the weights after one AdamW step match one process's; a vocabulary tp does not divide stays whole.
One forward and backward per model: the training runs themselves are in test_distributed.py and test_mesh.py."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from conftest import free_port
from lmforge.model.gpt import GPT
from lmforge.presets import get_preset

SHAPES = {  # name: tiny's overrides
    "tied": dict(vocab_size=320, context_length=32),  # tiny ties tok_emb and lm_head
    "untied-learned-gemma": dict(vocab_size=320, context_length=32, tie_embeddings=False, positions="learned",
                                 embed_scale=True),
    "odd-vocab": dict(vocab_size=321, context_length=32),  # 321 % 2: left replicated
}


def _check(name: str, shape: dict, rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from lmforge.train import tensor_parallel
    from lmforge.train.optim import make_optimizer

    cfg = get_preset("tiny", **shape)
    torch.manual_seed(3)
    model = GPT(cfg)
    reference = GPT(cfg)
    reference.load_state_dict(model.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))

    tensor_parallel.parallelize(model, init_device_mesh("cpu", (2,)), 2)
    emb, head = model.tok_emb.weight, model.lm_head.weight
    if name == "odd-vocab":
        assert not isinstance(emb, DTensor) and not isinstance(head, DTensor), name
    else:
        for w in (emb, head):
            assert isinstance(w, DTensor) and w.placements == (Shard(0),), name
            assert w.to_local().shape == (cfg.vocab_size // 2, cfg.d_model), name
        assert torch.equal(emb.to_local(), reference.tok_emb.weight[rank * 160:(rank + 1) * 160]), name
    if cfg.tie_embeddings:
        assert model.lm_head.weight is model.tok_emb.weight, name
        assert len([p for n, p in model.named_parameters() if "tok_emb" in n or "lm_head" in n]) == 1, name
    else:
        assert head is not emb and not torch.equal(head.full_tensor(), emb.full_tensor()), name
    if cfg.positions == "learned":
        assert not isinstance(model.pos_emb.weight, DTensor), name

    logits, want = model(idx), reference(idx)
    assert not isinstance(logits, DTensor) and logits.shape == want.shape, name  # whole (B, T, V) for the loss
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5, msg=name)
    F.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    F.cross_entropy(want.flatten(0, 1), idx.flatten()).backward()
    grad = model.tok_emb.weight.grad
    grad = grad.full_tensor() if isinstance(grad, DTensor) else grad
    torch.testing.assert_close(grad, reference.tok_emb.weight.grad, atol=1e-6, rtol=1e-5, msg=name)

    # one AdamW step: its groups mix the sharded embedding with plain norms (and, untied, the head with the
    # projections), which torch's fused kernel takes only one kind at a time. A large eps: Adam's first step is
    # about lr * sign(grad), which would turn a gradient's rounding-level difference into a whole lr
    for m in (model, reference):
        make_optimizer(m, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-3).step()
    whole = tensor_parallel.full_state_dict(model, rank == 0)
    if rank == 0:
        for key, w in reference.state_dict().items():
            torch.testing.assert_close(whole[key], w, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {key}: {m}")


def _worker(rank: int, port: int) -> None:
    import torch.distributed as tdist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo")
    try:
        for name, shape in SHAPES.items():
            _check(name, shape, rank)
    finally:
        tdist.destroy_process_group()


def test_embeddings_and_head_are_split_by_vocabulary():
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(free_port(),), nprocs=2, join=True)
