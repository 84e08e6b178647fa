"""Pruning: score every structure (importance), choose what each layer keeps (plan), cut
the model to it (slim); sizes for parameter targets (strategies) and between stages (schedule).

    scores = estimate_importance(model, blocks, ImportanceConfig())
    plan = build_plan(adapter, model, scores, SlimTargets(expert_intermediate_size=960))
    small = apply_plan(model, plan)

``prune()`` does all of it for a checkpoint on disk (``slimmoe prune``); ``slim_checkpoint`` /
``slim_streamed`` slim a safetensors folder layer by layer, without loading the model.
"""

from slimmoe.prune.importance import ImportanceScores, Wanted, estimate_importance, wanted_for
from slimmoe.prune.one_shot import SCORES_FILE, prune
from slimmoe.prune.plan import PLAN_FILE, LayerPlan, SlimPlan, build_plan, resolve_targets, source_sizes
from slimmoe.prune.schedule import estimate_active_params, estimate_total_params, format_schedule, interpolate_stages
from slimmoe.prune.slim import apply_plan, save_slimmed
from slimmoe.prune.strategies import resolve_sizes
from slimmoe.prune.stream import slim_checkpoint, slim_streamed

__all__ = ["PLAN_FILE", "SCORES_FILE", "ImportanceScores", "LayerPlan", "SlimPlan", "Wanted", "apply_plan",
           "build_plan", "estimate_active_params", "estimate_importance", "estimate_total_params", "format_schedule",
           "interpolate_stages", "prune", "resolve_sizes", "resolve_targets", "save_slimmed", "slim_checkpoint",
           "slim_streamed", "source_sizes", "wanted_for"]
