"""How steps name a checkpoint to each other: its path and a content fingerprint."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BIG = 64 << 20  # files larger than this are fingerprinted by size + head + tail


def folder_fingerprint(path: str | Path) -> str:
    """Content hash of a checkpoint folder: names and bytes of its top-level files.

    Files over 64 MiB (real checkpoints' shards) are hashed by size and their first and
    last MiB, which keeps fingerprinting a 80 GB teacher to seconds.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).iterdir() if p.is_file()):
        h.update(f.name.encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            if size <= _BIG:
                h.update(fh.read())
            else:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.hexdigest()[:24]


def model_ref(path: str | Path) -> dict:
    """A local checkpoint as tasks pass it around: path + fingerprint."""
    p = Path(path)
    fp = folder_fingerprint(p) if p.is_dir() else hashlib.sha256(str(path).encode()).hexdigest()[:24]
    return {"path": str(path), "fingerprint": fp}
