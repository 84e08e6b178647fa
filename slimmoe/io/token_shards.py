"""Reading a tokenised folder (``slimmoe tokenize``'s output) as lazy [N, seq_len] blocks.

A folder holds flat token-id shards (raw little-endian ``uint16`` / ``uint32`` files,
``<stream>-<k>.bin``) and ``index.json``, written last. Block ``b`` of a stream is tokens
``[b*T, (b+1)*T)`` of the stream's shards laid end to end; every shard but the last of a
stream holds a whole number of blocks, so a block never spans two shards.

:class:`ShardBlocks` presents a range of blocks with the part of ``torch.Tensor``'s
interface that the library uses on token blocks (``shape``, ``dim``, ``size``, ``numel``,
``split``, ``max``, indexing). Shards are opened with ``numpy.memmap`` (mode ``"r"``:
read-only pages of the file, https://numpy.org/doc/stable/reference/generated/numpy.memmap.html),
so only the rows asked for are read and resident memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from slimmoe.errors import UserError

INDEX_FILE = "index.json"
FORMAT = "slimmoe-tokens-v1"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
_REQUIRED = ("format", "num_tokens", "dtype", "seq_len", "train_blocks", "eval_blocks", "shards", "train", "eval",
             "fingerprint", "tokenizer")


def is_token_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding ``index.json`` (a tokenised corpus)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / INDEX_FILE).is_file()


def read_index(folder: str | os.PathLike) -> dict[str, Any]:
    """``folder/index.json``, checked for the fields a reader needs and for shard sizes."""
    folder = Path(folder).expanduser()
    f = folder / INDEX_FILE
    try:
        index = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{f}: cannot be read as JSON ({e.__class__.__name__})") from None
    missing = [k for k in _REQUIRED if not isinstance(index, dict) or k not in index]
    if missing:
        raise UserError(f"{f}: missing field {missing[0]!r} (not written by slimmoe tokenize?)")
    if index["format"] != FORMAT:
        raise UserError(f"{f}: format {index['format']!r} is not {FORMAT!r}")
    if index["dtype"] not in DTYPES:
        raise UserError(f"{f}: dtype {index['dtype']!r} is not one of {', '.join(DTYPES)}")
    itemsize = np.dtype(DTYPES[index["dtype"]]).itemsize
    for shard in index["shards"]:
        path = folder / shard["file"]
        size = path.stat().st_size if path.is_file() else None
        if size != shard["tokens"] * itemsize:
            found = "is missing" if size is None else f"has {size} bytes"
            raise UserError(f"{path}: {found}, {f.name} says {shard['tokens']} tokens of {index['dtype']} "
                            f"({shard['tokens'] * itemsize} bytes): truncated, or not this index's shard")
    return index


def verify_shards(folder: str | os.PathLike, index: dict[str, Any]) -> None:
    """Recompute every shard's sha256 (a full read) and compare with ``index.json``."""
    folder = Path(folder)
    for shard in index["shards"]:
        if file_sha256(folder / shard["file"]) != shard["sha256"]:
            raise UserError(f"{folder / shard['file']}: sha256 differs from {INDEX_FILE}; the shard was changed")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 hex of a file, read in chunks (no memory growth)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


def open_splits(folder: str | os.PathLike, seq_len: int | None = None, tokenizer_fp: str | None = None,
                field: str = "data") -> tuple["ShardBlocks", "ShardBlocks"]:
    """(train, eval) blocks of a tokenised folder. ``seq_len`` and ``tokenizer_fp``, when
    given, must match the index (the error names ``field`` and the index's value)."""
    folder = Path(folder).expanduser()
    index = read_index(folder)
    if seq_len is not None and int(index["seq_len"]) != int(seq_len):
        raise UserError(f"{field}: {folder} was tokenised with seq_len={index['seq_len']}, not seq_len={seq_len} "
                        f"(tokenise again with --seq-len {seq_len})")
    if tokenizer_fp is not None and index["tokenizer"] != tokenizer_fp:
        raise UserError(f"{field}: {folder} was tokenised with another tokenizer (index.json tokenizer hash "
                        f"{index['tokenizer'][:12]}..., this model's {tokenizer_fp[:12]}...)")
    return ShardBlocks(folder, index, "train"), ShardBlocks(folder, index, "eval")


@dataclass(frozen=True)
class _Shard:
    path: Path
    first_block: int  # of its stream
    blocks: int  # whole blocks in the shard
    max_token_id: int


class ShardBlocks:
    """Blocks ``[start, stop)`` of one stream of a tokenised folder, read lazily."""

    def __init__(self, folder: Path, index: dict[str, Any], split: str, start: int | None = None,
                 stop: int | None = None):
        rng = index[split]
        self.folder, self.index, self.part, self.stream = Path(folder), index, split, rng["stream"]
        self.seq_len = int(index["seq_len"])
        self.start = int(rng["start"]) if start is None else start
        self.stop = int(rng["stop"]) if stop is None else stop
        self._np_dtype = DTYPES[index["dtype"]]
        self._shards = _stream_shards(self.folder, index, self.stream, self.seq_len)
        self.fingerprint = _range_fingerprint(index, self.stream, self.start, self.stop)

    # --- the tensor-like interface
    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.stop - self.start, self.seq_len))

    @property
    def dtype(self) -> torch.dtype:
        return torch.long

    def dim(self) -> int:
        return 2

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return len(self) * self.seq_len

    def __len__(self) -> int:
        return self.stop - self.start

    def __repr__(self) -> str:
        return f"ShardBlocks({str(self.folder)!r}, {self.part}, blocks {self.start}:{self.stop} of {self.stream})"

    def head(self, n: int) -> "ShardBlocks":
        """The first ``n`` blocks, still lazy."""
        return ShardBlocks(self.folder, self.index, self.part, self.start, self.start + min(n, len(self)))

    def split_batches(self, batch_size: int) -> "_Batches":
        return _Batches(self, batch_size)

    split = split_batches  # torch.Tensor.split(batch_size) on dim 0: lazy batches

    def max(self) -> torch.Tensor:
        """Largest token id in the shards these blocks lie in (recorded at write time)."""
        ids = [s.max_token_id for s in self._shards_in(self.start, self.stop)]
        return torch.tensor(max(ids) if ids else 0, dtype=torch.long)

    def to(self, *args, **kwargs) -> torch.Tensor:
        return self[:].to(*args, **kwargs)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, tuple):  # blocks[rows, cols]: read the rows, then index the columns
            rows = self[key[0]]
            return rows[(slice(None),) + tuple(key[1:])] if rows.dim() == 2 else rows[key[1:]]
        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.dim() == 0):
            i = int(key)
            if not -len(self) <= i < len(self):
                raise IndexError(f"block {i} out of range for {len(self)} blocks")
            return self._read(np.array([i % len(self)], dtype=np.int64))[0]
        if isinstance(key, slice):
            return self._read(np.arange(len(self), dtype=np.int64)[key])
        rows = np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).reshape(-1)
        if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"block index out of range for {len(self)} blocks")
        return self._read(rows % max(len(self), 1))

    # --- internals
    def _read(self, rows: np.ndarray) -> torch.Tensor:
        """int64 [len(rows), T] of the given rows (relative to ``start``), only those read."""
        out = np.empty((rows.size, self.seq_len), dtype=np.int64)
        if rows.size == 0:
            return torch.from_numpy(out)
        absolute = rows + self.start
        firsts = np.array([s.first_block for s in self._shards], dtype=np.int64)
        which = np.searchsorted(firsts, absolute, side="right") - 1
        for k in np.unique(which):
            sel, s = np.flatnonzero(which == k), self._shards[k]
            # mapped for this read only: the pages it touched leave this process's resident set
            # when the map is dropped, so the peak follows the rows read, not the corpus
            shard = np.memmap(s.path, dtype=self._np_dtype, mode="r", shape=(s.blocks * self.seq_len,))
            out[sel] = shard.reshape(-1, self.seq_len)[absolute[sel] - s.first_block]  # copies these rows only
            del shard
        return torch.from_numpy(out)

    def _shards_in(self, start: int, stop: int) -> list[_Shard]:
        return [s for s in self._shards if s.first_block < stop and s.first_block + s.blocks > start]


class _Batches(Sequence):
    """``blocks.split(batch_size)`` of a :class:`ShardBlocks`: each batch read when asked for."""

    def __init__(self, blocks: ShardBlocks, batch_size: int):
        self.blocks, self.batch_size = blocks, int(batch_size)

    def __len__(self) -> int:
        return -(-len(self.blocks) // self.batch_size)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        if not -len(self) <= j < len(self):
            raise IndexError(j)
        s = (j % len(self)) * self.batch_size
        return self.blocks[s : s + self.batch_size]


def _stream_shards(folder: Path, index: dict[str, Any], stream: str, seq_len: int) -> list[_Shard]:
    shards, first = [], 0
    for s in index["shards"]:
        if s["stream"] != stream:
            continue
        blocks = int(s["tokens"]) // seq_len
        shards.append(_Shard(folder / s["file"], first, blocks, int(s.get("max_token_id", 0))))
        first += blocks
    return shards


def _range_fingerprint(index: dict[str, Any], stream: str, start: int, stop: int) -> str:
    """Content fingerprint of blocks [start, stop) of a stream: the index's content
    fingerprint (it covers every shard's sha256) plus the range and block length."""
    text = json.dumps({"data": index["fingerprint"], "stream": stream, "start": start, "stop": stop,
                       "seq_len": index["seq_len"], "dtype": "int64"}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
