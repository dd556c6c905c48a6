"""Batch-1 matrix-vector throughput: PyTorch's F.linear with one row vs lmforge's gemv kernel.

    python bench/matvec.py                       # fp32/bf16/fp16, 1 and 2 threads, SmolLM2-135M shapes
    python bench/matvec.py --threads 2 --dtypes bf16 --repeats 30

Decoding one token reads every weight once, so what matters is the rate at which weights stream from memory.
For each matrix shape of a SmolLM2-135M-sized model (d 576, 30 layers, fused qkv 960x576, o 576x576, fused
gate/up 3072x576, down 576x1536, lm_head 49152x576) it reports GB/s of weight read by
  - F.linear(x, W) with x one row in W's dtype (what nn.Linear does at batch 1), and
  - fastpath.gemv(W, x) (fp32 x, fp32 accumulation),
each cycling through enough copies of the matrix (>= 128 MB) that the weights come from DRAM, not from the
32 MB L3, as they do in a real decode step. References: torch's `a.sum()` over 256 MB of fp32 and the
kernel module's own plain streaming read of the same buffer. Then a whole model's worth of distinct matrices
(30 layers + lm_head, ~270 MB in bf16) is run in layer order, as one decode step would, through F.linear,
gemv and FastLinear modules (kernel plus module-call overhead), giving time per token of the matmuls alone
and the tokens/s upper bound it implies (attention, norms and sampling come on top).

The paths being compared run round-robin, once each per round, and the best of `--repeats` rounds is
reported (the machine may be shared: the best run is the least disturbed, and round-robin makes a noisy
neighbour hit every path alike); the median is given for the per-token totals. Speed is reported, never
asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.engine import fastpath  # noqa: E402

D, LAYERS, VOCAB, FF = 576, 30, 49152, 1536
SHAPES = {  # name: (out, in), per layer count
    "qkv": ((960, D), LAYERS),
    "o": ((D, D), LAYERS),
    "gate_up": ((2 * FF, D), LAYERS),
    "down": ((D, FF), LAYERS),
    "lm_head": ((VOCAB, D), 1),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COLD_BYTES = 128 << 20


def best_of(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Run each function once per round, round-robin, so that a noisy neighbour slows all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def copies(shape, dtype, min_bytes: int) -> list[torch.Tensor]:
    one = torch.randn(shape).to(dtype)
    n = max(1, -(-min_bytes // (one.numel() * one.element_size())))
    return [one] + [one.clone() for _ in range(n - 1)]


def stream_refs(rounds: int) -> dict[str, float]:
    """GB/s of a plain read of 256 MB of fp32: torch's a.sum() and the kernel module's own streaming loop."""
    a = torch.randn(64 << 20)
    fns = {"torch a.sum()": lambda: a.sum()}
    k = fastpath._kernel()
    if k is not None:
        fns["kernel read"] = lambda: k.stream(a.data_ptr(), a.numel())
    return {name: a.numel() * 4 / min(t) / 1e9 for name, t in best_of(fns, rounds).items()}


def matrix_rows(dtype: torch.dtype, rounds: int) -> list[tuple[str, float, float | None]]:
    rows = []
    for name, ((out_f, in_f), _) in SHAPES.items():
        Ws = copies((out_f, in_f), dtype, COLD_BYTES)
        x = torch.randn(in_f)
        xl = x.to(dtype)[None]
        nbytes = Ws[0].numel() * Ws[0].element_size() * len(Ws)
        fns = {"F.linear": lambda: [F.linear(xl, W) for W in Ws]}
        if fastpath.available():
            fns["gemv"] = lambda: [fastpath.gemv(W, x) for W in Ws]
        gbs = {k: nbytes / min(t) / 1e9 for k, t in best_of(fns, rounds).items()}
        rows.append((f"{name} {out_f}x{in_f}", gbs["F.linear"], gbs.get("gemv")))
        del Ws
    return rows


def model_step(dtype: torch.dtype, rounds: int) -> tuple[dict[str, tuple[float, float]], int]:
    """One decode step's matmuls over distinct 135M-shaped matrices, in layer order: (best, median) seconds
    for F.linear (one row in the weight dtype, as nn.Linear at batch 1), the gemv function, and FastLinear
    modules (the kernel plus everything a module call costs)."""
    (qkv, _), (o, _), (gu, _), (down, _), (head, _) = SHAPES.values()
    mats = [torch.randn(s).to(dtype) for _ in range(LAYERS) for s in (qkv, o, gu, down)] + [torch.randn(head).to(dtype)]
    nbytes = sum(W.numel() * W.element_size() for W in mats)
    xs = {n: torch.randn(n) for n in (D, FF)}
    xls = {n: v.to(dtype)[None] for n, v in xs.items()}
    x3 = {n: v[None, None] for n, v in xs.items()}  # (B=1, T=1, C) as in the model
    mods = []
    for W in mats:
        lin = fastpath.FastLinear(W.shape[1], W.shape[0], bias=False, dtype=dtype)
        lin.weight = torch.nn.Parameter(W, requires_grad=False)
        mods.append(lin)

    def fast_step():
        with torch.inference_mode():
            for m in mods:
                m(x3[m.in_features])

    fns = {"F.linear": lambda: [F.linear(xls[W.shape[1]], W) for W in mats]}
    if fastpath.available():
        fns["gemv"] = lambda: [fastpath.gemv(W, xs[W.shape[1]]) for W in mats]
        fns["FastLinear"] = fast_step
    times = best_of(fns, rounds)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}, nbytes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=12, help="rounds per measurement (best is reported)")
    args = ap.parse_args(argv)

    t = time.perf_counter()
    ok = fastpath.available()
    print(f"kernel: {'available' if ok else 'UNAVAILABLE: ' + str(fastpath.unavailable_reason())}"
          f" (build/load {time.perf_counter() - t:.1f}s); torch {torch.__version__}\n")
    before = torch.get_num_threads()
    table, steps, refs = [], [], {}
    try:
        for th in args.threads:
            torch.set_num_threads(th)
            refs[th] = stream_refs(args.repeats)
            for dname in args.dtypes:
                for shape, lin, gem in matrix_rows(DTYPES[dname], args.repeats):
                    table.append((shape, dname, th, lin, gem))
                step, nbytes = model_step(DTYPES[dname], args.repeats)
                steps.append((dname, th, nbytes, step))
    finally:
        torch.set_num_threads(before)

    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    print("## Streaming references (256 MB fp32, GB/s)\n")
    print("| threads | torch a.sum() | kernel's plain read |")
    print("|---:|---:|---:|")
    for th, r in refs.items():
        print(f"| {th} | {r['torch a.sum()']:.1f} | {fmt(r.get('kernel read'))} |")

    print("\n## One matrix, one row (weights from DRAM), GB/s of weights read\n")
    print("| matrix | dtype | threads | F.linear | gemv | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for shape, dname, th, lin, gem in table:
        print(f"| {shape} | {dname} | {th} | {lin:.1f} | {fmt(gem)} | {fmt(gem / lin if gem else None)}x |")

    print("\n## One decode step's matmuls, 135M shapes (30 layers + lm_head)\n")
    print("| dtype | threads | MB/token | path | ms/token (best / median) | GB/s | tokens/s bound "
          "| % of stream bound |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for dname, th, nbytes, step in steps:
        bound = max(refs[th].values()) * 1e9
        for path, (best, med) in step.items():
            print(f"| {dname} | {th} | {nbytes / 1e6:.0f} | {path} | {best * 1e3:.2f} / {med * 1e3:.2f} | "
                  f"{nbytes / best / 1e9:.1f} | {1 / best:.0f} | {100 * nbytes / bound / best:.0f}% |")
    print("\n(stream bound = MB/token at the better of the two streaming references for that thread count)")


if __name__ == "__main__":
    main()
