"""Apply a slimming plan in memory: slice fused expert tensors, routers, shared experts and attention.

What is kept is decided by :func:`slimmoe.prune.selection.plan_selections` (shared with the
streamed path, stream.py). The smaller model is rebuilt from its updated config on the meta
device and the sliced tensors are assigned into it, so its modules' sizes always agree with
its config and no second full copy of the weights is allocated.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

from slimmoe.arch import get_adapter
from slimmoe.io.atomic import replace_folder
from slimmoe.io.loading import save_tokenizer
from slimmoe.prune.plan import SlimPlan
from slimmoe.prune.selection import check_plan, plan_selections
from slimmoe.resources import check_disk, state_dict_bytes

__all__ = ["SAVE_DTYPES", "apply_plan", "as_dtype", "check_plan", "resolve_save_dtype", "save_slimmed"]

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_save_dtype(name: str | None, source_dtype: torch.dtype) -> torch.dtype:
    """``save_dtype`` resolved: ``auto`` (or None) is the source's dtype."""
    return source_dtype if name in (None, "auto") else SAVE_DTYPES[name]


def apply_plan(model: nn.Module, plan: SlimPlan, dtype: torch.dtype | None = None) -> nn.Module:
    """Return a new, smaller model that computes what ``model`` computes with the removed
    structures masked out. ``model`` itself is left unchanged. ``dtype`` (default: the
    model's) is the dtype of the new model, built as ``from_config(dtype=...)`` builds it
    (modules a family keeps in float32, such as DeepSeek's router, stay float32)."""
    keeps, new_cfg = plan_selections(model, plan, get_adapter(model.config))
    state = dict(model.state_dict())
    for name, keep in keeps.items():
        state[name] = keep.take(state[name])
    return _rebuild(model, new_cfg, state, dtype)


def _rebuild(old: nn.Module, cfg, state: dict, dtype: torch.dtype | None) -> nn.Module:
    dtype = dtype or next(old.parameters()).dtype
    with torch.device("meta"):
        new = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    # tied weights appear once in the new state dict; drop what the new model does not hold
    expected = new.state_dict()
    missing = set(expected) - set(state)
    if missing:
        raise RuntimeError(f"slimmed state misses {sorted(missing)[:3]}")
    cast = {k: as_dtype(v, expected[k].dtype) for k, v in state.items() if k in expected}
    new.load_state_dict(cast, strict=True, assign=True)
    old_buffers = dict(old.named_buffers())
    for name, buf in list(new.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (rotary inv_freq): same shape as before
            mod_name, _, attr = name.rpartition(".")
            setattr(new.get_submodule(mod_name) if mod_name else new, attr, old_buffers[name].clone())
    if getattr(cfg, "tie_word_embeddings", False):
        new.tie_weights()
    new.train(old.training)
    return new


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` when both are floating point (integer buffers keep theirs)."""
    return t.to(dtype) if t.is_floating_point() and dtype.is_floating_point and t.dtype != dtype else t


def save_slimmed(model: nn.Module, plan: SlimPlan, out: str | Path, tokenizer=None, extra: dict | None = None,
                 max_shard_size: str | int | None = None) -> Path:
    """Save with ``save_pretrained`` into a temporary sibling folder, then swap it in for ``out``.

    ``extra`` maps file names to writers (``writer(path)``) for side files such as scores.
    An interrupted save leaves ``out`` as it was; a finished one holds the completion marker.
    """
    check_disk(Path(out), state_dict_bytes(model))
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with replace_folder(Path(out), point="slim:write") as tmp:
        model.save_pretrained(tmp, **kw)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        for name, write in (extra or {}).items():
            write(tmp / name)
        plan.save(tmp)
    return Path(out)
