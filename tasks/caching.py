"""When a step may be skipped: the same inputs, the same task code, the same library code.

A step's cache key (:func:`step_policy`) hashes

* its inputs by what they *are* (:class:`StepInputs`): a step record
  (``slimmoe.pipeline.steps.refs``) by its content fingerprint and counts, never by the
  path it lies at; a settings model by its fields; an output ``Path`` made absolute. So a
  run from ``slimmoe run`` and one from a work pool (another working directory, relative
  instead of absolute paths, another environment) compute the same keys. MLflow run ids,
  tracking settings and the number of processes (``launch``: N processes compute the same
  result as one, up to float reassociation) are left out;
* the task function's source (Prefect's ``TASK_SOURCE``);
* the source of every slimmoe module the task can reach (:class:`LibraryCode`), computed
  from the code by ``tasks.code_reach``, not listed by hand.

Keys and results are stored under ``<output_dir>/.prefect-cache``, so they hold across
flow runs, and deleting the output folder forgets them with the outputs they point to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from types import SimpleNamespace
from typing import Any

from prefect.cache_policies import TASK_SOURCE, CachePolicy
from pydantic import BaseModel

from tasks.code_reach import code_hash, reached_modules

NOT_CACHE_INPUTS = ("run_id", "tracking", "launch")
logger = logging.getLogger("slimmoe")


def cache_identity(value: Any) -> Any:
    """The JSON-able part of a task input that decides its result (see the module docstring)."""
    if hasattr(value, "cache_identity"):
        return cache_identity(value.cache_identity())
    if isinstance(value, BaseModel):
        return cache_identity(value.model_dump(mode="json"))
    if isinstance(value, PurePath):
        return os.path.normpath(Path(value).absolute())
    if isinstance(value, dict):
        return {str(k): cache_identity(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [cache_identity(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cache key: a task input of type {type(value).__name__} has no stable identity")


@dataclass
class StepInputs(CachePolicy):
    """Hash of the inputs' :func:`cache_identity`, ``exclude`` left out."""

    exclude: tuple[str, ...] = NOT_CACHE_INPUTS

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs: Any) -> str:
        ident = {k: cache_identity(v) for k, v in sorted((inputs or {}).items()) if k not in self.exclude}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


@dataclass
class LibraryCode(CachePolicy):
    """Hash of the source files of every slimmoe module the task function can reach."""

    _reached: dict = field(default_factory=dict, repr=False, compare=False)

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs: Any) -> str:
        fn = task_ctx.task.fn
        if fn not in self._reached:
            self._reached[fn] = reached_modules(fn)
        return code_hash(self._reached[fn])


def step_policy() -> CachePolicy:
    return StepInputs() + TASK_SOURCE + LibraryCode()


def step_key(task, **inputs: Any) -> str:
    """The cache key ``task`` gets for ``inputs``, computed as Prefect computes it."""
    return task.cache_policy.compute_key(task_ctx=SimpleNamespace(task=task), inputs=inputs, flow_parameters={})


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


def open_step_cache(output_dir: str | Path) -> Path:
    """Create the pipeline's cache folder and drop the records a crash left unreadable
    (:func:`drop_broken_records`); flows call this once before their first cached step."""
    where = cache_dir(output_dir)
    where.mkdir(parents=True, exist_ok=True)
    drop_broken_records(where)
    return where


def cached(task, output_dir: str | Path, *outputs: str | Path, refresh: bool = False):
    """``task`` with its results and cache keys stored under ``output_dir``'s cache, and
    recomputed instead of served from the cache when an output its result names is not
    complete (a file that is gone, or a folder without its completion marker): a cached
    result is a record that points at files, and deleting a stage folder (but not the
    cache), or a crash that left a folder half written, must not hand a missing or partial
    path to the next step."""
    from slimmoe.io.atomic import is_complete

    where = cache_dir(output_dir)
    policy = task.cache_policy.configure(key_storage=where / "keys")
    refresh = refresh or not all(is_complete(p) for p in outputs)
    return task.with_options(result_storage=where / "results", cache_policy=policy, persist_result=True,
                             refresh_cache=refresh)
