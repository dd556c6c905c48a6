"""Training on several processes (torchrun): the process group, and the model wrapped from outside.

`model/gpt.py` knows nothing of this: a `GPT` is wrapped here, after it is built, in DDP (each rank holds
the whole model, gradients are averaged) or FSDP2 (`fully_shard` on every block, then on the root: each
rank holds a slice of every weight, gathered for the forward and backward of its block). The one `fit()`
drives every case through a `Dist`, the process's place in the job: a single process is `Dist()` (rank 0
of 1), which makes every collective a no-op, so the single-process run is the N=1 case of the same code.

How the batch is divided (one rule for every process count): `--batch-size` is the GLOBAL micro-batch, in
sequences summed over all processes; each of N ranks computes rows [r*B/N, (r+1)*B/N) of every micro-batch
that one process would draw (`WindowBatches`), so B must be divisible by N. A step is `grad_accum`
micro-batches, so the global batch is batch_size x grad_accum sequences of context_length tokens whatever N
is, and the loss curve and the weights are those of one process (up to float summation order). Averaging
the ranks' mean losses equals the mean over the global batch because every rank has as many rows and
every row as many scored tokens (pretraining windows).

A rank that dies: torchrun sees its child exit, stops the other workers and exits non-zero naming the
failed rank; a rank blocked in a collective with a dead peer fails in gloo/NCCL at once, and a hung (alive)
peer is bounded by the process group's timeout (`LMFORGE_DIST_TIMEOUT` seconds, default 300).

Checkpoints: rank 0 writes the usual Hugging Face directory (the weights gathered). Under FSDP2 every rank
writes its own slices of the optimizer state (`lmforge.train.sharded_state`, DCP as safetensors), so no
rank holds the whole state; DDP and TP write it whole from rank 0. Either layout resumes on any number of
processes, with any strategy: each rank reads what it holds.

Tensor parallelism (`--parallel tp=N`; `lmforge.train.tensor_parallel`): the blocks' projections are split
over N consecutive ranks, which all see the same slice of the batch: the data is divided among the
`data_world` = world_size / tp data-parallel groups. With data parallelism too (`tp=2,dp=4`: replicas,
strategy "tp"; `tp=2,fsdp`: FSDP2 shards, strategy "tp+fsdp") the processes form a 2-D (dp, tp) device mesh
(`lmforge.train.mesh`); `tp=N` alone is its dp=1 case. Checkpoints are written whole, in one process's
layout.

Pipeline parallelism (`--parallel pp=N`; `lmforge.train.pipeline`): the blocks are cut into N stages, one
a rank, run by a 1F1B (or GPipe) schedule whose micro-batches are one step's `grad_accum` micro-batches;
the stages of one pipeline read the same slice of the batch (stage 0 its tokens, the last stage its
targets). With data parallelism too (`pp=2,dp=2`: replicas of the pipeline, strategy "pp"; `pp=2,fsdp`:
FSDP2 over dp on every stage, strategy "pp+fsdp") the processes form a 2-D (dp, pp) mesh whose pipelines
are consecutive ranks, so the data is divided among `data_world` = world_size / pp pipelines; `pp=N`
alone is its dp=1 case. Checkpoints are written whole, as TP's are.

Not here yet (issue 18): pipeline parallelism combined with tensor parallelism (`pp=2,tp=2`), pipeline
stages for mixture-of-experts models, and sharded optimizer state for TP and PP (TP's rows are permuted
per rank, so its state is gathered whole on rank 0).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

from lmforge.errors import UserError
from lmforge.parallel import Parallel, check_model
from lmforge.parallel import parse_parallel as parse_spec

__all__ = ["Dist", "check_backend", "check_fits", "launched_by_torchrun", "lost_peer", "parse_parallel", "setup", "strategy_of", "torchrun_command", "wrap"]

DEFAULT_TIMEOUT_S = 300
SPEC_UNIT = dict(unit="processes", count_flag="--nproc (torchrun's world size)")


def parse_parallel(spec: str | None, world: int | None = None) -> Parallel | None:
    """The --parallel text for a job of `world` processes (None: the torchrun environment's WORLD_SIZE, 1
    without torchrun) through the one parser `lmforge plan` uses too; None for `none` (one process, no group).
    Mistakes, and splits this training loop cannot run yet, are one line."""
    if (spec or "none").strip().lower() == "none":
        return None
    world = _env_int("WORLD_SIZE", 1) if world is None else world
    par = parse_spec(spec, world, **SPEC_UNIT)
    strategy_of(par, spec)  # what is not built yet is refused here, before any slow work
    return par


def strategy_of(par: Parallel | None, spec: str = "") -> str:
    """The training strategy for a parsed spec: none | ddp | fsdp | tp (alone, or with dp replicas) | tp+fsdp |
    pp (alone, or with dp replicas) | pp+fsdp."""
    if par is None:
        return "none"
    if par.dp > 1 and par.fsdp > 1:
        raise UserError(f"--parallel {spec or par.describe()!r}: replicas of FSDP shards (HSDP: dp and fsdp both > 1) are "
                        f"not available in training yet; use fsdp or dp over the data-parallel processes")
    if par.pp > 1 and par.tp > 1:
        raise UserError(f"--parallel {spec or par.describe()!r}: pipeline parallelism combined with tensor parallelism "
                        f"is not available yet; use pp=N with dp or fsdp, or tp=N with dp or fsdp")
    if par.pp > 1:  # alone, or on a 2-D mesh with dp replicas ("pp") or FSDP2 shards ("pp+fsdp"): lmforge.train.pipeline
        return "pp+fsdp" if par.sharded else "pp"
    if par.tp > 1:  # alone, or on a 2-D mesh with dp replicas ("tp") or FSDP2 shards ("tp+fsdp"): lmforge.train.mesh
        return "tp+fsdp" if par.sharded else "tp"
    return "fsdp" if par.sharded else "ddp"


def check_fits(par: Parallel | None, cfg, spec: str = "") -> None:
    """The model can be split as `par` asks (checked where the config is known, before data or workers)."""
    if par is None:
        return
    check_model(par, par.world, cfg, spec, **SPEC_UNIT)
    if par.tp > 1 and cfg.n_experts:
        raise UserError(f"--parallel {spec!r}: mixture-of-experts models are not split by tensor parallelism yet; "
                        f"use ddp or fsdp")
    if par.pp > 1:
        from lmforge.train.pipeline import check_config

        check_config(cfg, spec)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def lost_peer(error: BaseException) -> bool:
    """Whether a collective failed because another rank went away (closed connection, timeout) rather than
    from a bug here: gloo and NCCL raise plain RuntimeErrors (or DistErrors) that say so in their text."""
    if isinstance(error, getattr(tdist, "DistError", ())):
        return True
    text = str(error).lower()
    return any(m in text for m in ("connection closed", "connection reset", "timed out", "timeout", "broken pipe",
                                   "nccl", "gloo"))


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"the launcher set {name}={raw!r}, which is not a whole number") from None


@dataclass
class Dist:
    """This process's place in the job and the few collectives `fit()` needs (no-ops for one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp: int = 1  # tensor-parallel ranks that share one copy of the batch (strategies "tp" and "tp+fsdp")
    pp: int = 1  # pipeline stages, which share one copy of the batch too (strategies "pp" and "pp+fsdp")

    @property
    def data_rank(self) -> int:
        """Which slice of every global micro-batch this rank computes: tensor-parallel ranks and pipeline
        stages share one."""
        return self.rank // (self.tp * self.pp)

    @property
    def data_world(self) -> int:
        """Into how many slices every global micro-batch is divided."""
        return self.world_size // (self.tp * self.pp)

    @property
    def gathers(self) -> bool:
        """Whether the weights are split across ranks, so saving gathers them (a collective every rank enters).
        The optimizer state is then gathered too, except under FSDP2, whose ranks write and read their own
        slices of it (`lmforge.train.sharded_state`)."""
        return self.strategy in ("fsdp", "tp", "tp+fsdp", "pp", "pp+fsdp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.strategy != "none" and tdist.is_available() and tdist.is_initialized()

    def grad_sync(self, model: torch.nn.Module, sync: bool):
        """A context for one micro-step's backward: gradients are reduced across ranks only when `sync`
        (the last micro-step of an accumulation); the others accumulate locally (DDP's no_sync, FSDP2's
        set_requires_gradient_sync, and for replicas of a tensor-parallel model no explicit all-reduce:
        `lmforge.train.mesh.replica_sync`), which saves grad_accum - 1 all-reduces a step."""
        if self.strategy == "ddp" and not sync:
            return model.no_sync()
        if self.strategy in ("fsdp", "tp+fsdp"):
            model.set_requires_gradient_sync(sync)
        if self.strategy == "tp" and self.data_world > 1:  # replicas of a tensor-parallel model
            from lmforge.train import mesh

            return mesh.replica_sync(model, sync)
        return nullcontext()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, one all-reduce (the loss, a stop flag)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        tdist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (CPU), None on the others. FSDP2 gathers its shards (a
        collective every rank must enter); otherwise rank 0 already holds them."""
        if self.strategy in ("tp", "tp+fsdp"):  # full_tensor() gathers over both mesh dimensions
            from lmforge.train import tensor_parallel

            return tensor_parallel.full_state_dict(model, self.is_main)
        if self.strategy in ("pp", "pp+fsdp"):
            from lmforge.train import pipeline

            return pipeline.full_state_dict(model, self.is_main, first_replica=self.data_rank == 0)
        if self.strategy != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.is_main else None

    def full_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """TP and PP: the optimizer's whole state on rank 0, in `optimizer.state_dict()`'s own layout (parameters
        numbered in group order), so the trainer state written from it resumes on one process or DDP."""
        if self.strategy in ("tp", "tp+fsdp"):  # full_tensor() gathers over both mesh dimensions
            from lmforge.train import tensor_parallel

            return tensor_parallel.full_optimizer_state(model, optimizer, self.is_main)
        if self.strategy in ("pp", "pp+fsdp"):
            from lmforge.train import pipeline

            return pipeline.full_optimizer_state(model, optimizer, self.is_main,
                                                  first_replica=self.data_rank == 0)
        return None  # DDP: rank 0 holds it; FSDP2 writes its own slices (lmforge.train.sharded_state)

    def load_full_optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, whole: dict) -> None:
        """TP and PP: load a whole optimizer state (as `full_optimizer_state` wrote it, or one process saved it),
        every rank keeping its own shard: what lets a run resume with any number of processes."""
        if self.strategy in ("tp", "tp+fsdp"):  # each rank keeps its shard on both mesh dimensions
            from lmforge.train import tensor_parallel

            return tensor_parallel.load_full_optimizer_state(model, optimizer, whole)
        if self.strategy in ("pp", "pp+fsdp"):
            from lmforge.train import pipeline

            return pipeline.load_full_optimizer_state(model, optimizer, whole)
        raise ValueError(f"strategy {self.strategy!r} reads its optimizer state itself (lmforge.train.sharded_state)")

    def close(self, ok: bool = True) -> None:
        """Leave the group together: a barrier first (one rank tearing gloo down while another still reads from
        it can abort a process at exit: "terminate called without an active exception"), then destroy. A peer
        already gone makes the barrier fail at once; there is nothing left to wait for then. `ok=False` (leaving
        on an exception) skips the barrier: it could pair with a barrier the other ranks are still to reach in
        their run and let them go on as if nothing had failed here."""
        if self.active:
            if ok:
                try:
                    tdist.barrier()
                except Exception:  # noqa: BLE001 - whatever the backend raises for a lost peer
                    pass
            tdist.destroy_process_group()


def check_backend(backend: str, device: torch.device) -> None:
    """The --backend asked for exists and fits the device (checked before any slow work)."""
    if backend not in ("auto", "gloo", "nccl"):
        raise UserError(f"--backend must be auto, gloo or nccl, got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise UserError("--backend nccl needs CUDA GPUs and this machine has none; use gloo (or leave it auto)")
    if backend == "nccl" and device.type != "cuda":
        raise UserError(f"--backend nccl runs on CUDA GPUs, but the device is {device}; use --device cuda or gloo")


def setup(parallel: Parallel | str | None, device: torch.device, backend: str = "auto") -> tuple[Dist, torch.device]:
    """Read the torchrun environment and join the process group. Returns the Dist and this rank's device
    (cuda:LOCAL_RANK when training on GPUs). One process without torchrun and `none` joins nothing.
    `parallel` is what `parse_parallel` returned, or the --parallel text itself."""
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"the launcher set RANK={rank} and WORLD_SIZE={world}; RANK must be in [0, WORLD_SIZE)")
    check_backend(backend, device)
    par = parse_parallel(parallel, world) if isinstance(parallel, str) or parallel is None else parallel
    if par is not None:
        check_model(par, world, None, par.describe(), **SPEC_UNIT)
    strategy = strategy_of(par)
    if strategy == "none":
        if world > 1:
            raise UserError(f"this is one of {world} processes started by torchrun; choose how they share the work "
                            f"with --parallel ddp, fsdp, tp={world} or pp={world}")
        return Dist(device=device), device
    if not tdist.is_available():
        raise UserError("this PyTorch build has no torch.distributed")
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"--parallel {strategy} runs on CPUs (gloo) or CUDA GPUs (NCCL), not on {device}")
    name = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
    timeout = timedelta(seconds=_env_int("LMFORGE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not tdist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            # The rendezvous store outlives a torchrun restart (--max-restarts), and gloo finds its peers' addresses
            # in it under the same keys every attempt: restarted workers could read the dead ones' and fail with
            # "Connection refused" (seen here about half the time). A prefix per attempt keeps attempts apart.
            store, _, _ = next(tdist.rendezvous("env://", rank, world, timeout=timeout))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            tdist.init_process_group(name, store=tdist.PrefixStore(f"lmforge/attempt-{attempt}", store), rank=rank,
                                     world_size=world, timeout=timeout)
        elif world == 1:  # --parallel without torchrun: a group of one, the N=1 case
            tdist.init_process_group(name, store=tdist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            raise UserError("WORLD_SIZE > 1 but no MASTER_ADDR: start the job with torchrun (or lmforge pretrain --nproc N)")
    return Dist(rank=rank, world_size=world, local_rank=local, strategy=strategy, device=device, tp=par.tp,
                pp=par.pp), device


def wrap(model: torch.nn.Module, dist: Dist, precision: str = "fp32") -> torch.nn.Module:
    """The model as the strategy trains it. DDP returns a wrapper (`unwrap` finds the model); FSDP2 changes
    the model in place (its parameters become sharded DTensors), so the optimizer must be built after."""
    if dist.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if dist.strategy in ("tp", "tp+fsdp"):
        from lmforge.train import mesh

        par = Parallel(**{"fsdp" if dist.strategy == "tp+fsdp" else "dp": dist.data_world}, tp=dist.tp)
        check_fits(par, model.config, par.describe())  # before any collective: one line, every rank
        return mesh.parallelize(model, dist, precision)
    if dist.strategy in ("pp", "pp+fsdp"):
        from lmforge.train import pipeline

        par = Parallel(**{"fsdp" if dist.strategy == "pp+fsdp" else "dp": dist.data_world}, pp=dist.pp)
        check_fits(par, model.config, par.describe())  # before any collective: one line, every rank
        return pipeline.parallelize(model, dist)
    if dist.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(dist.device.type, (dist.world_size,))
        kw: dict[str, Any] = {"mesh": mesh}
        if precision in ("bf16", "fp16"):  # compute in low precision, reduce gradients in fp32
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise UserError("--parallel fsdp shards a model by its transformer blocks, and this model has none")
        for block in blocks:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
        return model
    return model


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun line `lmforge pretrain --nproc N ...` runs for the user: one node, a free port."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "lmforge", *argv]
