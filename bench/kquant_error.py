"""Our K-quant quantizers against llama.cpp's, on the same tensors: RMSE of quantize -> dequantize, per tensor.

    python bench/kquant_error.py 2>/dev/null          # a seeded random Llama-shaped model (d_model 512, 4 layers)
    python bench/kquant_error.py --model runs/small   # the weights of a model lmforge can load

It writes the model as an F32 GGUF (our writer), quantizes that file with llama.cpp itself
(`llama_cpp.llama_model_quantize`, ftype Q4_K_M / Q5_K_M / Q6_K), reads llama.cpp's tensors back with
gguf-py's `GGUFReader`, and for every tensor llama.cpp stored as Q4_K, Q5_K or Q6_K quantizes the same F32
data with `lmforge.quant.kquant` and decodes both with gguf-py's `dequantize`. It prints, per tensor, the
RMSE of each relative to the tensor's RMS and the ratio ours / llama.cpp's (< 1: ours is closer), and a
summary per type (element-weighted), and the share of bytes identical to llama.cpp's. Needs
llama-cpp-python (the bench extra; llama.cpp logs to stderr); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def _model(args):
    from lmforge.loaders.auto import load
    from lmforge.model.gpt import GPT
    from lmforge.presets import get_preset
    from lmforge.tokenizer import train_tokenizer

    if args.model:
        loaded = load(args.model)
        return loaded.model, loaded.tokenizer
    text = "\n".join(f"line {i} of a small corpus, with words {i * 7 % 13} and more" for i in range(400))
    tok = train_tokenizer([text], 512, show_progress=False)
    cfg = get_preset("tiny", vocab_size=tok.vocab_size, context_length=256).replace(
        d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=64, d_ff=1536, tie_embeddings=False)
    torch.manual_seed(args.seed)
    return GPT(cfg), tok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a model lmforge can load (default: a seeded random one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ftypes", default="Q4_K_M,Q5_K_M,Q6_K")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("needs llama-cpp-python: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from lmforge.loaders.gguf import write_gguf
    from lmforge.quant.kquant import KQUANTS, quantize_k

    model, tok = _model(args)
    rows, totals = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "f32.gguf"
        write_gguf(src, model.config, model.state_dict(), tok, qtype="f32")
        originals = {t.name: np.array(t.data, dtype=np.float32) for t in GGUFReader(src).tensors}
        for ftype in args.ftypes.split(","):
            dst = Path(tmp) / f"{ftype}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
            params.nthread = 2
            if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
                print(f"llama.cpp failed to quantize to {ftype}", file=sys.stderr)
                return 1
            for t in GGUFReader(dst).tensors:
                name = T(t.tensor_type).name
                if name not in KQUANTS:
                    continue
                x = originals[t.name].reshape(-1, originals[t.name].shape[-1])
                theirs = dequantize(np.array(t.data), T[name]).reshape(x.shape)
                ours_bytes = quantize_k(torch.from_numpy(x), name).numpy().reshape(x.shape[0], -1)
                ours = dequantize(ours_bytes, T[name]).reshape(x.shape)
                rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
                e_t = float(np.sqrt(np.mean((theirs.astype(np.float64) - x) ** 2))) / rms
                e_o = float(np.sqrt(np.mean((ours.astype(np.float64) - x) ** 2))) / rms
                same = float(np.mean(ours_bytes == np.array(t.data).reshape(ours_bytes.shape)))
                rows.append((ftype, t.name, name, x.size, e_t, e_o, same))
                tt = totals.setdefault(name, [0, 0.0, 0.0])
                tt[0] += x.size
                tt[1] += e_t ** 2 * x.size
                tt[2] += e_o ** 2 * x.size
    print(f"{'file type':<9} {'tensor':<26} {'type':<5} {'values':>9} {'llama.cpp':>10} {'lmforge':>10} {'ratio':>6} {'same bytes':>10}")
    for ftype, name, qt, n, e_t, e_o, same in rows:
        print(f"{ftype:<9} {name:<26} {qt:<5} {n:>9} {e_t:>10.5f} {e_o:>10.5f} {e_o / e_t:>6.3f} {same:>10.1%}")
    print("\nper type (relative RMSE, element-weighted over all files):")
    for qt, (n, st, so) in sorted(totals.items()):
        et, eo = (st / n) ** 0.5, (so / n) ** 0.5
        print(f"  {qt:<5} llama.cpp {et:.5f}  lmforge {eo:.5f}  ratio {eo / et:.3f}  ({n:,} values)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
