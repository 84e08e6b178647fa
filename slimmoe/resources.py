"""Disk-space checks before large writes, and out-of-memory errors that say what to lower.

Both end as a :class:`ResourceError` (a ``UserError``: the CLI prints one ``error:`` line
and exits 2): running out of disk or memory is fixed by the user, not by a retry.
"""

from __future__ import annotations

import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from slimmoe.errors import UserError

GIB = float(1 << 30)
MARGIN = 1.10  # serialisation overhead, config/tokenizer files, filesystem slack
MIN_EXTRA = 16 << 20  # at least 16 MiB beyond the payload

# What to lower when a stage runs out of memory (config paths as users write them).
OOM_SETTINGS = {
    "distill": ("distill.micro_batch_size", "distill.chunk_size", "distill.gradient_checkpointing: true",
                "distill.eval_batch_size"),
    "importance": ("importance.batch_size", "importance.seq_len"),
    "eval": ("eval.batch_size", "eval.throughput_batch_sizes", "eval.generation: false"),
    "slim": (),
}
_CPU_OOM = ("not enough memory", "defaultcpuallocator: can't allocate", "out of memory")


class ResourceError(UserError):
    """Not enough disk space or memory for the requested work."""


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-z]*)\s*$")


def parse_size(text: str | int, field: str = "size") -> int:
    """Bytes of a size as users write it: ``85899345920``, ``80GiB`` (2**30), ``80GB`` (10**9),
    ``80G`` (= GiB, as ``docker --memory``), ``1.5TiB``; units are case-insensitive.
    Anything else, or a size below one byte, is a UserError naming ``field``."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _SIZE.match(str(text).lower())
        if not m or m.group(2) not in _SIZE_UNITS:
            raise UserError(f"{field}: expected a size like 80GiB, 80GB or 85899345920, got {text!r}")
        value, unit = float(m.group(1)), m.group(2)
    n = int(value * _SIZE_UNITS[unit])
    if n < 1:
        raise UserError(f"{field}: must be at least one byte, got {text!r}")
    return n


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside nested dicts/lists/tuples (state dicts, optimizer states)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Bytes ``save_pretrained`` writes for the weights (parameters and persistent buffers);
    compare ``slimmoe.evaluation.speed.resident_bytes``, what they occupy in memory."""
    return tensor_bytes(dict(model.state_dict()))


def _existing_ancestor(path: Path) -> Path:
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | Path) -> int:
    return shutil.disk_usage(_existing_ancestor(Path(path))).free


def check_disk(path: str | Path, needed: int, *, margin: float = MARGIN) -> None:
    """Raise ``ResourceError`` naming ``path`` when its filesystem cannot hold ``needed`` bytes."""
    want = int(needed * margin) + MIN_EXTRA
    free = free_bytes(path)
    if free < want:
        raise ResourceError(f"{path}: needs ~{want / GIB:.2f} GiB free, {free / GIB:.2f} GiB available")


def is_oom(exc: BaseException) -> bool:
    """torch's device OOM, or the CPU allocator's failure (a RuntimeError whose text says so)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or any(s in str(exc).lower() for s in _CPU_OOM))


def oom_error(exc: BaseException, stage: str, current: dict[str, Any] | None = None) -> ResourceError:
    """One line: where it ran out, the allocator's first line, the settings to lower."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    settings = []
    for s in OOM_SETTINGS.get(stage, ()):
        key = s.split(":")[0].split(".")[-1]
        now = (current or {}).get(key)
        settings.append(f"{s} (now {now})" if now is not None and ":" not in s else s)
    hint = f"; lower {', '.join(settings)}" if settings else "; use a machine with more memory"
    return ResourceError(f"{stage}: out of memory ({first}){hint}")


@contextmanager
def oom_hint(stage: str, current: dict[str, Any] | None = None) -> Iterator[None]:
    """Turn an out-of-memory error inside the block into a ``ResourceError`` naming the settings."""
    try:
        yield
    except ResourceError:
        raise
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not is_oom(e):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise oom_error(e, stage, current) from None
