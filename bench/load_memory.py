"""Peak memory of loading a model directory, as a multiple of the loaded weights' bytes.

    python bench/load_memory.py [--preset llama-135m] [--file-dtype bfloat16|float32] [--gguf q8_0|f16|f32|q4_0]

Saves a random model of the preset with transformers-style names, then loads it in a fresh process with
`lmforge.loaders.model_dir.load_model` and reports the peak RSS increase over the process's RSS right before
the load (after importing torch). A loader that reads the whole file and then copies it into a second
model would show ~2x; lmforge reads tensor by tensor from memory-mapped files and assigns them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import resource, sys, threading, time, torch
from lmforge.loaders.auto import load
def load_model(p): return load(p).model
def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 1024
    return out
peak_anon, done = [0.0], [False]
def sample():  # no kernel counter keeps the peak of anonymous memory alone: sample it
    while not done[0]:
        peak_anon[0] = max(peak_anon[0], status()["RssAnon"]); time.sleep(0.002)
before = status()
t = threading.Thread(target=sample); t.start()
model = load_model(sys.argv[1])
done[0] = True; t.join()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
uniq = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
print(before["VmRSS"], peak, before["RssAnon"], peak_anon[0], sum(uniq.values()) / 2**20)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-135m", help="model shape to save and load (default: llama-135m)")
    ap.add_argument("--file-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="dtype of the weights on disk; they load as float32 (default: bfloat16)")
    ap.add_argument("--gguf", choices=["f32", "f16", "q8_0", "q4_0"], help="save as a GGUF file of this type instead "
                    "of a safetensors directory (default: safetensors)")
    args = ap.parse_args()

    import torch

    from lmforge.loaders.model_dir import write_model_files
    from lmforge.model.gpt import GPT
    from lmforge.presets import get_preset

    with tempfile.TemporaryDirectory() as tmp:
        model = GPT(get_preset(args.preset))
        target = tmp
        if args.gguf:
            from lmforge.loaders.gguf import write_gguf
            from lmforge.tokenizer import train_tokenizer

            tok = train_tokenizer(["a few words of text to make a byte-level vocabulary"] * 10, 300, show_progress=False)
            target = str(Path(tmp) / "model.gguf")
            write_gguf(target, model.config, model.state_dict(), tok, qtype=args.gguf)
            file_mb = Path(target).stat().st_size / 2**20
            args.file_dtype = f"GGUF {args.gguf}"
        else:
            model = model.to(getattr(torch, args.file_dtype))
            write_model_files(Path(tmp), model)
            file_mb = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")) / 2**20
        del model
        out = subprocess.run([sys.executable, "-c", CHILD, target], capture_output=True, text=True, check=True).stdout
        before, peak, anon_before, anon_peak, weights = (float(x) for x in out.split())
        print(f"preset {args.preset}: file {file_mb:.0f} MiB ({args.file_dtype}), loaded weights {weights:.0f} MiB (float32)")
        print(f"peak RSS added by the load     {peak - before:5.0f} MiB = {(peak - before) / weights:.2f}x the loaded weights "
              f"(includes the file's pages while mapped)")
        print(f"peak anonymous memory added    {anon_peak - anon_before:5.0f} MiB = {(anon_peak - anon_before) / weights:.2f}x "
              f"(sampled every 2 ms: memory only this process holds)")


if __name__ == "__main__":
    main()
