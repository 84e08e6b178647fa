"""Slimming a safetensors checkpoint larger than memory: read, slice and write one layer at a time.

The source and the slimmed model exist only as parameter-less skeletons on the meta device
(``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``): the source's gives the
module tree the plan is checked against and what each tensor keeps (selection.py, shared with
the in-memory path); the slimmed one gives config.json, the dtype of every tensor and the
stored layout. Then, one decoder layer at a time (and once for what is outside the layers):

1. the stored tensors of that layer are read with only the kept experts and rows
   (checkpoint.py: ``safe_open(...).get_slice``), and assembled in the model's layout;
2. each is cast to the slimmed model's dtype for it (``save_dtype``);
3. transformers' own save-time conversion turns them into the stored layout
   (``core_model_loading.revert_weight_conversion``, what ``save_pretrained`` calls, after
   ``modeling_utils.remove_tied_weights_from_state_dict``), and they go to the shard being filled.

Shards are written with ``safetensors.torch.save_file`` once ``max_shard_size`` is reached and
indexed in ``model.safetensors.index.json`` like ``save_pretrained`` does. Peak memory: one
layer's kept tensors plus one output shard, whatever the model's size. The result equals
``apply_plan`` + ``save_slimmed`` tensor by tensor (tests/test_slim_stream.py).
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from slimmoe.arch import get_adapter
from slimmoe.errors import UserError
from slimmoe.io.atomic import replace_folder
from slimmoe.io.loading import SAFETENSORS_INDEX, check_weights, load_config, save_tokenizer
from slimmoe.prune.checkpoint import SINGLE_FILE, SourceCheckpoint, Stored, StoredLayout
from slimmoe.prune.plan import SlimPlan
from slimmoe.prune.selection import Keep, plan_selections
from slimmoe.prune.slim import as_dtype, resolve_save_dtype
from slimmoe.resources import check_disk

log = logging.getLogger("slimmoe")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def source_dtype(path, config=None) -> torch.dtype:
    """The dtype ``from_pretrained(path, dtype="auto")`` gives: config.json's, else the first stored float's."""
    d = getattr(config or load_config(str(path)), "dtype", None)
    d = getattr(torch, d, None) if isinstance(d, str) else d
    return d if isinstance(d, torch.dtype) else (SourceCheckpoint(path).first_float_dtype() or torch.float32)


def meta_skeleton(config, dtype: torch.dtype):
    """A parameter-less model of ``config`` (its tied weights tied, as ``from_pretrained`` builds it)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def slim_streamed(source: str | Path, plan: SlimPlan, out: str | Path, tokenizer=None, extra: dict | None = None,
                  save_dtype: str = "auto", max_shard_size: str | int = "5GB", field: str = "MODEL"):
    """Write the slimmed checkpoint of the safetensors folder ``source`` into ``out`` (atomically,
    as :func:`~slimmoe.prune.slim.save_slimmed`) and return the slimmed model's meta skeleton.
    Raises ``StreamUnsupported`` (before writing anything) for a stored layout it cannot map."""
    check_weights(source, field)  # a missing or truncated shard: one error naming it
    config = load_config(str(source), field)
    src_dtype = source_dtype(source, config)
    src = meta_skeleton(config, src_dtype)
    keeps, new_cfg = plan_selections(src, plan, get_adapter(config))
    dtype = resolve_save_dtype(save_dtype, src_dtype)
    slim = meta_skeleton(new_cfg, dtype)
    layout, ckpt = StoredLayout(src), SourceCheckpoint(source, field)
    groups = _group_stored(ckpt, layout)
    wanted = _saved_keys(slim)
    check_disk(Path(out), sum(t.numel() * t.element_size() for k, t in slim.state_dict().items() if k in wanted))
    with replace_folder(Path(out), point="slim:write") as tmp:
        writer = ShardWriter(tmp, _bytes(max_shard_size))
        done: set[str] = set()
        shapes = src.state_dict()
        for group in groups.values():
            state = _read_group(ckpt, group, keeps, shapes, wanted)
            state = {k: as_dtype(v, wanted[k].dtype) for k, v in state.items()}
            done |= set(state)
            writer.add(_to_stored(slim, state))
        if set(wanted) - done:
            missing = sorted(set(wanted) - done)
            raise UserError(f"{field}: {source} does not hold {missing[0]}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        writer.finish(total_parameters=slim.num_parameters())
        _save_config(slim, tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        for name, write in (extra or {}).items():
            write(tmp / name)
        plan.save(tmp)
    return slim


def _saved_keys(slim) -> dict[str, torch.Tensor]:
    """The model-layout tensors ``save_pretrained`` writes (tied copies dropped), as meta tensors."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return remove_tied_weights_from_state_dict(slim.state_dict(), slim)


def _group_stored(ckpt: SourceCheckpoint, layout: StoredLayout) -> dict[int, list[tuple[str, Stored]]]:
    """Stored names by decoder layer (-1: outside the layers), each with where it goes."""
    groups: dict[int, list[tuple[str, Stored]]] = defaultdict(list)
    for name in ckpt.keys():
        where = layout.locate(name)
        if where is None:
            log.debug("%s: %s is not a tensor of the model; skipped", ckpt.folder, name)
            continue
        m = _LAYER.search("." + where.key)
        groups[int(m.group(1)) if m else -1].append((name, where))
    return dict(sorted(groups.items()))


def _read_group(ckpt: SourceCheckpoint, group, keeps: dict[str, Keep], shapes: dict, wanted: dict) -> dict:
    """The kept part of every model tensor this group's stored tensors make, in the model's layout."""
    state: dict[str, torch.Tensor] = {}
    pieces: dict[str, dict[int, dict[int, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    parts_of: dict[str, Stored] = {}
    for name, where in group:
        if where.key not in wanted:
            continue  # a tied copy: save_pretrained does not write it
        keep = keeps.get(where.key)
        if where.expert is None:
            state[where.key] = _read_whole(ckpt, name, keep)
            continue
        rows = None
        if keep is not None:
            full = shapes[where.key].shape[keep.dim]
            rows = keep.expert_rows(where.expert, where.part, where.parts, where.part_dim, full)
            if rows is None:
                continue  # a dropped expert is never read
        slot = where.expert if keep is None else keep.experts.index(where.expert)
        d = 0 if keep is None else keep.dim - 1
        pieces[where.key][slot][where.part] = ckpt.read(name, dim=d, index=rows)
        parts_of[where.key] = where
    for key, by_expert in pieces.items():
        where, keep = parts_of[key], keeps.get(key)
        experts = len(keep.experts) if keep is not None else shapes[key].shape[0]
        if sorted(by_expert) != list(range(experts)) or any(len(p) != where.parts for p in by_expert.values()):
            raise UserError(f"{ckpt.field}: {ckpt.folder} lacks some of the per-expert tensors that make {key}")
        state[key] = torch.stack([
            torch.cat([by_expert[e][p] for p in range(where.parts)], dim=where.part_dim) for e in sorted(by_expert)
        ])
    return state


def _read_whole(ckpt: SourceCheckpoint, name: str, keep: Keep | None) -> torch.Tensor:
    """A model tensor stored as one tensor (granitemoe stores its experts fused like this)."""
    if keep is None:
        return ckpt.read(name)
    if keep.experts is None:
        return ckpt.read(name, dim=keep.dim, index=keep.index)
    return torch.stack([ckpt.read(name, expert=e, dim=keep.dim - 1, index=r) for e, r in zip(keep.experts, keep.rows)])


def _to_stored(slim, state: dict) -> dict:
    """Model layout -> the layout ``save_pretrained`` writes (per-expert modules, original names)."""
    from transformers.core_model_loading import revert_weight_conversion

    return {k: v.contiguous() for k, v in revert_weight_conversion(slim, state).items()}


def _save_config(slim, folder: Path) -> None:
    """config.json (and generation_config.json) as ``save_pretrained`` writes them."""
    slim.config.dtype = str(slim.dtype).split(".")[1]
    slim.config.architectures = [type(slim).__name__]
    slim.config.save_pretrained(folder)
    if slim.can_generate():
        slim.generation_config.save_pretrained(folder)


def _bytes(size: str | int) -> int:
    """"5GB", "500MB", "20MiB" or a number of bytes."""
    if isinstance(size, int):
        return size
    from huggingface_hub.serialization._base import parse_size_to_int  # what save_pretrained parses "5GB" with

    return parse_size_to_int(size)


class ShardWriter:
    """Fills safetensors shards up to ``max_bytes`` each; ``finish`` names and indexes them
    (``model.safetensors`` alone when one shard is enough, as ``save_pretrained`` does)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            size = t.numel() * t.element_size()
            if self.pending and self.pending_bytes + size > self.max_bytes:
                self._flush()
            self.pending[name] = t
            self.pending_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        tmp_name = f".shard-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / tmp_name), metadata={"format": "pt"})
        self.files.append((tmp_name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self, total_parameters: int) -> None:
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            (self.folder / self.files[0][0]).rename(self.folder / SINGLE_FILE)
            return
        n, weight_map = len(self.files), {}
        for i, (tmp_name, names) in enumerate(self.files, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.folder / tmp_name).rename(self.folder / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_parameters": total_parameters, "total_size": self.total_bytes},
                 "weight_map": weight_map}
        (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def slim_checkpoint(source: str | Path, scores, targets, out: str | Path, *, score_info: dict | None = None,
                    tokenizer=None, extra: dict | None = None, save_dtype: str = "auto",
                    max_shard_size: str | int = "5GB", model=None, field: str = "MODEL") -> dict:
    """Plan from ``scores`` and write the slimmed checkpoint of ``source`` into ``out``: streamed
    when ``source`` is a safetensors folder, in memory otherwise (a hub id, a layout the stream
    cannot map; ``model`` is then used if given, loaded if not). Returns the plan and the
    parameter counts before and after."""
    from slimmoe.evaluation.params import parameter_counts
    from slimmoe.io.loading import load_model
    from slimmoe.prune.checkpoint import StreamUnsupported, is_safetensors_folder
    from slimmoe.prune.plan import build_plan
    from slimmoe.prune.slim import apply_plan, save_slimmed

    if is_safetensors_folder(source):
        config = load_config(str(source), field)
        skeleton = meta_skeleton(config, source_dtype(source, config))
        plan = build_plan(get_adapter(config), skeleton, scores, targets, score_info=score_info)
        try:
            slim = slim_streamed(source, plan, out, tokenizer, extra, save_dtype, max_shard_size, field)
            return {"plan": plan, "before": parameter_counts(skeleton), "after": parameter_counts(slim)}
        except StreamUnsupported as e:
            log.warning("%s: slimming in memory: %s", source, e)
    model = model if model is not None else load_model(str(source), field)
    plan = build_plan(get_adapter(model.config), model, scores, targets, score_info=score_info)
    small = apply_plan(model, plan, resolve_save_dtype(save_dtype, model.dtype))
    save_slimmed(small, plan, out, tokenizer=tokenizer, extra=extra, max_shard_size=max_shard_size)
    return {"plan": plan, "before": parameter_counts(model), "after": parameter_counts(small)}
