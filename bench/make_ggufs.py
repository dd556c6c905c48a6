"""The GGUF files bench/vs_llamacpp.py measures, made by llama.cpp's own tools (never by lmforge's writer).

    nice -n 10 python bench/make_ggufs.py                    # 135M and 1B, each F16 / Q8_0 / Q4_0 / Q4_K_M
    nice -n 10 python bench/make_ggufs.py --shapes 135M      # only the small one
    nice -n 10 python bench/make_ggufs.py --seven-b          # also the Llama-2-7B-shaped Q4_0 file (~3.8 GB)

Why llama.cpp's tools: a comparison on files lmforge wrote itself would only show that lmforge agrees with
lmforge. So the files come from the code people's downloads come from:

1. A random-weight Hugging Face checkpoint per shape, built by `transformers` from a config (seeded, no
   download) and saved in float16, so the F16 GGUF holds exactly the checkpoint's numbers:
   - "135M": SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads / 3 kv heads, MLP 1536, vocab 49152,
     tied embeddings, rope_theta 1e5);
   - "1B": Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8 kv heads, MLP 8192, vocab 128256,
     tied embeddings, rope_theta 5e5, llama3 rope scaling).
   The tokenizer is a SentencePiece model (4096 pieces, byte fallback) trained here on tinyshakespeare. That
   route is chosen because llama.cpp's converter takes a Llama checkpoint's `tokenizer.model` first
   (`LlamaModel.set_vocab` -> `_set_vocab_sentencepiece`): it needs no pre-tokenizer hash (a BPE
   `tokenizer.json` it does not recognise is refused, and recognising one needs a hub download), and it
   pads the token list to the config's `vocab_size` with `[PAD<i>]` tokens of type UNUSED -- so a 4096-piece
   vocabulary serves a 49152- or 128256-row embedding.
2. `convert_hf_to_gguf.py --outtype f16` and `--outtype q8_0`, from the llama.cpp tree inside the
   llama-cpp-python sdist (`--llama-cpp`).
3. `llama_cpp.llama_model_quantize` on the F16 file for Q4_0 and Q4_K_M, llama.cpp's own quantizer with
   its default mixing rules. K-quants work on 256-wide super-blocks, and the 135M shape's hidden size 576
   is not a multiple of 256: every matrix with 576-wide rows falls back to a legacy type (Q5_0 / Q8_0; only
   ffn_down, 1536 wide, keeps Q4_K / Q6_K), which is why its Q4_K_M file is larger than its Q4_0 one. That
   is what users of such a model download, so it is kept; the 1B shape gets K-quants throughout.

`--seven-b` writes a Llama-2-7B-shaped Q4_0 file (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab
32000, untied output) from random blocks with `gguf.GGUFWriter`: no 7B checkpoint exists here, and
building one in fp32 would take 28 GB. Each tensor is generated, written and dropped in turn (tensor infos
first, then the data one tensor at a time), so writing it needs ~100 MB of RAM, not 4 GB. The blocks carry
small finite fp16 scales (weights of std ~0.02, so activations stay moderate through 32 layers), the norms
are F32 ones, and the vocabulary is the same SentencePiece model padded to 32000 as the converter pads it,
so both tools load it as an SPM ("llama") tokenizer.

Every file is cached: one that exists is not made again (files are written under a temporary name and
renamed, so a killed run leaves nothing that looks finished). Work files default to /work/benchfiles.
Needs: transformers, sentencepiece, protobuf, gguf, and llama-cpp-python for the Q4_0 / Q4_K_M step
(`pip install -e '.[bench]'`, see bench/vs_llamacpp.py). The converter is not part of the installed
package: it is in the llama.cpp tree of the llama-cpp-python sdist, which pip does not keep; unpack it with
`pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36` and point `--llama-cpp` at its
`vendor/llama.cpp`. The converter runs with that tree's own gguf-py first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("/work/benchfiles")
DEFAULT_LLAMA_CPP = Path("/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp")
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SPM_VOCAB = 4096

SHAPES = {
    "135M": dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=2048,
                 tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),
    "1B": dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, max_position_embeddings=131072,
               tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
               rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192)),
}
TYPES = ("f16", "q8_0", "q4_0", "q4_k_m")
SEVEN_B = dict(vocab=32000, hidden=4096, layers=32, heads=32, ff=11008, context=4096)
SEVEN_B_NAME = "7B-shape-q4_0.gguf"


def die(msg: str) -> None:
    """A user's mistake (or a missing tool): one line on stderr, exit code 2, no traceback."""
    print(f"{Path(sys.argv[0]).name}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def log(msg: str) -> None:
    print(f"[make_ggufs {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gguf_path(out: Path, shape: str, qtype: str) -> Path:
    return out / f"{shape}-{qtype}.gguf"


def _fresh(path: Path) -> Path:
    """A temporary sibling of `path` to write to before the rename (a leftover from a killed run is removed)."""
    tmp = path.with_name(path.name + ".part")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    return tmp


# ---------------------------------------------------------------------------------------------------------
def spm_model(out: Path, text: Path) -> Path:
    """A 4096-piece SentencePiece model (BPE, byte fallback) trained on `text`; cached."""
    path = out / "spm" / "spm.model"
    if path.is_file():
        return path
    import sentencepiece as spm

    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"training a {SPM_VOCAB}-piece SentencePiece model on {text}")
    # the Llama convention: <unk>=0, <s>=1, </s>=2, no pad piece; byte fallback so any text encodes
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(path.parent / "spm.part"),
                                   vocab_size=SPM_VOCAB, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   num_threads=2, minloglevel=2)
    (path.parent / "spm.part.vocab").unlink(missing_ok=True)
    os.replace(path.parent / "spm.part.model", path)
    return path


def hf_checkpoint(out: Path, shape: str, spm: Path) -> Path:
    """A seeded random-weight LlamaForCausalLM of `shape`, saved in float16 with the SPM tokenizer; cached."""
    d = out / f"hf-{shape}"
    if (d / "config.json").is_file():
        return d
    import torch
    import transformers

    tmp = _fresh(d)
    log(f"building the random {shape} checkpoint in {d}")
    cfg = transformers.LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, initializer_range=0.02)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval().half()
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    tok = transformers.LlamaTokenizer(vocab_file=str(spm), legacy=False, add_bos_token=True, add_eos_token=False)
    tok.save_pretrained(tmp)
    # The converter reads `tokenizer.model` itself; some transformers versions save only tokenizer.json.
    if not (tmp / "tokenizer.model").is_file():
        shutil.copyfile(spm, tmp / "tokenizer.model")
    os.replace(tmp, d)
    return d


def convert(hf_dir: Path, qtype: str, dest: Path, llama_cpp: Path) -> None:
    """`convert_hf_to_gguf.py --outtype {f16,q8_0}` from the llama.cpp tree (its own gguf-py first on the path)."""
    script = llama_cpp / "convert_hf_to_gguf.py"
    if not script.is_file():
        die(f"{script} not found; give the llama.cpp tree with --llama-cpp")
    tmp = _fresh(dest)
    env = {**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py")}
    log(f"convert_hf_to_gguf.py {hf_dir.name} --outtype {qtype} -> {dest.name}")
    r = subprocess.run([sys.executable, str(script), str(hf_dir), "--outtype", qtype, "--outfile", str(tmp)],
                       env=env, capture_output=True, text=True)
    if r.returncode != 0:
        die(f"the converter failed on {hf_dir} ({qtype}):\n{r.stderr[-3000:]}")
    os.replace(tmp, dest)


def quantize(src: Path, qtype: str, dest: Path, threads: int) -> None:
    """llama.cpp's quantizer (`llama_model_quantize`, default params, `ftype` set) from the F16 file."""
    try:
        import llama_cpp
    except ImportError:
        die("llama_cpp is not importable; install the bench extra (see bench/vs_llamacpp.py)")
    ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[qtype]
    tmp = _fresh(dest)
    log(f"llama_model_quantize {src.name} -> {dest.name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        die(f"llama_model_quantize returned {rc} for {src} -> {qtype}")
    os.replace(tmp, dest)


def make_shape(out: Path, shape: str, types, spm: Path, llama_cpp: Path, threads: int) -> list[Path]:
    want = [gguf_path(out, shape, t) for t in types]
    if all(p.is_file() for p in want):
        return want
    hf = hf_checkpoint(out, shape, spm)
    f16 = gguf_path(out, shape, "f16")
    for t in types:
        dest = gguf_path(out, shape, t)
        if dest.is_file():
            continue
        if t in ("f16", "q8_0"):
            convert(hf, t, dest, llama_cpp)
        else:
            if not f16.is_file():
                convert(hf, "f16", f16, llama_cpp)
            quantize(f16, t, dest, threads)
    return want


# ---------------------------------------------------------------------------------------------------------
def _q4_0_rows(rng: np.random.Generator, rows: int, cols: int, std: float) -> np.ndarray:
    """`rows` x `cols` weights as random Q4_0 blocks (uint8, rows x cols/32*18): a float16 scale `d`, then 16
    bytes of 4-bit codes q, each weight (q - 8) * d. Uniform codes have std ~4.6, so d ~ std / 4.6, jittered
    by +-50% so blocks differ."""
    nb = cols // 32
    blocks = rng.integers(0, 256, size=(rows, nb, 18), dtype=np.uint8)
    d = (rng.uniform(0.5, 1.5, size=(rows, nb)) * (std / 4.6)).astype(np.float16)
    blocks[:, :, :2] = d.view(np.uint8).reshape(rows, nb, 2)
    return blocks.reshape(rows, nb * 18)


def seven_b(out: Path, spm: Path, seed: int = 0) -> Path:
    """The Llama-2-7B-shaped Q4_0 GGUF from random blocks, written one tensor at a time; cached."""
    import gguf
    import sentencepiece

    dest = out / SEVEN_B_NAME
    if dest.is_file():
        return dest
    s = SEVEN_B
    H, L, F, V = s["hidden"], s["layers"], s["ff"], s["vocab"]
    tmp = _fresh(dest)
    log(f"writing {dest.name} (Llama-2-7B shape, random Q4_0 blocks)")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("random 7B-shaped Q4_0 (lmforge bench)")
    w.add_context_length(s["context"])
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_rope_dimension_count(H // s["heads"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(V)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # the vocabulary as convert_hf_to_gguf.py writes an SPM one: pieces, scores, types, padded to V
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm))
    tt = gguf.TokenType
    tokens = [f"[PAD{i}]".encode() for i in range(V)]
    scores = [-1000.0] * V
    types = [tt.UNUSED] * V
    for i in range(sp.vocab_size()):
        tokens[i] = sp.IdToPiece(i).encode()
        scores[i] = sp.GetScore(i)
        types[i] = (tt.UNKNOWN if sp.IsUnknown(i) else tt.CONTROL if sp.IsControl(i) else
                    tt.BYTE if sp.IsByte(i) else tt.UNUSED if sp.IsUnused(i) else tt.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    # (name, rows, cols); None cols = a 1-D F32 norm of `rows` ones
    plan: list[tuple[str, int, int | None]] = [("token_embd.weight", V, H)]
    for i in range(L):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", H, None), (b + "attn_q.weight", H, H), (b + "attn_k.weight", H, H),
                 (b + "attn_v.weight", H, H), (b + "attn_output.weight", H, H), (b + "ffn_norm.weight", H, None),
                 (b + "ffn_gate.weight", F, H), (b + "ffn_up.weight", F, H), (b + "ffn_down.weight", H, F)]
    plan += [("output_norm.weight", H, None), ("output.weight", V, H)]
    Q4_0 = gguf.GGMLQuantizationType.Q4_0
    for name, rows, cols in plan:
        if cols is None:
            w.add_tensor_info(name, (rows,), np.dtype(np.float32), rows * 4)
        else:
            w.add_tensor_info(name, (rows, cols // 32 * 18), np.dtype(np.uint8), rows * cols // 32 * 18,
                              raw_dtype=Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for n, (name, rows, cols) in enumerate(plan):
        if cols is None:
            w.write_tensor_data(np.ones(rows, dtype=np.float32))
        else:
            w.write_tensor_data(_q4_0_rows(rng, rows, cols, std=0.02))
        if n % 45 == 0:
            log(f"  {n + 1}/{len(plan)} tensors")
    w.close()
    os.replace(tmp, dest)
    return dest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"work directory (default: {DEFAULT_OUT})")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES), help="default: 135M 1B")
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES, help="default: all four")
    ap.add_argument("--seven-b", action="store_true", help=f"also write {SEVEN_B_NAME} (~3.8 GB)")
    ap.add_argument("--llama-cpp", type=Path, default=DEFAULT_LLAMA_CPP,
                    help=f"llama.cpp source tree holding convert_hf_to_gguf.py (default: {DEFAULT_LLAMA_CPP})")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text the SentencePiece model is trained on")
    ap.add_argument("--threads", type=int, default=2, help="quantizer threads (default: 2)")
    args = ap.parse_args(argv)
    if args.shapes and not (args.llama_cpp / "convert_hf_to_gguf.py").is_file():
        die(f"no convert_hf_to_gguf.py in {args.llama_cpp}; give the llama.cpp tree with --llama-cpp")
    if not args.text.is_file():
        die(f"{args.text} not found; give the SentencePiece training text with --text")
    args.out.mkdir(parents=True, exist_ok=True)
    spm = spm_model(args.out, args.text)
    made = []
    for shape in args.shapes:
        made += make_shape(args.out, shape, args.types, spm, args.llama_cpp, args.threads)
    if args.seven_b:
        made.append(seven_b(args.out, spm))
    for p in made:
        print(f"{p.name:28s} {p.stat().st_size / 2**20:10.1f} MiB")
    index = args.out / "files.json"  # every file made so far, with its size in bytes
    listing = json.loads(index.read_text()) if index.is_file() else {}
    listing.update({p.name: p.stat().st_size for p in made})
    index.write_text(json.dumps(dict(sorted(listing.items())), indent=1))


if __name__ == "__main__":
    main()
