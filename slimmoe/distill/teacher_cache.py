"""Disk store of the teacher's top-k log-probabilities per training block, written by every rank.

When the same packed data is distilled more than once (several stages, several epochs,
ablations) the teacher's output never changes, so it is computed once per key and read back
afterwards. The key hashes (format, teacher fingerprint, data fingerprint, k, temperature,
log-prob dtype); the teacher fingerprint of a checkpoint folder is computed from its files
(:func:`teacher_fingerprint`), so a run can find a complete entry (:func:`find_complete`)
without loading the teacher at all.

Layout of one entry ``<cache_dir>/<key>/``::

    index.json                  shape [N, T, k], both dtypes, the key's parts, num_parts, part_size
    part-000000.logprobs.f16    raw [rows, T, k] log-probs, rows = part_size (the last part: the rest);
                                .f16 float16 (default), .bf16 bfloat16 bits, .f32 float32
    part-000000.indices.u16     raw [rows, T, k] token ids: .u16 uint16 when the vocabulary has at
                                most 65536 entries, else .i32 int32
    part-000000.json            the part's completion marker: rows and sha256 of both data files
    part-000001.* ...

Size: k x (2 + 2) B per token in float16 / bfloat16 up to 65536 ids (32 B at k = 8), k x (2 + 4)
above, k x (4 + 4) in float32. Precision (:mod:`slimmoe.distill.topk_codec`): the float32
log-softmax is clamped at -1e4 and rounded once to nearest; a probability's relative error is
|log p| x 2^-11 in float16 (2^-8 bfloat16); float32 mode stores today's values bit for bit.
Reads convert only the rows asked for to float32 / int64. Format 2 (float32 + int32) entries
have other keys: they are not found and are rebuilt (delete their folders by hand).

Blocks are split into parts of ``part_size`` rows, a number that does not depend on the
world size, and rank r computes the parts p with ``p % world == r`` (:func:`build`). The
bytes of a part depend only on the part (its rows are run through the teacher in the same
batches whoever computes them), so an entry written by 2 ranks is byte-identical to one
written by 1. Every file is written under a temporary name, fsynced and renamed; a part's
marker is written last, so a kill loses at most the parts in flight and a new build skips
every part that has its marker. Nothing in an entry names a world size, a pid or a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from slimmoe.distill.fingerprints import (  # noqa: F401 - fingerprint_blocks, fingerprint_model: part of this API
    fingerprint_blocks,
    fingerprint_model,
    teacher_fingerprint,
)
from slimmoe.distill.topk_codec import (  # noqa: F401 - LOGPROB_FLOOR, bytes_per_token: part of this API
    INDEX_DTYPES,
    LOGPROB_DTYPES,
    LOGPROB_FLOOR,
    bytes_per_token,
    decode_logprobs,
    encode_ids,
    encode_logprobs,
    file_suffixes,
    index_dtype,
)
from slimmoe.faults import crash_point
from slimmoe.io.atomic import atomic_write_text, fsync_dir
from slimmoe.losses import teacher_topk
from slimmoe.parallel import Topology, topology
from slimmoe.parallel import barrier as dist_barrier

INDEX_FILE = "index.json"
FORMAT = "slimmoe-teacher-topk/3"  # /3: 16-bit log-probs and ids; /2: float32 + int32 parts; /1: rank 0 only
PART_SIZE = 256  # blocks per part: at seq 4096, k 8, 32 MiB of data per part in float16


# ---------------------------------------------------------------------------------------------
# fingerprints and key


def cache_key(teacher_fp: str, data_fp: str, k: int, temperature: float, logprobs_dtype: str = "float16") -> str:
    raw = json.dumps([FORMAT, teacher_fp, data_fp, int(k), float(temperature), logprobs_dtype])
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def _entry(cache_dir, blocks, teacher_fp: str, data_fp: str | None, k: int, temperature: float,
           logprobs_dtype: str, vocab_size: int | None, part_size: int = PART_SIZE) -> tuple[Path, dict]:
    """The entry folder of this key and the index a new entry gets (``indices_dtype`` None when
    the vocabulary is not known: any recorded one is accepted)."""
    if len(blocks.shape) != 2:
        raise ValueError(f"teacher cache: blocks must be [N, seq_len], got shape {tuple(blocks.shape)}")
    if part_size < 1:
        raise ValueError(f"teacher cache: part_size must be >= 1, got {part_size}")
    if logprobs_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"teacher_cache_dtype: {logprobs_dtype!r} is not one of {', '.join(LOGPROB_DTYPES)}")
    data_fp = data_fp or fingerprint_blocks(blocks)
    n, seq_len = (int(d) for d in blocks.shape)
    index = {"format": FORMAT, "shape": [n, seq_len, int(k)], "logprobs_dtype": logprobs_dtype,
             "indices_dtype": None if vocab_size is None else index_dtype(vocab_size),
             "teacher_fingerprint": teacher_fp, "data_fingerprint": data_fp,
             "k": int(k), "temperature": float(temperature), "part_size": int(part_size),
             "num_parts": math.ceil(n / part_size)}
    return Path(cache_dir) / cache_key(teacher_fp, data_fp, k, temperature, logprobs_dtype), index


_KEYED = ("format", "shape", "logprobs_dtype", "indices_dtype", "teacher_fingerprint", "data_fingerprint",
          "k", "temperature")


def _read_index(entry: Path, expected: dict) -> dict | None:
    """The entry's index.json when it is there and describes this key (its own part size)."""
    try:
        index = json.loads((entry / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return None
    if any(index.get(f) != expected[f] for f in _KEYED if expected[f] is not None) or index.get("part_size", 0) < 1:
        return None
    if index.get("logprobs_dtype") not in LOGPROB_DTYPES or index.get("indices_dtype") not in INDEX_DTYPES:
        return None
    if index.get("num_parts") != math.ceil(index["shape"][0] / index["part_size"]):
        return None
    return index


# ---------------------------------------------------------------------------------------------
# parts


def _part_name(p: int) -> str:
    return f"part-{p:06d}"


def _part_rows(index: dict, p: int) -> tuple[int, int]:
    start = p * index["part_size"]
    return start, min(start + index["part_size"], index["shape"][0])


def _part_complete(entry: Path, index: dict, p: int) -> bool:
    """The part's marker names its rows, and both data files have the size those rows need.
    Reads only the marker and two ``stat`` results."""
    name = _part_name(p)
    try:
        marker = json.loads((entry / f"{name}.json").read_text())
    except (OSError, ValueError):
        return False
    start, stop = _part_rows(index, p)
    if marker.get("part") != p or marker.get("rows") != [start, stop]:
        return False
    values = (stop - start) * index["shape"][1] * index["shape"][2]
    try:
        return all((entry / f"{name}.{suffix}").stat().st_size == values * dt.itemsize
                   for suffix, dt in file_suffixes(index))
    except OSError:
        return False


def _write_data(path: Path, chunks: list[bytes]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.writelines(chunks)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed writer of this part
        stale.unlink(missing_ok=True)


def _write_part(entry: Path, index: dict, p: int, blocks, teacher_logits_fn, batch_size: int) -> int:
    """Run the teacher over part ``p`` in batches of ``batch_size`` and write its three files,
    the marker last. Returns the number of teacher forwards."""
    start, stop = _part_rows(index, p)
    k, temperature = index["k"], index["temperature"]
    lp_chunks, idx_chunks, forwards = [], [], 0
    lp_hash, idx_hash = hashlib.sha256(), hashlib.sha256()
    for s in range(start, stop, batch_size):
        logits = teacher_logits_fn(blocks[s : min(s + batch_size, stop)])
        forwards += 1
        lp, idx = teacher_topk(logits, k=k, temperature=temperature)
        lp_chunks.append(encode_logprobs(lp, index["logprobs_dtype"]))
        idx_chunks.append(encode_ids(idx, index["indices_dtype"], logits.shape[-1]))
        lp_hash.update(lp_chunks[-1])
        idx_hash.update(idx_chunks[-1])
        del logits, lp, idx
    name = _part_name(p)
    (lp_suffix, _), (idx_suffix, _) = file_suffixes(index)
    _write_data(entry / f"{name}.{lp_suffix}", lp_chunks)
    _write_data(entry / f"{name}.{idx_suffix}", idx_chunks)
    fsync_dir(entry)
    crash_point("teacher_cache:data", part=p)  # data renamed into place, marker not yet written
    marker = {"part": p, "rows": [start, stop],
              "logprobs_sha256": lp_hash.hexdigest(), "indices_sha256": idx_hash.hexdigest()}
    atomic_write_text(entry / f"{name}.json", json.dumps(marker, sort_keys=True) + "\n")
    fsync_dir(entry)
    crash_point("teacher_cache:part", part=p)  # part complete
    return forwards


# ---------------------------------------------------------------------------------------------
# reading


class TeacherTopkCache:
    """Read-only view of one complete cache entry; each part's files are memory-mapped on first
    use, and only the rows asked for are read and converted (to float32 and int64). At most
    ``OPEN_PARTS`` parts stay mapped (least recently used first out): a cache of a corpus
    far larger than RAM has tens of thousands of parts, two open files each."""

    OPEN_PARTS = 64

    def __init__(self, path: Path, index: dict | None = None):
        self.path = Path(path)
        self.index = index if index is not None else json.loads((self.path / INDEX_FILE).read_text())
        self._parts: OrderedDict[int, tuple[np.memmap, np.memmap]] = OrderedDict()

    def __len__(self) -> int:
        return self.index["shape"][0]

    def _part(self, p: int) -> tuple[np.memmap, np.memmap]:
        if p in self._parts:
            self._parts.move_to_end(p)
            return self._parts[p]
        start, stop = _part_rows(self.index, p)
        shape = (stop - start, *self.index["shape"][1:])
        name = _part_name(p)
        self._parts[p] = tuple(np.memmap(self.path / f"{name}.{suffix}", dtype=dt, mode="r", shape=shape)
                               for suffix, dt in file_suffixes(self.index))
        while len(self._parts) > self.OPEN_PARTS:
            self._parts.popitem(last=False)  # numpy closes the map when its last view goes
        return self._parts[p]

    def get(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k log-probs (float32) and token ids (int64) of the given block rows, [b, T, k]."""
        r = np.asarray(rows.cpu().numpy() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64).reshape(-1)
        n, seq_len, k = self.index["shape"]
        if r.size and (r.min() < 0 or r.max() >= n):
            raise IndexError(f"teacher cache {self.path}: rows must be in 0..{n - 1}")
        lp = np.empty((r.size, seq_len, k), dtype=np.float32)
        idx = np.empty((r.size, seq_len, k), dtype=np.int64)
        parts = r // self.index["part_size"]
        for p in np.unique(parts).tolist():
            sel = np.nonzero(parts == p)[0]
            local = r[sel] - p * self.index["part_size"]
            lp_mm, idx_mm = self._part(p)
            lp[sel] = decode_logprobs(lp_mm[local], self.index["logprobs_dtype"])
            idx[sel] = idx_mm[local]
        return torch.from_numpy(lp), torch.from_numpy(idx)

    def verify(self) -> bool:
        """Re-hash every part's data against its marker (reads the whole entry)."""
        for p in range(self.index["num_parts"]):
            name = _part_name(p)
            marker = json.loads((self.path / f"{name}.json").read_text())
            for (suffix, _), field in zip(file_suffixes(self.index), ("logprobs_sha256", "indices_sha256")):
                if hashlib.sha256((self.path / f"{name}.{suffix}").read_bytes()).hexdigest() != marker[field]:
                    return False
        return True


def _open_if_complete(entry: Path, expected: dict) -> TeacherTopkCache | None:
    index = _read_index(entry, expected)
    if index is None or not all(_part_complete(entry, index, p) for p in range(index["num_parts"])):
        return None
    return TeacherTopkCache(entry, index)


def _all_reduce_int(value: int, op, topo: Topology | None) -> int:
    """``value`` reduced over every rank (collective; ``value`` itself with one process)."""
    if topo is None or topo.world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return value
    device = torch.device("cpu") if dist.get_backend() == "gloo" else topo.device
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=op)
    return int(t.item())


def find_complete(cache_dir, blocks, *, teacher_fp: str, k: int, temperature: float,
                  logprobs_dtype: str = "float16", vocab_size: int | None = None, data_fp: str | None = None,
                  topo: Topology | None = None) -> TeacherTopkCache | None:
    """The entry of this key, opened, if its index and every part's marker are there; else None.

    Reads only small files (index.json, the part markers, ``stat`` of the data files).
    ``data_fp``, when given, replaces hashing ``blocks``; ``vocab_size``, when given, must
    match the entry's id dtype (else any is accepted). With ``topo`` of more than one
    process this is a collective (every rank calls it) and the answer is the same on every
    rank: the cache only when every rank found it complete. Without ``topo`` each rank
    decides alone, which can differ between ranks while another rank is already building,
    so a multi-process caller that decides whether to call :func:`build` must pass ``topo``.
    """
    entry, expected = _entry(cache_dir, blocks, teacher_fp, data_fp, k, temperature, logprobs_dtype, vocab_size)
    cache = _open_if_complete(entry, expected)
    if _all_reduce_int(int(cache is not None), dist.ReduceOp.MIN, topo) == 0:
        return None
    return cache


# ---------------------------------------------------------------------------------------------
# building


def build(cache_dir, blocks, teacher_logits_fn: Callable[[torch.Tensor], torch.Tensor], *,
          teacher_fp: str, k: int, temperature: float, batch_size: int, topo: Topology,
          logprobs_dtype: str = "float16", vocab_size: int | None = None, data_fp: str | None = None,
          part_size: int = PART_SIZE, lockstep: bool = False,
          barrier: Callable[[], None] | None = None) -> TeacherTopkCache:
    """Build (or finish) the entry of this key and open it. Collective: every rank calls it
    with the same ``blocks`` (all of them, not a rank's share).

    ``teacher_logits_fn(ids [b, T]) -> logits [b, T, V]`` runs the teacher. Rank r computes
    the parts p with ``p % topo.world == topo.rank`` that have no marker yet, then waits at
    one barrier (``barrier``, default torch.distributed's) for the others, then opens the
    whole entry. ``part_size`` applies to a new entry; a partial one keeps its own.
    ``logprobs_dtype`` (part of the key) is how log-probs are stored; ``vocab_size`` (the
    teacher's logits per position) picks the ids' dtype of a new entry: uint16 up to 65536,
    else int32 (int32 too when None). ``blocks`` is a [N, T] tensor or any object with
    ``shape``, slicing to int64 tensors and a ``fingerprint`` (:func:`fingerprint_blocks`).

    A teacher that fits one device is replicated per rank: its forwards are independent,
    and no collective runs before the final barrier. A sharded teacher's forward (FSDP) is
    itself a collective, so every rank must run the same number of teacher forwards: pass
    ``lockstep=True``, and the ranks agree on the largest number of forwards any rank needs
    (one all-reduce at the start) and the ranks with fewer run the first batch again,
    discarding the output, until they have run as many.
    """
    if batch_size < 1:
        raise ValueError(f"teacher cache: batch_size must be >= 1, got {batch_size}")
    entry, index = _entry(cache_dir, blocks, teacher_fp, data_fp, k, temperature, logprobs_dtype, vocab_size,
                          part_size)
    entry.mkdir(parents=True, exist_ok=True)
    existing = _read_index(entry, index)
    if existing is not None:  # a partial entry keeps its part size (and, without vocab_size, its id dtype)
        index = existing
    elif index["indices_dtype"] is None:
        index["indices_dtype"] = "int32"
    if existing is None and topo.is_main:  # one writer: rank 0
        atomic_write_text(entry / INDEX_FILE, json.dumps(index, indent=1, sort_keys=True) + "\n")
        fsync_dir(entry)
    todo = [p for p in range(topo.rank, index["num_parts"], topo.world) if not _part_complete(entry, index, p)]
    needed = sum(math.ceil((b - a) / batch_size) for a, b in (_part_rows(index, p) for p in todo))
    total = _all_reduce_int(needed, dist.ReduceOp.MAX, topo) if lockstep else needed
    done = 0
    with torch.no_grad():
        for p in todo:
            done += _write_part(entry, index, p, blocks, teacher_logits_fn, batch_size)
        for _ in range(total - done):  # lockstep padding: the same forward again, output dropped
            teacher_logits_fn(blocks[:batch_size])
    if topo.world > 1:
        (barrier or dist_barrier)()
    cache = _open_if_complete(entry, index)
    if cache is None:
        missing = [p for p in range(index["num_parts"]) if not _part_complete(entry, index, p)]
        raise RuntimeError(f"teacher cache {entry}: parts {missing[:8]} are missing after every rank built its share")
    return cache


def open_shared(cache_dir: Path, blocks, teacher_logits_fn, *, is_main: bool,
                barrier: Callable[[], None], **key) -> TeacherTopkCache:
    """Compatibility wrapper (collective): open the complete entry, or build it with every rank.
    ``is_main`` is implied by the process group; ``key`` holds teacher_fp, k, temperature, batch_size
    and optionally logprobs_dtype, vocab_size."""
    topo = topology()
    batch_size = key.pop("batch_size")
    cache = find_complete(cache_dir, blocks, topo=topo, **key)
    if cache is not None:
        return cache
    return build(cache_dir, blocks, teacher_logits_fn, batch_size=batch_size, topo=topo, barrier=barrier, **key)
