"""Tensor parallelism combined with data parallelism on a 2-D device mesh (`--parallel tp=2,dp=4`, `tp=2,fsdp`).

The `world` processes form a (dp, tp) grid, `init_device_mesh(type, (dp, tp), mesh_dim_names=("dp", "tp"))`:
rank = d * tp + t, so the tp ranks of one data slice are consecutive (on GPUs, the same node, where the
two all-reduces per block and direction are cheapest) and `Dist.data_rank` (rank // tp) is `d`. Within a
row of the grid `lmforge.train.tensor_parallel` splits every block over mesh["tp"], exactly as it does
alone; the rows then divide the batch among themselves over mesh["dp"] (a column of the grid):

- `tp=N,fsdp=M` (strategy "tp+fsdp"), the torchtitan way: FSDP2 `fully_shard` with mesh["dp"] on every block
  and then on the root. A tensor-parallel weight becomes a 2-D DTensor, its tp shard split again over dp;
  the weights tensor parallelism leaves whole (norms, position embeddings; the token embedding and lm_head
  too when tp does not divide the vocabulary) are sharded over dp alone.
- `tp=N,dp=M` (strategy "tp"): replicas, like DDP, with the gradients averaged over mesh["dp"] by one
  explicit all-reduce per bucket after the last micro-step's backward (`replica_sync`). Why not DDP: DDP
  does not take DTensor parameters (PyTorch's own TP+DDP path, `tensor.parallel.ddp`, swaps them for plain
  tensors behind private hooks); `torch.distributed._composable.replicate` is private API, and FSDP2 on
  mesh["dp"] would shard the optimizer state - a different memory trade than the one asked for. The
  explicit all-reduce is one collective per 25 MiB of gradients, skipped on the micro-steps before the last (gradient
  accumulation), and leaves the parameters exactly as tensor parallelism made them, so checkpoints and
  resume work as for `tp=N` alone. Replicas stay equal because every rank starts from the same weights (the
  same seed, or the same checkpoint) and applies the same averaged gradients.

`tp=N` alone is the dp=1 case of the same code (a (1, N) mesh), and no gradient is averaged then.

Checkpoints stay whole: DTensor's `full_tensor()` gathers over both mesh dimensions, so
`tensor_parallel.full_state_dict` and its optimizer-state twins serve every case here, and a checkpoint
written by a 2-D run resumes on one process (or any other split), and the other way round.

The gradient norm: under "tp+fsdp" the gradients live on two meshes (the 2-D one, and mesh["dp"] for the
weights tensor parallelism leaves whole), and DTensor cannot add norms across meshes, so `clip_grad_norm`
takes each mesh's norm whole and combines them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from lmforge.model.gpt import unwrap

__all__ = ["average_gradients", "clip_grad_norm", "parallelize", "replica_sync", "several_meshes"]

BUCKET_BYTES = 25 * 2**20  # gradients per all-reduce (DDP's default bucket size)


def parallelize(model: nn.Module, dist, precision: str = "fp32") -> nn.Module:
    """Split `model` over the (data_world, tp) mesh of `dist` ("tp" or "tp+fsdp"), in place: tensor parallelism
    over mesh["tp"], then FSDP2 over mesh["dp"] ("tp+fsdp") or replicas whose gradients `replica_sync`
    averages ("tp"). The optimizer must be built after (FSDP2 replaces the parameters)."""
    from torch.distributed.device_mesh import init_device_mesh

    from lmforge.train import tensor_parallel

    mesh = init_device_mesh(dist.device.type, (dist.data_world, dist.tp), mesh_dim_names=("dp", "tp"))
    # The batch is sliced by Dist.data_rank; the mesh must put this rank in the same data slice.
    assert mesh.get_local_rank("dp") == dist.data_rank and mesh.get_local_rank("tp") == dist.rank % dist.tp
    tensor_parallel.parallelize(model, mesh["tp"], dist.tp)
    if dist.strategy == "tp+fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw: dict[str, Any] = {"mesh": mesh["dp"]}
        if precision in ("bf16", "fp16"):  # compute in low precision, reduce gradients in fp32
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        if hasattr(mesh, "_flatten"):  # the gradient norm's two all-reduces become one (and DTensor stops warning)
            mesh._flatten("dp_tp")
        for block in model.blocks:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
    elif dist.data_world > 1:
        model._dp_mesh = mesh["dp"]  # for replica_sync
    return model


@contextmanager
def replica_sync(model: nn.Module, sync: bool):
    """Around one micro-step's backward under strategy "tp": on the last micro-step (`sync`) average the
    gradients over the data-parallel replicas once the backward is done; on the others, nothing (the
    gradients accumulate locally, as under DDP's no_sync)."""
    yield
    if sync:
        average_gradients(unwrap(model))


@torch.no_grad()
def average_gradients(model: nn.Module, dp_mesh=None) -> None:
    """Average every gradient over `dp_mesh` (default: the model's mesh["dp"] set by `parallelize`; a no-op
    without replicas): each rank's local part (its tp shard, for a DTensor), flattened into buckets of
    `BUCKET_BYTES` per dtype, one all-reduce each. Every rank walks the parameters in the same order, so the
    buckets line up. Replicas of a pipeline stage (`lmforge.train.pipeline`, `pp=2,dp=2`) pass the stage and
    their mesh["dp"]: the same averaging, one path for both 2-D meshes."""
    dp_mesh = dp_mesh if dp_mesh is not None else getattr(model, "_dp_mesh", None)
    if dp_mesh is None:
        return
    group, n = dp_mesh.get_group(), dp_mesh.size()
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
             for p in model.parameters() if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        start = 0
        while start < len(same):
            bucket, size = [], 0
            while start < len(same) and (not bucket or size + same[start].nbytes <= BUCKET_BYTES):
                bucket.append(same[start])
                size += same[start].nbytes
                start += 1
            flat = torch.cat([g.reshape(-1) for g in bucket])
            tdist.all_reduce(flat, group=group)
            flat.div_(n)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def several_meshes(params: list[torch.Tensor]) -> bool:
    """Whether the gradients are DTensors on more than one device mesh (tensor parallelism with FSDP2)."""
    return len({p.grad.device_mesh for p in params if hasattr(p.grad, "device_mesh")}) > 1


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], clip: float) -> float:
    """Clip the gradients to `clip` (0: no clipping) and return their global norm, for gradients spread over
    several meshes: each mesh's norm made whole (`full_tensor`), plain tensors' (replicated) counted once,
    combined as the 2-norm of the norms - the norm one process computes, up to summation order."""
    from torch.distributed.tensor.experimental import implicit_replication

    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)
    if clip > 0:
        with implicit_replication():
            for group in groups.values():
                torch.nn.utils.clip_grads_with_norm_(group, clip, total)
    return float(total)
