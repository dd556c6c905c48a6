"""`lmforge plan`'s formulas checked against published numbers (Llama 2's paper, Chinchilla, the 4-bytes-a-
parameter rule, Korthikanti et al.'s activation count), the ways parallelism divides memory, and bad input."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_cli

from lmforge import plan as P
from lmforge.config import ModelConfig
from lmforge.presets import get_preset

# Llama-2-70B (Touvron et al. 2023): GQA with 8 key/value heads, untied 32000-token vocabulary.
LLAMA2_70B = ModelConfig(name="llama2-70b", vocab_size=32000, context_length=4096, d_model=8192, n_layers=80,
                         n_heads=64, n_kv_heads=8, d_ff=28672, tie_embeddings=False)
# The paper's Table 2: GPU-hours, power per GPU (W) and tCO2e of each Llama 2 size on A100-80GB.
LLAMA2_TABLE = {"7B": (184_320, 400, 31.22), "13B": (368_640, 400, 62.44), "34B": (1_038_336, 350, 153.90),
                "70B": (1_720_320, 400, 291.42)}
# Its grid factor, implied by the table itself: 31.22 t / (184,320 h x 0.4 kW) = 0.4235 kgCO2e/kWh (every row agrees).
LLAMA2_GRID = 0.4235


def hours_for(hw: P.Hardware, device_hours: float, mfu: float = 0.4) -> float:
    """The FLOPs that take exactly `device_hours` on `hw` at `mfu`."""
    return device_hours * 3600 * hw.peak * mfu


def test_llama2_70b_gpu_hours_order_of_magnitude():
    assert LLAMA2_70B.num_params() == 68_976_648_192  # the published count
    flops = P.training_flops(2e12, cfg=LLAMA2_70B, seq=4096).value
    run = P.run_figures(flops, P.named_hardware("a100-80g", "bf16"), gpus=2048, mfu=P.DEFAULT_MFU)
    paper = LLAMA2_TABLE["70B"][0]
    assert 0.5 < run["device_hours"].value / paper < 2  # 1.72M A100-hours in the paper
    implied_mfu = flops / (paper * 3600 * 312e12)
    assert 0.35 < implied_mfu < 0.55  # the paper's run reached ~45% of the bf16 peak, by this count


def test_llama2_co2_from_its_paper():
    hw = P.named_hardware("a100-80g", "bf16")
    assert hw.watts == 400
    total = 0.0
    for size, (gpu_hours, watts, tco2) in LLAMA2_TABLE.items():
        run = P.run_figures(hours_for(hw, gpu_hours), hw, gpus=1, mfu=0.4, power=watts, grid_co2=LLAMA2_GRID)
        assert run["device_hours"].value == pytest.approx(gpu_hours)
        assert run["co2"].value == pytest.approx(tco2, rel=2e-3), size
        total += run["co2"].value
    assert total == pytest.approx(539, rel=2e-3)  # "539 tCO2e" for the family
    # The datasheet's 400 W is the default power: the 70B row with no --power.
    run = P.run_figures(hours_for(hw, 1_720_320), hw, gpus=1, mfu=0.4, grid_co2=LLAMA2_GRID)
    assert run["co2"].value == pytest.approx(291.42, rel=2e-3)


def test_four_gigabytes_per_billion_fp32_parameters(capsys):
    code, out, _ = run_cli(capsys, "plan", "--params", "1e9", "--dtype", "fp32", "--json")
    assert code == 0
    assert json.loads(out)["inference memory"]["weights"] == 4e9
    code, out, _ = run_cli(capsys, "plan", "--params", "1e9", "--dtype", "fp32")
    assert "(4.00 GB)" in out
    # Training with AdamW in fp32: 4 + 4 + 8 = 16 bytes a parameter before activations.
    assert P.state_only_memory(1e9).value == 16e9


def test_chinchilla_70b_on_1_4t_tokens():
    assert P.chinchilla_tokens(70e9) == pytest.approx(1.4e12)
    n, d = P.compute_optimal(5.76e23)  # Chinchilla's compute budget
    assert n == pytest.approx(70e9, rel=0.02) and d == pytest.approx(1.4e12, rel=0.02)
    assert 6 * n * d == pytest.approx(5.76e23)


def test_activations_are_korthikantis_count_without_dropout():
    """Korthikanti et al. 2022: 34*h + 5*a*s bytes per token and layer in 16 bits for a GPT-3 block. Ours
    (no dropout, eager attention) plus their dropout terms - two h-byte masks, an a*s-byte mask and the
    2*a*s-byte dropped-out probabilities - is exactly that."""
    h, a, s = 1024, 16, 2048
    cfg = ModelConfig(vocab_size=1000, context_length=s, d_model=h, n_layers=2, n_heads=a, d_ff=4 * h, mlp="gelu",
                      norm="layernorm", positions="learned")
    values, _ = P.activation_values(cfg, s, flash=False)
    assert 2 * values + 2 * h + 3 * a * s == 34 * h + 5 * a * s
    flash, _ = P.activation_values(cfg, s)
    assert values - flash == a * s  # flash attention keeps no score matrix


def test_activations_by_hand_for_tiny():
    """tiny: d 64, 4 heads and 2 kv heads of 16, SwiGLU d_ff 192, vocab 512, 2 layers."""
    cfg = get_preset("tiny")
    per_token = 4 * 64 + 2 * 64 + 2 * 32 + 4 * 192
    assert P.activation_values(cfg, 64)[0] == per_token == 1216
    logits = 2 * 64 * 2 * 512 * 4
    got = P.training_memory(cfg, batch=2, seq=64)["activations"].value
    assert got == 2 * 64 * 2 * per_token * 4 + logits
    ckpt = P.training_memory(cfg, batch=2, seq=64, checkpointing=True)["activations"].value
    assert ckpt == 2 * 64 * (2 * 64 + per_token) * 4 + logits
    pp = P.training_memory(cfg, batch=2, seq=64, parallel=P.Parallel(pp=2), micro_batches=8)["activations"].value
    assert pp == max(2 * 2 * 64 * per_token * 4, 2 * 64 * per_token * 4 + logits)  # 2 in flight on stage 1


def mem(cfg, **kw):
    return {k: f.value for k, f in P.training_memory(cfg, batch=2, seq=512, **kw).items()}


def test_parallelism_divides_memory_as_each_scheme_does():
    cfg = get_preset("llama-1b")
    one = mem(cfg)
    assert one["weights"] == one["gradients"] == 4 * cfg.num_params() and one["optimizer"] == 8 * cfg.num_params()
    assert mem(cfg, parallel=P.parse_parallel("ddp", 8)) == one  # DDP replicates everything
    fsdp = mem(cfg, parallel=P.parse_parallel("fsdp", 8))
    assert fsdp["optimizer"] == one["optimizer"] / 8 and fsdp["activations"] == one["activations"]
    assert fsdp["gathered"] > 0
    tp = mem(cfg, parallel=P.parse_parallel("tp=2,dp=4", 8, cfg))
    assert tp["weights"] == one["weights"] / 2 and one["activations"] / 2 < tp["activations"] < one["activations"]
    pp = mem(cfg, parallel=P.parse_parallel("pp=4", 4, cfg), micro_batches=8)
    assert pp["weights"] < one["weights"] / 2
    assert mem(cfg, checkpointing=True)["activations"] < one["activations"] / 2  # the logits stay
    assert mem(cfg, precision="bf16")["activations"] < one["activations"]
    assert mem(cfg, optimizer="sgd", moments="bf16")["optimizer"] == 2 * cfg.num_params()
    assert P.parse_parallel("tp=2", 64, cfg) == P.Parallel(dp=32, tp=2)
    assert P.parse_parallel("tp=2,fsdp", 16, cfg) == P.Parallel(fsdp=8, tp=2)


def test_the_dry_run_uses_the_same_formulas():
    from lmforge.train.plan import estimate

    cfg = get_preset("small")
    plan = estimate(cfg, batch_size=4, grad_accum=1, max_steps=10)
    same = P.training_memory(cfg, batch=4, seq=cfg.context_length)
    assert plan["memory_activations"] == int(same["activations"].value)
    assert plan["memory_weights_grads_adam"] == 16 * cfg.num_params()


def test_inference_memory_of_a_model_dir_and_a_quantized_mix(capsys, tmp_path, tiny_tokenizer):
    from conftest import save_tiny_model

    from lmforge.footprint import kv_cache_bytes, weights_bytes
    from lmforge.loaders.gguf.names import expected_shapes
    from lmforge.quant.ggml import packed_nbytes

    path = save_tiny_model(tmp_path / "m", tiny_tokenizer)
    code, out, _ = run_cli(capsys, "plan", "--model", path, "--context", "32", "--batch", "8", "--json")
    assert code == 0
    got = json.loads(out)["inference memory (8 x 32 tokens)"]
    cfg = get_preset("tiny", vocab_size=tiny_tokenizer.vocab_size)
    assert got["weights"] == weights_bytes(path)
    assert got["kv_cache"] == kv_cache_bytes(cfg, 8, 32) == 2 * 2 * 8 * 32 * 2 * 16 * 4  # GQA: 2 kv heads of 4
    code, out, _ = run_cli(capsys, "plan", "--model", path, "--quant", "q8_0", "--json", "--explain")
    q8 = sum(packed_nbytes("Q8_0" if len(s) == 2 else "F32", s) for s in expected_shapes(cfg).values())
    assert json.loads(out)["inference memory (1 x 64 tokens)"]["weights"] == q8
    code, out, _ = run_cli(capsys, "plan", "--preset", "gemma3-1b", "--quant", "q4_k_m", "--context", "8192",
                           "--explain")
    assert code == 0 and "sliding layers x a ring" in out and "llama.cpp's q4_k_m mix" in out


def test_a_training_plan_explains_every_figure(capsys):
    code, out, _ = run_cli(capsys, "plan", "--preset", "llama-1b", "--tokens", "20e9", "--gpu", "a100-80g", "--gpus",
                           "64", "--price", "2.0", "--grid-co2", "0.4", "--explain")
    assert code == 0
    lines = out.splitlines()
    figures = [i for i, line in enumerate(lines) if line.startswith("  ") and not line.strip().startswith(("=", "fits"))]
    assert len(figures) == 13 and all(lines[i + 1].strip().startswith("= ") for i in figures)
    for label in ("training FLOPs", "Chinchilla-optimal", "activations", "device-hours", "cost", "energy", "CO2"):
        assert label in out
    assert "dp=64" in out  # no --parallel: DDP over the devices


def test_this_machine_is_measured(capsys):
    code, out, _ = run_cli(capsys, "plan", "--params", "1e6", "--tokens", "1e6", "--gpu", "this", "--precision", "fp32",
                           "--power", "50", "--grid-co2", "0.3", "--json")
    assert code == 0
    run = json.loads(out)["training run on 1 x this machine"]
    assert run["time"] > 0 and math.isfinite(run["time"]) and run["co2"] > 0


@pytest.mark.parametrize("argv, says", [
    (["--params", "-5"], "--params -5 is out of range"),
    (["--params", "1e9", "--tokens", "-1"], "--tokens -1 is out of range"),
    (["--params", "1e9", "--tokens", "1e30"], "out of range"),
    (["--params", "1e9", "--mfu", "1.5"], "--mfu 1.5 is out of range"),
    (["--params", "1e9", "--price", "-2"], "--price -2"),
    (["--params", "1e9", "--grid-co2", "nan"], "--grid-co2 nan"),
    (["--params", "1e9", "--gpu", "tpu-v9"], "unknown accelerator 'tpu-v9'"),
    (["--params", "1e9", "--gpus", "8", "--parallel", "tp=3"], "needs a multiple of 3 devices"),
    (["--params", "1e9", "--gpus", "8", "--parallel", "tp=2,dp=2"], "uses 4 devices, but --gpus is 8"),
    (["--params", "1e9", "--gpus", "8", "--parallel", "zz=2"], "expected ddp, fsdp"),
    (["--preset", "llama-1b", "--gpus", "6", "--parallel", "tp=3"], "the model's 32 attention heads do not divide evenly among tp=3"),
    (["--preset", "small", "--gpus", "8", "--parallel", "pp=8"], "pp=8 stages need at least one block each, and the model has 6 layers"),
    (["--preset", "small", "--quant", "q9"], "unknown quantization type 'q9'"),
    (["--preset", "small", "--context", "100000"], "longer than the model's context"),
    (["--preset", "small", "--params", "1e9"], "give one of --preset, --model and --params"),
    ([], "nothing to plan"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, says):
    code, out, err = run_cli(capsys, "plan", *argv)
    assert code == 2 and out == ""
    assert says in err and len(err.strip().splitlines()) == 1


def test_a_quantized_mix_from_the_config_is_what_the_gguf_writer_writes(capsys, tmp_path, tiny_tokenizer):
    """The weights `--quant q4_k_m` plans from a config alone are the bytes of the file lmforge writes."""
    import torch

    from lmforge.footprint import weights_bytes
    from lmforge.loaders.gguf.write import write_gguf
    from lmforge.model.gpt import GPT

    cfg = get_preset("tiny", vocab_size=tiny_tokenizer.vocab_size, d_model=256, d_ff=512)
    torch.manual_seed(0)
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, GPT(cfg).state_dict(), tiny_tokenizer, qtype="q4_k_m")
    assert P.quantized_weights(cfg, "q4_k_m").value == weights_bytes(path)
    code, out, _ = run_cli(capsys, "plan", "--model", path, "--json")
    assert code == 0 and json.loads(out)["inference memory (1 x 64 tokens)"]["weights"] == weights_bytes(path)
