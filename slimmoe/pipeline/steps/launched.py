"""A pipeline step across several processes: the parent writes what to call and with which
arguments to a spec file, starts ``python -m slimmoe.pipeline.steps.launched SPEC RESULT``
under torchrun (``slimmoe.parallel.launch``), waits, and reads back rank 0's result.

Every rank joins the process group and calls the same step function with the same
arguments (rebuilt from JSON through the function's type hints, so a ``DistillConfig`` is a
``DistillConfig`` again); the step itself splits the work (sharded model, batches split
over ranks). Rank 0 writes the returned record. Training metrics, which in one process go
to a callback, are appended to ``metrics_file`` by rank 0 for the parent to follow.

The step function is named by ``module:qualname`` and imported only in the child, so this
module imports no step: what a task can reach (its cache key) stays the step it runs.
"""

from __future__ import annotations

import importlib
import json
import sys
import typing
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, TypeAdapter

from slimmoe.config import LaunchConfig
from slimmoe.errors import UserError
from slimmoe.io.atomic import atomic_write_text

MetricsCallback = Callable[[int, dict[str, float]], None]


def write_spec(fn: Callable[..., BaseModel], kwargs: dict[str, Any], work_dir: str | Path,
               metrics_file: str | Path | None = None) -> tuple[Path, Path]:
    """Write what every process will call, ``fn(**kwargs)``; returns (spec file, result file).
    ``metrics_file`` receives ``{"step": s, ...metrics}`` lines when ``fn`` takes a
    ``metrics_callback``. The result file of an earlier attempt is removed."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    spec, result = work / f".{fn.__name__}.spec.json", work / f".{fn.__name__}.result.json"
    result.unlink(missing_ok=True)
    doc = {"fn": f"{fn.__module__}:{fn.__qualname__}", "kwargs": _jsonable(kwargs),
           "metrics_file": str(metrics_file) if metrics_file else None}
    atomic_write_text(spec, json.dumps(doc, indent=1))
    return spec, result


def run_spec(launch: LaunchConfig, spec: Path, result: Path, read_result: bool = True) -> BaseModel | None:
    """Run a written spec in this node's processes (torchrun) and wait; then read the record
    global rank 0 wrote (of the type the step function declares; the result file lies on the
    filesystem the nodes share). The other nodes of a multi-node step pass ``read_result=False``."""
    from slimmoe.parallel.launch import launch as start

    start(launch, "slimmoe.pipeline.steps.launched", [str(spec), str(result)])
    if not read_result:
        return None
    doc = json.loads(Path(spec).read_text())
    if not result.is_file():
        raise RuntimeError(f"{doc['fn']}: every process ended without error, but rank 0 wrote no result ({result})")
    return _return_type(_resolve(doc["fn"])).model_validate_json(result.read_text())


def run_across(launch: LaunchConfig, fn: Callable[..., BaseModel], kwargs: dict[str, Any], work_dir: str | Path,
               metrics_file: str | Path | None = None) -> BaseModel:
    """``fn(**kwargs)`` in ``launch.world_size`` processes of this node; rank 0's result."""
    return run_spec(launch, *write_spec(fn, kwargs, work_dir, metrics_file))


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.model_dump(mode="json") if isinstance(v, BaseModel) else str(v) if isinstance(v, Path) else v)
            for k, v in kwargs.items()}


def _return_type(fn: Callable) -> type[BaseModel]:
    return typing.get_type_hints(fn)["return"]


def _resolve(name: str) -> Callable:
    module, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _metrics_writer(path: str) -> MetricsCallback:
    def write(step: int, metrics: dict[str, float]) -> None:  # called on rank 0 only
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    return write


def _call(doc: dict) -> BaseModel:
    fn = _resolve(doc["fn"])
    hints = typing.get_type_hints(fn)
    kwargs = {k: TypeAdapter(hints[k]).validate_python(v) if k in hints else v for k, v in doc["kwargs"].items()}
    if doc.get("metrics_file") and "metrics_callback" in hints:
        kwargs["metrics_callback"] = _metrics_writer(doc["metrics_file"])
    return fn(**kwargs)


def main(argv: list[str]) -> int:
    """The child: join the process group, run the step, rank 0 writes the result."""
    from slimmoe.parallel.topology import init_process_group

    spec, result = argv
    topo = init_process_group()
    try:
        record = _call(json.loads(Path(spec).read_text()))
        if topo.is_main:
            atomic_write_text(Path(result), record.model_dump_json(indent=1))
    except UserError as e:
        print(f"error: [rank {topo.rank}] {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
