"""The library stays a library, in layers: read from the source (every import, those inside
functions included), each sub-package imports only the ones below it, nothing imports
Prefect, MLflow, tasks/ or flows/, and no module reaches itself through its imports.

    leaves (errors, config, losses, resources, faults)
      <- io, arch <- evaluation, export, quantize <- prune, distill <- pipeline <- cli
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LIB = ROOT / "slimmoe"
LEAVES = {"slimmoe", "slimmoe.errors", "slimmoe.config", "slimmoe.losses", "slimmoe.resources", "slimmoe.faults"}
LEVEL = {"io": 1, "arch": 1, "parallel": 1, "evaluation": 2, "export": 2, "quantize": 2, "prune": 3, "distill": 3, "pipeline": 4, "cli": 5}
FORBIDDEN_ROOTS = ("prefect", "mlflow", "tasks", "flows")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_under(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / "slimmoe").rglob("*.py"))}


def group(module: str) -> str:
    """The layer group a module belongs to: 'leaf' or its sub-package (io, prune, ...)."""
    if module in LEAVES:
        return "leaf"
    sub = module.split(".")[1]
    assert sub in LEVEL, f"{module}: a new top-level module must join a layer (tests/test_layering.py)"
    return sub


def level(module: str) -> int:
    g = group(module)
    return 0 if g == "leaf" else LEVEL[g]


def imports_of(path: Path, module: str, known: dict[str, Path]) -> set[str]:
    """Every module a file names in an import statement, anywhere in it (functions too);
    for ``from P import x`` that is ``P.x`` when it is a module, else ``P``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return found


def import_graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(every import of every module, the imports between slimmoe modules)."""
    known = modules_under(root)
    raw = {m: imports_of(p, m, known) for m, p in known.items()}
    return raw, {m: {i for i in deps if i in known and i != m} for m, deps in raw.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for m, deps in graph.items():
        for d in deps:
            same_floor_other_room = level(d) == level(m) and group(d) != group(m)
            if level(d) > level(m) or (same_floor_other_room and level(m) != 0):
                wrong.append(f"{m} ({group(m)}) imports {d} ({group(d)})")
    return sorted(wrong)


RAW, GRAPH = import_graph(ROOT)
MODULES = modules_under(ROOT)


def test_every_module_is_in_a_layer():
    for m in MODULES:
        group(m)


def test_layers_import_only_downwards():
    wrong = layer_violations(GRAPH)
    assert not wrong, "\n".join(wrong)


def test_nothing_imports_the_pipeline_engines_or_the_layers_above_the_library():
    wrong = [f"{m} imports {i}" for m, deps in RAW.items() for i in deps if i.split(".")[0] in FORBIDDEN_ROOTS]
    assert not wrong, "\n".join(sorted(wrong))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a self-loop."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The checks above can fail: in a made-up tree, a loop closed by an import inside a
    function, an upward import and a Prefect import are all found."""
    files = {
        "slimmoe/__init__.py": "",
        "slimmoe/io/__init__.py": "",
        "slimmoe/io/a.py": "from slimmoe.io import b\n",
        "slimmoe/io/b.py": "def f():\n    from slimmoe.io.a import g\n",
        "slimmoe/prune/__init__.py": "",
        "slimmoe/prune/c.py": "def h():\n    import prefect\n    from slimmoe.pipeline.d import x\n",
        "slimmoe/pipeline/__init__.py": "",
        "slimmoe/pipeline/d.py": "x = 1\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    raw, graph = import_graph(tmp_path)
    assert cycles(graph) == [["slimmoe.io.a", "slimmoe.io.b"]]
    assert layer_violations(graph) == ["slimmoe.prune.c (prune) imports slimmoe.pipeline.d (pipeline)"]
    assert "prefect" in raw["slimmoe.prune.c"]


@pytest.mark.parametrize("module, dep", [("slimmoe.prune.importance", "slimmoe.losses"),
                                         ("slimmoe.distill.loop", "slimmoe.distill.checkpoint"),
                                         ("slimmoe.pipeline.steps.score", "slimmoe.prune.importance")])
def test_imports_are_read_from_the_source(module, dep):
    """The graph holds what the files say (a sample checked by hand against the tree)."""
    assert dep in GRAPH[module]


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
    """At run time too: importing every module and building the CLI (with its pipeline
    commands, which join through entry points) loads neither Prefect nor MLflow."""
    subprocess.run([sys.executable, "-c", CODE], check=True, cwd=ROOT, timeout=300)
