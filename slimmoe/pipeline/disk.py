"""Disk a pipeline writes, estimated from configs (and the size of a local corpus).

The number of training blocks is not in any config. It is read from a tokenised folder's
``index.json`` (``slimmoe tokenize``: exact), else estimated from a local text corpus as
``file bytes / 4`` tokens (English text under BPE vocabularies of 32k-150k tokens
averages about 4 bytes per token; jsonl counts its keys and quoting too, so it is an
overestimate there), cut into ``data.seq_len`` blocks, the last ``data.eval_fraction``
held out as ``slimmoe.io.data.load_blocks`` does, capped by ``data.max_blocks``. Anything
else (a hub dataset, parquet, a compressed file) has no estimate: the teacher cache and
the tokenised data are then reported per million training tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

BYTES_PER_TOKEN = 4
TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".json")
TOKEN_BYTES = 8  # prepared blocks are int64 token ids
CHECKPOINT_BYTES_PER_PARAM = 12  # fp32 weights + AdamW exp_avg and exp_avg_sq
CACHE_LOGPROB_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}  # distill.teacher_cache_dtype
UINT16_VOCAB = 1 << 16  # the teacher cache stores ids as uint16 up to this vocabulary, else int32
MILLION = 1_000_000


@dataclass(frozen=True)
class DataEstimate:
    seq_len: int
    train_blocks: int | None
    eval_blocks: int | None
    how: str  # where the numbers come from

    def as_dict(self) -> dict:
        tokens = None if self.train_blocks is None else self.train_blocks * self.seq_len
        return {**asdict(self), "train_tokens": tokens}


def _index(path: Path) -> dict | None:
    f = path / "index.json"
    try:
        return json.loads(f.read_text()) if path.is_dir() and f.is_file() else None
    except (OSError, ValueError):
        return None


def _text_bytes(source: str | None) -> int | None:
    """Bytes of a local text corpus (a file, or the text files of a folder); None otherwise."""
    if not source:
        return None
    p = Path(source).expanduser()
    if p.is_file():
        return p.stat().st_size if p.suffix.lower() in TEXT_SUFFIXES else None
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES]
        return sum(f.stat().st_size for f in files) if files else None
    return None


def estimate_data(data) -> DataEstimate:
    """Train and held-out blocks of a ``DataConfig`` (module docstring); None where unknown."""
    T = data.seq_len
    index = _index(Path(data.train).expanduser())
    if index is not None and "train_blocks" in index and index.get("seq_len", T) == T:
        train = int(index["train_blocks"])
        if data.max_blocks:
            train = min(train, data.max_blocks)
        return DataEstimate(T, train, int(index.get("eval_blocks", 0)), f"{data.train}/index.json")
    size = _text_bytes(data.train)
    if size is None:
        return DataEstimate(T, None, None, f"unknown: data.train {data.train} is not a local text corpus")
    blocks = size // BYTES_PER_TOKEN // T
    if data.eval is not None:
        held = _text_bytes(data.eval)
        train, held_blocks = blocks, None if held is None else held // BYTES_PER_TOKEN // T
    else:
        n_eval = 0
        if data.eval_fraction > 0 and blocks >= 2:
            n_eval = min(blocks - 1, max(1, math.floor(blocks * data.eval_fraction + 0.5)))
        train, held_blocks = blocks - n_eval, n_eval
    if data.max_blocks:
        train = min(train, data.max_blocks)
    return DataEstimate(T, train, held_blocks,
                        f"estimated: {size:,} bytes of text at {BYTES_PER_TOKEN} bytes per token")


def distill_disk(s, d) -> dict[str, int]:
    """What a distill step leaves: checkpoints at their peak, the best state, the final model."""
    P = s.params
    ckpt = (d.keep_checkpoints + 1) * CHECKPOINT_BYTES_PER_PARAM * P if d.checkpoint_every else 0
    best = 4 * P if d.eval_every and d.keep_best else 0
    return {"checkpoints": ckpt, "best": best, "model": P * s.dtype_bytes}


def cache_bytes_per_token(d, vocab: int) -> int:
    """The teacher top-k cache per training token (slimmoe.distill.teacher_cache, format 3): topk
    log-probs in ``d.teacher_cache_dtype`` and topk ids (2 B up to 65536 tokens, else 4)."""
    return d.topk * (CACHE_LOGPROB_BYTES[d.teacher_cache_dtype] + (2 if vocab <= UINT16_VOCAB else 4))


def cache_bytes(data: DataEstimate, d, vocab: int) -> int | None:
    """The teacher cache of every training block, for the distill config ``d``."""
    return None if data.train_blocks is None else data.train_blocks * data.seq_len * cache_bytes_per_token(d, vocab)


def stage_disk(source, shape, stage, data: DataEstimate, new_cache: bool) -> dict[str, int | None]:
    """A stage's outputs: scores, pruned model, teacher cache (when this stage builds it),
    checkpoints, best state and final model (a prune-only stage's model is its pruned model)."""
    out: dict[str, int | None] = {"scores": 8 * source.score_elements}
    d = stage.distill
    if d is None:
        return {**out, "pruned": 0, "teacher_cache": 0, "checkpoints": 0, "best": 0,
                "model": shape.params * shape.dtype_bytes}
    out["pruned"] = shape.params * source.dtype_bytes
    out["teacher_cache"] = cache_bytes(data, d, shape.vocab) if new_cache else 0
    return {**out, **distill_disk(shape, d)}


def pipeline_disk(output_dir, resolved, stages, data: DataEstimate) -> dict:
    """Totals over the pipeline (``resolved``: its explicit stages, ``stages``: their plans),
    and the free space under ``output_dir``."""
    from slimmoe.resources import free_bytes

    blocks = None if data.train_blocks is None else data.train_blocks + (data.eval_blocks or 0)
    data_bytes = None if blocks is None else blocks * data.seq_len * TOKEN_BYTES
    caches = [s.disk["teacher_cache"] for s in stages]
    cache_total = None if any(c is None for c in caches) else sum(caches)
    outputs = sum(v for s in stages for k, v in s.disk.items() if k != "teacher_cache")
    known = data_bytes is not None and cache_total is not None
    total = outputs + (data_bytes or 0) + (cache_total or 0)
    free = free_bytes(output_dir)
    vocab = {s.name: s.shape.vocab for s in stages}
    per_million = {s.name: cache_bytes_per_token(s.distill, vocab[s.name]) * MILLION
                   for s in resolved if s.distill and s.distill.teacher_cache_dir}
    return {"data_bytes": data_bytes, "data_bytes_per_million_tokens": TOKEN_BYTES * MILLION,
            "stage_outputs_bytes": outputs, "teacher_cache_bytes": cache_total,
            "teacher_cache_bytes_per_million_tokens": per_million, "total_bytes": total if known else None,
            "total_known_bytes": total, "free_bytes": free, "fits": (total <= free) if known else None}
