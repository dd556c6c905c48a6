"""Reading the fused mixture-of-experts LoRA layout that peft writes on transformers 5.

In transformers 5, Mixtral's and Qwen3-MoE's experts are no longer one nn.Linear each: every layer holds two
3-D parameters, `mlp.experts.gate_up_proj` (E, 2 * d_ff, d_model: each expert's gate rows, then its up rows,
our `mlp.experts.{}.fc`) and `mlp.experts.down_proj` (E, d_model, d_ff: our `mlp.experts.{}.proj`), and the
router `mlp.gate` is a module with a bare weight. peft adapts such parameters (`target_parameters`) with one
LoRA per parameter whose rank dimension holds every expert's rank:

    lora_A (E * r, in)   expert e's A = lora_A.reshape(E, r, in)[e]            (experts major)
    lora_B (out, r * E)  expert e's B = lora_B.reshape(out, r, E)[:, :, e]     (experts minor)

and saves them as `...layers.N.mlp.experts.lora_A.weight` (where both are adapted, one of the two a level deeper:
`...mlp.experts.base_layer.lora_A.weight`), the router as `...mlp.gate.lora_A.weight`. Which of the two expert
parameters a pair is follows from its shapes alone (gate_up: in d_model, out 2 * d_ff; down: in d_ff, out
d_model; both at once is impossible). peft's fused gate_up has rank 2r (`rank_pattern` `.*\\.gate_up_proj`):
the gate's r rows of A, then the up's, which `rank_blocks` records so that a still block-diagonal B saves back
per expert and per projection.

Only read: `lmforge.loaders.peft` saves experts one module per expert (the names of the model files), which peft
on transformers 5 converts to this layout when it loads them.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from lmforge.errors import UserError
from lmforge.loaders.hf_tensors import MIXTRAL_FAMILY, QWEN2_MOE_FAMILY, QWEN3_MOE_FAMILY, family
from lmforge.model.lora import EXPERT_FC, EXPERT_PROJ, ROUTER, lora_parts

__all__ = ["fused_expert_adapters", "is_fused_expert_key"]

# (layer, "gate" | "experts", ".base_layer" per level of nesting, A | B); an adapter name before ".weight" allowed.
_FUSED = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.mlp\.(gate|experts)((?:\.base_layer)*)"
                    r"\.lora_([AB])(?:\.[\w-]+)?\.weight$")

# One adapter (parts, A, B, scaling, rank_blocks) per module of ours, as LoRALinear takes them.
Adapter = tuple[list[tuple[str, int, int]], torch.Tensor, torch.Tensor, float, list[tuple[int, int]] | None]


def is_fused_expert_key(cfg, key: str) -> bool:
    """A tensor name of the fused layout, for a model of a family that transformers 5 fuses."""
    return family(cfg) in (MIXTRAL_FAMILY, QWEN3_MOE_FAMILY, QWEN2_MOE_FAMILY) and _FUSED.match(key) is not None


def _expert_module(cfg, A: torch.Tensor, B: torch.Tensor) -> str | None:
    """Which of our expert projections a fused pair adapts, by its shapes (None: neither)."""
    if A.shape[1] == cfg.d_model and B.shape[0] == 2 * cfg.d_ff:
        return EXPERT_FC
    if A.shape[1] == cfg.d_ff and B.shape[0] == cfg.d_model:
        return EXPERT_PROJ
    return None


def fused_expert_adapters(cfg, tensors: dict[str, torch.Tensor], rank_and_scaling: Callable[[str], tuple[int, float]],
                          source: str) -> dict[str, Adapter]:
    """Our module name ("blocks.0.mlp.experts.3.fc") -> its adapter, from the fused tensors of an adapter file.

    `rank_and_scaling(key)` is the adapter config's rank and scale for a parameter, by PEFT's key
    ("model.layers.0.mlp.experts.gate_up_proj"), so that rank_pattern / alpha_pattern / rslora apply as in peft.
    """
    groups: dict[tuple[int, str, int], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        layer, module, nesting, ab = _FUSED.match(key).groups()
        if int(layer) >= cfg.n_layers:
            raise UserError(f"{source}: tensor {key!r} is for layer {layer}, but this model has {cfg.n_layers} layers")
        groups.setdefault((int(layer), module, nesting.count(".base_layer")), {})[ab] = t.float()
    out: dict[str, Adapter] = {}
    E = cfg.n_experts
    for (layer, module, depth), pair in sorted(groups.items()):
        where = f"model.layers.{layer}.mlp.{module}" + ".base_layer" * depth
        if "A" not in pair or "B" not in pair:
            raise UserError(f"{source}: {where} has lora_{'A' if 'A' not in pair else 'B'} missing")
        A, B = pair["A"], pair["B"]
        if A.dim() != 2 or B.dim() != 2:
            raise UserError(f"{source}: {where} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}: "
                            "not LoRA matrices")
        if module == "gate":  # the router: one plain LoRA of its E rows
            r, scaling = rank_and_scaling(f"model.layers.{layer}.mlp.gate.weight")
            if A.shape != (r, cfg.d_model) or B.shape != (E, r):
                raise UserError(f"{source}: {where} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; this "
                                f"model's router needs ({r}, {cfg.d_model}) and ({E}, {r}) (r={r})")
            _put(out, f"blocks.{layer}.{ROUTER}", (lora_parts(cfg, ROUTER), A, B, scaling, None), source)
            continue
        ours = _expert_module(cfg, A, B)
        if ours is None:
            raise UserError(f"{source}: {where} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, which fit "
                            f"neither the experts' gate_up_proj (in {cfg.d_model}, out {2 * cfg.d_ff}) nor their "
                            f"down_proj (in {cfg.d_ff}, out {cfg.d_model}): the adapter is for another model")
        param = "gate_up_proj" if ours == EXPERT_FC else "down_proj"
        r, scaling = rank_and_scaling(f"model.layers.{layer}.mlp.experts.{param}")
        if A.shape[0] != E * r or B.shape[1] != E * r:
            raise UserError(f"{source}: {where} ({param}) has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; "
                            f"{E} experts of rank {r} need {E * r} rows of A and columns of B")
        per_expert_A = A.reshape(E, r, A.shape[1])  # (E, r, in)
        per_expert_B = B.reshape(B.shape[0], r, E)  # (out, r, E)
        # peft's gate_up: the gate's half of the rank, then the up's (it fuses w1 and w3 / gate_proj and up_proj).
        blocks = [(0, r // 2), (r // 2, r)] if ours == EXPERT_FC and r % 2 == 0 else None
        for e in range(E):
            _put(out, f"blocks.{layer}.{ours.format(e)}", (lora_parts(cfg, ours), per_expert_A[e].contiguous(),
                                                           per_expert_B[:, :, e].contiguous(), scaling, blocks), source)
    return out


def _put(out: dict[str, Adapter], name: str, adapter: Adapter, source: str) -> None:
    if name in out:
        raise UserError(f"{source}: {name} has LoRA weights twice")
    out[name] = adapter


def transformers5_settings(cfg, modules: dict[str, tuple[int, str, int, float]], r: int, alpha: float
                           ) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """The adapter config's r and lora_alpha, and rank_pattern / alpha_pattern entries under transformers 5's
    parameter names, such that peft on transformers 5 rebuilds exactly the adapters saved per expert.

    `modules`: PEFT's key of every saved module -> (layer, our module in `lora_projections` terms, rank, scale);
    `r`, `alpha`: the adapter's nominal settings. peft fuses each expert's gate and up adapters into one of rank
    2 r and alpha 2 alpha, whatever rank_pattern says of them, so r must be the rank their A's are saved with and
    alpha give their scale: after loading its own fused adapter with a B that is no longer block-diagonal, that
    is twice the nominal rank. Where r changes so, or the experts' down / the router differ from (r, alpha), they
    get entries under the names transformers 5 gives them (`model.layers.N.mlp.experts.down_proj`,
    `model.layers.N.mlp.gate.weight`), which the per-expert names (and we) never match.
    """
    if family(cfg) not in (MIXTRAL_FAMILY, QWEN3_MOE_FAMILY, QWEN2_MOE_FAMILY):
        return r, alpha, {}, {}
    fused = {(rank, scaling) for _, module, rank, scaling in modules.values() if module == EXPERT_FC}
    if len(fused) == 1:
        (rank, scaling), = fused
        r, alpha = rank, scaling * rank
    ranks, alphas = {}, {}
    for layer, module, rank, scaling in modules.values():
        name = {EXPERT_PROJ: f"model.layers.{layer}.mlp.experts.down_proj",
                ROUTER: f"model.layers.{layer}.mlp.gate.weight"}.get(module)
        if name is None:
            continue
        if rank != r:
            ranks[re.escape(name)] = rank
        if abs(scaling * rank - alpha) > 1e-9 * abs(alpha):
            alphas[re.escape(name)] = scaling * rank
    return r, alpha, ranks, alphas
