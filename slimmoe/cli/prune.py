"""``slimmoe prune MODEL OUT``: one-shot importance + slimming, no training."""

from __future__ import annotations

import json

from slimmoe.cli.common import add_safety_flags
from slimmoe.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="one-shot importance + slimming, no training",
                       description="Score MODEL's structures and save a slimmed checkpoint plus slim_plan.json in OUT.")
    p.add_argument("model", metavar="MODEL", help="checkpoint folder or hub id")
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument("--expert-intermediate-size", type=int, help="target width of every expert")
    p.add_argument("--num-key-value-heads", type=int, help="target KV groups (query heads follow)")
    p.add_argument("--num-experts", type=int, help="target experts per layer (drops the lowest-scored)")
    p.add_argument("--strategy", default="slim", choices=["slim", "drop", "slim+drop"],
                   help="which axes reach --total-params/--active-params (default slim: expert width)")
    p.add_argument("--total-params", help="target total parameters, e.g. 3.8e9 or 3.8B (sizes are solved)")
    p.add_argument("--active-params", help="target active parameters (sizes are solved)")
    p.add_argument("--data", help="calibration text (file or folder); random tokens when absent")
    p.add_argument("--samples", type=int, default=64, help="calibration sequences (default 64)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--score", default="taylor", choices=["taylor", "magnitude", "activation", "random"],
                   help="score of neurons and KV groups (default taylor)")
    p.add_argument("--expert-score", default=None, choices=["taylor", "frequency", "reap", "random"],
                   help="score of whole experts for --num-experts (default taylor; reap for --strategy drop/slim+drop)")
    p.add_argument("--loss", default="kd_topk_renorm", choices=["kd_topk_renorm", "kd_topk", "lm"],
                   help="loss whose sensitivity taylor scores measure (default kd_topk_renorm)")
    p.add_argument("--topk", type=int, default=8, help="teacher logits used by the KD loss")
    p.add_argument("--teacher", help="teacher checkpoint for the KD loss (default: MODEL itself)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace OUT even if it is not an earlier slimmoe output")
    p.add_argument("--no-progress", action="store_true")
    add_safety_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from slimmoe.config import PruneConfig
    from slimmoe.prune.one_shot import prune

    targets = {"expert_intermediate_size": args.expert_intermediate_size,
               "num_key_value_heads": args.num_key_value_heads, "num_experts": args.num_experts}
    expert_score = _strategy_expert_score(args)
    if args.total_params is not None or args.active_params is not None:
        targets = _solve_prune_targets(args, targets)
    cfg = PruneConfig.model_validate({
        "targets": targets,
        "importance": {"samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size,
                       "score": args.score, "expert_score": expert_score, "loss": args.loss,
                       "topk": args.topk, "seed": args.seed},
        "data": args.data,
    })
    result = prune(args.model, args.out, cfg, teacher_path=args.teacher, force=args.force, progress=not args.no_progress)
    print(json.dumps(result))
    return 0


def _strategy_expert_score(args) -> str:
    from slimmoe.config import DROP_EXPERT_SCORES, DROP_STRATEGIES

    if args.strategy not in DROP_STRATEGIES:
        return args.expert_score or "taylor"
    if args.expert_score not in (None, *DROP_EXPERT_SCORES):
        raise UserError(f"--expert-score: --strategy {args.strategy} removes experts by frequency or reap, "
                        f"got {args.expert_score}")
    return args.expert_score or "reap"


def _solve_prune_targets(args, explicit: dict) -> dict:
    """--total-params / --active-params -> sizes (slimmoe.prune.strategies), errors naming the flag."""
    from slimmoe.config import SlimTargets, parse_param_count
    from slimmoe.io.loading import load_config
    from slimmoe.prune.strategies import resolve_sizes

    counts = {}
    for name in ("total_params", "active_params"):
        raw = getattr(args, name)
        try:
            counts[name] = None if raw is None else int(parse_param_count(raw))
        except ValueError as e:
            raise UserError(f"--{name.replace('_', '-')}: {e}") from None
    try:
        sizes = resolve_sizes(load_config(args.model), args.strategy, explicit=SlimTargets(**explicit), **counts)
    except UserError as e:
        msg = str(e)
        field = msg.split(":", 1)[0]
        raise UserError(f"--{field.replace('_', '-')}:{msg.split(':', 1)[1]}" if "_" in field else msg) from None
    return sizes.model_dump()
