"""Documents -> token ids, in order, in this process or in worker processes.

:class:`Encoder` tokenises batches of texts with the same call and options as
``slimmoe.io.data.load_blocks`` (no special tokens added); with ``num_proc`` > 1 the batches
go to forked worker processes (``concurrent.futures.ProcessPoolExecutor``) with a bounded
number in flight, and come back in submission order, so the output does not depend on
``num_proc``. :func:`join_with_eos` joins documents as ``load_blocks`` does.

Why not ``Dataset.map(num_proc=N)``: it needs a map-style dataset (the whole corpus
converted to Arrow on disk first) and writes a second Arrow copy of every token id; a
streamed ``IterableDataset`` has no ``num_proc`` in ``map``. Splitting the document stream
over worker processes serves both, and the shards are the only copy written.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator

import numpy as np

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    from transformers import AutoTokenizer

    _WORKER_TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_dir)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_texts(_WORKER_TOKENIZER, texts)


def encode_texts(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(all ids of the batch as one uint32 array, each document's length); the call and its
    options are ``load_blocks``' (no special tokens added)."""
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=int(lengths.sum()))
    return flat, lengths


class Encoder:
    """Tokenises batches in order: in this process, or in ``num_proc`` forked workers with
    at most ``2 * num_proc`` batches in flight (bounded memory, results in submission order)."""

    def __init__(self, tokenizer, tokenizer_dir: str, num_proc: int, batch_size: int):
        self.tokenizer, self.pool, self.window, self.batch_size = tokenizer, None, 2 * num_proc, batch_size
        if num_proc > 1:
            ctx = multiprocessing.get_context("fork")
            self.pool = ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_init_worker,
                                            initargs=(str(tokenizer_dir),))

    def map(self, batches: Iterator[tuple[int, list[str]]]) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """(first document index, documents, flat ids, lengths) per batch, in order."""
        if self.pool is None:
            for first, texts in batches:
                yield (first, len(texts), *encode_texts(self.tokenizer, texts))
            return
        pending: deque = deque()
        for first, texts in batches:
            pending.append((first, len(texts), self.pool.submit(_encode_in_worker, texts)))
            if len(pending) >= self.window:
                f, n, fut = pending.popleft()
                yield (f, n, *fut.result())
        while pending:
            f, n, fut = pending.popleft()
            yield (f, n, *fut.result())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def skip_documents(batches: Iterator[list[str]], skip: int) -> Iterator[tuple[int, list[str]]]:
    """(index of the first document, texts) per batch, leaving out the first ``skip`` documents."""
    base = 0
    for texts in batches:
        n = len(texts)
        if base + n > skip:
            lo = max(0, skip - base)
            yield base + lo, texts[lo:]
        base += n


def join_with_eos(flat: np.ndarray, lengths: np.ndarray, eos, seen_text: bool) -> tuple[np.ndarray, np.ndarray]:
    """(token sequence with EOS before every non-empty document but the corpus's first,
    where each document's part starts). Same sequence as ``load_blocks``' ``x + [eos]`` per
    non-empty document with the final EOS dropped."""
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64) if lengths.size else lengths
    if eos is None:
        return flat, starts
    gets_eos = lengths > 0
    if not seen_text and gets_eos.any():
        gets_eos[np.argmax(gets_eos)] = False  # the corpus's first non-empty document
    seq = np.insert(flat, starts[gets_eos], np.uint32(eos))
    before = np.concatenate(([0], np.cumsum(gets_eos)[:-1])) if lengths.size else lengths
    return seq, starts + before
