"""``slimmoe quantize MODEL OUT --scheme FP8_DYNAMIC|W4A16|W8A8``: a compressed-tensors
checkpoint (what vLLM serves) made by llm-compressor in its own environment
(``slimmoe/quantize/``; install it with scripts/install-llmcompressor)."""

from __future__ import annotations

import json

from slimmoe.quantize.config import INSTALL_SCRIPT, PYTHON_ENV, SCHEMES, QuantizeConfig


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model folder with llm-compressor (FP8 / INT4 / INT8)",
                       description="Quantize MODEL's Linear layers, MoE experts included (routers and lm_head "
                                   "stay as they are), with one of llm-compressor's data-free schemes and write "
                                   "a compressed-tensors checkpoint plus the tokenizer to OUT. llm-compressor "
                                   f"runs in its own environment: {INSTALL_SCRIPT} creates it, ${PYTHON_ENV} or "
                                   "--python points elsewhere.")
    p.add_argument("model", metavar="MODEL", help="a model folder (config.json + safetensors)")
    p.add_argument("out", metavar="OUT", help="the folder to write")
    p.add_argument("--scheme", required=True, choices=list(SCHEMES), metavar="|".join(SCHEMES),
                   help="FP8_DYNAMIC: FP8 weights per channel, FP8 activations per token; W4A16: int4 weights "
                        "in groups; W8A8: int8 weights per channel, int8 activations per token")
    p.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="W4A16 only: input columns per scale (32, 64 or 128; default 128)")
    p.add_argument("--ignore", action="append", default=None, metavar="NAME",
                   help="a module name or 're:REGEX' to leave unquantized (repeatable; replaces the default: "
                        "lm_head and the MoE routers)")
    p.add_argument("--python", default=None, metavar="PATH", help="the Python of llm-compressor's environment")
    p.set_defaults(func=run)


def run(args) -> int:
    from slimmoe.quantize.runner import quantize_model

    given = {"group_size": args.group_size, "ignore": args.ignore, "python": args.python}
    config = QuantizeConfig(scheme=args.scheme, **{k: v for k, v in given.items() if v is not None})
    report = quantize_model(args.model, args.out, config)
    print(json.dumps(report, indent=2))
    return 0
