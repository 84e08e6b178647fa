"""The ``slimmoe`` command line (``slimmoe.cli.main``)."""

from slimmoe.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
