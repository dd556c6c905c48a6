"""AdamW parameter groups and the learning-rate schedule (a pure function of the step)."""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only. Norm gains and biases are scales and offsets, and embeddings are lookup tables
    whose rows are touched rarely; decaying them pulls rare tokens towards zero for no regularisation gain
    (GPT-3, nanoGPT, LitGPT all exempt them)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied weights appear once, under the embedding's name
        if not p.requires_grad:
            continue
        if p.dim() < 2 or "emb" in name.split(".")[-2]:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


#: Floating dtypes and devices torch's fused AdamW kernel takes.
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def use_fused(params: list[torch.Tensor]) -> bool:
    """Fused AdamW (one kernel for every parameter's update) wherever torch has it: CUDA and, since torch
    2.4, CPUs. Measured with bench/optimizer_step.py on the `small` preset's 6.5M parameters (Intel Xeon with
    AMX, 2 threads, torch 2.13, a shared machine under a load of 6-10 on its 2 cores, so the figures swing):
    two runs gave plain for-loop 620 / 467 ms a step, foreach 63 / 676 ms, fused 18 / 82 ms: fused was the
    fastest both times, 35x / 5.7x the plain loop. Torch's own default on a CPU is that plain loop (its
    foreach default is for CUDA only), so leaving it to torch costs a CPU run hundreds of ms a step here.
    The update is the same AdamW, not bit-identical to the loop's (it rounds in another order); a run and
    its resume both use it, so resume stays exact.

    Parameters on the `meta` device do not count: a pipeline rank (`lmforge.train.pipeline`) keeps the
    other stages' parameters there, in the optimizer so its numbering stays one process's, but they never
    get a gradient, so AdamW (fused or not, which checks a parameter's device when it first updates it)
    never touches them. Counting them would send every pipeline rank to the plain loop."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    real = [p for p in params if not p.is_meta]
    return bool(real) and all(p.device.type in devices and p.dtype in _FUSED_DTYPES for p in real)


def _mesh_key(p: torch.Tensor):
    """Which device mesh a parameter lives on: None for a plain tensor."""
    return getattr(p, "device_mesh", None)  # meshes compare (and hash) by their ranks and dimension names


class _MeshAdamW(torch.optim.AdamW):
    """AdamW that updates each parameter group in pieces of one device mesh apiece. Under tensor parallelism a
    group can mix DTensors with plain tensors (1-D: the sharded embedding beside replicated norms, both
    undecayed) or DTensors of two meshes (with FSDP2: tp x dp and dp alone), and torch's fused and foreach
    kernels take one kind per call ("got mixed torch.Tensor and DTensor"). The pieces exist only during
    `step`: the groups themselves, and so `state_dict()`'s layout, stay one process's, so checkpoints resume
    across strategies. The update is the same; only how it is batched into kernels differs."""

    def step(self, closure=None):
        groups = self.param_groups
        pieces = []
        for g in groups:
            by_mesh: dict = {}
            for p in g["params"]:
                by_mesh.setdefault(_mesh_key(p), []).append(p)
            pieces += [{**g, "params": ps} for ps in by_mesh.values()]
        self.param_groups = pieces
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups


def make_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over `param_groups`: fused where `use_fused` says it runs, else foreach (multi-tensor ops:
    torch's own default on CUDA; on a CPU 10x faster than the plain loop in one of the two noisy runs of
    `use_fused`'s measurement, a little slower in the other), rather than torch's CPU default, the loop."""
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = use_fused(params)
    mixed = any(len({_mesh_key(p) for p in g["params"] if not p.is_meta}) > 1 for g in groups)
    return (_MeshAdamW if mixed else torch.optim.AdamW)(groups, lr=lr, betas=betas, eps=eps, fused=fused or None,
                                                        foreach=None if fused or not params else True)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `decay_steps`, then flat.

    `step` is the 0-based index of the update about to be taken. Example with lr=1e-3, min_lr=1e-4,
    warmup 10, decay 110: step 0 -> 1e-4, step 9 -> 1e-3, step 60 -> 5.5e-4 (half way), step >= 110 -> 1e-4.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
