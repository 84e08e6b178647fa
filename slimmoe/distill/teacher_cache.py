"""Memory-mapped store of the teacher's top-k log-probabilities per training block.

When the same packed data is distilled more than once (several stages, several epochs,
ablations) the teacher's output never changes, so it is computed once per
(teacher fingerprint, data fingerprint, k, temperature) and read back afterwards.

Layout of one entry ``<cache_dir>/<key>/``: ``logprobs.f32`` and ``indices.i32`` (raw
numpy memmaps of shape [N, seq_len, k]) and ``index.json`` (shapes, dtypes, the key's
parts). The entry is built in a temporary folder and renamed into place, so a folder
with the key's name is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from slimmoe.losses import teacher_topk

INDEX_FILE = "index.json"


def fingerprint_blocks(blocks: torch.Tensor) -> str:
    """Content hash of a token block tensor (shape and values)."""
    h = hashlib.sha256(str(tuple(blocks.shape)).encode())
    h.update(blocks.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


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


def cache_key(teacher_fp: str, data_fp: str, k: int, temperature: float) -> str:
    raw = json.dumps([teacher_fp, data_fp, int(k), float(temperature)])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


class TeacherTopkCache:
    """Read-only view of one complete cache entry."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.index = json.loads((self.path / INDEX_FILE).read_text())
        shape = tuple(self.index["shape"])
        self._lp = np.memmap(self.path / "logprobs.f32", dtype=np.float32, mode="r", shape=shape)
        self._idx = np.memmap(self.path / "indices.i32", dtype=np.int32, mode="r", shape=shape)

    def __len__(self) -> int:
        return self.index["shape"][0]

    def get(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k log-probs (float32) and token ids (int64) of the given block rows."""
        r = rows.cpu().numpy()
        lp = torch.from_numpy(np.ascontiguousarray(self._lp[r]))
        idx = torch.from_numpy(np.ascontiguousarray(self._idx[r])).long()
        return lp, idx


def build_or_open(
    cache_dir: Path,
    blocks: torch.Tensor,
    teacher_logits_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    teacher_fp: str,
    k: int,
    temperature: float,
    batch_size: int,
    build: bool = True,
) -> TeacherTopkCache:
    """Open the entry for this key, building it first if it is missing and ``build`` is set.

    ``teacher_logits_fn(ids [b, T]) -> logits [b, T, V]`` runs the teacher. Only one
    process should build; the others call with ``build=False`` after a barrier.
    """
    data_fp = fingerprint_blocks(blocks)
    key = cache_key(teacher_fp, data_fp, k, temperature)
    final = Path(cache_dir) / key
    if (final / INDEX_FILE).is_file():
        return TeacherTopkCache(final)
    if not build:
        raise FileNotFoundError(f"teacher cache entry {final} is missing")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{key}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    n, seq_len = blocks.shape
    shape = (n, seq_len, k)
    lp_mm = np.memmap(tmp / "logprobs.f32", dtype=np.float32, mode="w+", shape=shape)
    idx_mm = np.memmap(tmp / "indices.i32", dtype=np.int32, mode="w+", shape=shape)
    with torch.no_grad():
        for s in range(0, n, batch_size):
            logits = teacher_logits_fn(blocks[s : s + batch_size])
            lp, idx = teacher_topk(logits, k=k, temperature=temperature)
            lp_mm[s : s + batch_size] = lp.cpu().numpy()
            idx_mm[s : s + batch_size] = idx.cpu().to(torch.int32).numpy()
    lp_mm.flush()
    idx_mm.flush()
    del lp_mm, idx_mm
    index = {
        "shape": list(shape),
        "teacher_fingerprint": teacher_fp,
        "data_fingerprint": data_fp,
        "k": k,
        "temperature": temperature,
        "logprobs_dtype": "float32",
        "indices_dtype": "int32",
    }
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1))
    try:
        os.replace(tmp, final)
    except OSError:  # another builder won the race; its entry is equivalent
        shutil.rmtree(tmp, ignore_errors=True)
    return TeacherTopkCache(final)


def open_shared(cache_dir: Path, blocks: torch.Tensor, teacher_logits_fn, *, is_main: bool,
                barrier: Callable[[], None], **key) -> TeacherTopkCache:
    """Multi-process :func:`build_or_open`: the main process builds, everyone opens after a barrier."""
    if is_main:
        build_or_open(cache_dir, blocks, teacher_logits_fn, **key)
    barrier()
    return build_or_open(cache_dir, blocks, teacher_logits_fn, build=False, **key)
