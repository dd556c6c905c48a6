"""Pipeline parallelism (`--parallel pp=N`): a `GPT` cut into N stages by blocks, run by a
`torch.distributed.pipelining` schedule, and applied from outside (`model/gpt.py` knows nothing of it).

The cut. Stage s of N runs a contiguous run of blocks, n_layers // N each, the first n_layers % N stages
one more (the last stage also carries the final norm, the output head and the loss, which over a large
vocabulary is the heaviest single step, so the spare blocks go early). Stage 0 also turns token ids into
embeddings (+ learned or sinusoidal positions); the last stage applies the final norm, `lm_head` and the
logit soft cap. What passes between stages is one tensor, the residual stream (B, T, C). Rotary tables and
sliding-window masks depend only on T, so every stage builds them itself rather than receiving them.
`StageModule.forward` runs GPT.forward's own pieces (`embed`, `attention_inputs`, `run_block`, `head`) on its
share of the blocks, so there is one copy of the forward; a test chains the stages on one process and
compares the logits with GPT.forward's for every position and norm flavour.

Each rank keeps the whole `GPT` object, but every parameter of the other stages is replaced by a
parameter on the `meta` device (shape and dtype, no storage). So parameter names, their order and the
optimizer's numbering stay exactly one process's: the optimizer is built over the whole model (meta
parameters never get a gradient, so AdamW never touches them), checkpoints are written whole by rank 0
after gathering every stage's tensors, and a checkpoint resumes on one process or on N stages alike. The
whole model is built (or loaded) on every rank before the cut, so start-up briefly needs the whole model's
memory on each rank.

Tied input/output embeddings: the matrix lives on stage 0 (the lookup) and on the last stage (the head),
and each gets only its own part of the gradient. After every step's backward the two parts are summed
(one all-reduce in a group of just those two ranks), so both copies receive the same update from the same
optimizer state and stay equal; the gradient norm counts the matrix once (on stage 0).

The step. One optimizer step of one process is `grad_accum` micro-batches of `batch_size` rows, each
loss a mean, each backward of loss / grad_accum. Here the step's micro-batches are the pipeline's
micro-batches, the same rows in the same order, and the loss on the last stage is the same
cross-entropy / grad_accum (the schedule's own gradient scaling is off), so the gradients are one
process's up to summation order. The schedule is 1F1B when there are at least as many micro-batches as
stages: it has GPipe's bubble but keeps at most N micro-batches' activations alive on a stage instead of
all of them (GPipe runs every forward before any backward). With fewer micro-batches 1F1B does not apply
(torch requires n_microbatches >= stages) and GPipe's fill-drain order is all there is. More micro-batches
(a larger --grad-accum for the same global batch) shrink the bubble, the (N-1)/(M+N-1) of the time each
stage waits.

Data parallelism across pipelines (`pp=P,dp=D`, `pp=P,fsdp`). The P*D processes form a (dp, pp) device
mesh, rank = d * P + s: the P stages of pipeline d are consecutive ranks (on GPUs, one node, where the
point-to-point traffic between stages stays), and `Dist.data_rank` (rank // P) is d, the slice of every
micro-batch that pipeline reads. Each pipeline is the pipeline above on its rows; stage s of every pipeline
holds the same blocks, and the D copies of a stage are one data-parallel group (a column, mesh["dp"]):

- `pp=P,dp=D` (strategy "pp"): replicas. After the step's backward (the tied matrix's two parts summed
  within the pipeline), each stage's gradients are averaged over mesh["dp"] by the same bucketed
  all-reduce tensor-parallel replicas use (`lmforge.train.mesh.average_gradients`), once a step: the
  schedule runs every micro-batch's backward before it, so grad_accum - 1 syncs are skipped by
  construction. Replicas stay equal as they do under DDP (same start, same averaged gradients).
- `pp=P,fsdp` (strategy "pp+fsdp"), as torchtitan does: FSDP2 `fully_shard` over mesh["dp"] on each of the
  stage's blocks and then on the stage. The schedule knows FSDP2 (`PipelineStage.backward_maybe_with_nosync`
  turns its gradient sync off for every backward, and the last one reduce-scatters once); the tied
  matrix's two parts are summed shard by shard (both ends shard it alike over dp). No mixed-precision
  policy: the residual stream crosses stages in the parameters' dtype, as under `pp=N`, and autocast
  still runs the matmuls in bf16 on GPUs.

The reported loss is each pipeline's mean (broadcast from its last stage) averaged over the D pipelines
by `fit` (every slice has as many rows), the global mean one process reports. The gradient norm sums
every stage's squares once: over one pipeline for replicas (their copies are equal), over every rank
under FSDP2 (each holds a distinct shard). Validation runs on every pipeline (each holds every
validation batch, as under DDP). Checkpoints gather the first pipeline's stages (FSDP2 shards made whole
within each stage's column first), so a pp=2,dp=2 checkpoint is one process's, and the other way round.

What is refused (one line, before any work): mixture-of-experts models, whose router load-balancing loss
is computed from every layer's router logits at the end of the forward, which a stage cannot see; pp
combined with tensor parallelism; objectives other than pretraining (only `pretrain` runs several
processes).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as tdist
from torch import nn

from lmforge.errors import UserError
from lmforge.model.gpt import GPT
from lmforge.train.losses import cross_entropy

__all__ = ["PipelinedGPT", "StageModule", "check_config", "full_optimizer_state", "full_state_dict", "load_full_optimizer_state",
           "parallelize", "stage_blocks"]


def stage_blocks(n_layers: int, stages: int, stage: int) -> range:
    """The blocks stage `stage` of `stages` runs: contiguous, n_layers // stages each, the first
    n_layers % stages stages one more."""
    base, extra = divmod(n_layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


class StageModule(nn.Module):
    """One stage of a `GPT`: its blocks, plus the embeddings on the first stage and the final norm and
    output head on the last. The submodules are the GPT's own (same parameters, same names: `blocks.7...`
    stays `blocks.7...`), so gradients land in the parameters the optimizer holds."""

    def __init__(self, model: GPT, stage: int, stages: int) -> None:
        super().__init__()
        self.config = cfg = model.config
        self.first, self.last = stage == 0, stage == stages - 1
        object.__setattr__(self, "model", model)  # its methods run the pieces; not registered (its parameters are)
        if self.first:
            self.tok_emb, self.drop = model.tok_emb, model.drop
            if cfg.positions == "learned":
                self.pos_emb = model.pos_emb
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in stage_blocks(cfg.n_layers, stages, stage)})
        if self.last:
            self.norm, self.lm_head = model.norm, model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) on the first stage, the residual stream (B, T, C) on the others; returns the
        residual stream, or the logits (B, T, V) on the last stage: GPT.forward without a cache, through the
        same pieces (`embed`, `attention_inputs`, `run_block`, `head`)."""
        model = self.model
        T = x.shape[1]
        if T > self.config.context_length:
            raise ValueError(f"position {T - 1} is beyond the context length {self.config.context_length}")
        pos2d = torch.arange(T, device=x.device)[None, :]  # (1, T)
        if self.first:
            x = model.embed(x, pos2d)
        ctx = model.attention_inputs(pos2d, T - 1, None, True, None, None, T)
        for block in self.blocks.values():
            x = model.run_block(block, x, ctx)
        return model.head(x) if self.last else x


def _release_other_stages(model: GPT, keep: StageModule) -> None:
    """Replace every parameter this rank's stage does not use by a meta parameter (no storage). A tied
    matrix shared by two modules becomes one meta parameter, so the model's parameter list (names, order,
    tying) stays one process's."""
    owned = {id(p) for p in keep.parameters()}
    memo: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) in owned:
                continue
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            setattr(module, name, memo[id(p)])


class PipelinedGPT(nn.Module):
    """What `fit()` trains under `--parallel pp=N` (alone, or on a (dp, pp) mesh): this rank's stage, and the
    three things the loop asks of a pipeline instead of running the model itself (`train_step`,
    `clip_grad_norm`, `evaluate`).

    `module` is the whole GPT (its other stages' parameters on the meta device), kept as a plain attribute
    rather than a submodule so `.to()` and `.train()` reach only this rank's real parameters, while
    `unwrap()` finds the model whose names, optimizer numbering and checkpoints are one process's."""

    is_pipeline = True  # fit() asks this instead of importing this module

    def __init__(self, model: GPT, stage: int, stages: int, device: torch.device, group, tied_group, dp_mesh=None,
                 sharded: bool = False) -> None:
        super().__init__()
        self.stage_module = StageModule(model, stage, stages)
        object.__setattr__(self, "module", model)  # not registered: see the class docstring
        self.stage, self.stages, self.device = stage, stages, torch.device(device)
        self.first, self.last = stage == 0, stage == stages - 1
        self.group = group  # this pipeline's stages (mesh["pp"]): the schedule's sends, the loss broadcast
        self.tied_group = tied_group  # this pipeline's first and last stage, when the embeddings are tied
        self.dp_mesh = dp_mesh  # this stage's copies in the other pipelines (mesh["dp"]); None with one pipeline
        self.sharded = sharded  # FSDP2 over dp_mesh ("pp+fsdp") rather than replicas
        self.hidden_dtype = model.tok_emb.weight.dtype
        self._schedules: dict[tuple, Any] = {}
        self._ce: list[torch.Tensor] = []  # the last stage's unscaled micro-batch losses of the current step

    @property
    def tied(self) -> nn.Parameter | None:
        """This stage's copy of a tied matrix (None on a middle stage, or untied): looked up when needed,
        since FSDP2 replaces the parameter object when it shards it."""
        if not self.module.config.tie_embeddings:
            return None
        if self.first:
            return self.stage_module.tok_emb.weight
        return self.stage_module.lm_head.weight if self.last else None

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipelined model runs through its schedule (train_step / evaluate), not as one module")

    def _schedule(self, rows: int, T: int, n_micro: int):
        """The stage and schedule for micro-batches of (rows, T), built on first use: shapes are given
        (static), so the stage runs no extra forward to infer them."""
        key = (rows, T, n_micro)
        if key not in self._schedules:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

            cfg = self.module.config
            hidden = torch.empty(rows, T, cfg.d_model, dtype=self.hidden_dtype, device="meta", requires_grad=True)
            inputs = torch.empty(rows, T, dtype=torch.long, device="meta") if self.first else hidden
            outputs = torch.empty(rows, T, cfg.vocab_size, dtype=self.hidden_dtype, device="meta",
                                  requires_grad=True) if self.last else hidden
            stage = PipelineStage(self.stage_module, self.stage, self.stages, self.device, input_args=inputs,
                                  output_args=outputs, group=self.group)

            def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
                ce = cross_entropy(logits, targets)
                self._ce.append(ce.detach())
                return ce / n_micro  # one process's backward of loss / grad_accum

            kind = Schedule1F1B if n_micro >= self.stages else ScheduleGPipe
            self._schedules[key] = kind(stage, n_micro, loss_fn=loss_fn, scale_grads=False)
        return self._schedules[key]

    def train_step(self, objective, batches: list[tuple[torch.Tensor, torch.Tensor]], autocast) -> tuple[float, dict]:
        """Forward and backward of one optimizer step's micro-batches through the schedule. Returns the sum
        of the micro-batch losses (the same number on every rank: broadcast from the last stage) and the
        objective's metrics (none for dense pretraining)."""
        _check_objective(objective)
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        schedule = self._schedule(batches[0][0].shape[0], x.shape[1], len(batches))
        self._ce.clear()
        with autocast:
            if self.first:
                schedule.step(x)
            elif self.last:
                schedule.step(target=y)
            else:
                schedule.step()
        self._sum_tied_grads()
        if self.dp_mesh is not None and not self.sharded:  # replicas: this stage's gradients averaged over dp
            from lmforge.train import mesh

            mesh.average_gradients(self.stage_module, self.dp_mesh)
        total = torch.tensor([sum(float(ce) for ce in self._ce) if self.last else 0.0], dtype=torch.float64,
                             device=self.device)
        tdist.broadcast(total, group=self.group, group_src=self.stages - 1)
        return float(total), {}

    @torch.no_grad()
    def _sum_tied_grads(self) -> None:
        """The tied matrix's two gradient parts (embedding on stage 0, head on the last) summed on both
        (under FSDP2, shard by shard: both ends hold the same rows of it)."""
        tied = self.tied
        if tied is None:
            return
        if tied.grad is None:
            tied.grad = torch.zeros_like(tied)
        tdist.all_reduce(_local(tied.grad), group=self.tied_group)

    @torch.no_grad()
    def clip_grad_norm(self, clip: float) -> float:
        """The whole model's gradient norm (every stage's squares counted once, the tied matrix once, on stage
        0), and the gradients scaled as `clip_grad_norm_` does when it exceeds `clip` (0: no clipping).
        Replicas hold equal copies of their stage's gradients, so the squares are summed over one pipeline;
        FSDP2 shards hold distinct parts, so they are summed over every rank."""
        tied = self.tied
        grads = [_local(p.grad) for p in self.stage_module.parameters()
                 if p.grad is not None and not (p is tied and not self.first)]
        local = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]).square().sum() if grads else \
            torch.zeros((), device=self.device)
        squares = local.to(torch.float64).reshape(1)
        tdist.all_reduce(squares, group=None if self.sharded else self.group)
        norm = torch.sqrt(squares).to(torch.float32)
        if clip > 0:
            coef = torch.clamp(clip / (norm + 1e-6), max=1.0)
            for p in self.stage_module.parameters():
                if p.grad is not None:
                    g = _local(p.grad)
                    g.mul_(coef.to(g.device, g.dtype))
        return float(norm)

    @torch.no_grad()
    def evaluate(self, objective, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], autocast) -> tuple[float, dict]:
        """The mean validation loss over `batches` (every rank holds the same ones), as `loop.evaluate`
        computes it on one process: the residual stream is passed stage to stage by plain send/recv (the
        batches may differ in size, which a schedule's fixed buffers do not allow), the last stage scores,
        and the mean is broadcast to the pipeline's stages (every pipeline computes the same one)."""
        _check_objective(objective)
        self.stage_module.eval()
        total, n = 0.0, 0
        try:
            with autocast:
                for x, y in batches:
                    h = x
                    if not self.first:
                        shape = (*x.shape, self.module.config.d_model)
                        h = torch.empty(shape, dtype=self.hidden_dtype, device=self.device)
                        tdist.recv(h, group=self.group, group_src=self.stage - 1)
                    h = self.stage_module(h)
                    if not self.last:
                        tdist.send(h.to(self.hidden_dtype).contiguous(), group=self.group, group_dst=self.stage + 1)
                    else:
                        total += float(cross_entropy(h, y))
                    n += 1
        finally:
            self.stage_module.train()
        mean = torch.tensor([total / max(n, 1)], dtype=torch.float64, device=self.device)
        tdist.broadcast(mean, group=self.group, group_src=self.stages - 1)
        return float(mean), {}


def _local(t: torch.Tensor) -> torch.Tensor:
    """A tensor's own storage: a DTensor's local shard (FSDP2), a plain tensor itself. In-place changes to
    it change the DTensor (under no_grad `to_local()` is the shard itself)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _check_objective(objective) -> None:
    from lmforge.train.objectives import Pretrain

    if not isinstance(objective, Pretrain):
        raise UserError("pipeline parallelism (--parallel pp=N) trains the pretraining objective only")


def check_config(cfg, spec: str) -> None:
    """What a pipeline cannot split yet (a stage count above the layer count is refused by lmforge.parallel)."""
    if cfg.n_experts:
        raise UserError(f"--parallel {spec!r}: mixture-of-experts models are not split into pipeline stages yet "
                        f"(the router's load-balancing loss needs every layer's routing on the last stage); "
                        f"use ddp or fsdp")


def parallelize(model: GPT, dist) -> PipelinedGPT:
    """Cut `model` (the same weights on every rank: the same seed, or the same checkpoint) into `dist.pp`
    stages on the (dp, pp) mesh of `dist` ("pp" or "pp+fsdp"; dp = dist.data_world, 1 for `pp=N` alone) and
    keep this rank's stage, sharded over dp under "pp+fsdp". Every rank must call this (it creates the
    mesh's and the tied matrix's groups)."""
    from torch.distributed.device_mesh import init_device_mesh

    stages, pipelines = dist.pp, dist.data_world
    check_config(model.config, f"pp={stages}")
    mesh = init_device_mesh(dist.device.type, (pipelines, stages), mesh_dim_names=("dp", "pp"))
    # The batch is sliced by Dist.data_rank; the mesh must put this rank in the same pipeline.
    assert mesh.get_local_rank("dp") == dist.data_rank and mesh.get_local_rank("pp") == dist.rank % stages
    stage = mesh.get_local_rank("pp")
    tied_group = None
    if model.config.tie_embeddings:
        for d in range(pipelines):  # collectives: every rank creates every pipeline's group, two ranks use each
            ends = tdist.new_group([d * stages, d * stages + stages - 1])
            if d == dist.data_rank:
                tied_group = ends
    sharded = dist.strategy == "pp+fsdp"
    pipe = PipelinedGPT(model, stage, stages, dist.device, mesh["pp"].get_group(), tied_group,
                        mesh["dp"] if pipelines > 1 or sharded else None, sharded)
    _release_other_stages(model, pipe.stage_module)
    if sharded:
        _shard_stage(model, pipe.stage_module, mesh["dp"])
    return pipe


def _shard_stage(model: GPT, stage: StageModule, dp_mesh) -> None:
    """FSDP2 over `dp_mesh` on each of the stage's blocks, then on the stage (the embeddings, final norm and
    head it holds). FSDP2 replaces each parameter on the modules inside the stage; a tied matrix is also held
    by a module outside it (`lm_head` on stage 0, `tok_emb` on the last), which is pointed at the sharded
    parameter too, so the model's parameter list (names, order, tying) stays one process's."""
    from torch.distributed.fsdp import fully_shard

    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((module, name))
    before = {name: p for name, p in stage.named_parameters()}
    for block in stage.blocks.values():
        fully_shard(block, mesh=dp_mesh)
    fully_shard(stage, mesh=dp_mesh)
    after = dict(stage.named_parameters())
    for name, old in before.items():
        for module, attr in holders[id(old)]:
            if getattr(module, attr) is old:
                setattr(module, attr, after[name])


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor whole on the CPU: an FSDP2 shard gathered over its stage's dp group (a collective every copy
    of the stage enters, in the same order: they hold the same parameters)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def _held(tensors: dict[str, torch.Tensor], send: bool) -> dict[str, torch.Tensor]:
    """This stage's real tensors, whole; empty on the pipelines after the first (their copies are the same),
    which still take part in gathering their shards."""
    held = {k: _whole(v) for k, v in tensors.items() if not v.is_meta}
    return held if send else {}


def full_state_dict(model: GPT, main: bool, first_replica: bool = True) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0: the first pipeline's stages' real tensors gathered there (every
    rank must call this). The objects cross the process group in memory only; what is written stays
    safetensors."""
    parts: list[Any] | None = [None] * tdist.get_world_size() if main else None
    tdist.gather_object(_held(model.state_dict(), first_replica), parts, dst=0)
    if not main:
        return None
    whole: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, t in part.items():  # a tied matrix comes from both ends: its copies must not have drifted
            if name in whole and not torch.equal(whole[name], t):
                raise RuntimeError(f"pipeline checkpoint: the stages hold different copies of {name}")
            whole[name] = t
    missing = [k for k in model.state_dict() if k not in whole]
    if missing:
        raise RuntimeError(f"pipeline checkpoint: no stage holds {missing[:3]}")
    return whole


def full_optimizer_state(model: GPT, optimizer: torch.optim.Optimizer, main: bool,
                         first_replica: bool = True) -> dict | None:
    """The optimizer's whole state on rank 0, in one process's `state_dict()` layout: the optimizer is
    built over the whole model on every rank, so its numbering is already one process's and each rank
    holds the state of its own stage's parameters (both ends hold the tied matrix's, equal; FSDP2's
    shards are made whole first, and the first pipeline's stages send theirs)."""
    sd = optimizer.state_dict()
    mine = {idx: {k: _whole(v) if torch.is_tensor(v) else v for k, v in s.items()} for idx, s in sd["state"].items()}
    mine = mine if first_replica else {}
    parts: list[Any] | None = [None] * tdist.get_world_size() if main else None
    tdist.gather_object(mine, parts, dst=0)
    if not main:
        return None
    state: dict[int, dict] = {}
    for part in parts:
        state.update(part)
    return {"state": dict(sorted(state.items())), "param_groups": sd["param_groups"]}


def load_full_optimizer_state(model: GPT, optimizer: torch.optim.Optimizer, whole: dict) -> None:
    """Load a whole optimizer state (one process's, or `full_optimizer_state`'s), keeping the entries of
    the parameters this stage holds; under FSDP2 each rank keeps its shard of each (the copies of a stage
    walk the same entries in the same order, so the scatters line up)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for idx, s in whole["state"].items():
        p = params[int(idx)]
        if p.is_meta:
            continue
        if isinstance(p, DTensor):
            s = {k: distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)
                 if torch.is_tensor(v) and v.shape == p.shape else v for k, v in s.items()}
        state[int(idx)] = s
    optimizer.load_state_dict({"state": state, "param_groups": whole["param_groups"]})
