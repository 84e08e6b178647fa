"""Step: every measurement of a stage's model on the held-out blocks."""

from __future__ import annotations

from pathlib import Path

import torch

from slimmoe.evaluation.harness import run_lm_eval
from slimmoe.evaluation.summary import evaluate
from slimmoe.faults import crash_point
from slimmoe.io.loading import load_model
from slimmoe.pipeline.schema import EvalConfig
from slimmoe.pipeline.steps.data import load_prepared
from slimmoe.quantize.checkpoint import load_evaluable
from slimmoe.resources import oom_hint


def evaluate_stage(model_dir: str, blocks_path: str, max_blocks: int = 64, batch_size: int = 8,
                   teacher_dir: str | None = None, **options) -> dict:
    """Held-out perplexity (train blocks if no held-out), parameter counts, throughput, peak
    memory, KL to ``teacher_dir`` and lm-eval tasks, as ``options`` (``EvalConfig`` fields) ask.

    KL is 0.0 without a forward pass when the model is the teacher; it is left out when
    no teacher is given or ``kl_to_teacher`` is false. With GPUs, the model and the teacher
    are each spread over all of them (``device_map="auto"``: layers placed in order over the
    GPUs, then the CPU), so neither has to fit one device; peak memory is then read on the
    first GPU only.
    """
    crash_point("evaluate")  # tests: die mid-pipeline, after the stage's model is complete

    cfg = EvalConfig(max_blocks=max_blocks, batch_size=batch_size, **options)
    placement = {"device_map": "auto"} if torch.cuda.is_available() else {}
    model = load_evaluable(model_dir, **placement)  # a quantized stage's int8 experts: a dequantized copy
    train, held = load_prepared(blocks_path)
    split = "eval" if held.numel() else "train"
    blocks = (held if held.numel() else train)[: cfg.max_blocks]
    is_teacher = teacher_dir is not None and Path(teacher_dir).resolve() == Path(model_dir).resolve()
    teacher = None
    if cfg.kl_to_teacher and teacher_dir is not None and not is_teacher:
        teacher = load_model(teacher_dir, "teacher", **placement)
    with oom_hint("eval", {"batch_size": cfg.batch_size, "throughput_batch_sizes": cfg.throughput_batch_sizes}):
        metrics = evaluate(model, blocks, cfg.batch_size, teacher=teacher,
                           throughput_batch_sizes=cfg.throughput_batch_sizes,
                           generation_tokens=cfg.generation_tokens if cfg.generation else 0,
                           generation_prompt_tokens=cfg.generation_prompt_tokens, peak_memory=cfg.peak_memory)
    if cfg.kl_to_teacher and is_teacher:
        metrics["kl_to_teacher"] = 0.0
    del model, teacher
    if cfg.lm_eval_tasks:
        scores = run_lm_eval(model_dir, cfg.lm_eval_tasks, cfg.lm_eval_limit, cfg.lm_eval_batch_size,
                             cfg.lm_eval_include_path)
        metrics.update({f"lm_eval/{k}": v for k, v in scores.items()})
    return {**metrics, "perplexity_split": split}
