"""Which slimmoe modules a step's function can reach, computed from the source.

A cached step must be recomputed when code it runs changes, and only then. The set of
that code is computed, not listed by hand (hand lists drift):

1. the *roots*: the slimmoe names the task function's own body uses (``steps.score``,
   ``ImportanceConfig``), each resolved to the module that defines it;
2. the *closure*: every slimmoe module a root imports, anywhere in the file (imports
   inside functions too), and so on transitively.

Following an import: ``from P import x`` reaches ``P.x`` when that is a module, else the
module where package ``P`` gets ``x`` from (a re-export in ``P/__init__.py`` is followed
to the module that defines ``x``, so using one name of ``slimmoe.prune`` does not reach
all of it), else ``P`` itself. A package's ``__init__`` that imports whole submodules for
their side effects (``slimmoe.arch`` registering its families) passes them on to
everyone who imports from that package: they decide what ``get_adapter`` returns.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import sys
import textwrap
from functools import lru_cache
from pathlib import Path
from typing import Callable

LIBRARY = "slimmoe"


@lru_cache(maxsize=None)
def _file(module: str) -> Path | None:
    """Source file of a slimmoe module (``__init__.py`` for a package), None if none."""
    if module != LIBRARY and not module.startswith(LIBRARY + "."):
        return None
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _is_package(module: str) -> bool:
    f = _file(module)
    return f is not None and f.name == "__init__.py"


@lru_cache(maxsize=None)
def _tree(module: str) -> ast.Module:
    f = _file(module)
    return ast.parse(f.read_text(), str(f))


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if _is_package(module) else module.rpartition(".")[0]
    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def _bound_by_init(package: str) -> tuple[dict[str, tuple[str, str]], set[str]]:
    """Names ``package/__init__.py`` re-exports (name -> (module, original name)) and the
    submodules it imports whole (side-effect imports such as adapter registration)."""
    reexports, whole = {}, set()
    for node in _tree(package).body:
        if isinstance(node, ast.ImportFrom):
            base = _absolute(package, node)
            for a in node.names:
                if _file(f"{base}.{a.name}") is not None:
                    whole.add(f"{base}.{a.name}")
                else:
                    reexports[a.asname or a.name] = (base, a.name)
        elif isinstance(node, ast.Import):
            whole.update(a.name for a in node.names if _file(a.name) is not None)
    return reexports, whole


def _name_source(package: str, name: str, seen: frozenset = frozenset()) -> set[str]:
    """The modules that decide what ``from package import name`` gives."""
    if _file(f"{package}.{name}") is not None:
        return {f"{package}.{name}"}
    if not _is_package(package) or (package, name) in seen:
        return {package} if _file(package) else set()
    reexports, whole = _bound_by_init(package)
    if name not in reexports:
        return {package} | whole  # defined in the __init__ itself
    base, original = reexports[name]
    return _name_source(base, original, seen | {(package, name)}) | whole


@lru_cache(maxsize=None)
def imports_of(module: str) -> frozenset[str]:
    """The slimmoe modules ``module`` imports, anywhere in its file."""
    found: set[str] = set()
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _file(a.name) is not None:
                    found.add(a.name)
                    if _is_package(a.name):
                        found |= _bound_by_init(a.name)[1]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            for a in node.names:
                found |= _name_source(base, a.name)
    found.discard(module)
    return frozenset(found)


def closure(roots: set[str]) -> set[str]:
    """``roots`` and every slimmoe module they reach through imports."""
    seen: set[str] = set()
    todo = [r for r in roots if _file(r) is not None]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(imports_of(m) - seen)
    return seen


def _dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"] for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _defining_module(obj: object, holder: str) -> str | None:
    if inspect.ismodule(obj):
        return obj.__name__
    module = getattr(obj, "__module__", None)
    return module if isinstance(module, str) else holder


def roots_of(fn: Callable) -> set[str]:
    """The slimmoe modules that define what ``fn``'s body names (globals and attribute
    chains on them, resolved in ``fn``'s module)."""
    namespace = sys.modules[fn.__module__].__dict__
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # a.b: count a.b, not a
    found = set()
    for node in ast.walk(tree):
        if id(node) in inner:
            continue
        chain = _dotted(node) if isinstance(node, (ast.Name, ast.Attribute)) else None
        if not chain or chain[0] not in namespace:
            continue
        obj, holder = namespace[chain[0]], fn.__module__
        for attr in chain[1:]:  # follow the chain as far as it resolves
            if not hasattr(obj, attr):
                break
            holder = obj.__name__ if inspect.ismodule(obj) else holder
            obj = getattr(obj, attr)
        module = _defining_module(obj, holder)
        if module and _file(module) is not None:
            found.add(module)
    return found


def reached_modules(fn: Callable) -> list[str]:
    """Every slimmoe module ``fn`` can reach, sorted."""
    return sorted(closure(roots_of(fn)))


def code_hash(modules: list[str]) -> str:
    """sha256 of the modules' names and source bytes, as they are on disk now."""
    h = hashlib.sha256()
    for m in sorted(modules):
        h.update(m.encode())
        h.update(_file(m).read_bytes())
    return h.hexdigest()
