"""Content fingerprints of what the teacher top-k cache is keyed by (slimmoe.distill.teacher_cache):
token blocks, an in-memory model, and a teacher checkpoint folder read without loading it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from slimmoe.io.fingerprint import folder_fingerprint


def fingerprint_blocks(blocks) -> str:
    """Content hash of token blocks. A tensor: of its shape and values. Any other block source
    (a lazy reader with ``shape``, slicing and a ``fingerprint`` of exactly those blocks): of its
    shape and ``fingerprint``, without reading a token. (So a tensor and a reader of the same
    tokens key different cache entries.)"""
    if isinstance(blocks, torch.Tensor):
        h = hashlib.sha256(str(tuple(blocks.shape)).encode())
        h.update(blocks.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()[:32]
    fp = getattr(blocks, "fingerprint", None)
    if not isinstance(fp, str) or not fp:
        raise TypeError(f"teacher cache: blocks of type {type(blocks).__name__} are neither a tensor nor have a "
                        "'fingerprint' string")
    raw = json.dumps(["blocks", [int(d) for d in blocks.shape], fp])
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def fingerprint_model(model: torch.nn.Module) -> str:
    """Content hash of a model's config and parameters (CPU copies, in name order)."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(cfg.to_json_string(use_diff=False).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def teacher_fingerprint(teacher: str | Path | torch.nn.Module, *, dtype: str | torch.dtype | None = None) -> str:
    """The teacher's part of the cache key, without loading a checkpoint.

    A checkpoint folder (str or Path) is fingerprinted from its files
    (:func:`slimmoe.io.fingerprint.folder_fingerprint`: names, sizes and bytes, head and tail
    only of files over 64 MiB); an in-memory module by its weights (:func:`fingerprint_model`).
    ``dtype``, when given, is mixed in: a folder's outputs depend on the dtype it is loaded in.
    """
    if isinstance(teacher, torch.nn.Module):
        fp = fingerprint_model(teacher)
    else:
        path = Path(teacher)
        if not path.is_dir():
            raise FileNotFoundError(f"teacher: {path} is not a checkpoint folder")
        fp = folder_fingerprint(path)
    if dtype is not None:
        fp = hashlib.sha256(f"{fp}:{dtype}".encode()).hexdigest()[:32]
    return fp
