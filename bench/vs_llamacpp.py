"""lmforge against llama.cpp on the same GGUF files, made by llama.cpp's own tools, in one run (issue 14).

    nice -n 10 python bench/make_ggufs.py --seven-b          # the files, once (cached; see that script)
    python bench/vs_llamacpp.py --json vs_llamacpp.json       # 135M and 1B x F16/Q8_0/Q4_0/Q4_K_M
    python bench/vs_llamacpp.py --shapes 135M --types q8_0 q4_0 --decode-tokens 8 --prompt-tokens 64   # smoke
    python bench/vs_llamacpp.py --seven-b --shapes --no-prefill  # only the 7B-shaped Q4_0 file
    python bench/vs_llamacpp.py --also small-q4.gguf          # + a file `lmforge quantize` wrote

For every file and both tools, each measured alone in a fresh child process of this script (`--worker`):
  - batch-1 decode tok/s: greedy, `--decode-tokens` (128) steps after a 32-token prompt, EOS ignored; only
    the decode steps are timed (from the first generated token to the last), after a short warm-up;
  - prefill tok/s: one forward pass over a `--prompt-tokens` (512) prompt of fixed random ids into an empty
    cache, after one warm-up pass. Both tools take the whole prompt in one go: lmforge in one model call
    (as `Engine.generate` prefills), llama.cpp with n_batch = n_ubatch = max(512, prompt) -- the worker reads
    both back from the context and refuses to time a prompt that would be split;
  - peak RSS: the child's VmHWM at the end (load, decode and prefill; mmapped file pages count once they
    are touched, for both tools); the anonymous / file split at the end goes to the JSON;
  - the greedy tokens; on F16 files the first 32 of each tool are printed side by side (llama.cpp rounds
    activations to f16 for F16 matrices, so a near-tie may still differ). Random weights often settle into
    repeating one token, which makes equal tokens weak evidence, so the logits of the first step (after the
    32-token prompt) are compared too: the largest difference relative to the logits' spread, and whether
    the top-5 ids agree.
Both get `--threads` (2): `torch.set_num_threads` and OMP_NUM_THREADS for lmforge; `n_threads` and
`n_threads_batch` for llama.cpp. lmforge is used as `lmforge run` uses it: `lmforge.loaders.auto.load` with the
stored precision (dtype="auto", `lmforge run`'s default), then `lmforge.engine.generate.Engine(fast=True)`.

Targets (issue 14): lmforge decode and prefill >= 0.8x llama.cpp's, peak RSS <= 1.2x; the 7B-shaped file
under 5 GB of peak RSS in lmforge. Reported, never asserted. The parent watches each child's RSS and kills
it past `--mem-limit-gib` (default 80% of the memory available at start), so a tool that would need more
than the machine has gets a "killed past N GiB" line instead of waking the OOM killer on a shared machine.
(An address-space limit would not do: it counts the mmapped file and every reserved-but-untouched page.)

llama.cpp comes from `llama-cpp-python`, a bench-only extra (never a runtime dependency):
    pip install -e '.[bench]'            # or: pip install 'llama-cpp-python==0.3.36' sentencepiece protobuf
pip builds llama.cpp from source (CMake + a C++ compiler; about 10 minutes on 2 cores). The build targets the
building machine's CPU (GGML_NATIVE); set CMAKE_ARGS="-DGGML_NATIVE=OFF ..." to build for another.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_ggufs import DEFAULT_OUT, SEVEN_B_NAME, SHAPES, TYPES, gguf_path  # noqa: E402

TOOLS = ("lmforge", "llama.cpp")
DECODE_PROMPT = 32  # tokens of prompt before the timed decode
COMPARE = 32  # greedy tokens compared on F16 files
WARMUP_STEPS = 4


def die(msg: str) -> None:
    """A user's mistake (or a missing tool): one line on stderr, exit code 2, no traceback."""
    print(f"{Path(sys.argv[0]).name}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------------------
# worker side: one tool, one file, in a fresh process
def prompts(vocab: int, prompt_tokens: int) -> tuple[list[int], list[int]]:
    """The fixed random prompts (decode, prefill): ids in [3, vocab), the same for both tools."""
    import numpy as np

    rng = np.random.default_rng(0)
    return (rng.integers(3, vocab, DECODE_PROMPT).tolist(), rng.integers(3, vocab, prompt_tokens).tolist())


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM, the high-water mark of its own address space. Not `ru_maxrss`: Linux
    carries that over from the forked parent's image through execve, so every child would report at least
    the parent's RSS at the fork (seen here: the same 359 MiB for every llama.cpp file)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; an upper bound


def rss_now_mib() -> dict:
    """The current RSS split into anonymous memory and mapped file pages (which the kernel can drop)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile"):
                out[f"{k[3:].lower()}_rss_mib_end"] = int(v.split()[0]) / 1024
    except OSError:
        pass
    return out


def lmforge_worker(path: Path, a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from lmforge.engine.generate import Engine
    from lmforge.engine.sampling import SamplingParams
    from lmforge.loaders.auto import load
    from lmforge.model.kv_cache import KVCache

    t = time.perf_counter()
    loaded = load(path, dtype="auto")  # the stored precision, as `lmforge run` loads (--dtype auto)
    engine = Engine(loaded.model, loaded.tokenizer, fast=True)
    out = dict(load_s=time.perf_counter() - t, format=loaded.format, peak_rss_after_load_mib=peak_rss_mib())
    cfg = engine.config
    short, long = prompts(cfg.vocab_size, a.prompt_tokens)

    def greedy(n: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)

    list(engine.generate([short], greedy(WARMUP_STEPS)))
    stamps, tokens = [], []
    for ev in engine.generate([short], greedy(a.decode_tokens + 1)):
        stamps.append(time.perf_counter())
        tokens.append(ev.token_id)
    out.update(decode_tok_s=a.decode_tokens / (stamps[-1] - stamps[0]), tokens=tokens)
    with torch.inference_mode():  # the first step's logits, for the parent to compare (not timed)
        out["first_logits"] = engine.model(torch.tensor([short]), last_only=True)[0, -1].float().tolist()

    if not a.no_prefill:
        idx = torch.tensor([long])

        def prefill() -> float:
            cache = KVCache.for_model(cfg, 1, len(long), dtype=engine.dtype, device=engine.device)
            t = time.perf_counter()
            with torch.inference_mode():
                engine.model(idx, cache=cache, last_only=True)  # what Engine.generate's prefill calls
            return time.perf_counter() - t

        prefill()
        out["prefill_tok_s"] = len(long) / min(prefill() for _ in range(a.repeats))
    out.update(peak_rss_mib=peak_rss_mib(), **rss_now_mib())
    return out


def llamacpp_worker(path: Path, a) -> dict:
    import llama_cpp
    import numpy as np

    t = time.perf_counter()
    batch = max(512, a.prompt_tokens)
    n_ctx = max(batch, DECODE_PROMPT + WARMUP_STEPS + a.decode_tokens + 1) + 64  # Llama caps n_batch at n_ctx
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=batch, n_ubatch=batch, n_threads=a.threads,
                          n_threads_batch=a.threads, flash_attn=a.flash_attn, use_mmap=not a.llama_no_mmap,
                          logits_all=False, verbose=False)
    ctx = llm._ctx.ctx
    out = dict(load_s=time.perf_counter() - t, peak_rss_after_load_mib=peak_rss_mib(), n_ctx=llama_cpp.llama_n_ctx(ctx),
               n_batch=llama_cpp.llama_n_batch(ctx), n_ubatch=llama_cpp.llama_n_ubatch(ctx),
               llama_cpp_version=llama_cpp.__version__)
    n_vocab = llm.n_vocab()
    short, long = prompts(n_vocab, a.prompt_tokens)

    def last_logits() -> np.ndarray:  # a view of llama.cpp's buffer: the last row's logits
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))

    def decode(steps: int) -> tuple[list[int], list[float], list[float]]:
        llm.reset()  # the next eval drops the cache from position 0 on
        llm.eval(short)
        first = last_logits().tolist()
        tokens, stamps = [int(last_logits().argmax())], [time.perf_counter()]
        for _ in range(steps):
            llm.eval([tokens[-1]])
            tokens.append(int(last_logits().argmax()))
            stamps.append(time.perf_counter())
        return tokens, stamps, first

    decode(WARMUP_STEPS)
    tokens, stamps, first = decode(a.decode_tokens)
    out.update(decode_tok_s=a.decode_tokens / (stamps[-1] - stamps[0]), tokens=tokens, first_logits=first)

    if not a.no_prefill:
        if min(out["n_batch"], out["n_ubatch"]) < len(long):
            raise RuntimeError(f"llama.cpp would split the {len(long)}-token prompt (n_batch {out['n_batch']}, "
                               f"n_ubatch {out['n_ubatch']})")

        def prefill() -> float:
            llm.reset()
            t = time.perf_counter()
            llm.eval(long)  # one llama_decode of the whole prompt, logits of the last row
            return time.perf_counter() - t

        prefill()
        out["prefill_tok_s"] = len(long) / min(prefill() for _ in range(a.repeats))
    out.update(peak_rss_mib=peak_rss_mib(), **rss_now_mib())
    return out


def worker(a) -> None:
    """`--worker TOOL FILE`: measure, write a JSON object to `--result` (an `error` line on failure)."""
    tool, path = a.worker[0], Path(a.worker[1])
    try:
        res = (lmforge_worker if tool == "lmforge" else llamacpp_worker)(path, a)
    except BaseException as e:  # noqa: BLE001 -- a report line, not a crash of the whole run
        msg = " ".join(str(e).split())[:300]
        res = dict(error=f"{type(e).__name__}: {msg}", peak_rss_mib=peak_rss_mib())
    Path(a.result).write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------------------
# parent side
def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def measure(tool: str, path: Path, a) -> dict:
    """Run one worker, killing it if its RSS passes `--mem-limit-gib`; its result, or an `error` saying how
    the child died."""
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    with tempfile.TemporaryDirectory() as d:
        result = Path(d) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, str(path), "--result", str(result),
               "--threads", str(a.threads), "--decode-tokens", str(a.decode_tokens),
               "--prompt-tokens", str(a.prompt_tokens), "--repeats", str(a.repeats)]
        if a.no_prefill or (a.seven_b_no_prefill and path.name == SEVEN_B_NAME):
            cmd.append("--no-prefill")
        if a.flash_attn:
            cmd.append("--flash-attn")
        if a.llama_no_mmap:
            cmd.append("--llama-no-mmap")
        t = time.perf_counter()
        limit, seen, killed = a.mem_limit_gib * 1024, 0.0, False
        with open(Path(d) / "stderr", "w+") as err:
            child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
            while child.poll() is None:
                seen = max(seen, _rss_mib(child.pid))
                if seen > limit > 0:
                    child.kill()
                    child.wait()
                    killed = True
                    break
                time.sleep(0.05)
            err.seek(0)
            stderr = err.read()
        wall = time.perf_counter() - t
        if killed:
            res = dict(error=f"killed by the bench: RSS passed {a.mem_limit_gib:g} GiB (--mem-limit-gib)",
                       peak_rss_mib=seen)
        elif result.is_file():
            res = json.loads(result.read_text())
        else:
            rc = child.returncode
            how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
            tail = " | ".join(stderr.strip().splitlines()[-2:])[:300]
            res = dict(error=f"worker {how}" + (f": {tail}" if tail else ""), peak_rss_mib=seen or None)
    res["wall_s"] = wall
    return res


def file_type(path: Path) -> str:
    import gguf

    try:
        f = gguf.GGUFReader(path).fields.get("general.file_type")
        return gguf.LlamaFileType(int(f.contents())).name.replace("MOSTLY_", "") if f else "?"
    except Exception:  # noqa: BLE001 -- a label only
        return "?"


def compare_logits(ours: list[float], theirs: list[float]) -> dict:
    """lmforge's first-step logits against llama.cpp's: the largest difference over the spread (std) of
    llama.cpp's logits, and whether the top-5 ids (in order) agree."""
    import numpy as np

    o, t = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    top_o, top_t = np.argsort(-o)[:5].tolist(), np.argsort(-t)[:5].tolist()
    return dict(max_abs_diff=float(np.abs(o - t).max()), spread=float(t.std()),
                max_diff_over_spread=float(np.abs(o - t).max() / max(t.std(), 1e-30)),
                top5_lmforge=top_o, top5_llamacpp=top_t, top5_equal=top_o == top_t)


def first_mismatch(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _num(x, fmt="{:,.1f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) else "-"


def _ratio(ours, theirs) -> str:
    if not isinstance(ours, (int, float)) or not isinstance(theirs, (int, float)) or not theirs:
        return "-"
    return f"{ours / theirs:.2f}x"


def table(rows: list[dict]) -> str:
    head = ("| file | type | MiB | decode lmforge | decode llama.cpp | ratio | prefill lmforge | prefill llama.cpp "
            "| ratio | RSS MiB lmforge | RSS MiB llama.cpp | ratio |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        o, t = r["lmforge"], r["llama.cpp"]
        cells = [r["file"], r["type"], f"{r['size_mib']:,.1f}"]
        for key in ("decode_tok_s", "prefill_tok_s", "peak_rss_mib"):
            a, b = o.get(key), t.get(key)
            if "error" in o and key != "peak_rss_mib":
                a = None
            if "error" in t and key != "peak_rss_mib":
                b = None
            cells += [_num(a), _num(b), _ratio(a, b)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    name, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "?":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")
           if f in flags]
    return f"{name} ({' '.join(isa) or 'no AVX2'})"


def mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 16.0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=DEFAULT_OUT, help=f"where make_ggufs.py wrote (default: {DEFAULT_OUT})")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES),
                    help="default: 135M 1B (none with a bare --shapes)")
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES, help="default: all four")
    ap.add_argument("--seven-b", action="store_true", help=f"also the 7B-shaped Q4_0 file ({SEVEN_B_NAME})")
    ap.add_argument("--seven-b-prefill", dest="seven_b_no_prefill", action="store_false",
                    help="also time the 512-token prefill on the 7B file (minutes on 2 cores; default: decode only)")
    ap.add_argument("--also", type=Path, nargs="+", default=[], metavar="FILE.gguf",
                    help="more GGUF files, e.g. one `lmforge quantize` wrote: does llama.cpp load and run it?")
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS, help="default: both")
    ap.add_argument("--threads", type=int, default=2, help="threads for each tool (default: 2)")
    ap.add_argument("--decode-tokens", type=int, default=128, help="timed decode steps (default: 128)")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="prefill prompt length (default: 512)")
    ap.add_argument("--repeats", type=int, default=1, help="timed prefill passes after the warm-up, best kept")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill measurement")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp with flash attention (default: "
                    "llama-cpp-python's default, off)")
    ap.add_argument("--llama-no-mmap", action="store_true", help="llama.cpp reads the file instead of mapping "
                    "it (default: mapped, llama-cpp-python's default; its RSS then includes the mapped pages it "
                    "touched, even for weights it copied into repacked buffers)")
    ap.add_argument("--mem-limit-gib", type=float, default=round(0.8 * mem_available_gib(), 1),
                    help="kill a child whose RSS passes this; 0 = no limit (default: 80%% of the memory "
                    "available now)")
    ap.add_argument("--json", type=Path, help="also write the rows (and every token list) here")
    ap.add_argument("--worker", nargs=2, metavar=("TOOL", "FILE"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.decode_tokens < 1 or a.prompt_tokens < 1 or a.threads < 1 or a.repeats < 1:
        ap.error("--decode-tokens, --prompt-tokens, --threads and --repeats must be positive")
    if a.worker:
        return worker(a)

    files = [gguf_path(a.dir, s, t) for s in a.shapes for t in a.types]
    if a.seven_b:
        files.append(a.dir / SEVEN_B_NAME)
    files += a.also
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        die(f"missing {', '.join(missing)} -- make them with bench/make_ggufs.py")
    if not files:
        die("no files chosen")

    from importlib.metadata import version

    torch_version = version("torch")  # not imported: the parent stays small (it forks every child)
    try:
        import llama_cpp

        lc = llama_cpp.__version__
    except ImportError:
        lc = None
        if "llama.cpp" in a.tools:
            die("llama_cpp is not importable; install the bench extra (see this script's docstring)")
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(f"{machine()}; {a.threads} threads each; torch {torch_version}; llama-cpp-python {lc}; lmforge "
          f"{rev.stdout.strip() or '?'}; decode {a.decode_tokens} after {DECODE_PROMPT}, prefill {a.prompt_tokens}; "
          f"child memory limit {a.mem_limit_gib} GiB\n", flush=True)

    rows = []
    for path in files:
        row = dict(file=path.name, path=str(path), type=file_type(path), size_mib=path.stat().st_size / 2**20,
                   also=path in a.also)
        for tool in TOOLS:
            row[tool] = measure(tool, path, a) if tool in a.tools else {"error": "not run"}
            res = row[tool]
            line = res.get("error") or ", ".join(f"{k} {_num(res.get(k))}" for k in
                                                 ("decode_tok_s", "prefill_tok_s", "peak_rss_mib", "load_s"))
            print(f"  {path.name} {tool}: {line}", flush=True)
        o, t = row["lmforge"].get("tokens"), row["llama.cpp"].get("tokens")
        if o and t:
            row["tokens_equal_first"] = first_mismatch(o, t)
        lo, lt = (row[tool].pop("first_logits", None) for tool in TOOLS)
        if lo and lt and len(lo) == len(lt):
            row["first_logits"] = compare_logits(lo, lt)
        rows.append(row)

    print()
    print(table(rows))
    for r in rows:
        o, t = r["lmforge"].get("tokens"), r["llama.cpp"].get("tokens")
        if r["type"] in ("F16", "ALL_F32") and o and t:
            n = min(COMPARE, len(o), len(t))
            same = r["tokens_equal_first"] >= n
            print(f"\ngreedy tokens on {r['file']} (first {n}): {'identical' if same else 'DIFFER'}"
                  + ("" if same else f" from token {r['tokens_equal_first']}"))
            print(f"  lmforge  : {o[:n]}\n  llama.cpp: {t[:n]}")
        elif "tokens_equal_first" in r:
            print(f"{r['file']}: greedy tokens equal for the first {r['tokens_equal_first']} of "
                  f"{min(len(o), len(t))}")
        if "first_logits" in r:
            c = r["first_logits"]
            print(f"{r['file']}: first-step logits differ by at most {c['max_abs_diff']:.3g} "
                  f"({c['max_diff_over_spread']:.2%} of their spread); top-5 ids "
                  + ("equal" if c["top5_equal"] else f"differ: {c['top5_lmforge']} vs {c['top5_llamacpp']}"))
    print("\nRSS at the end, anonymous + mapped file pages (MiB; file pages are clean, the kernel can drop them):")
    for r in rows:
        split = [f"{tool} {r[tool]['anon_rss_mib_end']:,.0f} + {r[tool]['file_rss_mib_end']:,.0f}" for tool in TOOLS
                 if "anon_rss_mib_end" in r[tool]]
        if split:
            print(f"  {r['file']}: " + "; ".join(split))
    for r in rows:
        if r["also"]:
            t = r["llama.cpp"]
            print(f"\n{r['file']} (--also): llama.cpp " + (f"FAILED: {t['error']}" if "error" in t else
                  f"loaded and ran it ({len(t['tokens'])} greedy tokens, {t['decode_tok_s']:.1f} tok/s)"))
    errors = [(r["file"], tool, r[tool]["error"]) for r in rows for tool in a.tools if "error" in r[tool]]
    for f, tool, e in errors:
        print(f"{f} {tool}: {e}")
    if a.json:
        a.json.write_text(json.dumps(dict(machine=machine(), threads=a.threads, decode_tokens=a.decode_tokens,
                                          decode_prompt=DECODE_PROMPT, prompt_tokens=a.prompt_tokens,
                                          llama_cpp_python=lc, torch=torch_version, lmforge=rev.stdout.strip(),
                                          rows=rows), indent=1))
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
