"""Decode and prefill speed: lmforge's engine vs Hugging Face transformers on identical random weights.

    python bench/decode.py                       # both configs, fp32 and bf16 (a few minutes)
    python bench/decode.py --configs 15M --dtypes fp32 --new-tokens 64

Two random-weight Llama configs are built with transformers ("15M": d_model 288, 6 layers, 6 heads, vocab
32000; "135M": SmolLM2-135M's shape: d_model 576, 30 layers, 9 heads, 3 kv heads, MLP 1536, vocab 49152,
tied embeddings), the same weights are loaded into lmforge, and in one run, with the same thread count:
  - batch-1 decode tokens/s: greedy, 32-token prompt, exactly `--new-tokens` new tokens
    (transformers: generate(min_new_tokens = max_new_tokens); lmforge: ignore_eos);
  - batch-8 aggregate tokens/s: 8 prompts, same settings;
  - prefill tokens/s: one forward pass over a 512-token prompt (the "15M" context is raised to 1024 for
    this, since its nominal context is 256).
It also measures the machine's streaming read bandwidth and reports lmforge's batch-1 decode as a share of
the bandwidth bound (bytes of weights read per token / bandwidth). Reported, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.engine.generate import Engine  # noqa: E402
from lmforge.engine.sampling import SamplingParams  # noqa: E402
from lmforge.loaders.hf_read import config_from_hf  # noqa: E402
from lmforge.loaders.hf_tensors import state_dict_from_hf  # noqa: E402
from lmforge.model.gpt import GPT  # noqa: E402

CONFIGS = {
    "15M": dict(vocab_size=32000, hidden_size=288, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                intermediate_size=768, max_position_embeddings=1024, tie_word_embeddings=True),
    "135M": dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class _BenchTokenizer:
    """Just enough tokenizer for the engine: no EOS (so every run generates the same number of tokens)."""

    eos_ids: list[int] = []
    bos_id, pad_id, eos_id = 1, 0, 2

    def token_bytes(self, token_id: int) -> bytes:
        return b"x"

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "x" * len(ids)


def stream_bandwidth() -> float:
    """Bytes/s of a streaming read of 512 MiB (best of 5): the ceiling for batch-1 decoding."""
    a = torch.ones(128 * 1024 * 1024)
    a.sum()
    best = min(_timed(a.sum) for _ in range(5))
    return a.numel() * 4 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, kernel build, caches)
    return min(_timed(fn) for _ in range(repeats))


def build(name: str, dtype: torch.dtype):
    import transformers

    cfg = transformers.LlamaConfig(**CONFIGS[name], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    ours_cfg = config_from_hf({**cfg.to_dict(), "architectures": ["LlamaForCausalLM"]})
    model = GPT(ours_cfg)
    model.load_state_dict(state_dict_from_hf(ours_cfg, hf.state_dict()))
    return hf.to(dtype), model.to(dtype).eval()


def run(name: str, dtype_name: str, new_tokens: int, repeats: int, bandwidth: float) -> list[dict]:
    dtype = DTYPES[dtype_name]
    hf, model = build(name, dtype)
    engine = Engine(model, _BenchTokenizer(), fast=True)
    g = torch.Generator().manual_seed(0)
    V = hf.config.vocab_size
    prompt1 = torch.randint(3, V, (1, 32), generator=g)
    prompt8 = torch.randint(3, V, (8, 32), generator=g)
    long_prompt = torch.randint(3, V, (1, 512), generator=g)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    hf_kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    rows = []

    with torch.inference_mode():
        def ours(prompts):
            return lambda: list(engine.generate([p.tolist() for p in prompts], params))

        def theirs(prompts):
            return lambda: hf.generate(prompts, attention_mask=torch.ones_like(prompts), **hf_kw)

        # Same greedy tokens? (bf16 may diverge after a near-tie; report, don't fail)
        ref = hf.generate(prompt1, attention_mask=torch.ones_like(prompt1), **hf_kw)[0, 32:].tolist()
        got = [e.token_id for e in engine.generate([prompt1[0].tolist()], params)]
        same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))

        for label, n_seq, prompts in (("decode b=1", 1, prompt1), ("decode b=8", 8, prompt8)):
            t_ours = best_of(ours(prompts), repeats)
            t_hf = best_of(theirs(prompts), repeats)
            rows.append(dict(config=name, dtype=dtype_name, what=label, ours=n_seq * new_tokens / t_ours,
                             hf=n_seq * new_tokens / t_hf))
        t_ours = best_of(lambda: model(long_prompt, last_only=True), repeats)
        t_hf = best_of(lambda: hf(long_prompt, use_cache=False), repeats)
        rows.append(dict(config=name, dtype=dtype_name, what="prefill 512", ours=512 / t_ours, hf=512 / t_hf))

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bound = bandwidth / weight_bytes
    rows[0]["bound"] = bound
    rows[0]["same_tokens"] = same
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="default: both")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="default: fp32 bf16")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (default: 128)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats, best kept (default: 2)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    from lmforge.engine import fastpath

    bw = stream_bandwidth()
    kernel = "on" if fastpath.available() else f"off ({fastpath.unavailable_reason()})"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"streaming read bandwidth {bw / 1e9:.1f} GB/s, lmforge matvec kernel {kernel}\n")
    print("| config | dtype | measure | lmforge tok/s | transformers tok/s | ratio | share of bandwidth bound |")
    print("|---|---|---|---|---|---|---|")
    for name in args.configs:
        for dt in args.dtypes:
            for r in run(name, dt, args.new_tokens, args.repeats, bw):
                share = f"{r['ours'] / r['bound']:.0%} of {r['bound']:.0f} tok/s" if "bound" in r else ""
                print(f"| {r['config']} | {r['dtype']} | {r['what']} | {r['ours']:,.1f} | {r['hf']:,.1f} | "
                      f"{r['ours'] / r['hf']:.2f}x | {share} |", flush=True)
                if "same_tokens" in r and r["same_tokens"] < args.new_tokens:
                    print(f"|  |  | (greedy tokens equal to transformers' for the first {r['same_tokens']} of "
                          f"{args.new_tokens}) | | | | |")


if __name__ == "__main__":
    main()
