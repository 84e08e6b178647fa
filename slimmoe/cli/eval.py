"""``slimmoe eval MODEL``: perplexity, parameter counts and throughput as one JSON object."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import Field, field_validator

from slimmoe.cli.common import add_safety_flags
from slimmoe.cli.flags import ModelFlags
from slimmoe.config import StrictModel


class EvalOptions(StrictModel):
    """What `slimmoe eval` measures on."""

    data: str | None = Field(None, description="evaluation text (file or folder); random tokens when absent")
    seq_len: int = Field(128, description="tokens per block")
    max_blocks: int = Field(64, description="evaluate at most this many blocks")
    batch_size: int = Field(8, description="blocks per forward pass")

    @field_validator("seq_len", "max_blocks", "batch_size")
    @classmethod
    def _positive(cls, v: int, info) -> int:
        if v < (2 if info.field_name == "seq_len" else 1):
            raise ValueError(f"must be positive (seq-len >= 2), got {v}")
        return v

    @field_validator("data")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).exists():
            raise ValueError(f"no such file or folder: {v}")
        return v


EVAL_FLAGS = ModelFlags(EvalOptions, errors="flag", metavars={"data": "PATH"})


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, parameter counts and throughput of a checkpoint",
                       description="Print one JSON object: perplexity, total_params, active_params, tokens_per_second.")
    p.add_argument("model", metavar="MODEL", help="checkpoint folder or hub id")
    EVAL_FLAGS.add_to(p)
    add_safety_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from slimmoe.evaluation.summary import evaluate
    from slimmoe.io.data import load_blocks, random_blocks
    from slimmoe.io.loading import load_tokenizer
    from slimmoe.quantize.checkpoint import load_evaluable

    opts = EVAL_FLAGS.build(args)
    model = load_evaluable(args.model)  # load_model, or a dequantized copy of int8 MoE experts
    tokenizer = load_tokenizer(args.model)
    if opts.data and tokenizer is not None:
        blocks, _ = load_blocks(opts.data, tokenizer, opts.seq_len, max_blocks=opts.max_blocks, fields=("--data", "--data"))
    else:
        logging.getLogger("slimmoe").warning(
            "evaluating on random tokens (%s): perplexity is only comparable between models on the same tokens",
            "no --data" if not opts.data else "the checkpoint has no tokenizer")
        blocks = random_blocks(model.config.vocab_size, min(opts.max_blocks, 16), opts.seq_len)
    print(json.dumps(evaluate(model, blocks, batch_size=opts.batch_size)))
    return 0
