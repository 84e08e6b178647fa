"""What a grid's cells say, in the three comparisons issue 14 asks about, from plain dicts:

* **stages**: the best multi-stage slim arm against one-shot slim;
* **slim vs drop**: one-shot slim against one-shot drop and slim+drop (all at the same total);
* **compression vs scratch**: the scratch arm's perplexity over the best compression arm's.

Two arms are *told apart* when both have two seeds or more and their means (ppl / teacher)
differ by at least :data:`MARGIN` times the larger of their sample stds; arms that are not
get a third seed (``grid.close_pair_seeds``), and a multi-stage arm that is not told apart
from one-shot does not make the automatic schedule multi-stage
(:mod:`slimmoe.pipeline.schedule_rule`).
"""

from __future__ import annotations

MARGIN = 2.0


def told_apart(a: dict, b: dict) -> bool:
    """Whether two grid cells (``grid_report.grid_cells`` entries) differ by more than the margin."""
    if min(len(a["seeds"]), len(b["seeds"])) < 2:
        return False
    return abs(a["ratio_mean"] - b["ratio_mean"]) >= MARGIN * max(a["ratio_std"], b["ratio_std"])


def split_label(shares) -> str:
    """A budget split as percentages, e.g. ``25/75``."""
    return "/".join(f"{100 * x:.0f}" for x in shares)


def slim_splits(arms: dict) -> dict[str, tuple[float, ...]]:
    """Slim arms (the report's ``meta.arms``) -> their budget split."""
    return {a: tuple(float(x) for x in spec["split"]) for a, spec in arms.items()
            if spec.get("kind") == "slim" and spec.get("split")}


def cell_findings(cells: list[dict], arms: dict) -> list[dict]:
    """Per (budget, cut), in report order: one-shot, best multi-stage, drop arms and scratch
    cells (None where not run), and whether the best multi-stage arm wins (told apart, lower)."""
    kinds = {a: spec.get("kind") for a, spec in arms.items()}
    splits = slim_splits(arms)
    out = []
    for budget, cut in dict.fromkeys((c["budget"], c["cut"]) for c in cells):
        here = {c["arm"]: c for c in cells if (c["budget"], c["cut"]) == (budget, cut)}
        one = next((c for a, c in here.items() if len(splits.get(a, ())) == 1), None)
        multi = sorted((c for a, c in here.items() if len(splits.get(a, ())) > 1), key=lambda c: c["ratio_mean"])
        best = multi[0] if multi else None
        wins = one is not None and best is not None and told_apart(one, best) and best["ratio_mean"] < one["ratio_mean"]
        compression = [c for a, c in here.items() if kinds.get(a) != "scratch"]
        out.append({"budget": budget, "cut": cut, "one_shot": one, "best_multi": best, "multi_wins": wins,
                    "drop": next((c for a, c in here.items() if kinds.get(a) == "drop"), None),
                    "slim_drop": next((c for a, c in here.items() if kinds.get(a) == "slim-drop"), None),
                    "scratch": next((c for a, c in here.items() if kinds.get(a) == "scratch"), None),
                    "best_compression": min(compression, key=lambda c: c["ratio_mean"]) if compression else None})
    return out


def _v(c: dict) -> str:
    return f"{c['arm']} {c['ratio_mean']:.4f} ± {c['ratio_std']:.4f}"


def _versus(a: dict, b: dict) -> str:
    """``a`` against ``b``: lower by how much, and whether that is beyond the margin."""
    d = b["ratio_mean"] - a["ratio_mean"]
    word = "lower" if d > 0 else "higher"
    verdict = "told apart" if told_apart(a, b) else f"within {MARGIN:g}x the spread"
    return f"{_v(a)} vs {_v(b)}: {abs(d):.4f} {word} ({verdict})"


def findings_markdown(findings: list[dict]) -> list[str]:
    """The findings as markdown lines, one block per cell."""
    lines = ["## Findings", "",
             f"Told apart: both arms have >= 2 seeds and their means differ by >= {MARGIN:g}x the larger std.", ""]
    for f in findings:
        lines.append(f"**{f['budget'] * 100:g}%, {f['cut']}**")
        lines.append("")
        if f["one_shot"] and f["best_multi"]:
            lines.append(f"* stages: {_versus(f['best_multi'], f['one_shot'])}"
                         + (" -> multi-stage wins" if f["multi_wins"] else " -> one stage"))
        for key in ("drop", "slim_drop"):
            if f["one_shot"] and f[key]:
                lines.append(f"* slim vs {key.replace('_', '+')}: {_versus(f['one_shot'], f[key])}")
        if f["scratch"] and f["best_compression"]:
            ratio = f["scratch"]["ratio_mean"] / f["best_compression"]["ratio_mean"]
            lines.append(f"* compression vs scratch: {_v(f['best_compression'])} vs {_v(f['scratch'])}: "
                         f"scratch {ratio:.2f}x the perplexity")
        lines.append("")
    return lines
