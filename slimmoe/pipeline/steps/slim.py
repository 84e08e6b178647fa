"""Step: cut a model to a stage's sizes by its importance scores."""

from __future__ import annotations

from pathlib import Path

from slimmoe.arch import get_adapter
from slimmoe.config import SlimTargets
from slimmoe.evaluation.params import parameter_counts
from slimmoe.io.loading import load_model, load_tokenizer
from slimmoe.pipeline.steps.refs import ModelRef, SlimmedModel
from slimmoe.prune.importance import ImportanceScores
from slimmoe.prune.plan import build_plan
from slimmoe.prune.slim import apply_plan, save_slimmed


def slim(model_dir: str, scores_path: str, targets: SlimTargets, out_dir: str | Path, score_info: dict | None = None) -> SlimmedModel:
    """Apply the plan the scores imply; the tokenizer of ``model_dir`` travels along."""
    model = load_model(model_dir)
    adapter = get_adapter(model.config)
    plan = build_plan(adapter, model, ImportanceScores.load(scores_path), targets, score_info=score_info)
    small = apply_plan(model, plan)
    save_slimmed(small, plan, out_dir, tokenizer=load_tokenizer(model_dir))
    return SlimmedModel(**ModelRef.of(out_dir).model_dump(), **parameter_counts(small), target=plan.target)
