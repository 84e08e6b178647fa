"""The pipeline's steps as library calls from paths to paths (no Prefect, no MLflow).

Each step reads its inputs from folders/files, writes its output atomically, and returns
a small JSON-able dict with the output path and a content fingerprint. The Prefect tasks
in ``tasks/`` wrap exactly one of these each; ``bench/pipeline.py`` calls them directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from slimmoe.arch import get_adapter
from slimmoe.checkpoints import atomic_torch_save, atomic_write_text, is_complete, mark_complete
from slimmoe.config import DistillConfig, ImportanceConfig, SlimTargets
from slimmoe.data import data_fingerprint, load_blocks
from slimmoe.evaluate import evaluate, parameter_counts
from slimmoe.faults import crash_point
from slimmoe.importance import ImportanceScores, estimate_importance, wanted_for
from slimmoe.loading import TOKENIZER_FILES, load_model, load_tokenizer
from slimmoe.plan import PLAN_FILE, SlimPlan, build_plan
from slimmoe.resources import oom_hint
from slimmoe.slim import apply_plan, save_slimmed

INPUTS_FILE = "distill_inputs.json"  # what the run in a distill folder was started from
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


def prepare_data(source: str, tokenizer_dir: str, out_dir: str | Path, seq_len: int, eval_path: str | None = None,
                 eval_fraction: float = 0.05, text_field: str = "text", max_blocks: int | None = None) -> dict:
    """Tokenise and pack the corpus once; ``out_dir/blocks-<fp>.pt`` holds train and eval blocks."""
    tok = load_tokenizer(tokenizer_dir)
    if tok is None:
        from slimmoe.errors import UserError

        raise UserError(f"teacher: {tokenizer_dir} has no tokenizer; the pipeline tokenises data with it")
    fp = data_fingerprint(source, tok, seq_len, eval_fraction=eval_fraction, eval_path=eval_path,
                          max_blocks=max_blocks, text_field=text_field)[:24]
    path = Path(out_dir) / f"blocks-{fp}.pt"
    if not path.exists():
        train, held = load_blocks(source, tok, seq_len, eval_fraction=eval_fraction, eval_path=eval_path,
                                  max_blocks=max_blocks, text_field=text_field)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"train": train, "eval": held}, path)
    blocks = torch.load(path, weights_only=True)
    return {"path": str(path), "fingerprint": fp, "source": str(source), "seq_len": seq_len,
            "train_blocks": int(blocks["train"].shape[0]), "eval_blocks": int(blocks["eval"].shape[0])}


def load_prepared(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.load(path, weights_only=True)
    return blocks["train"], blocks["eval"]


def score(model_dir: str, teacher_dir: str | None, blocks_path: str, cfg: ImportanceConfig, targets: SlimTargets,
          out_path: str | Path, progress: bool = True) -> dict:
    """Importance of ``model_dir``'s structures against the teacher (itself when None)."""
    model = load_model(model_dir)
    want = wanted_for(get_adapter(model.config), model.config, targets)
    teacher = load_model(teacher_dir, "teacher") if teacher_dir else None
    train, _ = load_prepared(blocks_path)
    scores = estimate_importance(model, train, cfg, teacher=teacher, want=want, progress=progress)
    crash_point("importance")  # tests: die with the scores computed but not saved
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    scores.save(out_path)
    return {"path": str(out_path), "fingerprint": hashlib.sha256(out_path.read_bytes()).hexdigest()[:24],
            "calibration_tokens": int(train[: cfg.samples].numel())}


def slim(model_dir: str, scores_path: str, targets: SlimTargets, out_dir: str | Path, score_info: dict | None = None) -> dict:
    """Apply the plan the scores imply; the tokenizer of ``model_dir`` travels along."""
    model = load_model(model_dir)
    adapter = get_adapter(model.config)
    plan = build_plan(adapter, model, ImportanceScores.load(scores_path), targets, score_info=score_info)
    small = apply_plan(model, plan)
    save_slimmed(small, plan, out_dir, tokenizer=load_tokenizer(model_dir))
    return {**model_ref(out_dir), **parameter_counts(small), "target": plan.target}


def distill_stage(student_dir: str, teacher_dir: str, blocks_path: str, cfg: DistillConfig, out_dir: str | Path,
                  metrics_callback=None) -> dict:
    """Distil; resumes from ``out_dir/checkpoints`` when called again after a failure.

    ``out_dir`` gets the completion marker only after the model, tokenizer and plan are in it.

    A folder left by a run with other inputs (student, teacher, data or settings) is
    cleared first, so its checkpoints are never resumed into a different run.
    """
    from slimmoe.distill import distill

    identity = json.dumps({"student": folder_fingerprint(student_dir), "teacher": model_ref(teacher_dir)["fingerprint"],
                           "blocks": Path(blocks_path).name,  # blocks-<data fingerprint>.pt
                           "config": cfg.model_dump(mode="json")}, sort_keys=True)
    out = Path(out_dir)
    marker = out / INPUTS_FILE
    if out.exists() and (not marker.exists() or marker.read_text() != identity):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        atomic_write_text(marker, identity)
    train, held = load_prepared(blocks_path)
    result = distill(student_dir, teacher_dir, out_dir, train, held if held.numel() else None, cfg,
                     metrics_callback=metrics_callback)
    for name in TOKENIZER_FILES + (PLAN_FILE,):
        src = Path(student_dir) / name
        if src.exists() and not (out / name).exists():
            shutil.copy2(src, out / f".{name}.tmp")
            os.replace(out / f".{name}.tmp", out / name)
    if not is_complete(out):
        mark_complete(out)  # last: the folder is now a result (flows check this, not mere existence)
    from dataclasses import asdict

    return {**model_ref(out_dir), "distill": asdict(result)}


def evaluate_stage(model_dir: str, blocks_path: str, max_blocks: int = 64, batch_size: int = 8,
                   teacher_dir: str | None = None, **options) -> dict:
    """Held-out perplexity (train blocks if no held-out), parameter counts, throughput, peak
    memory, KL to ``teacher_dir`` and lm-eval tasks, as ``options`` (``EvalConfig`` fields) ask.

    KL is 0.0 without a forward pass when the model is the teacher; it is left out when
    no teacher is given or ``kl_to_teacher`` is false. The model runs on CUDA when present.
    """
    from slimmoe.pipeline_config import EvalConfig

    crash_point("evaluate")  # tests: die mid-pipeline, after the stage's model is complete

    cfg = EvalConfig(max_blocks=max_blocks, batch_size=batch_size, **options)
    device = "cuda" if torch.cuda.is_available() else None
    model = load_model(model_dir, device=device)
    train, held = load_prepared(blocks_path)
    split = "eval" if held.numel() else "train"
    blocks = (held if held.numel() else train)[: cfg.max_blocks]
    is_teacher = teacher_dir is not None and Path(teacher_dir).resolve() == Path(model_dir).resolve()
    teacher = None
    if cfg.kl_to_teacher and teacher_dir is not None and not is_teacher:
        teacher = load_model(teacher_dir, "teacher", device=device)
    with oom_hint("eval", {"batch_size": cfg.batch_size, "throughput_batch_sizes": cfg.throughput_batch_sizes}):
        metrics = evaluate(model, blocks, cfg.batch_size, teacher=teacher,
                           throughput_batch_sizes=cfg.throughput_batch_sizes,
                           generation_tokens=cfg.generation_tokens if cfg.generation else 0,
                           generation_prompt_tokens=cfg.generation_prompt_tokens, peak_memory=cfg.peak_memory)
    if cfg.kl_to_teacher and is_teacher:
        metrics["kl_to_teacher"] = 0.0
    del model, teacher
    if cfg.lm_eval_tasks:
        from slimmoe.lm_eval_hook import run_lm_eval

        scores = run_lm_eval(model_dir, cfg.lm_eval_tasks, cfg.lm_eval_limit, cfg.lm_eval_batch_size,
                             cfg.lm_eval_include_path)
        metrics.update({f"lm_eval/{k}": v for k, v in scores.items()})
    return {**metrics, "perplexity_split": split}


def plan_of(model_dir: str | Path) -> SlimPlan | None:
    p = Path(model_dir) / PLAN_FILE
    return SlimPlan.load(p) if p.exists() else None
