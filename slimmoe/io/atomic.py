"""Writing files and folders so that a reader never sees half of them.

Every writer here fills a temporary sibling and renames it into place (``os.replace`` is
atomic on POSIX), after an ``fsync``. Result folders (a slimmed model, the demo teacher, a
distilled stage) carry one completion marker, :data:`COMPLETE_FILE`, written last; a
folder without it is never taken as a result (:func:`is_complete`). Temporaries left by a
killed writer are named after its pid and removed by the next writer.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from slimmoe.faults import crash_point

COMPLETE_FILE = ".complete"


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort where the OS does not allow it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file next to ``path``, then rename over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _drop_stale_temps(path)


def atomic_write_text(path: Path, text: str, point: str | None = None) -> None:
    """Write to a temporary sibling, fsync, rename over ``path``; ``point`` names a crash
    point between the two (tests)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if point:
        crash_point(point)
    os.replace(tmp, path)
    _drop_stale_temps(path)


def _drop_stale_temps(path: Path) -> None:
    """Temporary siblings of ``path`` left by killed writers (other pids)."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)


def mark_complete(folder: Path) -> None:
    """Write the completion marker; call after everything else in ``folder`` is written."""
    atomic_write_text(Path(folder) / COMPLETE_FILE, "")
    fsync_dir(Path(folder))


def is_complete(path: str | Path) -> bool:
    """A result on disk: a file that exists, or a folder holding the completion marker."""
    p = Path(path)
    return p.is_file() or (p.is_dir() and (p / COMPLETE_FILE).is_file())


@contextmanager
def replace_folder(out: Path, point: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out`` to fill; when the block succeeds the
    completion marker is written and the folder takes ``out``'s place (the old folder is
    removed only after the swap); when it fails it is deleted and ``out`` is left as it was.
    ``point`` names a :func:`~slimmoe.faults.crash_point` between filling and renaming."""
    out = Path(out)
    if out.parent.is_dir():  # leftovers of a killed writer (another pid) are never results
        for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    mark_complete(tmp)
    if point:
        crash_point(point)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def save_pretrained_atomic(model, out: Path, state_dict=None, max_shard_size: str | int | None = None) -> None:
    """save_pretrained into a temporary subfolder, then rename each file into ``out``:
    a reader never sees a half-written weights file. ``max_shard_size`` (e.g. "5GB") is the
    largest safetensors file; transformers' default when None."""
    for stale in Path(out).glob(".final.tmp-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(out) / f".final.tmp-{os.getpid()}"
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(tmp, state_dict=state_dict, **kw)
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    tmp.rmdir()
