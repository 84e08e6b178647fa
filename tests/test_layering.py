"""The library stays a library: importing every slimmoe module, and building the CLI with
its pipeline commands, loads neither Prefect nor MLflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

CODE = """
import importlib, pkgutil, sys
import slimmoe
for m in pkgutil.walk_packages(slimmoe.__path__, "slimmoe."):
    importlib.import_module(m.name)
from slimmoe.cli import build_parser
parser = build_parser()
assert {"prune", "eval", "distill", "run", "demo"} <= set(parser._subparsers._group_actions[0].choices), "commands"
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("prefect", "mlflow"))
assert not bad, bad
"""


def test_slimmoe_imports_no_pipeline_engine():
    subprocess.run([sys.executable, "-c", CODE], check=True, cwd=ROOT, timeout=300)
