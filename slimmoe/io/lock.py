"""One writer per output folder: an advisory ``fcntl.flock`` on ``<folder>/.slimmoe.lock``.

The OS drops a flock when its holder exits for any reason (SIGKILL included), so a crashed
run never leaves the folder locked; the file itself stays and only says who held it last.
The holder writes its pid, host and start time into the file so a refused run can name it.

    with output_lock(out_dir, what="slimmoe run"):
        ...  # only one process at a time gets here for the same folder
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from slimmoe.errors import UserError
from slimmoe.io.atomic import atomic_write_text

LOCK_FILE = ".slimmoe.lock"


class FolderLocked(UserError):
    """Another live process holds the folder's lock."""


def read_holder(folder: str | os.PathLike) -> dict:
    """What the lock file says about its (last) holder; {} when absent or unreadable."""
    try:
        return json.loads((Path(folder) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}


_HELD: set[Path] = set()  # folders this process holds


@contextmanager
def output_lock(folder: str | os.PathLike, what: str = "slimmoe", reentrant: bool = False) -> Iterator[Path]:
    """Hold the lock of ``folder`` (created if missing) for the ``with`` block.

    Raises :class:`FolderLocked` (a UserError: exit 2) naming the folder and the holder's
    pid at once, without waiting, when another holder has it. ``reentrant``: a folder this
    process already holds is entered without locking again (a flow started by `slimmoe run`,
    which holds the lock, takes it itself when a work pool starts it).
    """
    folder = Path(folder)
    key = folder.resolve()
    if reentrant and key in _HELD:
        yield folder / LOCK_FILE
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"output_dir: cannot create the lock file in {folder} ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            h = read_holder(folder)
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["started"])) if "started" in h else "?"
            raise FolderLocked(
                f"output_dir: {folder} is in use by another run (pid {h.get('pid', '?')} on {h.get('host', '?')}, "
                f"{h.get('command', 'slimmoe')}, since {since}); wait for it to finish or use another output_dir"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _HELD.add(key)
        try:
            yield folder / LOCK_FILE
        finally:
            _HELD.discard(key)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


MARKER_FILE = ".slimmoe-pipeline.json"
_OWN_FILES = {LOCK_FILE, MARKER_FILE}


def check_output_owner(folder: str | os.PathLike, name: str, force: bool = False) -> None:
    """Refuse an output folder that holds another pipeline's results, unless ``force``.

    Another pipeline's: its marker names a different pipeline, or it has no marker and is
    not empty. Reads only; writes nothing.
    """
    folder = Path(folder)
    if force or not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"output_dir: {folder} exists and is not a folder")
    owner = _owner(folder)
    if owner is not None:
        if owner != name:
            raise UserError(f"output_dir: {folder} holds the results of pipeline {owner!r}, not {name!r}; "
                            "use another output_dir, or pass --force to write into it anyway")
    elif any(p.name not in _OWN_FILES for p in folder.iterdir()):
        raise UserError(f"output_dir: {folder} is not empty and was not written by slimmoe run; "
                        "use another output_dir, or pass --force to write into it anyway")


def _owner(folder: Path) -> str | None:
    """The pipeline named by the marker, or by summary.json in folders written before markers existed."""
    for name in (MARKER_FILE, "summary.json"):
        try:
            owner = json.loads((folder / name).read_text()).get("name")
        except (OSError, ValueError, AttributeError):
            continue
        return str(owner)
    return None


def write_output_owner(folder: str | os.PathLike, name: str, teacher: str) -> None:
    """Mark ``folder`` as the output of pipeline ``name`` (atomically: temp file + rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / MARKER_FILE, json.dumps({"name": name, "teacher": str(teacher)}, indent=1))
