"""Compression strategies: turn a parameter target into explicit sizes.

A stage may ask for ``total_params`` or ``active_params`` instead of sizes; its
``strategy`` says which axes reach it:

- ``slim`` (the paper's): every expert is kept, the expert width is solved for the target.
  KV groups stay as they are unless given explicitly.
- ``drop``: whole experts are removed (scored by frequency or reap), the width is kept;
  the number of experts per layer is solved. Top-k is capped at the expert count, so
  while top-k experts remain, dropping lowers *active* parameters only by router rows:
  an active target below what the fewest experts leave is an error.
- ``slim+drop``: width and expert count shrink by the same ratio. The expert count is
  the largest ``E`` for which the model with ``E`` experts of the proportional width
  ``floor(I0 * E / E0)`` fits the target; the width is then solved exactly at ``E``.

Every solve picks the largest size whose estimated count is **not above** the target (a
target is a budget), so the result lies within one structure of it: one width step of
every expert of every layer, or one expert per MoE layer. A width step is 8 neurons (1
below 8): widths are multiples of 8, as slimmoe.prune.schedule rounds them, because stock
transformers cannot run fused experts of other widths everywhere (schedule.WIDTH_ALIGN).
Counts are exact analytic estimates (slimmoe.prune.schedule): a 42B teacher plans instantly.
"""

from __future__ import annotations

from typing import Callable

from slimmoe.arch import get_adapter
from slimmoe.config import STRATEGIES, SlimTargets
from slimmoe.errors import UserError
from slimmoe.prune.plan import resolve_targets, source_sizes
from slimmoe.prune.schedule import estimate_active_params, estimate_total_params, valid_widths


def resolve_sizes(
    source_config,
    strategy: str,
    total_params: int | None = None,
    active_params: int | None = None,
    explicit: SlimTargets | None = None,
) -> SlimTargets:
    """Explicit sizes (width, KV heads, experts) of ``source_config`` reaching the parameter target.

    Without a target, ``explicit`` is returned as it is. Errors are one line naming the field
    (``total_params``, ``active_params``, ``num_key_value_heads``, ...).
    """
    explicit = explicit or SlimTargets()
    if strategy not in STRATEGIES:
        raise UserError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if total_params is None and active_params is None:
        return explicit.model_copy()
    if total_params is not None and active_params is not None:
        raise UserError("active_params: give total_params or active_params, not both")
    field, target = ("total_params", total_params) if total_params is not None else ("active_params", active_params)
    count: Callable[..., int] = estimate_total_params if field == "total_params" else estimate_active_params
    if isinstance(target, bool) or not isinstance(target, int) or target <= 0:
        raise UserError(f"{field}: expected a positive whole number of parameters, got {target!r}")
    given = [f for f in ("expert_intermediate_size", "num_experts") if getattr(explicit, f) is not None]
    if given:
        raise UserError(f"{field}: a parameter target sets {' and '.join(given)} itself "
                        "(only num_key_value_heads may be given with it)")

    adapter = get_adapter(source_config)
    src = source_sizes(adapter, source_config)
    resolve_targets(adapter, source_config, explicit)  # a bad explicit KV count fails here, naming it
    I0, E0 = src["expert_intermediate_size"], src["num_experts"]
    kv = explicit.num_key_value_heads or src["num_key_value_heads"]
    have = count(source_config)
    if target > have:
        raise UserError(f"{field}: target {target:,} is larger than the source's {have:,}")

    def fits(width: int, experts: int) -> bool:
        return count(source_config, width, kv, experts) <= target

    widths = valid_widths(I0)
    experts = [e for e in range(1, E0 + 1) if e == E0 or _can_drop_to(adapter, source_config, e)]
    if strategy == "slim":
        E, I = E0, _largest(widths, lambda w: fits(w, E0))
    elif strategy == "drop":
        I, E = I0, _largest(experts, lambda e: fits(I0, e))
    else:
        E = _largest(experts, lambda e: fits(max(1, I0 * e // E0), e)) or experts[0]
        I = _largest(widths, lambda w: fits(w, E))
    if I is None or E is None:
        raise UserError(_unreachable(source_config, adapter, strategy, field, target, count, kv, widths, experts))
    out = SlimTargets(expert_intermediate_size=I, num_key_value_heads=kv, num_experts=E)
    resolve_targets(adapter, source_config, out)  # e.g. expert dropping the architecture refuses
    return out


def _can_drop_to(adapter, config, num_experts: int) -> bool:
    try:
        adapter.check_expert_dropping(config, num_experts)
    except UserError:
        return False
    return True


def _largest(values: list[int], ok: Callable[[int], bool]) -> int | None:
    """The largest of ascending ``values`` with ``ok`` true (``ok`` is monotone: true up to some
    point, then false), or None. A bisection: a few dozen counts even for a width of 6400."""
    lo, hi = 0, len(values)  # invariant: ok on values[:lo], not ok on values[hi:]
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(values[mid]):
            lo = mid + 1
        else:
            hi = mid
    return values[lo - 1] if lo else None


def _unreachable(config, adapter, strategy, field, target, count, kv, widths, experts) -> str:
    I0 = widths[-1]
    smallest = {"slim": (widths[0], experts[-1]), "drop": (I0, experts[0]),
                "slim+drop": (widths[0], experts[0])}[strategy]
    least = count(config, smallest[0], kv, smallest[1])
    msg = f"{field}: target {target:,} is below the {least:,} that strategy {strategy} reaches at its smallest"
    if strategy == "drop" and field == "active_params":
        k = adapter.top_k(config)
        msg += (f" ({experts[0]} experts): dropping experts lowers active parameters only by router rows while "
                f"top-k ({k}) experts stay active; use strategy slim or slim+drop")
    elif strategy == "drop":
        msg += f" ({experts[0]} experts per layer, the fewest {config.model_type} allows)"
    else:
        msg += f" (width {smallest[0]}, {smallest[1]} experts)"
    return msg
