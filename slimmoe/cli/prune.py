"""``slimmoe prune MODEL OUT``: one-shot importance + slimming, no training.

The flags are the fields of :class:`~slimmoe.config.PruneConfig` (its ``targets`` and
``importance`` flattened: ``--expert-intermediate-size``, ``--samples``, ``--score``) and
of :class:`PruneOptions`, this command's own settings.
"""

from __future__ import annotations

import json

from pydantic import Field, field_validator

from slimmoe.cli.common import add_launch_flags, add_safety_flags, run_launched
from slimmoe.cli.flags import ModelFlags
from slimmoe.config import (
    DROP_EXPERT_SCORES,
    DROP_STRATEGIES,
    PruneConfig,
    Strategy,
    StrictModel,
    parse_param_count,
)
from slimmoe.errors import UserError


class PruneOptions(StrictModel):
    """How sizes are solved from a parameter target, and how the run behaves."""

    strategy: Strategy = Field("slim", description="which axes reach --total-params/--active-params "
                               "(slim: expert width; drop: whole experts; slim+drop: both)")
    total_params: int | None = Field(None, gt=0, description="target total parameters, e.g. 3.8e9 or 3.8B "
                                     "(sizes are solved)")
    active_params: int | None = Field(None, gt=0, description="target active parameters (sizes are solved)")
    teacher: str | None = Field(None, description="teacher checkpoint for the KD loss (default: MODEL itself)")
    force: bool = Field(False, description="replace OUT even if it is not an earlier slimmoe output")
    progress: bool = Field(True, description="progress bar on stderr")

    _counts = field_validator("total_params", "active_params", mode="before")(
        classmethod(lambda cls, v: parse_param_count(v)))


PRUNE_FLAGS = ModelFlags(PruneConfig)
OPTION_FLAGS = ModelFlags(PruneOptions, errors="flag")


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="one-shot importance + slimming, no training",
                       description="Score MODEL's structures and save a slimmed checkpoint plus slim_plan.json in OUT.")
    p.add_argument("model", metavar="MODEL", help="checkpoint folder or hub id")
    p.add_argument("out", metavar="OUT", help="output folder")
    PRUNE_FLAGS.add_to(p, "pruning (PruneConfig: targets, importance, data)")
    OPTION_FLAGS.add_to(p, "run")
    add_launch_flags(p)
    add_safety_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if run_launched(args):  # --nproc-per-node N: scoring split over N processes
        return 0
    from slimmoe.prune.one_shot import prune

    opts = OPTION_FLAGS.build(args)
    values = PRUNE_FLAGS.given(args)
    _drop_expert_score(opts.strategy, values)
    if opts.total_params is not None or opts.active_params is not None:
        values["targets"] = _solve_prune_targets(args.model, opts, values.get("targets", {}))
    cfg = PRUNE_FLAGS.validate(values)
    result = prune(args.model, args.out, cfg, teacher_path=opts.teacher, force=opts.force, progress=opts.progress)
    print(json.dumps(result))
    return 0


def _drop_expert_score(strategy: str, values: dict) -> None:
    """--strategy drop / slim+drop score whole experts by frequency or reap (reap unless told)."""
    if strategy not in DROP_STRATEGIES:
        return
    importance = values.setdefault("importance", {})
    given = importance.get("expert_score")
    if given not in (None, *DROP_EXPERT_SCORES):
        raise UserError(f"--expert-score: --strategy {strategy} removes experts by frequency or reap, got {given}")
    importance["expert_score"] = given or "reap"


def _solve_prune_targets(model: str, opts: PruneOptions, explicit: dict) -> dict:
    """--total-params / --active-params -> sizes (slimmoe.prune.strategies), errors naming the flag."""
    from slimmoe.config import SlimTargets
    from slimmoe.io.loading import load_config
    from slimmoe.prune.strategies import resolve_sizes

    try:
        sizes = resolve_sizes(load_config(model), opts.strategy, explicit=SlimTargets(**explicit),
                              total_params=opts.total_params, active_params=opts.active_params)
    except UserError as e:
        msg = str(e)
        field = msg.split(":", 1)[0]
        raise UserError(f"--{field.replace('_', '-')}:{msg.split(':', 1)[1]}" if "_" in field else msg) from None
    return sizes.model_dump()
