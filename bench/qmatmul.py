"""Quantized matmul throughput: lmforge.quant.kernels per instruction-set path, against PyTorch.

    python bench/qmatmul.py                                  # default shapes and types, every runnable path
    python bench/qmatmul.py --types Q4_0 --shapes 4096x4096 --paths avx2,avx512vnni --repeats 5

For each weight shape (out x in) and GGML type it reports
  - n=1 (batch-1 decode): GB/s of packed bytes read, and its share of the ceiling: a plain sum over a
    256 MB buffer of bytes by the same library (`sum_bytes`), i.e. how fast memory can be read at all;
  - n=8 (a small continuous batch) and n=512 (a prefill): rows/s;
per kernel path (forced in turn), and for reference `F.linear` on the dequantized fp32 weight (4-8x the bytes
of the packed one; a small matrix of it may sit in cache, a large one can't) and, where this torch has them,
its own weight-only int8 / int4 CPU kernels (`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`:
what torchao's CPU int8/int4 paths call).

Batch-1 weights come from DRAM as in a real decode step: the kernel cycles through enough copies of the packed
matrix (>= 128 MB) that none is in the 32 MB L3. Weights are random blocks with small finite fp16 scales (speed
does not depend on the values). Every variant runs once per round, round-robin, best of --repeats rounds (the
machine may be shared; n=1 gets 3x the rounds). Speed is reported, never asserted. On a loaded machine with
2 threads, a time near a scheduler quantum (10-20 ms) means a thread waited for a core, not a slow kernel:
compare with --threads 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.quant import kernels  # noqa: E402
from lmforge.quant.ggml import block_sizes  # noqa: E402

SHAPES = ["576x576", "1536x576", "576x1536", "49152x576", "4096x4096", "11008x4096"]
TYPES = ["Q8_0", "Q4_0", "Q4_K", "Q6_K"]
SCALES = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
          "Q6_K": [208], "Q2_K": [80, 82], "Q3_K": [108]}
COLD_BYTES = 128 << 20


def packed(name: str, out_f: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    block, size = block_sizes(name)
    if name in ("F16", "BF16"):
        dtype = torch.float16 if name == "F16" else torch.bfloat16
        return torch.randn(out_f, in_f, generator=gen).to(dtype).view(torch.uint8)
    raw = torch.randint(0, 256, (out_f * in_f // block, size), dtype=torch.uint8, generator=gen)
    for off in SCALES[name]:
        raw[:, off:off + 2] = (torch.rand(raw.shape[0], 1, generator=gen) * 0.01).half().view(torch.uint8)
    return raw.reshape(out_f, -1)


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def torch_int_kernels(w: torch.Tensor) -> dict:
    """PyTorch's weight-only int8 / int4 CPU matmuls on `w` (fp32 (out, in)), where this torch has them."""
    fns = {}
    try:
        scale = w.abs().amax(1).clamp_min(1e-8) / 127
        w8 = torch.round(w / scale[:, None]).to(torch.int8)
        torch._weight_int8pack_mm(torch.randn(1, w.shape[1]), w8, scale)
        fns["torch int8"] = lambda x: torch._weight_int8pack_mm(x, w8, scale)
    except Exception:  # noqa: BLE001 - not in this build
        pass
    try:
        group = 32
        g = w.reshape(w.shape[0], -1, group)
        lo, hi = g.amin(-1), g.amax(-1)
        sc = ((hi - lo) / 15).clamp_min(1e-8)
        q = torch.round((g - lo[..., None]) / sc[..., None]).clamp(0, 15).to(torch.int32).reshape(w.shape)
        w4 = torch._convert_weight_to_int4pack_for_cpu(q, 2)
        zeros = lo + 8 * sc
        sz = torch.stack([sc, zeros], -1).transpose(0, 1).contiguous()
        torch._weight_int4pack_mm_for_cpu(torch.randn(1, w.shape[1]), w4, group, sz)
        fns["torch int4"] = lambda x: torch._weight_int4pack_mm_for_cpu(x, w4, group, sz)
    except Exception:  # noqa: BLE001
        pass
    return fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--paths", default="", help="kernel paths (default: every runnable one)")
    ap.add_argument("--rows", default="1,8,512")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        sys.exit(f"kernels unavailable: {kernels.unavailable_reason()}")
    info = kernels.info()
    paths = args.paths.split(",") if args.paths else info["isas"]
    rows = [int(r) for r in args.rows.split(",")]
    k = kernels._module()
    buf = torch.randint(0, 256, (256 << 20,), dtype=torch.uint8)
    ceiling = buf.numel() / best(lambda: k.sum_bytes(buf.data_ptr(), buf.numel()), 5) / 1e9
    print(f"threads {args.threads}, paths {info['isas']} (in use: {info['isa']}), GEMM tiles {info['tile_dtype']}, "
          f"AMX usable: {info['amx']}; ceiling (plain byte sum, 256 MB): {ceiling:.1f} GB/s")
    print(f"{'shape':>11} {'type':>5} {'variant':>12} {'n=1 GB/s':>9} {'%ceil':>6} {'n=1 us':>8}"
          + "".join(f" {'n=' + str(n) + ' rows/s':>14}" for n in rows if n > 1))
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        for name in args.types.split(","):
            if in_f % block_sizes(name)[0]:
                print(f"{shape:>11} {name:>5} {'-':>12}  rows of {in_f} are not whole {block_sizes(name)[0]}-value "
                      "blocks (llama.cpp picks another type for such tensors)")
                continue
            one = packed(name, out_f, in_f, gen)
            copies = [one] + [one.clone() for _ in range(max(0, -(-COLD_BYTES // one.numel()) - 1))]
            xs = {n: torch.randn(n, in_f, generator=gen) for n in rows}
            variants = {}
            for p in paths:
                def run(x, p=p, state={"i": 0}):
                    state["i"] = (state["i"] + 1) % len(copies)
                    return kernels.matmul(x, copies[state["i"]], name, in_f)
                variants[p] = (run, p)
            w32 = kernels.dequantize(one, name, in_f)
            variants["F.linear f32"] = (lambda x: F.linear(x, w32), None)
            for label, fn in torch_int_kernels(w32).items():
                variants[label] = (fn, None)
            for label, (fn, p) in variants.items():
                ctx = kernels.forced_isa(p) if p else _null()
                with ctx:
                    cols = []
                    for n in rows:
                        if n == 512 and p not in (None, paths[0]):
                            cols.append("-")  # prefill: decoded tiles + GEMM, the same on every path
                            continue
                        if n > 8 and label.startswith("torch int"):
                            cols.append("-")  # far too slow here to be worth the bench's time
                            continue
                        # n=1 is cheap: more rounds, so that one of them runs with both threads on a core
                        reps = 3 * args.repeats if n == 1 else args.repeats if n < 512 else max(1, args.repeats // 2)
                        t = best(lambda: fn(xs[n]), reps)
                        cols.append(t)
                t1 = cols[0]
                nbytes = one.numel() if p else (w32.numel() * 4 if label.startswith("F.") else one.numel())
                gbs = nbytes / t1 / 1e9
                line = f"{shape:>11} {name:>5} {label:>12} {gbs:9.1f} {100 * gbs / ceiling:5.0f}% {t1 * 1e6:8.0f}"
                for n, t in zip(rows[1:], cols[1:]):
                    line += f" {'-':>14}" if t == "-" else f" {n / t:14.0f}"
                print(line, flush=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    main()
