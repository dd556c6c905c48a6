"""Back-of-the-envelope numbers before paying for a run: memory, FLOPs, data, time, money and CO2.

One home for these formulas: `lmforge plan` prints them, and `lmforge pretrain --dry-run`
(`train.plan.estimate`) takes its memory figure from `training_memory` here. Every figure is a `Figure`
that carries the formula it came from, with the numbers put in, so `--explain` can show its working.

The rules, each a commonplace of the field:

- Training state per parameter: weights and gradients at the weights' precision (fp32 also under bf16
  autocast, which keeps fp32 master weights, as PyTorch's AMP and lmforge do), plus the optimizer's
  moments (AdamW 2, Lion and momentum-SGD 1) at their own precision: 4 + 4 + 8 = 16 bytes a parameter
  for AdamW in fp32, the "16-20x the model's size" of the folklore once activations are added.
- Activations kept for the backward pass, per token and layer, counted tensor by tensor after
  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", whose
  GPT-3-shaped total is 34*d bytes + 5*heads*T in 16 bits): the two norms' inputs and outputs (4*d),
  q, k, v and attention's output (2*q_dim + 2*kv_dim, so GQA counts), the MLP's intermediates (4*d_ff
  gated, 2*d_ff otherwise; times the experts a token runs through), and with eager attention the
  softmax probabilities (heads*T; flash/SDPA kernels keep only a log-sum-exp per head). No dropout
  masks: lmforge trains without dropout by default. The logits and their gradient are added in fp32.
  Activation checkpointing keeps each block's input (d per token and layer) plus one block's full set
  while it is recomputed.
- Division across devices: DDP replicates everything; FSDP (ZeRO-3) shards weights, gradients and
  optimizer state over its ranks and holds two units gathered (one computing, one prefetched); tensor
  parallelism divides the matrices (the embedding and output head too), the heads and the MLP's
  intermediates by tp (norms' activations and the logits stay whole, as lmforge's TP gathers the logits
  for the loss; no sequence parallelism); pipeline parallelism gives each stage ceil(layers/pp) blocks (the first
  also the embeddings, the last the output head) and with a 1F1B schedule the first stage keeps
  min(pp, micro-batches) micro-batches of activations in flight.
- Inference: the weights at a dtype, or at a GGUF mix (`quant.mix.tensor_types`, llama.cpp's per-tensor
  rules, sized by `quant.ggml.packed_nbytes`); the KV cache and runtime as lmforge's engine allocates them
  (`footprint.kv_cache_bytes`, sliding-window rings included, and `footprint.runtime_bytes`).
- FLOPs: `ModelConfig.flops_per_token` (6*N plus 12*layers*T*d_attn for attention, PaLM's count), or
  6*N*D given only a parameter count. Chinchilla (Hoffmann et al. 2022): ~20 tokens a parameter, so a
  budget C = 6*N*D is best spent on N = sqrt(C/120), D = 20*N.
- Time = FLOPs / (devices x peak x MFU); cost = device-hours x price; energy = device-hours x power x
  PUE; CO2 = energy x grid intensity (Llama 2's paper, sec. 2.2.1: 3.3M A100-80GB hours at 350-400 W,
  539 tCO2e).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from lmforge.config import GATED_MLPS, ModelConfig
from lmforge.errors import UserError
from lmforge.parallel import Parallel, parse_parallel  # noqa: F401 - re-exported for plan users

CHINCHILLA_TOKENS_PER_PARAM = 20
DEFAULT_MFU = 0.4  # what well-tuned large runs reach on A100/H100s (Llama 2's 70B: ~0.43, see tests)


# ---------------------------------------------------------------------------------------------------
# Figures and their formatting
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Figure:
    """One number of a plan: its label, value, the value as shown, and how it was computed."""

    label: str
    value: float
    shown: str
    formula: str


def human(n: float, unit: str = "") -> str:
    """1.5e9 -> '1.50G' (powers of 1000)."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def human_bytes(n: float) -> str:
    """Bytes in binary units: 4e9 -> '3.73 GiB'."""
    for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f} B"


def mem(n: float) -> str:
    """Bytes as binary units, with decimal GB beside them from 1 GB up (datasheets and rules of thumb speak
    GB): 4e9 -> '3.73 GiB (4.00 GB)'."""
    return human_bytes(n) + (f" ({n / 1e9:,.2f} GB)" if n >= 1e9 else "")


def sci(x: float) -> str:
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e5 or x == 0 else f"{x:.3e}"


def duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.1f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


# ---------------------------------------------------------------------------------------------------
# Accelerators
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Accelerator:
    name: str
    label: str
    bf16: float  # dense peak FLOP/s of 16-bit matmuls (tensor cores, no sparsity)
    fp32: float  # peak FLOP/s of fp32 matmuls as PyTorch runs them by default (TF32 off: plain FP32 units)
    memory: int  # bytes
    watts: float  # board power: the datasheet's maximum TDP


GiB = 2**30
# Sources: NVIDIA's datasheets (A100: "NVIDIA A100 Tensor Core GPU" datasheet, 2021 - BF16 312 TFLOPS dense,
# FP32 19.5, 400 W SXM; H100 SXM and H200: "NVIDIA H100/H200 Tensor Core GPU" datasheets - BF16 989 TFLOPS
# dense (1,979 is with sparsity), FP32 67, up to 700 W, 80 GB / 141 GB; L4: "NVIDIA L4" datasheet - BF16 121
# dense (242 sparse), FP32 30.3, 72 W, 24 GB), NVIDIA's "Ada Lovelace GPU architecture" whitepaper for the
# RTX 4090 (BF16 with FP32 accumulate 165.2 TFLOPS dense, FP32 82.6, 450 W, 24 GB), and for Apple's M2 Max
# (38-core GPU) the commonly quoted 13.6 TFLOPS FP32 with no faster 16-bit matmul path; Apple publishes no
# TDP, so its 90 W is an assumption (pass --power).
ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("a100-40g", "NVIDIA A100 40GB SXM", 312e12, 19.5e12, 40 * GiB, 400),
    Accelerator("a100-80g", "NVIDIA A100 80GB SXM", 312e12, 19.5e12, 80 * GiB, 400),
    Accelerator("h100-sxm", "NVIDIA H100 SXM 80GB", 989e12, 67e12, 80 * GiB, 700),
    Accelerator("h200", "NVIDIA H200 SXM 141GB", 989e12, 67e12, 141 * 10**9, 700),
    Accelerator("l4", "NVIDIA L4 24GB", 121e12, 30.3e12, 24 * GiB, 72),
    Accelerator("rtx-4090", "NVIDIA GeForce RTX 4090 24GB", 165.2e12, 82.6e12, 24 * GiB, 450),
    Accelerator("m2-max", "Apple M2 Max (38-core GPU)", 13.6e12, 13.6e12, 96 * GiB, 90),
)}


def accelerator(name: str) -> Accelerator:
    key = str(name).strip().lower()
    if key not in ACCELERATORS:
        raise UserError(f"unknown accelerator {name!r}; choose one of {', '.join(ACCELERATORS)}, or 'this' "
                        f"(this machine, measured)")
    return ACCELERATORS[key]


def measure_matmul_flops(dtype: torch.dtype = torch.float32, *, device: str | None = None, n: int | None = None,
                         reps: int = 5) -> tuple[float, str]:
    """(FLOP/s, what was measured) of a square n x n matmul on this machine's fastest device (a CUDA GPU,
    else Apple's MPS, else the CPU), best of `reps`: the ceiling a training step's matmuls approach.
    About a second; n defaults to 4096 on a GPU, 1024 on the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    n = n or (4096 if device != "cpu" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        elif device == "mps":
            torch.mps.synchronize()

    (a @ b)
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    where = torch.cuda.get_device_name() if device == "cuda" else device
    threads = f", {torch.get_num_threads()} threads" if device == "cpu" else ""
    return 2 * n**3 / best, f"this machine ({where}{threads}): measured {n}x{n} {str(dtype).removeprefix('torch.')} matmul"


# ---------------------------------------------------------------------------------------------------
# Parallelism
# ---------------------------------------------------------------------------------------------------
# Parallel and parse_parallel live in lmforge.parallel (one parser for plan and training).


# ---------------------------------------------------------------------------------------------------
# Training memory
# ---------------------------------------------------------------------------------------------------
MOMENTS = {"adamw": 2, "lion": 1, "sgd": 1}  # optimizer state tensors per parameter (SGD with momentum)
MOMENT_BYTES = {"fp32": 4, "bf16": 2, "8bit": 1}  # 8-bit: bitsandbytes' blockwise moments (scales not counted)
PRECISIONS = ("fp32", "bf16")  # bf16: autocast, fp32 master weights and gradients


def _param_split(cfg: ModelConfig) -> tuple[int, int, int]:
    """(embedding tables, output head counted on its stage, one block) parameters."""
    emb = cfg.vocab_size * cfg.d_model + (cfg.context_length * cfg.d_model if cfg.positions == "learned" else 0)
    head = cfg.vocab_size * cfg.d_model  # tied or not, the last pipeline stage needs the matrix
    final_norm = 2 * cfg.d_model if cfg.norm == "layernorm" else cfg.d_model
    untied = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    block = (cfg.num_params() - emb - untied - final_norm) // cfg.n_layers
    return emb, head + final_norm, block


def activation_values(cfg: ModelConfig, seq: int, *, tp: int = 1, flash: bool = True) -> tuple[float, str]:
    """(values kept per token in one block for the backward pass, its formula); see the module docstring."""
    d, hd = cfg.d_model, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    gated = cfg.mlp in GATED_MLPS
    mlp = (4 if gated else 2) * cfg.d_ff * (cfg.experts_per_token if cfg.n_experts else 1)
    if cfg.n_experts and cfg.shared_expert_d_ff:
        mlp += 4 * cfg.shared_expert_d_ff
    sharded = 2 * q + 2 * kv + mlp + (0 if flash else cfg.n_heads * seq)
    parts = f"2*{q} + 2*{kv} + {mlp}" + ("" if flash else f" + {cfg.n_heads}*{seq}")
    return 4 * d + sharded / tp, f"4*{d} + ({parts})" + (f"/{tp}" if tp > 1 else "")


def training_memory(cfg: ModelConfig, *, batch: int, seq: int, precision: str = "fp32", optimizer: str = "adamw",
                    moments: str = "fp32", checkpointing: bool = False, flash: bool = True,
                    parallel: Parallel = Parallel(), micro_batches: int = 1) -> dict[str, Figure]:
    """Bytes one device holds to train `cfg` on micro-batches of `batch` sequences of `seq` tokens, as
    {"weights", "gradients", "optimizer", "gathered", "activations", "total"} Figures (worst rank)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if optimizer not in MOMENTS:
        raise UserError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(MOMENTS)}")
    if moments not in MOMENT_BYTES:
        raise UserError(f"unknown optimizer-state dtype {moments!r}; choose one of {', '.join(MOMENT_BYTES)}")
    par = parallel
    emb, head, block = _param_split(cfg)
    per_stage = math.ceil(cfg.n_layers / par.pp)
    if par.pp == 1:
        stage_params, stage_f = cfg.num_params(), f"{cfg.num_params():,} parameters"
    else:
        stage_params = per_stage * block + max(emb, head)
        stage_f = f"({per_stage} blocks x {block:,} + max(embeddings {emb:,}, head {head:,})) parameters"
    shard = par.tp * par.fsdp
    n = stage_params / shard
    n_f = stage_f + (f" / (tp {par.tp} x fsdp {par.fsdp})" if shard > 1 else "")
    out: dict[str, Figure] = {}
    out["weights"] = Figure("weights", 4 * n, mem(4 * n), f"{n_f} x 4 B (fp32{' master' if precision == 'bf16' else ''})")
    out["gradients"] = Figure("gradients", 4 * n, mem(4 * n), f"{n_f} x 4 B (fp32)")
    k, mb = MOMENTS[optimizer], MOMENT_BYTES[moments]
    out["optimizer"] = Figure("optimizer", k * mb * n, mem(k * mb * n),
                              f"{n_f} x {k} {optimizer} moment{'s' if k > 1 else ''} x {mb} B ({moments})")
    act_b = 2 if precision == "bf16" else 4
    gathered = 0.0
    if par.fsdp > 1:
        unit = max(block, emb, head) / par.tp
        gathered = 2 * unit * act_b + unit * 4
        out["gathered"] = Figure("gathered (FSDP)", gathered, mem(gathered),
                                 f"2 units of {unit:,.0f} parameters gathered x {act_b} B + one unit's gradients x 4 B "
                                 f"(largest unit: a block, the embeddings or the head)")
    per_tok, per_tok_f = activation_values(cfg, seq, tp=par.tp, flash=flash)
    tokens = batch * seq
    # Values per token of one micro-batch kept until its backward pass, and those alive only while one
    # checkpointed block is recomputed (one micro-batch at a time).
    if checkpointing:
        kept, kept_f = per_stage * cfg.d_model, f"{per_stage} blocks x {cfg.d_model} (their inputs)"
        transient, why = per_tok, f" + {per_tok:,.0f} (one block recomputed)"
    else:
        kept, kept_f = per_stage * per_tok, f"{per_stage} blocks x {per_tok:,.0f}"
        transient, why = 0.0, ""
    logits = tokens * 2 * cfg.vocab_size * 4  # whole on every tp rank: lmforge's TP gathers them for the loss
    logits_f = f"logits and their gradient {batch} x {seq} x 2 x {cfg.vocab_size} x 4 B" + \
        (" (gathered whole on each tensor-parallel rank)" if par.tp > 1 else "")
    last = (kept + transient) * tokens * act_b + logits
    formula = f"{batch} x {seq} tokens x ({kept_f}{why}) values x {act_b} B + {logits_f}"
    acts = last
    if par.pp > 1:  # 1F1B: the first stage holds the most micro-batches, the last holds the logits
        in_flight = min(par.pp, micro_batches)
        first = (in_flight * kept + transient) * tokens * act_b
        acts = max(first, last)
        formula = (f"the larger of the first stage, {batch} x {seq} tokens x ({in_flight} micro-batches in flight x "
                   f"{kept_f}{why}) values x {act_b} B, and the last, {formula}")
    out["activations"] = Figure("activations", acts, mem(acts), f"{formula} [per block and token {per_tok_f}]")
    total = sum(f.value for f in out.values())
    out["total"] = Figure("total per device", total, mem(total), " + ".join(f.label for f in out.values()))
    return out


def state_only_memory(n_params: float, *, optimizer: str = "adamw", moments: str = "fp32", shards: int = 1) -> Figure:
    """Weights + gradients + optimizer state of `n_params` parameters (no shape known: no activations)."""
    per = 8 + MOMENTS[optimizer] * MOMENT_BYTES[moments]
    v = n_params * per / shards
    return Figure("weights+grads+optimizer", v, mem(v),
                  f"{n_params:,.0f} parameters x (4 + 4 + {MOMENTS[optimizer]} x {MOMENT_BYTES[moments]}) B"
                  + (f" / {shards} shards" if shards > 1 else "") + " (activations need a model shape)")


# ---------------------------------------------------------------------------------------------------
# Inference memory
# ---------------------------------------------------------------------------------------------------
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def quantized_weights(cfg: ModelConfig, ftype: str) -> Figure:
    """Weights of `cfg` in the GGUF mix `ftype`, tensor by tensor, as llama.cpp's llama-quantize types them."""
    from lmforge.loaders.gguf.names import ROPE_FREQS, expected_shapes
    from lmforge.quant.ggml import packed_nbytes
    from lmforge.quant.mix import check_ftype, tensor_types

    ftype = check_ftype(ftype)
    shapes = {k: v for k, v in expected_shapes(cfg).items() if k != ROPE_FREQS}
    types = tensor_types(shapes, ftype)
    total = sum(packed_nbytes(types[k], s) for k, s in shapes.items())
    values = sum(math.prod(s) for s in shapes.values())
    return Figure("weights", total, mem(total),
                  f"{len(shapes)} tensors in llama.cpp's {ftype} mix (quant.mix.tensor_types) = {values:,} values x "
                  f"{8 * total / values:.2f} bits on average")


def inference_memory(cfg: ModelConfig | None, *, batch: int, context: int, weights: Figure,
                     kv_dtype: str = "fp32", prefill_chunk: int = 512) -> dict[str, Figure]:
    """{"weights", "kv_cache", "runtime", "total"} for serving `batch` sequences of `context` tokens with
    lmforge's engine: the KV cache as `KVCache` preallocates it (sliding-window layers keep a ring)."""
    from lmforge.footprint import kv_cache_bytes, runtime_bytes

    out = {"weights": weights}
    if cfg is not None:
        from lmforge.engine.scheduler import max_write

        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kv_dtype]
        write = max_write(prefill_chunk)
        kv = kv_cache_bytes(cfg, batch, context, dt, write)
        slots = f"{cfg.n_layers} layers x {context} tokens"
        ring = cfg.sliding_window + write - 1 if cfg.sliding_window is not None else context
        if ring < context:  # sliding-window layers keep a ring: window + the most one pass writes - 1
            sliding = sum(cfg.slides(i) for i in range(cfg.n_layers))
            slots = (f"({cfg.n_layers - sliding} full layers x {context} tokens + {sliding} sliding layers x "
                     f"a ring of {ring})")
        out["kv_cache"] = Figure("KV cache", kv, mem(kv),
                                 f"2 (K and V) x {slots} x {batch} sequences x {cfg.n_kv_heads} kv heads x "
                                 f"{cfg.head_dim} x {dt.itemsize} B ({kv_dtype})")
        rt = runtime_bytes(cfg, batch=batch, chunk=min(prefill_chunk, context))
        out["runtime"] = Figure("runtime", rt, mem(rt),
                                f"position tables + one {min(prefill_chunk, context)}-token prefill chunk's activations + "
                                f"128 MiB measured overhead (footprint.runtime_bytes)")
    total = sum(f.value for f in out.values())
    out["total"] = Figure("total", total, mem(total), " + ".join(f.label for f in out.values()))
    return out


# ---------------------------------------------------------------------------------------------------
# FLOPs, data, time, money, CO2
# ---------------------------------------------------------------------------------------------------
def chinchilla_tokens(n_params: float) -> float:
    return CHINCHILLA_TOKENS_PER_PARAM * n_params


def compute_optimal(flops: float) -> tuple[float, float]:
    """(N, D) that spend `flops` = 6*N*D with D = 20*N (Chinchilla): N = sqrt(C / 120)."""
    n = math.sqrt(flops / (6 * CHINCHILLA_TOKENS_PER_PARAM))
    return n, CHINCHILLA_TOKENS_PER_PARAM * n


def training_flops(tokens: float, *, cfg: ModelConfig | None = None, n_params: float | None = None,
                   seq: int | None = None) -> Figure:
    if cfg is not None:
        per = cfg.flops_per_token(seq)
        n = cfg.num_params(include_embeddings=False, active=True) + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)
        attn = 12 * cfg.n_layers * (seq or cfg.context_length) * cfg.n_heads * cfg.head_dim
        f = (f"(6 x {n:,} matmul parameters + 12 x {cfg.n_layers} layers x {seq or cfg.context_length} tokens x "
             f"{cfg.n_heads * cfg.head_dim} attention width = {per:,.0f}/token{' [' + human(attn) + ' of it attention]'}) "
             f"x {sci(tokens)} tokens")
    else:
        per = 6 * n_params
        f = f"6 x {sci(n_params)} parameters x {sci(tokens)} tokens"
    return Figure("training FLOPs", per * tokens, sci(per * tokens), f)


@dataclass(frozen=True)
class Hardware:
    """What a run is priced on: a per-device peak (FLOP/s), its label, and how the peak was found."""

    label: str
    peak: float
    source: str
    watts: float | None
    memory: int | None


def run_figures(flops: float, hw: Hardware, *, gpus: int, mfu: float, price: float | None = None,
                power: float | None = None, pue: float = 1.0, grid_co2: float | None = None) -> dict[str, Figure]:
    """Time, device-hours, cost, energy and CO2 of spending `flops` on `gpus` devices of `hw` at `mfu`."""
    out: dict[str, Figure] = {}
    rate = gpus * hw.peak * mfu
    seconds = flops / rate
    out["time"] = Figure("wall time", seconds / 3600, duration(seconds / 3600),
                         f"{sci(flops)} FLOPs / ({gpus} x {sci(hw.peak)} FLOP/s peak [{hw.source}] x MFU {mfu:g})")
    dev_h = gpus * seconds / 3600
    out["device_hours"] = Figure("device-hours", dev_h, f"{dev_h:,.0f}" if dev_h >= 10 else f"{dev_h:.2f}",
                                 f"{gpus} device{'s' if gpus > 1 else ''} x {seconds / 3600:,.4g} h")
    if price is not None:
        out["cost"] = Figure("cost", dev_h * price, f"${dev_h * price:,.0f}" if dev_h * price >= 10 else f"${dev_h * price:.2f}",
                             f"{dev_h:,.4g} device-hours x ${price:g}/device-hour")
    watts = power if power is not None else hw.watts
    if watts is not None:
        kwh = dev_h * watts * pue / 1000
        out["energy"] = Figure("energy", kwh, f"{kwh:,.0f} kWh" if kwh >= 10 else f"{kwh:.3f} kWh",
                               f"{dev_h:,.4g} device-hours x {watts:g} W{' (--power)' if power is not None else ' (TDP)'}"
                               f" x PUE {pue:g} / 1000")
        if grid_co2 is not None:
            t = kwh * grid_co2 / 1000
            out["co2"] = Figure("CO2", t, f"{t:,.2f} tCO2e" if t >= 0.01 else f"{t * 1000:.3f} kgCO2e",
                                f"{kwh:,.4g} kWh x {grid_co2:g} kgCO2e/kWh / 1000")
    return out


def this_machine(precision: str) -> Hardware:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak, what = measure_matmul_flops(dtype)
    mem = None
    if torch.cuda.is_available():
        mem = torch.cuda.get_device_properties(0).total_memory
    else:
        try:
            mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            mem = None
    return Hardware("this machine", peak, what, None, mem)


def named_hardware(name: str, precision: str) -> Hardware:
    a = accelerator(name)
    peak = a.bf16 if precision == "bf16" else a.fp32
    return Hardware(a.label, peak, f"{a.name} {precision} datasheet", a.watts, a.memory)
