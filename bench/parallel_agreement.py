"""How closely every way of training on several processes agrees with one process, in fp32 and in bf16.

    python bench/parallel_agreement.py                    # 2 processes: ddp, fsdp, tp=2, pp=2; fp32 and bf16
    python bench/parallel_agreement.py --nproc 4 --specs ddp,fsdp,tp=2,dp=2,tp=2,fsdp

Every run trains the same `tiny` model (4 heads, 2 key/value heads, 2 layers, context 32) from the same seed for
`--steps` steps on tinyshakespeare (../shared/data) with the same GLOBAL batch, through `lmforge.train.loop.fit`,
once on one process and once per --parallel spec on N gloo processes of this machine. The table gives, per spec and
precision, the largest difference of the per-step training loss and of any final weight from the single-process
run of the same precision. In fp32 the tests hold these within 1e-5 (tests/train/test_distributed.py, test_mesh.py,
test_pipeline.py); bf16 autocast rounds each matmul's inputs to 8 bits of mantissa, and different shapes of the
partial products (half a batch, half the heads, one stage) round differently, so its figure is the tolerance to
state, measured here rather than assumed. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from pathlib import Path

import torch

from lmforge.data.shards import prepare_data
from lmforge.loaders.model_dir import load_model
from lmforge.model.gpt import GPT
from lmforge.parallel import parse_parallel
from lmforge.presets import get_preset
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train import objectives
from lmforge.train.checkpointer import Checkpointer
from lmforge.train.distributed import Dist, setup, strategy_of, wrap
from lmforge.train.loop import TrainConfig, fit
from lmforge.train.pretrain import WindowBatches

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def _recipe(steps: int, precision: str) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=2, lr_decay_steps=steps + 4,
                       eval_interval=steps, log_interval=1, save_interval=0, seed=7, precision=precision)


def _train(out: Path, root: Path, dist: Dist, steps: int, precision: str) -> list[float]:
    tok = Tokenizer.load(root / "tok")
    data = prepare_data(str(root / "corpus.txt"), tok, root / "cache", show_progress=False)
    tc = _recipe(steps, precision)
    torch.manual_seed(tc.seed)
    model = GPT(get_preset("tiny", vocab_size=tok.vocab_size, context_length=32, dropout=0.0))
    batches = WindowBatches(data, batch_size=tc.batch_size, block_size=32, grad_accum=tc.grad_accum, seed=tc.seed,
                            eval_tokens=256, device=torch.device("cpu"), rank=dist.data_rank, world_size=dist.data_world)
    result = fit(wrap(model, dist, precision), objectives.pretrain, batches, tc, Checkpointer(out, tokenizer=tok),
                 progress=False, dist=dist)
    return [h["loss"] for h in result.history if "loss" in h]


def _worker(rank: int, world: int, port: int, root: str, specs: list[str], steps: int, precisions: list[str]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    base, _ = setup("ddp", torch.device("cpu"))
    try:
        for spec in specs:
            par = parse_parallel(spec, world, unit="processes", count_flag="--nproc")
            dist = Dist(rank=rank, world_size=world, strategy=strategy_of(par, spec), tp=par.tp, pp=par.pp)
            for precision in precisions:
                name = f"{spec}-{precision}".replace("=", "").replace(",", "_")
                losses = _train(Path(root) / name, Path(root), dist, steps, precision)
                if rank == 0:
                    (Path(root) / f"{name}.json").write_text(json.dumps(losses))
    finally:
        base.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2, help="processes (default: 2)")
    ap.add_argument("--specs", default=None, help="--parallel specs, ';'-separated (default: ddp;fsdp;tp=N;pp=N)")
    ap.add_argument("--steps", type=int, default=20, help="training steps (default: 20)")
    ap.add_argument("--precisions", default="fp32,bf16", help="(default: fp32,bf16)")
    args = ap.parse_args()
    n = args.nproc
    specs = args.specs.split(";") if args.specs else ["ddp", "fsdp", f"tp={n}", f"pp={n}"]
    precisions = args.precisions.split(",")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["LMFORGE_HOME"] = str(root / "home")
        text = SHAKESPEARE.read_text()[:200_000]
        (root / "corpus.txt").write_text(text)
        train_tokenizer([text], 320, show_progress=False).save(root / "tok")
        single = {p: _train(root / f"single-{p}", root, Dist(), args.steps, p) for p in precisions}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(n, port, str(root), specs, args.steps, precisions), nprocs=n, join=True)
        print(f"{n} gloo processes vs 1 process, tiny preset, {args.steps} steps, global batch 4 x 2 micro-batches")
        print(f"{'spec':<14}{'precision':<11}{'max |loss diff|':>17}{'max |weight diff|':>19}{'final loss':>12}")
        for spec in specs:
            for p in precisions:
                name = f"{spec}-{p}".replace("=", "").replace(",", "_")
                losses = json.loads((root / f"{name}.json").read_text())
                ref, got = load_model(root / f"single-{p}").state_dict(), load_model(root / name).state_dict()
                dw = max(float((got[k] - v).abs().max()) for k, v in ref.items())
                dl = max(abs(a - b) for a, b in zip(single[p], losses))
                print(f"{spec:<14}{p:<11}{dl:>17.2e}{dw:>19.2e}{losses[-1]:>12.4f}")


if __name__ == "__main__":
    main()
