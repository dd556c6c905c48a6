"""lmforge's GGUF tokenizers against llama.cpp's own, string by string (issue 14, requirement 8).

    python bench/tokenizer_vs_llamacpp.py [--workdir DIR] [--vocab spm gpt-2 ...] [--llama-cpp SRC]

Builds six tiny vocabularies here, trained on tinyshakespeare: a Llama-2-style SentencePiece BPE with and
without the space prefix, lmforge's own Llama-3-style byte-level BPE, and byte-level BPEs with the published
GPT-2, Qwen2 and SmolLM pre-tokenizers. Each becomes a GGUF made by llama.cpp's own convert_hf_to_gguf.py.
Then one row per (vocabulary, string): whether the token ids equal llama.cpp's (add_bos x special parsing
on/off: four encodes) and whether the text does (streamed pieces, decode, decode skipping special tokens),
and the same over seeded random strings. What exactly is compared is stated in
tests/loaders/gguf/test_gguf_vs_llamacpp.py, which asserts the same; it needs llama-cpp-python (a bench-only
extra) and the llama.cpp source tree (LMFORGE_LLAMA_CPP_SRC or --llama-cpp).

Takes a minute or two, most of it the converter starting up six times.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from lmforge.loaders.gguf import read_gguf  # noqa: E402
from tests.loaders.gguf.test_gguf_vs_llamacpp import (  # noqa: E402
    TRICKY,
    VOCABS,
    LlamaCppVocab,
    _requirements,
    build_gguf,
    compare,
    random_texts,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", help="where the model directories and GGUFs go (default: a temporary folder)")
    ap.add_argument("--vocab", nargs="+", choices=VOCABS, default=list(VOCABS))
    ap.add_argument("--random", type=int, default=300, help="seeded random strings per vocabulary (default: 300)")
    ap.add_argument("--llama-cpp", type=Path, help="llama.cpp source tree holding convert_hf_to_gguf.py "
                    "(default: $LMFORGE_LLAMA_CPP_SRC, else this project's copy)")
    args = ap.parse_args()
    if args.llama_cpp:
        os.environ["LMFORGE_LLAMA_CPP_SRC"] = str(args.llama_cpp)
    why = _requirements()
    if why:
        print(f"cannot compare: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        total = bad = 0
        print(f"{'vocabulary':<13} {'text':<34} {'ids equal':>9} {'text equal':>10}  differing checks")
        for kind in args.vocab:
            t0 = time.perf_counter()
            path = build_gguf(kind, work)
            tok, ref = read_gguf(path).tokenizer, LlamaCppVocab(path)
            print(f"-- {kind}: {path.name} made by convert_hf_to_gguf.py in {time.perf_counter() - t0:.0f} s, "
                  f"{tok.vocab_size} tokens")
            for text in TRICKY:
                res = compare(tok, ref, text, kind)
                ids_ok = all(ok for k, ok in res.items() if k.startswith("ids"))
                text_ok = all(ok for k, ok in res.items() if not k.startswith("ids"))
                failed = [k for k, ok in res.items() if not ok]
                total += 1
                bad += bool(failed)
                shown = repr(text) if len(repr(text)) <= 34 else repr(text)[:31] + "..."
                print(f"{kind:<13} {shown:<34} {'yes' if ids_ok else 'NO':>9} {'yes' if text_ok else 'NO':>10}  "
                      f"{', '.join(failed)}")
            rand = random_texts(args.random)
            same = sum(all(compare(tok, ref, text, kind).values()) for text in rand)
            total, bad = total + len(rand), bad + len(rand) - same
            line = f"{kind:<13} {f'{len(rand)} random strings':<34} {same} identical in every check"
            if not kind.startswith("spm"):  # what llama.cpp's own decode (with its clean-up pass) would change
                cleaned = sum(ref.detokenize(ref.tokenize(t, True, True)) != ref.pieces(ref.tokenize(t, True, True))
                              for t in TRICKY + rand)
                line += f"; llama_detokenize's clean-up rewrites {cleaned} of all {len(TRICKY) + len(rand)} texts"
            print(line)
        print(f"{total - bad} of {total} (vocabulary, string) pairs identical in every check")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
