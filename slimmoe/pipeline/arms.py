"""The stages of every arm of an ablation (``ablation_schema.AblationConfig``; of every cell of
a grid, ``grid.expand_grid``), and the checks ``slimmoe ablate`` makes before its flow starts."""

from __future__ import annotations

import copy

from slimmoe.arch import get_adapter
from slimmoe.config import DistillConfig, SlimTargets
from slimmoe.errors import UserError
from slimmoe.io.loading import load_config
from slimmoe.pipeline.ablation_schema import AblationConfig
from slimmoe.pipeline.grid import expand_grid
from slimmoe.pipeline.preflight import check_data_paths, check_teacher_and_data, cut
from slimmoe.pipeline.schema import StageConfig
from slimmoe.prune.schedule import estimate_total_params, interpolate_stages
from slimmoe.prune.strategies import resolve_sizes


def slim_targets(cfg: AblationConfig, teacher_config) -> SlimTargets:
    """The one-shot-slim shape: explicit width, or the width solved for the parameter target."""
    t = cfg.target
    if t.expert_intermediate_size is not None:
        return SlimTargets(expert_intermediate_size=t.expert_intermediate_size, num_key_value_heads=t.num_key_value_heads)
    explicit = SlimTargets(num_key_value_heads=t.num_key_value_heads)
    return _named("target", lambda: resolve_sizes(teacher_config, "slim", total_params=t.total_params,
                                                  active_params=t.active_params, explicit=explicit))


def plan_arms(cfg: AblationConfig, teacher_config) -> dict[str, list[StageConfig]]:
    """Every chosen arm as its list of stages (sizes explicit, tokens per stage, seed unset).

    Stage names are ``<arm>.<stage>`` so task runs and folders tell the arms apart.
    """
    final = slim_targets(cfg, teacher_config)
    # the drop arms' budget: the target's total, else (active or width target) the slim model's total
    budget = cfg.target.total_params or estimate_total_params(teacher_config, **final.model_dump())
    arms: dict[str, list[SlimTargets]] = {}
    for arm in cfg.arms:
        if arm in ("one-shot-slim", "scratch"):
            arms[arm] = [final]
        elif arm == "multi-stage-slim":
            arms[arm] = interpolate_stages(teacher_config, final, cfg.num_stages)
        else:
            strategy = "drop" if arm == "one-shot-drop" else "slim+drop"
            arms[arm] = [_named(f"arms.{arm}", lambda s=strategy: resolve_sizes(teacher_config, s, total_params=budget))]
    return {arm: _stages(cfg, arm, targets) for arm, targets in arms.items()}


def plan_grid(cfg: AblationConfig, teacher_config) -> dict[str, list[StageConfig]]:
    """Every arm of every cell of a grid config, keyed ``<cell>/<arm>`` (slimmoe.pipeline.grid)."""
    return {f"{cell.label}/{arm}": stages for cell in expand_grid(cfg, teacher_config)
            for arm, stages in cell.arms.items()}


def _stages(cfg: AblationConfig, arm: str, targets: list[SlimTargets]) -> list[StageConfig]:
    n = len(targets)
    out = []
    for i, t in enumerate(targets):
        tokens = cfg.tokens // n + (cfg.tokens % n if i == n - 1 else 0)
        distill = cfg.distill.model_dump()
        distill.update(tokens=tokens, teacher_cache_dir=cfg.cache_dir().resolve())
        if arm == "scratch":  # no teacher signal: next-token loss, no top-k cache
            distill.update(loss="lm", alpha=1.0, teacher_cache_dir=None)
        name = f"{arm}.final" if i == n - 1 else f"{arm}.stage{i + 1}"
        out.append(StageConfig(name=name, **t.model_dump(), importance=cfg.importance,
                               distill=DistillConfig(**distill), eval=cfg.eval))
    return out


def scoring_targets(arms: dict[str, list[StageConfig]], teacher_config) -> SlimTargets:
    """One scoring pass on the teacher covers the first stage of every arm: it scores every
    structure kind some first stage cuts (scores of one kind do not depend on the others)."""
    firsts = [stages[0].targets() for stages in arms.values()]

    def smallest(field: str):
        values = [getattr(t, field) for t in firsts if getattr(t, field) is not None]
        return min(values) if values else None

    return SlimTargets(**{f: smallest(f) for f in SlimTargets.model_fields})


def check_ablation_inputs(cfg: AblationConfig, preflight: bool = False) -> dict[str, list[StageConfig]]:
    """Fail fast with one line naming the field: a missing teacher or data file, a dense teacher,
    a target the teacher cannot be cut to; with ``preflight`` also what `slimmoe run` checks
    before a flow starts (teacher weights, tracking server, tokenizer, corpus). Returns the
    arms' stages."""
    teacher = load_config(cfg.teacher, "teacher")
    adapter = get_adapter(teacher)
    check_data_paths(cfg.data)
    arms = plan_grid(cfg, teacher) if cfg.grid is not None else plan_arms(cfg, teacher)
    for arm, stages in arms.items():
        current = copy.deepcopy(teacher)
        for stage in stages:
            cut(adapter, current, stage.targets(), f"target: arm {arm}, stage {stage.name}: ")
    if preflight:
        check_teacher_and_data(cfg.teacher, teacher, cfg.data, cfg.tracking_uri())
    return arms


def _named(field: str, fn):
    try:
        return fn()
    except UserError as e:
        raise UserError(f"{field}: {e}") from None
