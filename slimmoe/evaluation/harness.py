"""lm-evaluation-harness tasks on a saved checkpoint (optional: ``pip install slimmoe[eval]``).

The checkpoint folder is loaded by lm-eval's own ``hf`` model (``pretrained=<folder>``),
exactly as a user of the released model would evaluate it. Tasks can be lm-eval's
bundled ones (which download their datasets from the hub) or local YAML task configs in
``include_path`` (offline, e.g. a jsonl file next to the YAML). Tested with lm-eval
0.4.13 and transformers 5.
"""

from __future__ import annotations

from pathlib import Path

from slimmoe.errors import UserError

FIELD = "eval.lm_eval_tasks"
_SKIP = {"alias", "name", "sample_len", "samples"}


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise UserError(f"{FIELD}: lm-eval is not installed ({e}); install it with: pip install 'slimmoe[eval]'") from None
    return lm_eval, TaskManager


def flatten_results(results: dict) -> dict[str, float]:
    """lm-eval's ``results`` ({task: {"acc,none": v, ...}}) as {"task/acc": v}; a filter other
    than ``none`` is kept as a suffix ("task/exact_match_strict-match"); non-numbers are dropped."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if key in _SKIP or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            out[f"{task}/{name}"] = float(value)
    return out


def run_lm_eval(model_dir: str | Path, tasks: list[str], limit: int | float | None = None, batch_size: int = 8,
                include_path: str | Path | None = None, device: str | None = None) -> dict[str, float]:
    """Run ``tasks`` on the checkpoint in ``model_dir``; returns {"<task>/<metric>": value}."""
    if not tasks:
        return {}
    if not Path(model_dir).is_dir():
        raise UserError(f"{FIELD}: lm-eval needs a local checkpoint folder, {model_dir} is not one")
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"eval.lm_eval_include_path: no such folder: {include_path}")
    lm_eval, TaskManager = _import_lm_eval()
    import torch

    manager = None
    if include_path is not None:  # indexing lm-eval's ~15k bundled tasks takes seconds: skip it when possible
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = None
    manager = manager or TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"{FIELD}: unknown lm-eval task(s) {unknown}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        res = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(model_dir), "dtype": "auto"}, tasks=list(tasks),
            limit=limit, batch_size=batch_size, device=device, task_manager=manager, log_samples=False,
        )
    except OSError as e:  # a task's dataset missing, or on the hub while offline (hub errors are OSErrors)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"{FIELD}: lm-eval could not load the data of {list(tasks)} ({type(e).__name__}: {first}); "
                        f"offline, use local task YAMLs in eval.lm_eval_include_path") from None
    return flatten_results(res["results"])
