"""Apply a slimming plan: slice fused expert tensors, routers, shared experts and attention.

The smaller model is rebuilt from its updated config on the meta device and the sliced
tensors are assigned into it, so its modules' sizes always agree with its config and no
second full copy of the weights is allocated.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

from slimmoe.arch import MoEAdapter, get_adapter
from slimmoe.errors import UserError
from slimmoe.io.atomic import replace_folder
from slimmoe.prune.plan import LayerPlan, SlimPlan
from slimmoe.resources import check_disk, state_dict_bytes


def _idx(ids: list[int], device) -> torch.Tensor:
    return torch.as_tensor(ids, dtype=torch.long, device=device)


def _rows_of_heads(heads: list[int], head_dim: int, device) -> torch.Tensor:
    """Row indices of a projection whose output is laid out head by head."""
    h = _idx(heads, device)
    return (h[:, None] * head_dim + torch.arange(head_dim, device=device)[None, :]).reshape(-1)


class _Slicer:
    """Collects the sliced tensors of one model into a new state dict, by parameter name."""

    def __init__(self, model: nn.Module):
        self.names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
        self.state = dict(model.state_dict())

    def index(self, tensor: torch.Tensor, dim: int, index: torch.Tensor) -> None:
        name = self.names[id(tensor)]
        self.state[name] = tensor.detach().index_select(dim, index).contiguous()

    def linear_out(self, linear: nn.Linear, rows: torch.Tensor) -> None:
        self.index(linear.weight, 0, rows)
        if linear.bias is not None:
            self.index(linear.bias, 0, rows)

    def linear_in(self, linear: nn.Linear, cols: torch.Tensor) -> None:
        self.index(linear.weight, 1, cols)


def _slice_experts(s: _Slicer, blk, lp: LayerPlan, inter: int) -> None:
    experts = blk.experts
    dev = experts.gate_up_proj.device
    kept = _idx(lp.experts, dev)
    neurons = torch.stack([_idx(n, dev) for n in lp.expert_neurons])  # [E', I']
    gu = experts.gate_up_proj.detach().index_select(0, kept)  # [E', 2I, H]
    rows = torch.cat([neurons, neurons + inter], dim=1)  # gate rows first, then up rows
    s.state[s.names[id(experts.gate_up_proj)]] = torch.gather(
        gu, 1, rows[:, :, None].expand(-1, -1, gu.shape[-1])
    ).contiguous()
    dn = experts.down_proj.detach().index_select(0, kept)  # [E', H, I]
    s.state[s.names[id(experts.down_proj)]] = torch.gather(
        dn, 2, neurons[:, None, :].expand(-1, dn.shape[1], -1)
    ).contiguous()
    for bias_name in ("gate_up_proj_bias", "down_proj_bias"):
        if getattr(experts, bias_name, None) is not None:
            raise UserError(f"expert biases ({bias_name}) are not supported yet")
    router = blk.router
    for name in ("weight", "bias", "e_score_correction_bias"):
        t = getattr(router, name, None)
        if isinstance(t, torch.Tensor) and t.shape[0] == experts.gate_up_proj.shape[0]:
            s.index(t, 0, kept)


def _slice_shared(s: _Slicer, blk, lp: LayerPlan) -> None:
    """Shared experts are dense gated MLPs; their neurons are numbered across all of them."""
    offset = 0
    wanted = _idx(lp.shared_neurons, blk.shared[0].gate_proj.weight.device)
    for mlp in blk.shared:
        width = mlp.gate_proj.weight.shape[0]
        mine = wanted[(wanted >= offset) & (wanted < offset + width)] - offset
        s.linear_out(mlp.gate_proj, mine)
        s.linear_out(mlp.up_proj, mine)
        s.linear_in(mlp.down_proj, mine)
        offset += width


def _slice_attention(s: _Slicer, attn, lp: LayerPlan, head_dim: int, group: int) -> None:
    dev = attn.q_proj.weight.device
    q_heads = [g * group + j for g in lp.kv_groups for j in range(group)]
    q_rows = _rows_of_heads(q_heads, head_dim, dev)
    kv_rows = _rows_of_heads(lp.kv_groups, head_dim, dev)
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


def apply_plan(model: nn.Module, plan: SlimPlan) -> nn.Module:
    """Return a new, smaller model that computes what ``model`` computes with the removed
    structures masked out. ``model`` itself is left unchanged."""
    adapter = get_adapter(model.config)
    check_plan(plan, adapter, model)
    cfg = model.config
    inter, head_dim = adapter.expert_size(cfg), adapter.head_dim(cfg)
    group = cfg.num_attention_heads // adapter.num_kv_heads(cfg)
    s = _Slicer(model)
    blocks = {b.layer_idx: b for b in adapter.moe_blocks(model)}
    layers = adapter.layers(model)
    new_width = new_shared = new_kv = new_experts = None
    for lp in plan.layers:
        blk = blocks.get(lp.layer)
        if blk is not None and lp.experts is not None:
            _slice_experts(s, blk, lp, inter)
            new_width, new_experts = len(lp.expert_neurons[0]), len(lp.experts)
            if blk.shared and lp.shared_neurons is not None:
                _slice_shared(s, blk, lp)
                new_shared = len(lp.shared_neurons)
        if lp.kv_groups is not None and len(lp.kv_groups) != adapter.num_kv_heads(cfg):
            adapter.check_kv_slimming(cfg)
            _slice_attention(s, adapter.attention(layers[lp.layer]), lp, head_dim, group)
            new_kv = len(lp.kv_groups)

    new_cfg = copy.deepcopy(cfg)
    adapter.update_config(
        new_cfg,
        expert_size=new_width if new_width != inter else None,
        shared_size=new_shared,
        kv_heads=new_kv,
        num_experts=new_experts if new_experts != adapter.num_experts(cfg) else None,
    )
    return _rebuild(model, new_cfg, s.state)


def _rebuild(old: nn.Module, cfg, state: dict) -> nn.Module:
    dtype = next(old.parameters()).dtype
    with torch.device("meta"):
        new = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # tied weights appear once in the new state dict; drop what the new model does not hold
    expected = set(new.state_dict().keys())
    missing = expected - set(state)
    if missing:
        raise RuntimeError(f"slimmed state misses {sorted(missing)[:3]}")
    new.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=True)
    old_buffers = dict(old.named_buffers())
    for name, buf in list(new.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (rotary inv_freq): same shape as before
            mod_name, _, attr = name.rpartition(".")
            setattr(new.get_submodule(mod_name) if mod_name else new, attr, old_buffers[name].clone())
    if getattr(cfg, "tie_word_embeddings", False):
        new.tie_weights()
    new.train(old.training)
    return new


def save_slimmed(model: nn.Module, plan: SlimPlan, out: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Save with ``save_pretrained`` into a temporary sibling folder, then swap it in for ``out``.

    ``extra`` maps file names to writers (``writer(path)``) for side files such as scores.
    An interrupted save leaves ``out`` as it was; a finished one holds the completion marker.
    """
    check_disk(Path(out), state_dict_bytes(model))
    with replace_folder(Path(out), point="slim:write") as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, write in (extra or {}).items():
            write(tmp / name)
        plan.save(tmp)
    return Path(out)
