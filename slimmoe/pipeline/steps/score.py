"""Step: importance of a model's structures against the original teacher."""

from __future__ import annotations

from pathlib import Path

from slimmoe.arch import get_adapter
from slimmoe.config import ImportanceConfig, SlimTargets
from slimmoe.faults import crash_point
from slimmoe.parallel.topology import barrier, topology
from slimmoe.pipeline.steps.data import load_prepared
from slimmoe.pipeline.steps.refs import ImportanceRef, file_fingerprint
from slimmoe.prune.importance import estimate_importance, load_for_scoring, score_sharded, wanted_for


def score(model_dir: str, teacher_dir: str | None, blocks_path: str, cfg: ImportanceConfig, targets: SlimTargets,
          out_path: str | Path, progress: bool = True) -> ImportanceRef:
    """Importance of ``model_dir``'s structures against the teacher (itself when None). Under
    several processes the model and teacher are sharded with FSDP2, the calibration batches
    split over the ranks, and every rank gets the reduced scores (slimmoe.prune.one_shot)."""
    topo = topology()
    model = load_for_scoring(model_dir, "MODEL", cfg, topo.distributed)  # importance.device_map: several devices
    want = wanted_for(get_adapter(model.config), model.config, targets)
    teacher = load_for_scoring(teacher_dir, "teacher", cfg, topo.distributed) if teacher_dir else None
    train, _ = load_prepared(blocks_path)
    if topo.distributed:
        scores = score_sharded(model, teacher, train, cfg, want, topo, progress)
    else:
        scores = estimate_importance(model, train, cfg, teacher=teacher, want=want, progress=progress)
    crash_point("importance")  # tests: die with the scores computed but not saved
    out_path = Path(out_path)
    if topo.is_main:  # every rank holds the reduced scores; rank 0 writes them
        out_path.parent.mkdir(parents=True, exist_ok=True)
        scores.save(out_path)
    barrier()
    return ImportanceRef(path=str(out_path), fingerprint=file_fingerprint(out_path),
                         calibration_tokens=int(train[: cfg.samples].numel()))
