"""How much memory a model will take once loaded, worked out from its file headers before anything is read.

Why: the server decides whether a model fits before loading it (and which idle models to unload first),
and `lmforge bench` states how many bytes a decoded token has to stream. Adding up *file* sizes is wrong
both ways: a 4-bit GGUF used to be dequantized to fp32 (8x its file), and a bf16 checkpoint asked for in
fp32 doubles. So the estimate is made per tensor, from what the loader will really hold:

- GGUF: every tensor at its stored size in its GGML type (`quant.ggml.packed_nbytes`), which is how
  `--dtype auto` keeps them; an explicit dtype dequantizes every weight to it (what `--dtype f32|bf16|f16`
  asks for). `rope_freqs.weight` is left out: the loader turns it into config, not a weight.
- safetensors: each tensor's dtype and shape from the header, at the precision the loader keeps for it
  (`weights_bytes` states the rules); an explicit dtype converts the floating-point tensors.
- pickled checkpoints (`pytorch_model.bin`) have no header to read without unpickling, so their size is the
  config's parameter count at the requested dtype, fp32 for auto (a pickle is loaded as fp32).
- a LoRA adapter directory: its base model's weights (the merged adapter adds nothing that stays).

The total a loaded model needs is `Footprint`: weights + the KV cache the engine preallocates
(`model.kv_cache.KVCache`: two buffers of n_layers x batch x n_kv_heads x tokens x head_dim) + `runtime`:
the position tables computed from the config, the activations of one prefill chunk, and `RUNTIME_BYTES`, a
constant for everything else (allocator slack, scratch tiles, thread pools), measured with
`bench/load_memory.py`-style runs and stated below.

Free memory is asked of the device the model will run on: `torch.cuda.mem_get_info` (plus what PyTorch's
caching allocator holds but does not use) for a CUDA device, `lmforge.device.available_memory()` for the CPU
(and for Apple's MPS, whose memory is the machine's).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge import device as _device
from lmforge.config import ModelConfig
from lmforge.errors import UserError, one_line

__all__ = ["RUNTIME_BYTES", "Footprint", "activation_bytes", "compute_dtype", "estimate", "free_memory", "gib",
           "kv_cache_bytes", "model_config", "runtime_bytes", "weights_bytes"]

# Memory a loaded model takes beyond its weights, KV cache, position tables and one prefill chunk's
# activations: allocator slack, the fast path's scratch, GGML tiles decoded in flight, libraries' first-use
# buffers. Measured (Linux x86-64, PyTorch 2.13, glibc; RSS sampled every 2 ms, dtype="auto", 2 threads):
# - with the libraries already warm (a server's second model), a load + a 512-token prefill + 32 decode
#   steps added 0.2-17 MiB past weights + KV cache for the `tiny` and `small` presets (fp32/bf16
#   safetensors, GGUF f16/q8_0), and a 512-token prefill on a 135M-parameter GGUF (q8_0, and the same
#   dequantized to fp32) 54 MiB, 24 MiB of it KV cache;
# - the first model a process loads adds ~85 MiB more (tokenizers, kernel libraries, thread pools): a cold
#   `lmforge bench` of the 135M q8_0 / f16 GGUFs peaked 146 / 170 MiB past weights + KV cache.
# A load's transient peak also holds the pages of the memory-mapped weight file while tensors are copied
# out of it (~0.6x an fp32 135M model's weights); they are file-backed, which the kernel can drop, so they
# are not counted. 128 MiB covers the rest with room.
RUNTIME_BYTES = 128 * 2**20

# Bytes per element of the dtypes a safetensors header may name (its own spelling).
_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
                         "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_SAFETENSORS_FLOAT = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"}
_MAX_SAFETENSORS_HEADER = 100 << 20  # the format's own limit is 100 MB


# ---------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------
Dtype = torch.dtype | str | None  # a torch dtype, or None / "auto": the stored precision


def _explicit(dtype: Dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, 'auto' or None, got {dtype!r}")
    return dtype


def weights_bytes(path: str | os.PathLike, dtype: Dtype = None, *, device: str | torch.device = "cpu") -> int:
    """Bytes the weights of the model at `path` (a .gguf file, a model directory, a store entry, a LoRA
    adapter directory) will occupy once loaded on `device` at `dtype` (None or "auto": the stored
    precision, as `loaders.auto.load(dtype="auto")` keeps it; fp32 for a pickle checkpoint). From the
    headers only: no tensor is read. A one-line UserError for anything the loader would refuse to read
    (not a model, an unsupported GGML type, a damaged header).

    The rules are the loader's: a GGUF keeps every tensor in its GGML type; safetensors with no 16-bit
    tensor load as fp32; 16-bit safetensors keep their matrices 16-bit and widen vectors (norms, biases) to
    fp32 on the CPU, and load wholly in their 16-bit type on a GPU. An explicit dtype converts every
    floating-point tensor (GGUF blocks are dequantized to it)."""
    p = Path(path)
    want = _explicit(dtype)
    gguf = _gguf_file(p)
    if gguf is not None:
        return _gguf_weights_bytes(gguf, want)
    if _is_adapter_dir(p):
        return weights_bytes(_adapter_base_path(p), dtype, device=device)
    files = _safetensors_files(p)
    if files is not None:
        tensors = [t for f in files for t in _safetensors_header(f)]
        return sum(math.prod(shape) * _loaded_itemsize(kind, len(shape), tensors, want, device)
                   for kind, shape in tensors)
    if (p / "pytorch_model.bin").is_file() or (p / "pytorch_model.bin.index.json").is_file():
        return model_config(p).num_params() * (want or torch.float32).itemsize
    raise UserError(f"{p}: no weights found (not a .gguf file, nor a model directory with safetensors or "
                    f"pytorch_model.bin)")


def _loaded_itemsize(kind: str, ndim: int, tensors: list[tuple[str, list[int]]], dtype: torch.dtype | None,
                     device: str | torch.device) -> int:
    """Bytes per element, once loaded, of a safetensors tensor stored as `kind` (see `weights_bytes`)."""
    if kind not in _SAFETENSORS_FLOAT:
        return _SAFETENSORS_ITEMSIZE[kind]
    if dtype is not None:
        return dtype.itemsize
    low = {k for k, _ in tensors} & {"BF16", "F16"}
    if not low:
        return 4
    if torch.device(device).type != "cpu":
        return 2
    return _SAFETENSORS_ITEMSIZE[kind] if ndim >= 2 and kind in low else 4


def _gguf_file(p: Path) -> Path | None:
    from lmforge.loaders.auto import gguf_file

    return gguf_file(p)


def _is_adapter_dir(p: Path) -> bool:
    from lmforge.loaders.peft import is_adapter_dir

    return is_adapter_dir(p)


def _adapter_base_path(p: Path) -> Path:
    from lmforge.loaders.peft import adapter_base
    from lmforge.paths import resolve

    base = adapter_base(p)
    try:
        return resolve(base)
    except UserError as e:
        raise UserError(f"{p} is a LoRA adapter for base model {base!r}, which cannot be found ({e})") from None


def _gguf_weights_bytes(path: Path, dtype: torch.dtype | None) -> int:
    from lmforge.loaders.gguf.names import ROPE_FREQS
    from lmforge.loaders.gguf.reader import parse_file
    from lmforge.quant.ggml import packed_nbytes, qtype_name

    total = 0
    for t in parse_file(path).tensors:
        if t.name == ROPE_FREQS:
            continue
        try:
            if dtype is not None:
                qtype_name(t.ggml_type)  # an unsupported type is refused here too, as the loader would
                total += t.n_elements * dtype.itemsize
            else:
                total += packed_nbytes(t.ggml_type, t.shape)
        except UserError as e:
            raise UserError(f"{path}: tensor {t.name!r}: {e}") from None
    return total


def _safetensors_files(p: Path) -> list[Path] | None:
    """The safetensors files of a model directory: model.safetensors, or the shards its index names."""
    if not p.is_dir():
        return None
    if (p / "model.safetensors").is_file():
        return [p / "model.safetensors"]
    index = p / "model.safetensors.index.json"
    if not index.is_file():
        return None
    from lmforge.io import read_json

    d = read_json(index)
    weight_map = d.get("weight_map") if isinstance(d, dict) else None
    names = sorted({v for v in weight_map.values() if isinstance(v, str)}) if isinstance(weight_map, dict) else None
    if not names or any(n != Path(n).name or n in (".", "..") for n in names):
        raise UserError(f"{index}: not a valid weight index (its weight_map must name shard files in the directory)")
    missing = [n for n in names if not (p / n).is_file()]
    if missing:
        raise UserError(f"{p} is not a complete model directory: {missing[0]} is missing")
    return [p / n for n in names]


def _safetensors_header(f: Path) -> list[tuple[str, list[int]]]:
    """(dtype, shape) of every tensor of one safetensors file, from its header: an 8-byte little-endian
    length, then that many bytes of JSON {name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}."""
    try:
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_SAFETENSORS_HEADER, os.fstat(fh.fileno()).st_size - 8):
                raise ValueError(f"its header claims {n} bytes, more than the file holds")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        out = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            kind, shape = info["dtype"], info["shape"]
            if kind not in _SAFETENSORS_ITEMSIZE or not isinstance(shape, list) or \
                    not all(isinstance(s, int) and s >= 0 for s in shape):
                raise ValueError(f"tensor {name!r} has dtype {kind!r} and shape {shape!r}")
            out.append((kind, shape))
        return out
    except OSError as e:
        raise UserError(f"{f}: cannot read the file: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{f}: not a readable safetensors file ({one_line(e)})") from None


# ---------------------------------------------------------------------------------------------------
# Config, KV cache, runtime
# ---------------------------------------------------------------------------------------------------
def model_config(path: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of the model at `path`, from config.json or the GGUF header (no tensor read)."""
    p = Path(path)
    gguf = _gguf_file(p)
    if gguf is not None:
        from lmforge.loaders.gguf import describe_gguf

        return describe_gguf(gguf, check_tokenizer=False)["config"]
    if _is_adapter_dir(p):
        return model_config(_adapter_base_path(p))
    if not (p / "config.json").is_file():
        raise UserError(f"{p}: not a model (no config.json, and not a .gguf file)")
    from lmforge.io import read_json
    from lmforge.loaders.hf_read import config_from_hf

    return config_from_hf(read_json(p / "config.json"), source=str(p / "config.json"))


def kv_cache_bytes(cfg: ModelConfig, batch: int, tokens: int, dtype: torch.dtype = torch.float32,
                   max_write: int | None = None) -> int:
    """Bytes of the KV cache the engine preallocates for `batch` sequences of `tokens` positions: a key and
    a value buffer of (layers, batch, n_kv_heads, tokens, head_dim) each (see `model.kv_cache.KVCache`;
    the whole buffer is allocated up front, whatever the requests use). With `max_write` (the most slots a
    forward call writes per row), sliding-window layers hold a ring of window + max_write - 1 slots when
    that is fewer."""
    slots = cfg.n_layers * tokens
    if max_write and cfg.sliding_window is not None and cfg.sliding_window + max_write - 1 < tokens:
        sliding = sum(cfg.slides(i) for i in range(cfg.n_layers))
        slots -= sliding * (tokens - (cfg.sliding_window + max_write - 1))
    return 2 * batch * cfg.n_kv_heads * slots * cfg.head_dim * dtype.itemsize


def activation_bytes(cfg: ModelConfig, chunk: int, rows: int = 1) -> int:
    """A bound on the fp32 activations live during one forward step of `chunk` tokens in all (a prefill
    chunk) over `rows` sequences: per token the residual stream and a norm's output, q|k|v, attention's
    output, the MLP's gate|up and their product; per row the last position's logits, with as much again
    for sampling. Attention scores are not counted: PyTorch's SDPA works a block of keys at a time, with or
    without a mask (measured on the CPU: 19 MiB for 32 heads x 512 queries x 4096 keys, whose full score
    matrix would be 256 MiB), and with `enable_gqa` the shared K/V heads are not copied."""
    per_token = 3 * cfg.d_model + (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + 3 * cfg.d_ff
    return 4 * (chunk * per_token + 2 * rows * cfg.vocab_size)


def runtime_bytes(cfg: ModelConfig, *, batch: int = 1, chunk: int = 512) -> int:
    """Memory beyond weights and KV cache: the position tables the model computes from its config (fp32:
    cos and sin of context x head_dim for RoPE, context x d_model for a sinusoidal table), the activations
    of a prefill chunk of up to `chunk` tokens over `batch` rows (`activation_bytes`) and the measured
    constant `RUNTIME_BYTES`."""
    tables = {"rope": 2 * cfg.context_length * cfg.head_dim, "sinusoidal": cfg.context_length * cfg.d_model}
    return (4 * tables.get(cfg.positions, 0) + activation_bytes(cfg, min(chunk, cfg.context_length), batch)
            + RUNTIME_BYTES)


@dataclass(frozen=True)
class Footprint:
    """What a model will take on its device once loaded, in bytes, part by part."""

    weights: int
    kv_cache: int
    runtime: int
    batch: int  # KV cache rows counted
    tokens: int  # positions per row counted

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.runtime

    def describe(self) -> str:
        """'1.2 GiB (weights 0.9 GiB + KV cache for 8 x 4096 tokens 0.2 GiB + runtime 0.1 GiB)'."""
        return (f"{gib(self.total)} (weights {gib(self.weights)} + KV cache for {self.batch} x {self.tokens} tokens "
                f"{gib(self.kv_cache)} + runtime {gib(self.runtime)})")


def gib(n: int | float) -> str:
    """Bytes as GiB with two decimals, so that small models do not all read '0.0 GiB'."""
    return f"{n / 2**30:.2f} GiB"


def compute_dtype(path: str | os.PathLike, dtype: Dtype, device: str | torch.device) -> torch.dtype:
    """The dtype the engine computes in, which its KV cache follows: fp32 on the CPU (GGML and 16-bit
    matrices are widened as they are used; an explicit 16-bit model is widened by the engine's fast path),
    else the requested dtype, else for auto the 16-bit type of a safetensors model that stores one (it loads
    wholly in that type on a GPU), else fp32 (GGUF, fp32 files, pickles). Guessing fp32 when unsure
    over-counts the cache, never under-counts it."""
    if torch.device(device).type == "cpu":
        return torch.float32
    want = _explicit(dtype)
    if want is not None:
        return want
    p = Path(path)
    if _gguf_file(p) is None and _is_adapter_dir(p):
        return compute_dtype(_adapter_base_path(p), dtype, device)
    files = _safetensors_files(p) if _gguf_file(p) is None else None
    kinds = {k for f in files or () for k, _ in _safetensors_header(f)}
    return torch.bfloat16 if "BF16" in kinds else torch.float16 if "F16" in kinds else torch.float32


def estimate(path: str | os.PathLike, *, dtype: Dtype = None, device: str | torch.device = "cpu",
             batch: int = 1, tokens: int | None = None, chunk: int = 512, max_write: int | None = None) -> Footprint:
    """The `Footprint` of loading the model at `path` at `dtype` on `device` and serving `batch` sequences of
    up to `tokens` positions each (None: the model's context; more is capped at it), prefilled `chunk`
    tokens at a time, writing at most `max_write` slots per row in one pass (sliding-window rings)."""
    cfg = model_config(path)
    tokens = min(cfg.context_length, tokens or cfg.context_length)
    kv_dtype = compute_dtype(path, dtype, device)
    return Footprint(weights_bytes(path, dtype, device=device), kv_cache_bytes(cfg, batch, tokens, kv_dtype, max_write),
                     runtime_bytes(cfg, batch=batch, chunk=chunk), batch, tokens)


# ---------------------------------------------------------------------------------------------------
# Free memory
# ---------------------------------------------------------------------------------------------------
def free_memory(device: str | torch.device = "cpu") -> int | None:
    """Bytes this process could still allocate on `device`, or None where that is unknown.

    CUDA: the driver's free memory plus what PyTorch's caching allocator has reserved but holds no tensor in
    (this process can reuse that without the driver). The CPU and Apple's MPS (unified memory): the memory
    the OS could give the process now (`lmforge.device.available_memory`)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(dev)
            return int(free) + int(torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
        except (RuntimeError, AssertionError):  # no driver, or the device went away
            return None
    return _device.available_memory()
