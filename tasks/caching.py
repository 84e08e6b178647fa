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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

NOT_CACHE_INPUTS = ("run_id", "tracking")


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


def bind_cache(task, output_dir: str | Path, refresh: bool = False):
    """The task with its results and cache keys stored under the pipeline's output folder."""
    where = cache_dir(output_dir)
    where.mkdir(parents=True, exist_ok=True)
    policy = task.cache_policy.configure(key_storage=where / "keys") if hasattr(task.cache_policy, "configure") else task.cache_policy
    return task.with_options(result_storage=where / "results", cache_policy=policy, persist_result=True,
                             refresh_cache=refresh)
