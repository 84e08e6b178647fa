"""Speed and memory: forward throughput, greedy-generation throughput, peak memory.

Peak memory (``PeakMemory``) is the model's own weights plus the largest growth of
working memory seen while the block runs, so models can be compared whatever else the
process holds (a teacher, the data, the Python runtime):

* CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` at the start
  (exact, tensors only; the caching allocator's reserve is not counted).
* CPU: the process's resident set size (RSS) sampled every few milliseconds by a
  thread, minus the RSS at the start. A sample can miss a peak shorter than the
  interval, and memory the allocator kept from earlier work is reused without growth,
  so on CPU this is a lower bound of the working memory.
"""

from __future__ import annotations

import math
import os
import threading
import time

import torch
import torch.nn as nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def tokens_per_second(model: nn.Module, batch: torch.Tensor, repeats: int = 3) -> float:
    """Forward-pass throughput on one batch: best of ``repeats`` timed runs after a warm-up."""
    was_training = model.training
    model.eval()
    batch = batch.to(next(model.parameters()).device)
    model(input_ids=batch)
    best = math.inf
    for _ in range(repeats):
        _sync(batch.device)
        t0 = time.perf_counter()
        model(input_ids=batch)
        _sync(batch.device)
        best = min(best, time.perf_counter() - t0)
    model.train(was_training)
    return batch.numel() / best


def rows(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows of ``blocks``, cycling through them when there are fewer."""
    if blocks.shape[0] == 0:
        raise ValueError("need at least one block")
    idx = torch.arange(n) % blocks.shape[0]
    return blocks[idx]


@torch.no_grad()
def forward_throughput(model: nn.Module, blocks: torch.Tensor, batch_size: int, repeats: int = 3) -> float:
    """Tokens per second of one forward pass over ``batch_size`` full blocks (best of ``repeats``)."""
    return tokens_per_second(model, rows(blocks, batch_size), repeats=repeats)


def _max_positions(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


@torch.no_grad()
def generation_throughput(model: nn.Module, prompts: torch.Tensor, new_tokens: int, batch_size: int,
                          warmup_tokens: int = 2) -> dict:
    """Greedy ``generate`` of exactly ``new_tokens`` per sequence with the KV cache, after a
    short warm-up; prompts are the first columns of ``batch_size`` rows of ``prompts``.

    Returns ``tokens`` (new tokens generated in all, batch_size x new_tokens), ``seconds``
    and ``tokens_per_second``. The prompt is cut so prompt + new tokens fit the model's
    maximum positions.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    limit = _max_positions(model)
    plen = prompts.shape[1] if limit is None else max(1, min(prompts.shape[1], limit - new_tokens))
    ids = rows(prompts, batch_size)[:, :plen].to(device)
    mask = torch.ones_like(ids)
    pad = model.config.pad_token_id if getattr(model.config, "pad_token_id", None) is not None else 0
    # min_new_tokens = max_new_tokens: an end-of-sequence token never stops a row early.
    kw = dict(attention_mask=mask, do_sample=False, use_cache=True, pad_token_id=pad)
    w = min(warmup_tokens, new_tokens)
    model.generate(ids, max_new_tokens=w, min_new_tokens=w, **kw)
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    _sync(device)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    tokens = int((out.shape[1] - ids.shape[1]) * out.shape[0])
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}


def _rss_bytes() -> int | None:
    """Resident set size of this process, or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - psutil is optional
        return None


def resident_bytes(model: nn.Module) -> int:
    """Bytes the parameters and buffers occupy in memory (tied tensors once); compare
    ``slimmoe.resources.state_dict_bytes``, the bytes a checkpoint of it takes on disk."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class PeakMemory:
    """Context manager: ``growth`` is the peak working-memory growth inside the block, in
    bytes (see the module docstring for what is measured on CUDA and CPU); None when
    the platform offers no way to read it."""

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.002):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.growth: int | None = None
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._start = _rss_bytes()
        self._peak = self._start
        if self._start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.growth = int(torch.cuda.max_memory_allocated(self.device) - self._start)
            return
        if self._start is None:
            return
        self._stop.set()
        self._thread.join()
        last = _rss_bytes() or 0
        self.growth = int(max(self._peak, last) - self._start)


def throughput_metrics(model: nn.Module, blocks: torch.Tensor, batch_sizes, generation_tokens: int = 0,
                       prompt_tokens: int = 32) -> dict:
    """``forward_tokens_per_second_b{n}`` for every n, and ``generate_tokens_per_second_b{n}``
    when ``generation_tokens`` > 0 (prompts: the first ``prompt_tokens`` of the blocks)."""
    out = {}
    for n in batch_sizes:
        out[f"forward_tokens_per_second_b{n}"] = forward_throughput(model, blocks, n)
    if generation_tokens > 0:
        prompts = blocks[:, : max(1, min(prompt_tokens, blocks.shape[1]))]
        for n in batch_sizes:
            g = generation_throughput(model, prompts, generation_tokens, n)
            out[f"generate_tokens_per_second_b{n}"] = g["tokens_per_second"]
    return out
