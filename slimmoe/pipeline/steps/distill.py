"""Step: distil a slimmed student from the original teacher, resumably."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from slimmoe.config import DistillConfig
from slimmoe.distill import distill
from slimmoe.io.atomic import atomic_write_text, is_complete, mark_complete
from slimmoe.io.loading import TOKENIZER_FILES, copy_missing_files
from slimmoe.parallel.topology import barrier, topology
from slimmoe.pipeline.steps.data import load_prepared
from slimmoe.pipeline.steps.refs import DistilledModel, ModelRef, folder_fingerprint
from slimmoe.prune.plan import PLAN_FILE

INPUTS_FILE = "distill_inputs.json"  # what the run in a distill folder was started from


def distill_stage(student_dir: str, teacher_dir: str, blocks_path: str, cfg: DistillConfig, out_dir: str | Path,
                  metrics_callback: Callable[[int, dict[str, float]], None] | None = None) -> DistilledModel:
    """Distil; resumes from ``out_dir/checkpoints`` when called again after a failure.

    ``out_dir`` gets the completion marker only after the model, tokenizer and plan are in it.

    A folder left by a run with other inputs (student, teacher, data or settings) is
    cleared first, so its checkpoints are never resumed into a different run. Under several
    processes every rank calls this; rank 0 alone prepares and finishes the folder.
    """
    out = Path(out_dir)
    topo = topology()
    if topo.is_main:
        _claim_folder(out, student_dir, teacher_dir, blocks_path, cfg)
    barrier()
    train, held = load_prepared(blocks_path)
    result = distill(student_dir, teacher_dir, out_dir, train, held if held.numel() else None, cfg,
                     metrics_callback=metrics_callback)
    if topo.is_main:
        copy_missing_files(student_dir, out, TOKENIZER_FILES + (PLAN_FILE,))
        if not is_complete(out):
            mark_complete(out)  # last: the folder is now a result (flows check this, not mere existence)
    barrier()
    return DistilledModel(**ModelRef.of(out_dir).model_dump(), distill=asdict(result))


def _claim_folder(out: Path, student_dir: str, teacher_dir: str, blocks_path: str, cfg: DistillConfig) -> None:
    """Clear ``out`` when a run with other inputs left it, and record this run's inputs."""
    identity = json.dumps({"student": folder_fingerprint(student_dir), "teacher": ModelRef.of(teacher_dir).fingerprint,
                           "blocks": Path(blocks_path).name,  # tokens-<data fingerprint>
                           "config": cfg.model_dump(mode="json")}, sort_keys=True)
    marker = out / INPUTS_FILE
    if out.exists() and (not marker.exists() or marker.read_text() != identity):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        atomic_write_text(marker, identity)
