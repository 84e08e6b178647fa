"""Content fingerprints of checkpoint folders and files: what a result *is*, cheaply.

A fingerprint names a result in cache keys and records; it changes when a file's bytes
change. Files over 64 MiB (real checkpoints' shards) are hashed by size and their first and
last MiB, which keeps fingerprinting an 80 GB teacher to seconds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_BIG = 64 << 20  # files larger than this are fingerprinted by size + head + tail


def folder_fingerprint(path: str | Path) -> str:
    """Content hash of a checkpoint folder: names and bytes of its top-level files."""
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


def file_fingerprint(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:24]
