"""``slimmoe eval MODEL``: perplexity, parameter counts and throughput as one JSON object."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from slimmoe.cli.common import add_safety_flags
from slimmoe.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, parameter counts and throughput of a checkpoint",
                       description="Print one JSON object: perplexity, total_params, active_params, tokens_per_second.")
    p.add_argument("model", metavar="MODEL", help="checkpoint folder or hub id")
    p.add_argument("--data", help="evaluation text; random tokens when absent")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-blocks", type=int, default=64, help="evaluate at most this many blocks (default 64)")
    p.add_argument("--batch-size", type=int, default=8)
    add_safety_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from slimmoe.evaluation.summary import evaluate
    from slimmoe.io.data import load_blocks, random_blocks
    from slimmoe.io.loading import load_model, load_tokenizer

    for name in ("seq_len", "max_blocks", "batch_size"):
        if getattr(args, name) < (2 if name == "seq_len" else 1):
            raise UserError(f"--{name.replace('_', '-')}: must be positive (seq-len >= 2), got {getattr(args, name)}")
    if args.data is not None:
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
