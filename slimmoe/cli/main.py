"""The ``slimmoe`` command: one sub-command per module of ``slimmoe.cli``; ``run``, ``demo``
and ``ablate`` (Prefect + MLflow) join from outside the library through the
``slimmoe.commands`` entry-point group. Bad input ends with one ``error: ...`` line and exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from slimmoe.cli import distill, eval, export, plan, prune, quantize, tokenize
from slimmoe.cli.common import run_guarded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimmoe", description="Compress MoE language models by expert slimming and distillation.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (prune, eval, distill, plan, tokenize, export, quantize):
        command.add_parser(sub)
    for ep in entry_points(group="slimmoe.commands"):  # run, demo, ablate: the pipeline (Prefect + MLflow)
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("slimmoe").setLevel(logging.INFO)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)  # argparse itself exits 2 with a usage line on bad flags
    args.argv = argv  # a command that starts its own processes runs itself again in them
    return run_guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
