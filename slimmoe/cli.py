"""The ``slimmoe`` command. Bad input ends with one ``error: ...`` line and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib.metadata import entry_points

from pydantic import ValidationError

from slimmoe.errors import UserError

EXIT_USAGE = 2


def add_safety_flags(p: argparse.ArgumentParser) -> None:
    """Opt-ins of slimmoe.loading's safe defaults (safetensors only, no checkpoint code)."""
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickle weights (pytorch_model.bin); they can run code when loaded")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with a checkpoint (only for sources you trust)")


def _add_prune(sub) -> None:
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
    p.set_defaults(func=_run_prune)


def _run_prune(args) -> int:
    from slimmoe.config import PruneConfig
    from slimmoe.prune import prune

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
    from slimmoe.pipeline_config import DROP_EXPERT_SCORES, DROP_STRATEGIES

    if args.strategy not in DROP_STRATEGIES:
        return args.expert_score or "taylor"
    if args.expert_score not in (None, *DROP_EXPERT_SCORES):
        raise UserError(f"--expert-score: --strategy {args.strategy} removes experts by frequency or reap, "
                        f"got {args.expert_score}")
    return args.expert_score or "reap"


def _solve_prune_targets(args, explicit: dict) -> dict:
    """--total-params / --active-params -> sizes (slimmoe.strategies), errors naming the flag."""
    from slimmoe.config import SlimTargets
    from slimmoe.loading import load_config
    from slimmoe.pipeline_config import parse_param_count
    from slimmoe.strategies import resolve_sizes

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


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, parameter counts and throughput of a checkpoint",
                       description="Print one JSON object: perplexity, total_params, active_params, tokens_per_second.")
    p.add_argument("model", metavar="MODEL", help="checkpoint folder or hub id")
    p.add_argument("--data", help="evaluation text; random tokens when absent")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-blocks", type=int, default=64, help="evaluate at most this many blocks (default 64)")
    p.add_argument("--batch-size", type=int, default=8)
    add_safety_flags(p)
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from slimmoe.data import load_blocks, random_blocks
    from slimmoe.evaluate import evaluate
    from slimmoe.loading import load_model, load_tokenizer

    for name in ("seq_len", "max_blocks", "batch_size"):
        if getattr(args, name) < (2 if name == "seq_len" else 1):
            raise UserError(f"--{name.replace('_', '-')}: must be positive (seq-len >= 2), got {getattr(args, name)}")
    if args.data is not None:
        from pathlib import Path

        if not Path(args.data).exists():
            raise UserError(f"--data: no such file or folder: {args.data}")
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    if args.data and tokenizer is not None:
        blocks, _ = load_blocks(args.data, tokenizer, args.seq_len, max_blocks=args.max_blocks, fields=("--data", "--data"))
    else:
        logging.getLogger("slimmoe").warning(
            "evaluating on random tokens (%s): perplexity is only comparable between models on the same tokens",
            "no --data" if not args.data else "the checkpoint has no tokenizer")
        blocks = random_blocks(model.config.vocab_size, min(args.max_blocks, 16), args.seq_len)
    print(json.dumps(evaluate(model, blocks, batch_size=args.batch_size)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimmoe", description="Compress MoE language models by expert slimming and distillation.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    _add_eval(sub)
    try:
        from slimmoe import cli_distill
    except ImportError:  # pragma: no cover - the distill engine is optional at import time
        cli_distill = None
    if cli_distill is not None:
        cli_distill.add_parser(sub)
    for ep in entry_points(group="slimmoe.commands"):  # run, demo: the pipeline (Prefect + MLflow)
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("slimmoe").setLevel(logging.INFO)
    from slimmoe.loading import loading_policy

    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a usage line on bad flags
    try:
        with loading_policy(getattr(args, "trust_remote_code", False), getattr(args, "allow_pickle", False)):
            return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as e:
        from slimmoe.config import format_validation_error

        print(f"error: {format_validation_error(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
