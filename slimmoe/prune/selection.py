"""Which indices of which tensor a slimming plan keeps, by parameter name, and the config after it.

This is the one place the slicing is decided. :func:`plan_selections` reads a model's module
tree (a real model or a parameter-less skeleton on the meta device) and a :class:`SlimPlan`
and returns, for every tensor the plan cuts, a :class:`Keep`: the indices kept along one
dimension, and for a stacked expert tensor ([E, 2I, H] gate_up, [E, H, I] down) the kept
experts along dim 0, each with its own kept rows. Tensors not named keep everything.

Both ways of slimming use it: in memory (slim.py, ``Keep.take`` on whole tensors) and
streamed from safetensors (stream.py, ``Keep.take_expert_part`` on one expert's tensor on
disk, read with only the rows the plan keeps).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from slimmoe.arch import MoEAdapter
from slimmoe.errors import UserError
from slimmoe.prune.plan import LayerPlan, SlimPlan


@dataclass(frozen=True)
class Keep:
    """What one tensor keeps.

    Plain tensor: ``index`` along ``dim``. Stacked expert tensor: ``experts`` along dim 0 and,
    for the i-th kept expert, ``rows[i]`` along ``dim`` (counted in the stacked tensor)."""

    dim: int
    index: tuple[int, ...] | None = None
    experts: tuple[int, ...] | None = None
    rows: tuple[tuple[int, ...], ...] | None = None

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The kept part of the whole tensor (a new contiguous tensor)."""
        t = tensor.detach()
        if self.experts is None:
            return t.index_select(self.dim, _idx(self.index, t.device)).contiguous()
        per_expert = [t[e].index_select(self.dim - 1, _idx(r, t.device)) for e, r in zip(self.experts, self.rows)]
        return torch.stack(per_expert).contiguous()

    def expert_rows(self, expert: int, part: int = 0, parts: int = 1, part_dim: int | None = None,
                    full_size: int = 0) -> tuple[int, ...] | None:
        """Kept indices along ``dim - 1`` of one expert's slice, or of one of ``parts`` equal
        pieces of it cut along ``part_dim`` (per-expert numbering; ``full_size`` = the uncut
        size along it). None when the expert is not kept."""
        if expert not in self.experts:
            return None
        rows = self.rows[self.experts.index(expert)]
        if parts == 1 or part_dim != self.dim - 1:
            return rows
        size = full_size // parts
        lo = part * size
        return tuple(r - lo for r in rows if lo <= r < lo + size)


def _idx(ids, device) -> torch.Tensor:
    return torch.as_tensor(ids, dtype=torch.long, device=device)


def _heads_rows(heads: list[int], head_dim: int) -> tuple[int, ...]:
    """Row indices of a projection whose output is laid out head by head."""
    return tuple(h * head_dim + j for h in heads for j in range(head_dim))


class _Selections:
    """Collects a Keep per tensor name, found by the identity of the module's tensors."""

    def __init__(self, model: nn.Module):
        self.names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
        self.keep: dict[str, Keep] = {}

    def add(self, tensor: torch.Tensor | None, keep: Keep) -> None:
        if tensor is not None:
            self.keep[self.names[id(tensor)]] = keep

    def linear_out(self, linear: nn.Linear, rows: tuple[int, ...]) -> None:
        self.add(linear.weight, Keep(0, rows))
        self.add(linear.bias, Keep(0, rows))

    def linear_in(self, linear: nn.Linear, cols: tuple[int, ...]) -> None:
        self.add(linear.weight, Keep(1, cols))


def _select_experts(s: _Selections, blk, lp: LayerPlan, inter: int) -> None:
    experts = blk.experts
    for bias_name in ("gate_up_proj_bias", "down_proj_bias"):
        if getattr(experts, bias_name, None) is not None:
            raise UserError(f"expert biases ({bias_name}) are not supported yet")
    kept = tuple(lp.experts)
    neurons = [tuple(n) for n in lp.expert_neurons]
    s.add(experts.gate_up_proj, Keep(1, experts=kept, rows=tuple(n + tuple(i + inter for i in n) for n in neurons)))
    s.add(experts.down_proj, Keep(2, experts=kept, rows=tuple(neurons)))
    num_experts = experts.gate_up_proj.shape[0]
    for name in ("weight", "bias", "e_score_correction_bias"):
        t = getattr(blk.router, name, None)
        if isinstance(t, torch.Tensor) and t.shape[0] == num_experts:
            s.add(t, Keep(0, kept))


def _select_shared(s: _Selections, blk, lp: LayerPlan) -> None:
    """Shared experts are dense gated MLPs; their neurons are numbered across all of them."""
    offset = 0
    for mlp in blk.shared:
        width = mlp.gate_proj.weight.shape[0]
        mine = tuple(n - offset for n in lp.shared_neurons if offset <= n < offset + width)
        s.linear_out(mlp.gate_proj, mine)
        s.linear_out(mlp.up_proj, mine)
        s.linear_in(mlp.down_proj, mine)
        offset += width


def _select_attention(s: _Selections, attn, lp: LayerPlan, head_dim: int, group: int) -> None:
    q_rows = _heads_rows([g * group + j for g in lp.kv_groups for j in range(group)], head_dim)
    kv_rows = _heads_rows(lp.kv_groups, head_dim)
    s.linear_out(attn.q_proj, q_rows)
    s.linear_out(attn.k_proj, kv_rows)
    s.linear_out(attn.v_proj, kv_rows)
    s.linear_in(attn.o_proj, q_rows)


def check_plan(plan: SlimPlan, adapter: MoEAdapter, model: nn.Module) -> None:
    """Uniform width across experts and layers, indices in range: a UserError otherwise."""
    cfg = model.config
    n_layers = len(adapter.layers(model))
    if len(plan.layers) != n_layers:
        raise UserError(f"slim_plan: {len(plan.layers)} layers planned, the model has {n_layers}")
    widths, counts, groups = set(), set(), set()
    for lp in plan.layers:
        if lp.experts is not None:
            counts.add(len(lp.experts))
            widths.update(len(n) for n in lp.expert_neurons)
            if any(not 0 <= e < adapter.num_experts(cfg) for e in lp.experts):
                raise UserError(f"slim_plan: layer {lp.layer} keeps an expert index out of range")
        if lp.kv_groups is not None:
            groups.add(len(lp.kv_groups))
    if len(widths) > 1 or len(counts) > 1 or len(groups) > 1:
        raise UserError("slim_plan: widths, expert counts and KV groups must be the same in every layer")


def plan_selections(model: nn.Module, plan: SlimPlan, adapter: MoEAdapter):
    """``(keeps, config)``: a Keep for every tensor name the plan cuts, and a copy of the model's
    config with the sizes after slimming. ``model`` may live on the meta device."""
    check_plan(plan, adapter, model)
    cfg = model.config
    inter, head_dim = adapter.expert_size(cfg), adapter.head_dim(cfg)
    group = cfg.num_attention_heads // adapter.num_kv_heads(cfg)
    s = _Selections(model)
    blocks = {b.layer_idx: b for b in adapter.moe_blocks(model)}
    layers = adapter.layers(model)
    new_width = new_shared = new_kv = new_experts = None
    for lp in plan.layers:
        blk = blocks.get(lp.layer)
        if blk is not None and lp.experts is not None:
            _select_experts(s, blk, lp, inter)
            new_width, new_experts = len(lp.expert_neurons[0]), len(lp.experts)
            if blk.shared and lp.shared_neurons is not None:
                _select_shared(s, blk, lp)
                new_shared = len(lp.shared_neurons)
        if lp.kv_groups is not None and len(lp.kv_groups) != adapter.num_kv_heads(cfg):
            adapter.check_kv_slimming(cfg)
            _select_attention(s, adapter.attention(layers[lp.layer]), lp, head_dim, group)
            new_kv = len(lp.kv_groups)
    new_cfg = copy.deepcopy(cfg)
    adapter.update_config(
        new_cfg,
        expert_size=new_width if new_width != inter else None,
        shared_size=new_shared,
        kv_heads=new_kv,
        num_experts=new_experts if new_experts != adapter.num_experts(cfg) else None,
    )
    return s.keep, new_cfg
