"""A safetensors checkpoint folder read tensor by tensor, and where each stored tensor goes in the model.

:class:`SourceCheckpoint` knows which shard holds each stored tensor (``model.safetensors`` or
the shards named by ``model.safetensors.index.json``) and reads only the rows or columns wanted,
through ``safe_open(...).get_slice(name)[...]`` (safetensors' lazy slicing: only the bytes of
the requested range are read: https://huggingface.co/docs/safetensors, "Loading only part of the
tensors"; one file opened per read, so the pages mapped for it are released with it).

:class:`StoredLayout` maps a stored name to the model's parameter it belongs to. transformers 5
stores MoE experts one module per expert (``experts.N.w1/w3/w2`` or ``gate_proj/up_proj/down_proj``)
and fuses them on load into ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]; the rules are
its own conversion mapping (``transformers.conversion_mapping.get_model_conversion_mapping``,
``core_model_loading.rename_source_key``: renamings, then ``WeightConverter`` with
``MergeModulelist(dim=0)`` and ``Concatenate(dim=1)``), read here rather than copied.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from slimmoe.errors import UserError
from slimmoe.io.loading import SAFETENSORS_INDEX

SINGLE_FILE = "model.safetensors"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class StreamUnsupported(Exception):
    """The checkpoint's stored layout needs a conversion the streamed path does not do."""


def is_safetensors_folder(path) -> bool:
    p = Path(str(path))
    return p.is_dir() and ((p / SAFETENSORS_INDEX).is_file() or (p / SINGLE_FILE).is_file())


class SourceCheckpoint:
    """The stored tensors of a safetensors folder. A file is opened (memory-mapped) for one read at
    a time, so the pages read leave the process with the copy made of them."""

    def __init__(self, folder: str | Path, field: str = "MODEL"):
        self.folder, self.field = Path(folder), field
        index = self.folder / SAFETENSORS_INDEX
        if index.is_file():
            self.shard_of = dict(json.loads(index.read_text())["weight_map"])
        else:
            with self._open(self.folder / SINGLE_FILE) as f:
                self.shard_of = {k: SINGLE_FILE for k in f.keys()}

    def _open(self, path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except (OSError, SafetensorError) as e:
            raise UserError(f"{self.field}: cannot read {path} ({str(e).splitlines()[0][:200]})") from None

    def keys(self) -> list[str]:
        return list(self.shard_of)

    def first_float_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating-point tensor stored (what ``dtype="auto"`` falls back to)."""
        for name, shard in self.shard_of.items():
            with self._open(self.folder / shard) as f:
                dtype = _ST_DTYPES.get(f.get_slice(name).get_dtype())
            if dtype is not None:
                return dtype
        return None

    def read(self, name: str, expert: int | None = None, dim: int = 0, index=None) -> torch.Tensor:
        """Stored tensor ``name`` (``[expert]`` of it when given), with only ``index`` along ``dim``
        (of what is returned): the covering range is read, then the rows picked."""
        with self._open(self.folder / self.shard_of[name]) as f:  # opened per read: closing unmaps what was read
            return self._read(f.get_slice(name), name, expert, dim, index)

    def _read(self, sl, name: str, expert: int | None, dim: int, index) -> torch.Tensor:
        lead = () if expert is None else (slice(expert, expert + 1),)
        try:
            if index is None:
                t = sl[lead + (slice(None),)] if lead else sl[:]
            else:
                lo, hi = (min(index), max(index) + 1) if index else (0, 0)
                t = sl[lead + (slice(None),) * dim + (slice(lo, hi),)]
        except (OSError, SafetensorError, ValueError) as e:
            raise UserError(f"{self.field}: cannot read {name} from {self.folder / self.shard_of[name]} "
                            f"({str(e).splitlines()[0][:200]})") from None
        if expert is not None:
            t = t[0]
        if index is not None:
            t = t.index_select(dim, torch.as_tensor([i - lo for i in index], dtype=torch.long))
        return t.contiguous()


@dataclass(frozen=True)
class Stored:
    """Where one stored tensor goes: into ``key`` of the model; for a per-expert tensor, as
    expert ``expert`` and piece ``part`` of ``parts`` concatenated along ``part_dim`` (per expert)."""

    key: str
    expert: int | None = None
    part: int = 0
    parts: int = 1
    part_dim: int = 0


class StoredLayout:
    """Maps stored names to model tensors by transformers' own conversion mapping of ``skeleton``."""

    def __init__(self, skeleton):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        mapping = get_model_conversion_mapping(skeleton)
        self.renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        self.converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self.prefix = skeleton.base_model_prefix
        self.model_keys = skeleton.state_dict()
        for conv in self.converters:
            _check_supported(conv)

    def locate(self, name: str) -> Stored | None:
        """The model tensor a stored tensor belongs to; None for a name the model does not hold
        (``from_pretrained`` ignores those too)."""
        from transformers.core_model_loading import apply_renamings, rename_source_key

        key, pattern = rename_source_key(name, self.renamings, self.converters, self.prefix, self.model_keys)
        if key not in self.model_keys and name in self.model_keys:
            key, pattern = name, None
        if key not in self.model_keys:
            return None
        if pattern is None:
            return Stored(key)
        conv = next(c for c in self.converters if pattern in c.source_patterns)
        renamed = apply_renamings(name, self.renamings)
        found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), renamed)
        if found is None:
            raise StreamUnsupported(f"no expert number in {name} for the pattern {pattern}")
        ops = conv.operations
        part_dim = ops[1].dim - 1 if len(ops) > 1 else 0
        return Stored(key, int(found.group(1)), conv.source_patterns.index(pattern), len(conv.source_patterns), part_dim)


def _check_supported(conv) -> None:
    """Stacking per-expert tensors (MergeModulelist on dim 0), optionally then concatenating
    the stacks (Concatenate on a later dim): what every supported MoE family uses."""
    names = [type(op).__name__ for op in conv.operations]
    ok = names in (["MergeModulelist"], ["MergeModulelist", "Concatenate"])
    if not ok or conv.operations[0].dim != 0 or (len(names) == 2 and conv.operations[1].dim < 1):
        raise StreamUnsupported(f"stored layout {conv.source_patterns} -> {conv.target_patterns} uses {names}")
