"""Training throughput and model FLOPs utilisation (MFU) of the real training loop (issue 18, requirement 5).

    python bench/train_throughput.py                 # small and base: fp32 / bf16 / auto x compile off / on, + 2-process DDP
    python bench/train_throughput.py --presets small --steps 20 --batch-size 8 --compile off --ddp 0
    python bench/train_throughput.py --presets tiny --steps 4           # a smoke test of every path (seconds, not figures)
    python bench/train_throughput.py --presets small --precisions fp32 --compile off --ddp 0 --activation-checkpointing

For each preset, precision and torch.compile setting it runs `lmforge.train.loop.fit` (AdamW, clipping, the
same code as `lmforge pretrain`) on random tokens, in one process, and takes the median tokens/s over the
steps after warm-up (the first two steps, which include compilation, and the last, which includes the
final evaluation and save, are left out). Precisions:
  - fp32; bf16 (autocast, weights and optimizer in fp32, as `--precision bf16` trains);
  - auto: what `lmforge pretrain --precision auto` trains in (`lmforge.train.precision.resolve_auto`): on a
    CPU it times a forward and backward in each and keeps bf16 only when it is clearly faster (cached per
    machine, shape and batch; its figures are printed), on a CUDA device bf16 where the GPU has it. The row
    names the precision it ran in.
MFU is reported two ways, each against the measured matmul peak OF THE PRECISION THE ROW RAN IN (an fp32
and a bf16 square matmul, `lmforge.plan.measure_matmul_flops`, best of several runs):
  - 6 * params * tokens/s / peak, the issue's definition (params include the embedding table), and
  - training FLOPs/token (6 * matmul params + attention) * tokens/s / peak, the PaLM-paper definition.
With `--ddp N` (default 2; 0 leaves it out) each preset also runs in fp32 without compile on N processes
through torchrun (`--parallel ddp` over gloo on the CPU, the path `lmforge pretrain --nproc N --parallel ddp`
takes: `lmforge.train.distributed.setup` and `wrap`), with the same GLOBAL batch split between the ranks,
and the row reports the speed-up tokens/s(N processes) / tokens/s(1 process, fp32, no compile) and the
scaling efficiency, that speed-up / N. torchrun gives each worker one thread (OMP_NUM_THREADS=1) unless
the environment sets it; the single-process rows use torch's default thread count. On a machine with fewer
free cores than processes, expect a poor figure: it is reported, not judged.
With `--activation-checkpointing` every single-process row recomputes each block in the backward
(`lmforge.train.memory`): expect roughly a third less speed for much less activation memory.
Speed is reported, never asserted: compare runs on the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.model.gpt import GPT
from lmforge.plan import measure_matmul_flops
from lmforge.presets import get_preset
from lmforge.train import objectives
from lmforge.train.checkpointer import Checkpointer
from lmforge.train.distributed import Dist, setup, wrap
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.precision import resolve_auto

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class RandomTokens:
    """Random token ids, a pure function of the step. With several processes `batch` is the global
    micro-batch and each rank keeps its own contiguous rows, as `WindowBatches` does; `tokens_per_batch`
    stays the global count, so fit's tokens/s is the whole job's."""

    def __init__(self, vocab: int, batch: int, block: int, device: torch.device, rank: int = 0, world: int = 1) -> None:
        self.vocab, self.batch, self.block, self.device = vocab, batch, block, device
        self.tokens_per_batch = batch * block
        per = batch // world
        self.rows = slice(rank * per, (rank + 1) * per)

    def train_batch(self, step: int, micro: int):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, self.vocab, (self.batch, self.block + 1), generator=g)[self.rows].to(self.device)
        return x[:, :-1], x[:, 1:]

    def val_batches(self):
        return [self.train_batch(-1, 0)]


def run_fit(preset: str, *, steps: int, batch_size: int, block: int | None, precision: str, compile: bool,
            device: torch.device, dist: Dist | None = None, activation_checkpointing: bool = False) -> float | None:
    """Median tokens/s of `fit` after warm-up (steps 3 .. steps-1; with fewer than 4 steps, every step).
    None on the ranks other than 0, which do not log."""
    cfg = get_preset(preset, **({"context_length": block} if block else {}))
    torch.manual_seed(0)
    model: torch.nn.Module = GPT(cfg).to(device)
    world, rank = (dist.world_size, dist.rank) if dist else (1, 0)
    if dist:
        model = wrap(model, dist, precision)
    rates: list[tuple[int, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        fit(model, objectives.pretrain, RandomTokens(cfg.vocab_size, batch_size, cfg.context_length, device, rank, world),
            TrainConfig(max_steps=steps, batch_size=batch_size, warmup_steps=1, log_interval=1, eval_interval=10**9,
                        save_interval=0, precision=precision, compile=compile,
                        activation_checkpointing=activation_checkpointing),
            Checkpointer(tmp), progress=False, device=device, dist=dist,
            on_log=lambda r: rates.append((r["step"], r["tokens_per_s"])) if "tokens_per_s" in r else None)
    steady = [t for s, t in rates if 2 < s < steps] or [t for _, t in rates]
    return statistics.median(steady) if steady else None


def auto_precision(preset: str, *, batch_size: int, block: int | None, device: torch.device) -> tuple[str, str]:
    """(precision, why) that "auto" means here: the CPU's measured choice, or fit's choice on a GPU."""
    cfg = get_preset(preset, **({"context_length": block} if block else {}))
    choice = resolve_auto(cfg, batch_size, device)  # what `lmforge pretrain --precision auto` trains in
    return choice.precision, choice.describe()


def run_ddp(nproc: int, args, preset: str) -> float:
    """tokens/s of `preset` (fp32, no compile) on `nproc` processes under torchrun, from rank 0's report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "ddp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(Path(__file__).resolve()), "--ddp-worker", str(report), "--presets", preset,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--block", str(args.block),
               "--device", args.device]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        if done.returncode or not report.exists():
            sys.exit(f"the {nproc}-process DDP run failed (torchrun exit {done.returncode}):\n{done.stdout[-4000:]}")
        return json.loads(report.read_text())["tokens_per_s"]


def ddp_worker(args) -> None:
    """One torchrun worker: join the gloo/NCCL group as `lmforge pretrain --parallel ddp` does and train."""
    dist, device = setup("ddp", torch.device(args.device))
    try:
        tps = run_fit(args.presets[0], steps=args.steps, batch_size=args.batch_size, block=args.block or None,
                      precision="fp32", compile=False, device=device, dist=dist)
        if dist.is_main:
            Path(args.ddp_worker).write_text(json.dumps({"tokens_per_s": tps, "threads": torch.get_num_threads()}))
    finally:
        dist.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["small", "base"], help="presets to measure (default: small base)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "auto"], choices=["fp32", "bf16", "auto"],
                    help="precisions to measure (default: fp32 bf16 auto)")
    ap.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"],
                    help="torch.compile settings to measure (default: off on)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default: 12)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step, global (default: 8)")
    ap.add_argument("--block", type=int, default=256, help="tokens per sequence; 0 = the preset's context (default: 256)")
    ap.add_argument("--ddp", type=int, default=2, metavar="N",
                    help="also run fp32 without compile on N processes through torchrun; 0 = no (default: 2)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="recompute each block in the backward in the single-process rows (default: off)")
    ap.add_argument("--ddp-worker", metavar="REPORT", help=argparse.SUPPRESS)  # internal: one torchrun worker
    args = ap.parse_args()
    if args.ddp_worker:
        return ddp_worker(args)
    if args.ddp and args.batch_size % args.ddp:
        ap.error(f"--batch-size {args.batch_size} must divide evenly among --ddp {args.ddp} processes")
    device = torch.device(args.device)

    peaks: dict[str, float | None] = {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    for name, dtype in DTYPES.items():
        try:
            peaks[name], what = measure_matmul_flops(dtype, device=device.type)
            print(f"peak {name}: {peaks[name] / 1e9:,.1f} GFLOP/s ({what})")
        except RuntimeError as e:  # no such matmul on this device
            peaks[name] = None
            print(f"peak {name}: not measurable here ({str(e).splitlines()[0]})")
    print()

    rows = []
    for preset in args.presets:
        cfg = get_preset(preset, **({"context_length": args.block} if args.block else {}))
        base_tps = None
        for prec in args.precisions:
            used = prec
            if prec == "auto":
                used, why = auto_precision(preset, batch_size=args.batch_size, block=args.block or None, device=device)
                print(f"{preset} auto -> {why}", flush=True)
            for comp in args.compile:
                tps = run_fit(preset, steps=args.steps, batch_size=args.batch_size, block=args.block or None,
                              precision=used, compile=comp == "on", device=device,
                              activation_checkpointing=args.activation_checkpointing)
                if used == "fp32" and comp == "off" and base_tps is None:
                    base_tps = tps
                label = f"auto ({used})" if prec == "auto" else prec
                label += " +AC" if args.activation_checkpointing else ""
                rows.append((preset, cfg, label, comp, "1", tps, peaks.get(used), ""))
                print(f"  {preset} {label} compile {comp}: {tps:,.0f} tokens/s", flush=True)
        if args.ddp:
            if base_tps is None:
                base_tps = run_fit(preset, steps=args.steps, batch_size=args.batch_size, block=args.block or None,
                                   precision="fp32", compile=False, device=device)
            tps = run_ddp(args.ddp, args, preset)
            speedup = tps / base_tps
            rows.append((preset, cfg, "fp32", "off", f"{args.ddp} (DDP)", tps, peaks["fp32"],
                         f"{speedup:.2f}x / {speedup / args.ddp:.0%}"))
            print(f"  {preset} fp32 DDP x{args.ddp}: {tps:,.0f} tokens/s", flush=True)

    print()
    print("| preset | params | batch x context | precision | compile | processes | tokens/s | MFU (6*N) "
          "| MFU (6*N + attention) | speed-up vs 1 process / efficiency |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preset, cfg, label, comp, procs, tps, peak, scaling in rows:
        params = cfg.num_params()
        mfu = [f"{flops * tps / peak:.1%}" if peak else "n/a" for flops in (6 * params, cfg.flops_per_token())]
        print(f"| {preset} | {params / 1e6:.1f}M | {args.batch_size} x {cfg.context_length} | {label} | {comp} | {procs} "
              f"| {tps:,.0f} | {mfu[0]} | {mfu[1]} | {scaling} |")
    print("\nMFU is against the measured matmul peak of the precision the row ran in; DDP rows against fp32's "
          "(the whole machine's peak, shared by the processes).")


if __name__ == "__main__":
    main()
