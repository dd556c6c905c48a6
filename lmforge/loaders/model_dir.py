"""The Hugging Face model directory on disk: write one, recognise one, read its config, stream its weights.

A model directory is what transformers, vLLM and llama.cpp's converter read: `config.json` (with
`architectures`), `model.safetensors` (or shards with an index), `tokenizer.json`, `tokenizer_config.json`,
`generation_config.json`, plus `lmforge.json` for what only we record (lineage, training recipe). What the
config keys and tensor names mean is `lmforge.loaders.hf`'s business; this module is about the files:
which exist, how they are read without holding two copies of the weights, and refusing anything that is
not plainly a directory of safetensors (pickles only on request, and then weights-only).

Separate from `lmforge.checkpoint`, which makes several files replace their namesakes at once and keeps the
trainer state: writing a model directory happens inside one of its transactions, but the transaction does
not need to know what a model is (nor the loaders).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError

from lmforge.checkpoint import recover, save_tensors
from lmforge.config import ModelConfig, shown
from lmforge.errors import UserError, one_line
from lmforge.io import atomic_write_json, read_json
from lmforge.loaders.hf import config_to_hf
from lmforge.loaders.hf_read import config_from_hf
from lmforge.loaders.hf_tensors import (
    hf_tensor_names,
    state_dict_from_hf,
    state_dict_to_hf,
    tensor_names,
    text_model_name,
    without_body,
)
from lmforge.loaders.packed import as_part, build_packed_model, check_position_tables, packable
from lmforge.model.gpt import GPT, unwrap
from lmforge.tokenizer import Tokenizer

__all__ = [
    "PICKLE_INDEX",
    "PICKLE_WEIGHTS",
    "WEIGHTS",
    "WEIGHTS_INDEX",
    "WeightFiles",
    "build_model",
    "check_tokenizer",
    "check_encoder_dir",
    "check_weights",
    "expected_weight_shapes",
    "is_encoder_dir",
    "is_model_dir",
    "load_config",
    "load_model",
    "read_json",
    "read_lmforge_meta",
    "write_model_files",
]

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def write_model_files(directory: Path, model: torch.nn.Module, *, tokenizer=None, lineage: dict | None = None,
                      generation: dict | None = None) -> None:
    """Write the HF-layout files of `model` into `directory` (use inside a `transaction`)."""
    model = unwrap(model)
    cfg = model.config
    eos_ids = list(tokenizer.eos_ids) if tokenizer is not None else None
    bos = tokenizer.bos_id if tokenizer is not None else None
    eos_main = tokenizer.eos_id if tokenizer is not None else None
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    atomic_write_json(directory / "config.json", config_to_hf(cfg, bos_token_id=bos, eos_token_id=eos_main, dtype=dtype))
    gen = {"bos_token_id": bos, "eos_token_id": eos_ids, "pad_token_id": getattr(tokenizer, "pad_id", None),
           **(generation or {})}
    atomic_write_json(directory / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
    sd = state_dict_to_hf(cfg, model.state_dict())
    save_tensors(directory / WEIGHTS, sd)
    atomic_write_json(directory / "lmforge.json", {"format_version": 1, "model_config": cfg.to_dict(),
                                                   "lineage": lineage or {}, "saved_at": time.time()})
    if tokenizer is not None:
        tokenizer.save(directory)


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def is_encoder_dir(path: str | os.PathLike) -> bool:
    """A model directory of an encoder (config.json model_type "bert", loaded by `lmforge.loaders.bert`):
    it embeds text and cannot generate, so every place that would build a `GPT` from it refuses it by
    name instead of failing on its config. An unreadable config answers False (the loader says why)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    try:
        cfg = read_json(p / "config.json")
    except UserError:
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") == "bert"


# sentence-transformers modules whose effect `lmforge.loaders.bert` reproduces (a Dense projection, or
# any other, would change the vectors: a model using one is refused rather than embedded differently)
_ST_MODULES = ("Transformer", "Pooling", "Normalize")


def check_encoder_dir(path: str | os.PathLike) -> str:
    """Validate an encoder directory from its files' headers (config, pooling, tokenizer, every tensor's
    name and shape; no weights read), as an import does before copying; returns its architecture."""
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.loaders.bert import encoder_config, tensor_map
    from lmforge.model.bert import Encoder

    p = Path(path)  # no recover(): `lmforge list` describes entries with this, and listing never writes
    if not p.is_dir():
        raise UserError(f"{p}: not a model directory")
    cfg = encoder_config(p)  # config.json and the pooling files, refusing what we cannot compute
    modules = read_json(p / "modules.json") if (p / "modules.json").is_file() else []
    for m in modules if isinstance(modules, list) else []:
        kind = str(m.get("type", "")).rpartition(".")[2] if isinstance(m, dict) else "?"
        if kind not in _ST_MODULES:
            raise UserError(f"{p}: sentence-transformers module {kind!r} is not supported "
                            f"(only {', '.join(_ST_MODULES)})")
    if not (p / WEIGHTS).is_file():
        raise UserError(f"{p}: an embedding model needs its weights in one {WEIGHTS}")
    shapes = WeightFiles(p).shapes()
    prefix = "bert." if any(k.startswith("bert.") for k in shapes) else ""
    with torch.device("meta"):
        want = Encoder(cfg).state_dict()
    for ours, theirs in tensor_map(cfg).items():
        have = shapes.get(prefix + theirs)
        if have is None:
            raise UserError(f"{p}: tensor {prefix + theirs!r} is missing from the weights")
        if tuple(have) != tuple(want[ours].shape):
            raise UserError(f"{p}: tensor {prefix + theirs!r} has shape {tuple(have)}, "
                            f"config.json implies {tuple(want[ours].shape)}")
    if not (p / "tokenizer.json").is_file():
        raise UserError(f"{p}: no tokenizer.json (a fast Hugging Face tokenizer file is required)")
    try:
        tok = HFTokenizer.from_file(str(p / "tokenizer.json"))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a malformed file
        raise UserError(f"{p / 'tokenizer.json'}: unreadable tokenizer ({one_line(e)})") from None
    if tok.get_vocab_size() > cfg.vocab_size:
        raise UserError(f"{p}: the tokenizer has {tok.get_vocab_size()} tokens but the model's embedding only "
                        f"{cfg.vocab_size} rows (vocab_size); is it another model's tokenizer?")
    archs = read_json(p / "config.json").get("architectures")
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else "BertModel"


def _require_model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise UserError(f"{p} is not a model directory (it is a file)")
    recover(p)
    if not (p / "config.json").is_file():
        raise UserError(f"{p} is not a model directory: it has no config.json")
    return p


def _read_config(p: Path) -> ModelConfig:
    """config.json of model directory `p`, parsed and type-checked (nothing about the other files)."""
    return config_from_hf(read_json(p / "config.json"), source=str(p / "config.json"))


def load_config(path: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a model directory, checked against what the directory holds before anyone
    builds from it: the safetensors headers (embedding, layers, position table: `check_weights`) and the
    tokenizer (`check_tokenizer`). Reads no tensor data; pickled weights are checked by `load_model`,
    once they are allowed."""
    p = _require_model_dir(path)
    cfg = _read_config(p)
    if _safetensors_files(p) is not None:
        check_weights(cfg, WeightFiles(p).shapes(), source=str(p))
    if (p / "tokenizer.json").is_file():
        check_tokenizer(cfg, Tokenizer.load(p), source=str(p))
    return cfg


def _shard_names(index_file: Path) -> list[str]:
    """The shard files an index names: plain file names in the same directory, nothing else.

    The index is input like any other: a weight_map value of "../../x" must not make us open a file
    outside the model directory.
    """
    index = read_json(index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise UserError(f"{index_file}: not a valid weight index (no weight_map object)")
    for n in weight_map.values():  # before the set and the sort: a list or a mix of types would raise there
        if not isinstance(n, str) or not n or n in (".", "..") or "/" in n or "\\" in n or "\x00" in n:
            raise UserError(f"{index_file}: shard name {shown(n)} is not a plain file name in the model directory")
    return sorted(set(weight_map.values()))


def _safetensors_files(d: Path) -> list[Path] | None:
    """The safetensors files of model directory `d` (one, or the shards its index names), else None."""
    if (d / WEIGHTS).is_file():
        return [d / WEIGHTS]
    if (d / WEIGHTS_INDEX).is_file():
        return [d / n for n in _shard_names(d / WEIGHTS_INDEX)]
    return None


class WeightFiles(Mapping):
    """The tensors of a model directory by checkpoint name, read one at a time from memory-mapped files.

    Why lazy: building our fused q|k|v and gate|up weights needs the source tensors only until they are
    concatenated. Reading each tensor when it is asked for (and letting it go right after) keeps the peak
    memory of a load at about one copy of the weights, instead of the file's copy plus ours.

    `dtype` casts each tensor as it is read, so a bf16 checkpoint loaded in fp32 never holds both.
    Pickled weights (`pytorch_model.bin`) are refused unless `allow_pickle`, and then go only through
    `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
    """

    def __init__(self, directory: Path, *, dtype: torch.dtype | None = None, allow_pickle: bool = False) -> None:
        from safetensors import safe_open

        self.directory, self.dtype = directory, dtype
        self._stored: dict[str, Any] = {}  # name in the file -> (open safetensors handle or the tensor (pickles), file)
        self._where: dict[str, Any] = {}  # our reading of the name -> (handle or tensor, file, name in the file)
        self._handles: list[Any] = []
        files = _safetensors_files(directory)
        if files is None:
            self._load_pickles(allow_pickle)
            return
        for f in files:
            if not f.is_file():
                raise UserError(f"{directory} is not a complete model directory: {f.name} is missing")
            try:
                handle = safe_open(str(f), framework="pt")
                names = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(f"{f}: not a readable safetensors file ({one_line(e)})") from None
            self._handles.append(handle)
            for n in names:
                if n in self._stored:
                    raise UserError(f"{f}: tensor {n!r} also appears in another shard")
                self._stored[n] = (handle, f)
        self._keep_text_model()

    def _keep_text_model(self) -> None:
        """Name the tensors as a text-only model of the family would (a multimodal checkpoint's language
        model: `text_model_name`), leaving out the vision tower and projector."""
        for stored, (source, f) in self._stored.items():
            name = text_model_name(stored)
            if name is not None:
                self._where[name] = (source, f, stored)

    def _load_pickles(self, allow_pickle: bool) -> None:
        d = self.directory
        if (d / PICKLE_WEIGHTS).is_file():
            files = [d / PICKLE_WEIGHTS]
        elif (d / PICKLE_INDEX).is_file():
            files = [d / n for n in _shard_names(d / PICKLE_INDEX)]
        else:
            raise UserError(f"{d} is not a model directory: it has no {WEIGHTS} (or {WEIGHTS_INDEX})")
        if not allow_pickle:
            raise UserError(f"{d} holds only pickled weights ({files[0].name}); loading a pickle can run code. "
                            f"Pass --allow-pickle to load it with torch.load(weights_only=True), "
                            f"or use a safetensors copy of the model")
        for f in files:
            try:
                obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError...: never fall back
                raise UserError(f"{f}: refused or unreadable as a weights-only pickle ({one_line(e)})") from None
            if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
                raise UserError(f"{f}: expected a dict of named tensors")
            for n, t in obj.items():
                self._stored[n] = (t, f)
        self._keep_text_model()

    def __getitem__(self, name: str) -> torch.Tensor:
        source, f, stored = self._where[name]
        if torch.is_tensor(source):
            t = source
        else:
            try:
                t = source.get_tensor(stored)
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(f"{f}: tensor {name!r} is unreadable ({one_line(e)})") from None
        return t if self.dtype is None or not t.is_floating_point() else t.to(self.dtype)

    def stored_dtypes(self) -> set[torch.dtype]:
        """The dtypes of the floating-point tensors as stored, from the file headers alone (nothing is read)."""
        names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
        out = set()
        for name, (source, f, stored) in self._where.items():
            if torch.is_tensor(source):
                if source.is_floating_point():
                    out.add(source.dtype)
                continue
            try:
                kind = source.get_slice(stored).get_dtype()
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(f"{f}: tensor {name!r} is unreadable ({one_line(e)})") from None
            if kind in names:
                out.add(names[kind])
        return out

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the file headers alone (nothing is read)."""
        out = {}
        for name, (source, f, stored) in self._where.items():
            try:
                out[name] = tuple(source.shape) if torch.is_tensor(source) else tuple(source.get_slice(stored).get_shape())
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(f"{f}: tensor {name!r} is unreadable ({one_line(e)})") from None
        return out

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor to find out
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def check_weights(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], *, source: str) -> None:
    """Refuse a config the weight file does not back, from the tensors' names and shapes alone (a file
    header), before a model is built from it: the embedding is vocab_size x d_model, the blocks present
    are exactly 0..n_layers-1, a learned position table has context_length rows, an untied output head
    matches the embedding. A config.json claiming 10,000 layers over a file of two is refused here in
    milliseconds; building its model first, even on the meta device, took a minute and most of a GB.

    What these do not cover (each projection's shape, unexpected tensors) `build_model` checks, once the
    model it builds is known to be the file's size."""
    names = tensor_names(cfg)
    bare = without_body(cfg, shapes)

    def name_of(ours: str) -> str:
        theirs = hf_tensor_names(cfg, ours)[0]
        return theirs.removeprefix(names.body) if bare else theirs

    def expect(ours: str, want: tuple[int, ...], what: str) -> None:
        theirs = name_of(ours)
        if theirs not in shapes:
            raise UserError(f"{source}: tensor {theirs!r} ({what}) is missing from the weights")
        if tuple(shapes[theirs]) != want:
            raise UserError(f"{source}: tensor {theirs!r} ({what}) has shape {tuple(shapes[theirs])}, "
                            f"but config.json implies {want}")

    expect("tok_emb.weight", (cfg.vocab_size, cfg.d_model), "the token embedding: vocab_size x hidden size")
    if not cfg.tie_embeddings:
        expect("lm_head.weight", (cfg.vocab_size, cfg.d_model), "the output head: vocab_size x hidden size")
    if cfg.n_experts:  # a row of the router per expert: a config naming another count is refused here
        expect("blocks.0.mlp.router.weight", (cfg.n_experts, cfg.d_model), "layer 0's router: experts x hidden size")
    if cfg.positions == "learned":
        expect("pos_emb.weight", (cfg.context_length, cfg.d_model), "the position table: context length x hidden size")
    prefix = "" if bare else re.escape(names.body)
    layer = re.compile(prefix + re.escape(names.layer).replace(re.escape("{}"), "([0-9]{1,9})"))
    found = {int(m.group(1)) for m in map(layer.match, shapes) if m}
    if found != set(range(cfg.n_layers)):
        held = f"{len(found)} (numbered {min(found)}..{max(found)})" if found else "none"
        raise UserError(f"{source}: config.json says {cfg.n_layers} layers, but the blocks in the weights are {held}")


def check_tokenizer(cfg: ModelConfig, tokenizer: Tokenizer, *, source: str) -> None:
    """Refuse a tokenizer with more ids than the model has embedding rows: its ids past the embedding
    would fail the first prompt that uses them (a tokenizer from another model). Fewer ids is normal
    (Qwen2 pads its embedding from 151,665 tokens to 151,936 rows) and accepted."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only "
                        f"{cfg.vocab_size} rows (vocab_size); is it another model's tokenizer?")


def expected_weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape for `cfg`, computed on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = GPT(cfg)
    return {k: tuple(v.shape) for k, v in state_dict_to_hf(cfg, model.state_dict()).items()}


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | str | None = None, allow_pickle: bool = False) -> GPT:
    """Build the model described by `path/config.json` and load its weights (strictly: no silent zeros).

    The config is checked against the weights' shapes first (`check_weights`). The weights are read
    tensor by tensor from memory-mapped files and *assigned* to a model built on the meta device, so
    loading holds about one copy of the weights (plus one layer's worth in flight).
    `dtype=None` loads floating-point weights as float32, whatever the file stores. `dtype="auto"` keeps
    the stored precision: 16-bit matrices stay 16-bit (on the CPU as `GGMLLinear`s over the file's bytes,
    computing in float32; on a GPU as an ordinary model in that dtype), float32 files load as float32.
    """
    p = _require_model_dir(path)
    cfg = _read_config(p)
    if dtype == "auto":
        weights = WeightFiles(p, dtype=None, allow_pickle=allow_pickle)
        check_weights(cfg, weights.shapes(), source=str(p))
        low = weights.stored_dtypes() & {torch.bfloat16, torch.float16}
        if not low:
            dtype = torch.float32
        elif torch.device(device).type != "cpu":
            dtype = torch.bfloat16 if torch.bfloat16 in low else torch.float16
        else:
            return _build_stored(cfg, state_dict_from_hf(cfg, weights, source=str(p)), source=str(p), device=device)
    weights = WeightFiles(p, dtype=dtype or torch.float32, allow_pickle=allow_pickle)
    check_weights(cfg, weights.shapes(), source=str(p))
    return build_model(cfg, state_dict_from_hf(cfg, weights, source=str(p)), source=str(p), device=device)


def _build_stored(cfg: ModelConfig, sd: dict[str, torch.Tensor], *, source: str, device) -> GPT:
    """16-bit matrices kept as they are stored (sharing the tensors read), everything else in float32."""
    with torch.device("meta"):
        kinds = packable(GPT(cfg))
    tensors = {}
    for name, t in sd.items():
        if name in kinds and t.dtype in (torch.bfloat16, torch.float16):
            tensors[name] = [as_part(t)]
        else:
            tensors[name] = t.float() if t.is_floating_point() else t
    return build_packed_model(cfg, tensors, source=source, device=device)


def build_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], *, source: str, device: str | torch.device = "cpu") -> GPT:
    """A GPT for `cfg` whose parameters *are* the tensors of `sd` (our names): no second copy is made.

    Every parameter must be present with the shape the config implies; a mismatch names the tensor.
    """
    with torch.device("meta"):
        model = GPT(cfg)
    want = model.state_dict()
    missing, unexpected = set(want) - set(sd), set(sd) - set(want)
    if missing or unexpected:
        raise UserError(f"{source}: weights do not match the config (missing: {sorted(missing)[:5]}, "
                        f"unexpected: {sorted(unexpected)[:5]})")
    for name, t in sd.items():
        if tuple(t.shape) != tuple(want[name].shape):
            raise UserError(f"{source}: tensor {name} has shape {tuple(t.shape)}, the config implies {tuple(want[name].shape)}")
    check_position_tables(cfg, source)
    model.load_state_dict(sd, strict=True, assign=True)
    for name, table in model.position_tables().items():  # derived from the config, never stored
        setattr(model, name, table)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.to(device).eval()


def read_lmforge_meta(path: str | os.PathLike) -> dict[str, Any]:
    f = Path(path) / "lmforge.json"
    meta = read_json(f) if f.is_file() else {}
    return meta if isinstance(meta, dict) else {}
