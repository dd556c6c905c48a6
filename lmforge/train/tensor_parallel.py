"""Tensor parallelism (Megatron-style) applied to a `GPT` from outside, with DTensor's `parallelize_module`.

Each block's attention and MLP are split across the `tp` ranks of a 1-D device mesh (the "tp" dimension of
the 2-D mesh `lmforge.train.mesh` builds, where data parallelism runs across these groups): the input projections
(`attn.qkv`, `mlp.fc`) are column-parallel (each rank computes some of the output features from the whole
input), the output projections (`attn.proj`, `mlp.proj`) row-parallel (each rank multiplies its features by
its slice of the weight's columns, and one all-reduce sums the partial outputs). So a block costs two
all-reduces forward and two backward, and each rank holds 1/tp of every projection weight.

The fused projections need one step DTensor's plain row sharding cannot take alone: `attn.qkv`'s rows are
q | k | v and `mlp.fc`'s are gate | up, and `ColwiseParallel` gives rank r the r-th contiguous block of rows,
which would hand rank 0 all queries and no values. So before sharding, the rows are permuted (`row_order`)
to q_0 k_0 v_0 | q_1 k_1 v_1 | ... (and gate_0 up_0 | gate_1 up_1 | ...): the contiguous shards are then
each rank's whole heads of q, k and v, and matching halves of gate and up. Each rank's attention then runs
with its local head counts, set on the module here (`model/gpt.py` reads `self.n_heads`, `self.n_kv_heads`
and knows nothing of this); checkpoints are written in the original row order (`full_state_dict`).

The token embedding and the output head (a small model's largest weights) are split by vocabulary:
`tok_emb` is row-parallel (rank r holds rows r*V/tp .. (r+1)*V/tp of the table, looks up the tokens that fall
there, zeros for the others, and one all-reduce sums the lookups into the whole embedding on every rank) and
`lm_head` column-parallel (rank r computes the logits of its slice of the vocabulary, and one all-gather makes
them whole, so the losses, masks and sampling see ordinary (B, T, V) logits; torch's `loss_parallel` would
skip that gather, but only by leaving the logits a vocabulary-sharded DTensor that every one of those
consumers would have to take, so it is not used). Both weights are `Shard(0)` over the vocabulary, so a
tied model (`tie_embeddings`: one Parameter for both) stays tied: after sharding, `lm_head.weight` is set to
`tok_emb`'s DTensor again, one parameter, one gradient, one optimizer state. A vocabulary that tp does not divide (GPT-2's 50257) is left replicated rather than refused, with a
note on rank 0: the blocks still split, and padding the vocabulary would change the checkpoint's shapes.
Gemma's `embed_scale` multiplies the embedding after the all-reduce, as on one process.

What stays replicated: position embeddings (learned or sinusoidal: context x d_model, small), norms, and
the row-parallel layers' biases (every rank holds and computes them whole; their gradients agree across ranks
because DTensor all-reduces the gradient flowing back into each column-parallel input). Mixture-of-experts
blocks are not split.

The checkpoint functions below gather any DTensor whole, over every mesh dimension, so they also serve the
2-D mesh, where FSDP2 shards these weights (and their optimizer moments) over dp as well.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lmforge.model.gpt import MLP, projection_parts

__all__ = ["full_optimizer_state", "full_state_dict", "load_full_optimizer_state", "parallelize"]

_COLUMN = ("attn.qkv", "mlp.fc")  # their rows are permuted to rank order before sharding


def row_order(cfg, module: str, tp: int) -> torch.Tensor:
    """The permutation of `module`'s weight rows that puts rank r's slice of every part (q, k, v; gate, up)
    in the r-th contiguous block: new_rows = old_rows[order]."""
    pieces = []
    for r in range(tp):
        for _, start, stop in projection_parts(cfg, module):
            size = (stop - start) // tp
            pieces.append(torch.arange(start + r * size, start + (r + 1) * size))
    return torch.cat(pieces)


def _orders(model: nn.Module, tp: int) -> dict[str, torch.Tensor]:
    """Parameter name -> row order, for every permuted weight and bias."""
    out = {}
    for i, block in enumerate(model.blocks):
        for module in _COLUMN:
            order = row_order(model.config, module, tp)
            for p in ("weight", "bias"):
                if getattr(block.get_submodule(module), p, None) is not None:
                    out[f"blocks.{i}.{module}.{p}"] = order
    return out


def parallelize(model: nn.Module, mesh, tp: int) -> nn.Module:
    """Split `model`'s blocks over the 1-D `mesh` of `tp` ranks, in place (every rank must start from the same
    weights: the same seed, or the same checkpoint)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    cfg = model.config
    orders = _orders(model, tp)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in orders:
                p.copy_(p[orders[name]])
    plan = {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(),
            "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel()}
    for block in model.blocks:
        assert isinstance(block.mlp, MLP)
        parallelize_module(block, mesh, plan)
        block.attn.n_heads, block.attn.n_kv_heads = cfg.n_heads // tp, cfg.n_kv_heads // tp
    if cfg.vocab_size % tp == 0:
        _shard_vocab(model, mesh)
    elif torch.distributed.get_rank() == 0:
        print(f"note: the vocabulary ({cfg.vocab_size} tokens) does not divide among tp={tp} ranks, so the "
              f"embeddings and the output head stay whole on every rank", file=sys.stderr, flush=True)
    model._tp_row_orders = orders  # for writing checkpoints in the original row order
    return model


def _shard_vocab(model: nn.Module, mesh) -> None:
    """Split `tok_emb` and `lm_head` by vocabulary rows (both weights `Shard(0)`), keeping a tie a tie."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tied = model.lm_head.weight is model.tok_emb.weight
    parallelize_module(model, mesh, {
        # the token ids arrive whole on every rank; each looks up its rows, one all-reduce sums them
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        # each rank's logits for its slice of the vocabulary, gathered whole for the loss
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    })
    if tied:  # each module got its own DTensor of the one weight: make them one parameter again
        model.lm_head.weight = model.tok_emb.weight


def _whole(name: str, t, orders: dict[str, torch.Tensor]) -> torch.Tensor:
    """A parameter (or its optimizer moment) whole and in the original row order: a collective for DTensors.
    On a 2-D mesh (with FSDP2 over dp) the outer dimensions are gathered first, one at a time: `full_tensor()`
    alone would gather tp before dp, in two all-gathers that DTensor warns about on every rank."""
    if hasattr(t, "full_tensor"):
        from torch.distributed.tensor import Replicate

        for i in range(t.device_mesh.ndim - 1):
            t = t.redistribute(placements=[Replicate()] * (i + 1) + list(t.placements[i + 1:]))
        t = t.full_tensor()
    t = t.detach().cpu()
    if name in orders and t.dim() > 0:
        t = t[torch.argsort(orders[name])]
    return t


def full_state_dict(model: nn.Module, main: bool) -> dict[str, torch.Tensor] | None:
    """The whole model's weights, as one process holds them, on rank 0 (every rank must call this)."""
    orders = model._tp_row_orders
    sd = {name: _whole(name, t, orders) for name, t in model.state_dict().items()}
    return sd if main else None


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, main: bool) -> dict | None:
    """The optimizer's whole state in `optimizer.state_dict()`'s layout, on rank 0 (every rank must call)."""
    orders = model._tp_row_orders
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {idx: {k: _whole(names[id(params[idx])], v, orders) if torch.is_tensor(v) else v for k, v in s.items()}
             for idx, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]} if main else None


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, whole: dict) -> None:
    """Load a whole optimizer state (one process's, or `full_optimizer_state`'s): each rank permutes the rows
    as `parallelize` did and keeps the shard that matches its parameter's."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    orders = model._tp_row_orders
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for idx, s in whole["state"].items():
        p = params[int(idx)]
        name, entry = names[id(p)], {}
        for k, v in s.items():
            if torch.is_tensor(v) and isinstance(p, DTensor) and v.shape == p.shape:
                if name in orders:
                    v = v[orders[name]]
                v = distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)
            entry[k] = v
        state[idx] = entry
    optimizer.load_state_dict({"state": state, "param_groups": whole["param_groups"]})
