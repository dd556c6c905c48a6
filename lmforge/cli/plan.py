"""`lmforge plan`: the back-of-the-envelope numbers of a training run or a deployment, each with its formula.

A thin layer over `lmforge.plan` (where every formula lives): it turns the flags into a model shape, checks
that every number is sane (one line and exit code 2 otherwise: a negative token count or an MFU above 1 is
a typo, not a plan), and prints the figures, with `--explain` each one's formula under it.
"""

from __future__ import annotations

import argparse
import json

from lmforge.cli.common import Formatter, float_arg, para, positive_int
from lmforge.errors import UserError

# (flag, lowest allowed, highest allowed, unit): beyond these a number is a mistake, not a plan.
LIMITS = {
    "params": (1, 1e15, "parameters"), "tokens": (1, 1e17, "tokens"), "flops_budget": (1, 1e32, "FLOPs"),
    "mfu": (1e-4, 1.0, "(a fraction of peak)"), "price": (0, 1e4, "$ per device-hour"),
    "power": (1, 1e5, "W per device"), "pue": (1.0, 3.0, "(power usage effectiveness)"),
    "grid_co2": (0, 2.0, "kgCO2e/kWh (coal is ~1)"),
}
MAX_GPUS = 10**6


def _check(args) -> None:
    for name, (lo, hi, unit) in LIMITS.items():
        v = getattr(args, name)
        if v is not None and not (lo <= v <= hi):  # NaN fails too
            raise UserError(f"--{name.replace('_', '-')} {v:g} is out of range: expected {lo:g} to {hi:g} {unit}")
    if args.gpus > MAX_GPUS:
        raise UserError(f"--gpus {args.gpus} is out of range: expected at most {MAX_GPUS:,}")


def _model(args):
    """(config or None, model path or None, parameter count) from --preset / --model / --params."""
    given = [f for f in ("preset", "model", "params") if getattr(args, f) is not None]
    if len(given) > 1:
        raise UserError(f"give one of --preset, --model and --params, not {' and '.join('--' + g for g in given)}")
    if args.preset is not None:
        from lmforge.presets import get_preset

        cfg = get_preset(args.preset)
        return cfg, None, cfg.num_params()
    if args.model is not None:
        from lmforge.footprint import model_config
        from lmforge.paths import resolve

        path = resolve(args.model)
        cfg = model_config(path)
        return cfg, path, cfg.num_params()
    if args.params is not None:
        return None, None, args.params
    return None, None, None


def _section(title: str, figures, explain: bool) -> list[str]:
    lines = [title]
    for f in figures:
        lines.append(f"  {f.label:<26} {f.shown}")
        if explain:
            lines.append(f"  {'':<26}   = {f.formula}")
    return lines


def cmd_plan(args) -> int:
    from lmforge import plan as P

    _check(args)
    cfg, path, n_params = _model(args)
    if n_params is None and args.flops_budget is None:
        raise UserError("nothing to plan: give a model (--preset, --model or --params) or a --flops-budget")
    if args.context is not None and cfg is not None and args.context > cfg.context_length:
        raise UserError(f"--context {args.context} is longer than the model's context ({cfg.context_length})")
    infer_flags = args.model is not None or args.quant is not None or args.dtype is not None or args.kv_dtype is not None
    do_train = n_params is not None and (args.tokens is not None or not infer_flags)
    do_infer = n_params is not None and (infer_flags or args.tokens is None)
    if args.gpu is not None:
        args.gpu = args.gpu.strip().lower()
    named = args.gpu is not None and args.gpu != "this"
    par = P.parse_parallel(args.parallel, args.gpus, cfg)
    hw = None
    if args.gpu == "this":
        hw = P.this_machine(args.precision)
    elif named:
        hw = P.named_hardware(args.gpu, args.precision)
    out: list[str] = []
    data: dict = {}

    def add(title: str, figures: dict) -> None:
        out.extend(_section(title, figures.values(), args.explain))
        data[title] = {k: f.value for k, f in figures.items()}

    if cfg is not None:
        experts = f", {cfg.n_experts} experts ({cfg.experts_per_token} per token)" if cfg.n_experts else ""
        out.append(f"model  {cfg.name}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads "
                   f"({cfg.n_kv_heads} kv), d_ff {cfg.d_ff}, context {cfg.context_length}, vocab {cfg.vocab_size}{experts}")
    if n_params is not None:
        active = f" ({human_active(cfg)} active per token)" if cfg is not None and cfg.n_experts else ""
        out.append(f"parameters  {n_params:,.0f} ({P.human(n_params)}){active}")
    if do_train:
        seq = args.context or (min(cfg.context_length, 8192) if cfg is not None else None)
        tokens = args.tokens if args.tokens is not None else P.chinchilla_tokens(n_params)
        opt_tokens = P.chinchilla_tokens(n_params)
        data_figs = {
            "tokens": P.Figure("tokens", tokens, P.human(tokens), "--tokens" if args.tokens is not None else
                               f"none given: Chinchilla's {P.CHINCHILLA_TOKENS_PER_PARAM} x {n_params:,.0f} parameters"),
            "chinchilla": P.Figure("Chinchilla-optimal tokens", opt_tokens, P.human(opt_tokens),
                                   f"{P.CHINCHILLA_TOKENS_PER_PARAM} tokens/parameter x {n_params:,.0f} "
                                   f"(Hoffmann et al. 2022); this run: {tokens / opt_tokens:.2f}x that"),
            "flops": P.training_flops(tokens, cfg=cfg, n_params=n_params, seq=seq),
        }
        add("training: data and compute", data_figs)
        if cfg is not None:
            mem = P.training_memory(cfg, batch=args.batch, seq=seq, precision=args.precision, optimizer=args.optimizer,
                                    moments=args.moments, checkpointing=args.checkpointing,
                                    flash=args.attention == "flash", parallel=par, micro_batches=args.grad_accum)
        else:
            mem = {"state": P.state_only_memory(n_params, optimizer=args.optimizer, moments=args.moments,
                                                shards=par.fsdp * par.tp * par.pp)}
        title = (f"training memory per device ({par.describe()}, {args.precision}, {args.optimizer}"
                 f"{', checkpointing' if args.checkpointing else ''}"
                 f"{f', micro-batch {args.batch} x {seq} tokens' if seq else ''})")
        if cfg is not None:  # without a shape there are no activations: a fit would mislead
            _fits(mem, hw)
        add(title, mem)
        if hw is not None:
            add(f"training run on {args.gpus} x {hw.label}",
                P.run_figures(data_figs["flops"].value, hw, gpus=args.gpus, mfu=args.mfu, price=args.price,
                              power=args.power, pue=args.pue, grid_co2=args.grid_co2))
    if do_infer:
        context = args.context or (cfg.context_length if cfg is not None else 0)
        if args.quant is not None:
            if cfg is None:
                raise UserError("--quant needs a model shape (--preset or --model): a GGUF mix types tensor by tensor")
            weights = P.quantized_weights(cfg, args.quant)
        elif args.dtype is not None or path is None:
            dtype = args.dtype or args.precision
            b = P.DTYPE_BYTES[dtype]
            weights = P.Figure("weights", n_params * b, P.mem(n_params * b), f"{n_params:,.0f} parameters x {b} B ({dtype})")
        else:
            from lmforge.footprint import weights_bytes

            w = weights_bytes(path)
            weights = P.Figure("weights", w, P.mem(w), f"{path.name}'s tensors at their stored types (file headers)")
        kv = args.kv_dtype or ("bf16" if named or args.gpu == "this" and _cuda() else "fp32")
        title = f"inference memory ({args.batch} x {context} tokens)" if cfg is not None else "inference memory"
        mem = P.inference_memory(cfg, batch=args.batch, context=context, weights=weights, kv_dtype=kv)
        _fits(mem, hw)
        add(title, mem)
    if args.flops_budget is not None:
        n, d = P.compute_optimal(args.flops_budget)
        f = P.Figure
        figs = {"n": f("parameters", n, P.human(n), f"sqrt({P.sci(args.flops_budget)} / (6 x {P.CHINCHILLA_TOKENS_PER_PARAM}))"),
                "d": f("tokens", d, P.human(d), f"{P.CHINCHILLA_TOKENS_PER_PARAM} x {P.human(n)} parameters")}
        if hw is not None:
            figs.update(P.run_figures(args.flops_budget, hw, gpus=args.gpus, mfu=args.mfu, price=args.price,
                                      power=args.power, pue=args.pue, grid_co2=args.grid_co2))
        add(f"compute-optimal for {P.sci(args.flops_budget)} FLOPs (Chinchilla: C = 6ND, D = 20N)", figs)
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print("\n".join(out))
    return 0


def human_active(cfg) -> str:
    from lmforge.plan import human

    return human(cfg.num_params(active=True))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _fits(mem: dict, hw) -> None:
    """Add to `mem` a figure saying whether its per-device total fits the device's memory."""
    from lmforge.plan import Figure, human_bytes

    if hw is None or hw.memory is None:
        return
    total = mem.get("total", next(iter(mem.values()))).value
    ratio = total / hw.memory
    size = human_bytes(hw.memory)
    verdict = f"yes ({ratio:.0%} of {size})" if ratio <= 1 else f"NO ({ratio:.1f}x its {size})"
    mem["fits"] = Figure("fits one device", ratio, verdict,
                         f"{human_bytes(total)} per device / {human_bytes(hw.memory)} [{hw.source}]")


def register(sub) -> list[argparse.ArgumentParser]:
    """Add `plan` to `sub`; returns the parsers whose numeric flags get short metavars."""
    from lmforge.plan import ACCELERATORS, DEFAULT_MFU, MOMENT_BYTES, MOMENTS
    from lmforge.presets import preset_names
    from lmforge.quant.mix import FTYPES

    p = sub.add_parser(
        "plan", help="memory, FLOPs, data, time, cost and CO2 of a run or a deployment, before paying for it",
        formatter_class=Formatter,
        description=para("Back-of-the-envelope numbers, each with its formula (--explain): training memory per device "
                         "(weights, gradients, optimizer state, activations, divided as DDP/FSDP/TP/PP divide them), "
                         "inference memory (weights by dtype or GGUF quantization, KV cache by context, batch and GQA), "
                         "training FLOPs, Chinchilla's compute-optimal tokens and size, and time, device-hours, cost, "
                         "energy and CO2 on a named accelerator or this machine. Training figures appear with --tokens "
                         "(or when no inference flag is given: then at Chinchilla's 20 tokens a parameter); inference "
                         "figures with --model, --quant, --dtype or --kv-dtype (or without --tokens)."),
        epilog="examples:\n"
               "  lmforge plan --preset llama-1b --tokens 20e9 --gpu a100-80g --gpus 64 --parallel fsdp --price 2.0 --grid-co2 0.4\n"
               "  lmforge plan --model smol --context 8192 --batch 8 --quant q4_k_m\n"
               "  lmforge plan --params 70e9 --tokens 2e12 --gpu a100-80g --gpus 2048 --parallel fsdp --explain\n"
               "  lmforge plan --flops-budget 5.76e23 --gpu h100-sxm --gpus 1024")
    m = p.add_argument_group("the model (one of)")
    m.add_argument("--preset", metavar="NAME", help=f"a preset's shape: {', '.join(preset_names())}")
    m.add_argument("--model", metavar="MODEL", help="a model in the store, a model directory or a .gguf file (its config)")
    m.add_argument("--params", type=float_arg, metavar="N", help="only a parameter count, e.g. 70e9 (no shape: no "
                   "activations or KV cache)")
    t = p.add_argument_group("training")
    t.add_argument("--tokens", type=float_arg, metavar="N", help="training tokens, e.g. 20e9 (default: 20 per parameter)")
    t.add_argument("--context", type=positive_int, help="tokens per sequence (default: the model's context; for "
                   "training at most 8192)")
    t.add_argument("--batch", type=positive_int, default=1, help="sequences per micro-batch per device, or served at "
                   "once (default: 1)")
    t.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step: with pp, how many can "
                   "be in flight (default: 1)")
    t.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="fp32, or bf16 autocast with fp32 "
                   "master weights (default: bf16); also picks the datasheet peak")
    t.add_argument("--optimizer", choices=list(MOMENTS), default="adamw", help="adamw (2 moments), lion or sgd with "
                   "momentum (1) (default: adamw)")
    t.add_argument("--moments", choices=list(MOMENT_BYTES), default="fp32", help="the optimizer state's dtype "
                   "(default: fp32)")
    t.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    t.add_argument("--attention", choices=["flash", "eager"], default="flash", help="flash/SDPA keeps no score "
                   "matrix; eager keeps heads x T per token (default: flash)")
    t.add_argument("--parallel", metavar="SPEC", help="ddp, fsdp, tp=N, pp=N or a list like tp=2,dp=4 over --gpus "
                   "(default: ddp over --gpus)")
    t.add_argument("--flops-budget", type=float_arg, metavar="C", help="also: the Chinchilla-optimal size and tokens "
                   "for C FLOPs")
    i = p.add_argument_group("inference")
    i.add_argument("--quant", metavar="TYPE", help=f"weights in a GGUF mix: {', '.join(FTYPES)}")
    i.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="weights at this dtype (default: a --model's "
                   "stored types, else --precision)")
    i.add_argument("--kv-dtype", choices=["fp32", "bf16", "fp16"], help="KV cache dtype (default: bf16 on a GPU, "
                   "fp32 on the CPU as lmforge's engine keeps it)")
    h = p.add_argument_group("hardware, cost and CO2")
    h.add_argument("--gpu", metavar="NAME", help=f"the accelerator: {', '.join(ACCELERATORS)}, or 'this' (this "
                   f"machine's matmul FLOP/s, measured in about a second)")
    h.add_argument("--gpus", type=positive_int, default=1, help="devices (default: 1)")
    h.add_argument("--mfu", type=float_arg, default=DEFAULT_MFU, help=f"model FLOPs utilization: the fraction of "
                   f"peak a run reaches (default: {DEFAULT_MFU})")
    h.add_argument("--price", type=float_arg, help="$ per device-hour")
    h.add_argument("--power", type=float_arg, help="W per device (default: the datasheet's TDP)")
    h.add_argument("--pue", type=float_arg, default=1.0, help="the data centre's power usage effectiveness (default: 1.0)")
    h.add_argument("--grid-co2", type=float_arg, help="grid intensity in kgCO2e per kWh (e.g. 0.4)")
    p.add_argument("--explain", action="store_true", help="show each figure's formula, with the numbers put in")
    p.add_argument("--json", action="store_true", help="print the figures as JSON (raw values: bytes, FLOPs, hours, "
                   "$, kWh, tCO2e)")
    p.set_defaults(func=cmd_plan)
    return [p]
