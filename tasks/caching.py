"""When a step may be skipped: same settings, same input fingerprints, same code.

The cache key of a step hashes its inputs (paths, content fingerprints and settings as
plain dicts; MLflow run ids and tracking settings are excluded), the source of the task
function, and the source of the library modules that do the work. Keys and results are
stored under ``<output_dir>/.prefect-cache``, so they hold across flow runs, and deleting
the output folder forgets them together with the outputs they point to.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

NOT_CACHE_INPUTS = ("run_id", "tracking")
logger = logging.getLogger("slimmoe")


@dataclass
class LibraryCode(CachePolicy):
    """Hash of the source files of the library modules a step calls."""

    modules: tuple[str, ...] = field(default_factory=tuple)

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs: Any) -> str:
        h = hashlib.sha256()
        for name in sorted(self.modules):
            h.update(name.encode())
            h.update(inspect.getsource(importlib.import_module(name)).encode())
        return h.hexdigest()


def step_policy(*modules: str) -> CachePolicy:
    policy = INPUTS + TASK_SOURCE + LibraryCode(modules=tuple(modules))
    for name in NOT_CACHE_INPUTS:
        policy = policy - name
    return policy


def cache_dir(output_dir: str | Path) -> Path:
    return Path(output_dir).resolve() / ".prefect-cache"


def drop_broken_records(where: Path) -> list[Path]:
    """Delete cache records that cannot be read back; returns the key files removed.

    Prefect writes a record as two plain (non-atomic) files, the result under
    ``results/`` and then its metadata under ``keys/``. A kill while it writes leaves a
    torn file: torn metadata already reads as a cache miss, but torn result bytes behind
    intact metadata would fail the cached step on the next run. Removing such a record
    turns it into a miss, so the step is recomputed.
    """
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata

    removed = []
    keys = Path(where) / "keys"
    for key in sorted(keys.iterdir()) if keys.is_dir() else []:
        if not key.is_file():
            continue
        result_file = None
        try:
            meta_bytes = key.read_bytes()
            meta = ResultRecordMetadata.load_bytes(meta_bytes)
            result_file = Path(meta.storage_key) if meta.storage_key else None
            if result_file is not None and not result_file.is_absolute():
                result_file = Path(where) / "results" / result_file
            ResultRecord.deserialize_from_result_and_metadata(result=result_file.read_bytes(), metadata=meta_bytes)
        except Exception as e:  # noqa: BLE001 - anything unreadable is a miss
            logger.warning("dropping unreadable cache record %s (%s: %s)", key.name, type(e).__name__,
                           str(e).splitlines()[0][:120] if str(e) else "")
            key.unlink(missing_ok=True)
            if result_file is not None:
                result_file.unlink(missing_ok=True)
            removed.append(key)
    return removed


def bind_cache(task, output_dir: str | Path, refresh: bool = False):
    """The task with its results and cache keys stored under the pipeline's output folder
    (records that a crash left unreadable are dropped first, see :func:`drop_broken_records`)."""
    where = cache_dir(output_dir)
    where.mkdir(parents=True, exist_ok=True)
    drop_broken_records(where)
    policy = task.cache_policy.configure(key_storage=where / "keys") if hasattr(task.cache_policy, "configure") else task.cache_policy
    return task.with_options(result_storage=where / "results", cache_policy=policy, persist_result=True,
                             refresh_cache=refresh)
