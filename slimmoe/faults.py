"""Deterministic fault injection for crash and numerics tests (no effect unless an env var is set).

``SLIMMOE_CRASH_AT=<point>[,<point>...]`` makes :func:`crash_point` SIGKILL its own
process when execution reaches a named point, e.g. ``importance``, ``slim:write``
(between filling the temporary folder and renaming it), ``distill:step=5`` (after
optimizer step 5), ``checkpoint:write`` (checkpoint files half written), ``evaluate``,
``summary:write``. A SIGKILL runs no cleanup, so it is the same as a power cut or the
OOM killer for everything on disk.

``SLIMMOE_NAN_AT=<step>[,<step>...]`` makes :func:`poison_loss` turn the distillation
loss of those optimizer steps (1-based) into NaN before backward.
"""

from __future__ import annotations

import os
import signal
import sys

CRASH_ENV = "SLIMMOE_CRASH_AT"
NAN_ENV = "SLIMMOE_NAN_AT"


def _listed(env: str) -> list[str]:
    return [p.strip() for p in os.environ.get(env, "").split(",") if p.strip()]


def crash_point(name: str, **where: object) -> None:
    """SIGKILL this process if ``SLIMMOE_CRASH_AT`` names this point.

    ``crash_point("distill", step=5)`` matches ``distill`` and ``distill:step=5``.
    """
    points = _listed(CRASH_ENV)
    if not points:
        return
    full = name + "".join(f":{k}={v}" for k, v in where.items())
    if name in points or full in points:
        print(f"slimmoe: crash point {full} reached ({CRASH_ENV}); killing process {os.getpid()}",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def poison_loss(loss, step: int):
    """``loss`` times NaN when ``SLIMMOE_NAN_AT`` lists ``step``; ``loss`` itself otherwise."""
    steps = _listed(NAN_ENV)
    if steps and str(step) in steps:
        return loss * float("nan")
    return loss
