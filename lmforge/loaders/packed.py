"""Building a model whose big matrices stay in their stored bytes (GGML blocks, or 16-bit floats).

Loading with `dtype="auto"` (the default of every command that runs a model) keeps each weight in the
precision its file stores: the projection and embedding matrices become `quant.GGMLLinear` /
`quant.GGMLEmbedding` over the file's bytes (usually views of the memory-mapped file: nothing is copied),
while norms, biases and position tables -- a rounding error of the size -- are float32. Activations stay
float32, so the model computes as it was trained and only the weights' storage differs.

The model is built on the meta device and every tensor is assigned, as `model_dir.build_model` does, so no
float32 copy of any matrix is ever allocated.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.device import available_memory
from lmforge.model.gpt import GPT
from lmforge.quant.linear import GGMLEmbedding, GGMLLinear, Part

# torch dtype -> the GGML type name of the same bytes
FLOAT_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def check_position_tables(cfg: ModelConfig, source: str) -> None:
    """RoPE and sinusoidal tables are computed from the config, not stored, so no weight file bounds their
    size: context_length x (2 x head_dim | d_model) float32s. Refuse, before computing them, a context
    whose tables (and as much again while they are built) would not fit in the memory available (a
    config.json with max_position_embeddings 10**9 made the loader ask the allocator for 32 GB)."""
    width = {"rope": 2 * cfg.head_dim, "sinusoidal": cfg.d_model}.get(cfg.positions, 0)
    need = 2 * 4 * cfg.context_length * width
    free = available_memory()
    if free is not None and need > free:
        raise UserError(f"{source}: the position tables for a context of {cfg.context_length} tokens need "
                        f"{need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB of memory is available (is the "
                        f"context length in the config right?)")



def as_part(t: torch.Tensor) -> Part:
    """A 2-D float tensor (rows, cols) as a one-part weight of its own dtype, sharing its memory."""
    if t.dtype not in FLOAT_TYPES or t.dim() != 2:
        raise ValueError(f"cannot hold a {t.dtype} tensor of shape {tuple(t.shape)} as stored bytes")
    t = t.contiguous()
    return Part(t.view(torch.uint8).reshape(t.shape[0], -1), FLOAT_TYPES[t.dtype], t.shape[0])


def packable(model: nn.Module) -> dict[str, type]:
    """Our weight names that can stay packed ("blocks.0.attn.qkv.weight" -> nn.Linear, "tok_emb.weight" ->
    nn.Embedding): the matrices of linear layers and of the token embedding."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Embedding) and name == "tok_emb"):
            out[f"{name}.weight"] = type(m)
    return out


def build_packed_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor | list[Part]], *, source: str,
                       device: str | torch.device = "cpu") -> GPT:
    """A GPT for `cfg` from our-named `tensors`: a list of `Part`s for a weight kept packed (rows stacked in
    order), a float tensor for everything else (assigned as it is: no copy).

    With tied embeddings, `lm_head.weight` may be left out (or be the embedding's parts): the head then
    reads the embedding's bytes, shared, not copied. Every tensor the config implies must be there, with
    its shape; a mismatch names the tensor."""
    with torch.device("meta"):
        model = GPT(cfg)
    want = model.state_dict()
    kinds = packable(model)
    tensors = dict(tensors)
    if cfg.tie_embeddings and "lm_head.weight" not in tensors and "tok_emb.weight" in tensors:
        tensors["lm_head.weight"] = tensors["tok_emb.weight"]
    missing, unexpected = set(want) - set(tensors), set(tensors) - set(want)
    if missing or unexpected:
        raise UserError(f"{source}: weights do not match the config (missing: {sorted(missing)[:5]}, "
                        f"unexpected: {sorted(unexpected)[:5]})")
    check_position_tables(cfg, source)
    floats = {}
    for name, value in tensors.items():
        shape = tuple(want[name].shape)
        if isinstance(value, torch.Tensor):
            if tuple(value.shape) != shape:
                raise UserError(f"{source}: tensor {name} has shape {tuple(value.shape)}, the config implies {shape}")
            floats[name] = value
            continue
        if name not in kinds:
            raise UserError(f"{source}: tensor {name} cannot be held packed")
        rows = sum(p.rows for p in value)
        if rows != shape[0]:
            raise UserError(f"{source}: tensor {name} has {rows} rows, the config implies {shape[0]}")
        module_name = name.removesuffix(".weight")
        parent_name, _, attr = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if kinds[name] is nn.Embedding:
            if len(value) != 1:
                raise UserError(f"{source}: the token embedding must be one tensor")
            new = GGMLEmbedding(value[0].packed, value[0].qtype, shape[0], shape[1])
        else:
            bias = tensors.get(f"{module_name}.bias")
            if bias is not None and not isinstance(bias, torch.Tensor):
                raise UserError(f"{source}: tensor {module_name}.bias must be a float vector")
            new = GGMLLinear([tuple(p) for p in value], None, shape[1], shape[0], bias=bias)
        setattr(parent, attr, new)
    # what is left on the meta device: norms, biases of unpacked layers, position tables
    biases_taken = {f"{n.removesuffix('.weight')}.bias" for n, v in tensors.items() if not isinstance(v, torch.Tensor)}
    floats = {k: v for k, v in floats.items() if k not in biases_taken}
    result = model.load_state_dict(floats, strict=False, assign=True)
    if result.unexpected_keys:
        raise UserError(f"{source}: unexpected tensors {result.unexpected_keys[:5]}")
    for name, table in model.position_tables().items():  # derived from the config, never stored
        setattr(model, name, table)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise UserError(f"{source}: tensor {still_meta[0]} is missing")
    return model.to(device).eval()
