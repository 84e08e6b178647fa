"""The grid's report from plain dicts: one table per budget (rows: arms, columns: width cuts;
held-out perplexity over the teacher's, mean ± sample std over seeds), report.json, and one
plot of perplexity against active parameters per budget. No Prefect, no MLflow; matplotlib is
imported only to plot, and its absence is said in the report instead of failing it.

A *run* is one arm of one cell at one seed::

    {"budget": 0.025, "cut": "4x", "arm": "one-shot-slim", "seed": 0, "perplexity": 61.2,
     "total_params": ..., "active_params": ..., "tokens": 600000}
"""

from __future__ import annotations

import json
from pathlib import Path

from slimmoe.io.atomic import atomic_write_text
from slimmoe.pipeline.grid_findings import cell_findings, findings_markdown, split_label, told_apart
from slimmoe.pipeline.report import REPORT_JSON, REPORT_MD, mean_std

GRID_PNG = "grid_perplexity_vs_active.png"


def grid_cells(runs: list[dict], teacher: dict) -> list[dict]:
    """One entry per (budget, cut, arm), in the order they first appear: seeds, sizes, and
    perplexity and perplexity / teacher as mean and sample std over seeds."""
    out = []
    for key in dict.fromkeys((r["budget"], r["cut"], r["arm"]) for r in runs):
        mine = sorted((r for r in runs if (r["budget"], r["cut"], r["arm"]) == key), key=lambda r: r["seed"])
        ppl = [float(r["perplexity"]) for r in mine]
        (pm, ps), (rm, rs) = mean_std(ppl), mean_std([p / float(teacher["perplexity"]) for p in ppl])
        out.append({"budget": key[0], "cut": key[1], "arm": key[2], "seeds": [r["seed"] for r in mine],
                    "total_params": mine[0]["total_params"], "active_params": mine[0]["active_params"],
                    "tokens": mine[0].get("tokens"), "perplexity_mean": pm, "perplexity_std": ps,
                    "ratio_mean": rm, "ratio_std": rs})
    return out


def close_pairs(cells: list[dict]) -> list[dict]:
    """Pairs of arms at the same budget and cut that are not told apart
    (:func:`~slimmoe.pipeline.grid_findings.told_apart`: means within twice the larger of their
    spreads; issue 14: such pairs get a third seed). Arms of one seed have no spread and are
    left out."""
    out = []
    for i, a in enumerate(cells):
        for b in cells[i + 1:]:
            if (a["budget"], a["cut"]) != (b["budget"], b["cut"]) or min(len(a["seeds"]), len(b["seeds"])) < 2:
                continue
            if not told_apart(a, b):
                out.append({"budget": a["budget"], "cut": a["cut"], "arms": [a["arm"], b["arm"]],
                            "difference": abs(a["ratio_mean"] - b["ratio_mean"]),
                            "spread": max(a["ratio_std"], b["ratio_std"])})
    return out


def budget_label(budget: float, teacher_tokens: int | None = None) -> str:
    tokens = f" ({int(round(budget * teacher_tokens)):,} tokens)" if teacher_tokens else ""
    return f"{budget * 100:g}% of the teacher's tokens{tokens}"


def grid_markdown(cells: list[dict], teacher: dict, meta: dict | None = None, plot: str | None = GRID_PNG) -> str:
    """A table per budget: rows arms, columns cuts, each entry ppl / teacher as mean ± std."""
    meta = meta or {}
    lines = [f"# Ablation grid: {meta.get('name', '')}".rstrip(), ""]
    lines += [f"* {k}: {v}" for k, v in meta.items() if k not in ("name", "teacher_tokens", "cuts", "arms")]
    if meta.get("arms"):
        lines.append("* arms: " + ", ".join(f"{a} ({s['kind']}" + (f", budget split {split_label(s['split'])})" if s.get("split")
                                            else ")") for a, s in meta["arms"].items()))
    lines += [f"* teacher: perplexity {teacher['perplexity']:.3f}, total / active parameters "
              f"{teacher['total_params']:,} / {teacher['active_params']:,}", ""]
    for budget in dict.fromkeys(c["budget"] for c in cells):
        mine = [c for c in cells if c["budget"] == budget]
        cuts = list(dict.fromkeys(c["cut"] for c in mine))
        arms = list(dict.fromkeys(c["arm"] for c in mine))
        at = {(c["arm"], c["cut"]): c for c in mine}
        lines += [f"## Budget {budget_label(budget, meta.get('teacher_tokens'))}", "",
                  "ppl / teacher, mean ± std over seeds (n = seeds)", "",
                  "| arm | " + " | ".join(cuts) + " |", "|---" * (len(cuts) + 1) + "|"]
        for arm in arms:
            entries = [f"{at[arm, cut]['ratio_mean']:.4f} ± {at[arm, cut]['ratio_std']:.4f} "
                       f"(n={len(at[arm, cut]['seeds'])})" if (arm, cut) in at else "—" for cut in cuts]
            lines.append(f"| {arm} | " + " | ".join(entries) + " |")
        lines.append("")
    lines.append("Spread is the sample standard deviation over seeds; — : the arm was not run at that cut.")
    close = close_pairs(cells)
    if close:
        lines += ["", "Within twice their spread of each other (add a seed to tell them apart):", ""]
        lines += [f"* {c['budget'] * 100:g}%, {c['cut']}: {c['arms'][0]} vs {c['arms'][1]} "
                  f"(difference {c['difference']:.4f}, spread {c['spread']:.4f})" for c in close]
    if meta.get("arms"):
        lines += [""] + findings_markdown(cell_findings(cells, meta["arms"]))
    lines += ["", f"![perplexity vs active parameters]({plot})", ""] if plot else \
        ["", "(no plot: matplotlib is not installed in this environment)", ""]
    return "\n".join(lines)


def grid_figure(cells: list[dict], teacher: dict):
    """One panel per budget: perplexity (mean, error bar = std) against active parameters,
    one colour per arm, one point per cut; the teacher as a dashed line."""
    from matplotlib.figure import Figure

    budgets = list(dict.fromkeys(c["budget"] for c in cells))
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(dict.fromkeys(c["arm"] for c in cells))}
    fig = Figure(figsize=(6 * len(budgets), 4.2), layout="constrained")
    axes = fig.subplots(1, len(budgets), squeeze=False)[0]
    for ax, budget in zip(axes, budgets):
        for arm, color in colors.items():
            pts = sorted((c["active_params"], c["perplexity_mean"], c["perplexity_std"]) for c in cells
                         if c["budget"] == budget and c["arm"] == arm)
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, fmt="o-", color=color, capsize=3, linewidth=0.8, label=arm)
        ax.axhline(teacher["perplexity"], color="gray", linestyle="--", linewidth=1, label="teacher")
        ax.set(xlabel="active parameters (log)", ylabel="held-out perplexity (log)",
               title=f"budget {budget * 100:g}% of the teacher's tokens")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    return fig


def write_grid_report(out_dir: str | Path, runs: list[dict], teacher: dict, meta: dict | None = None) -> dict:
    """report.md, report.json and (matplotlib permitting) the plot in ``out_dir``, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cells = grid_cells(runs, teacher)
    paths = {}
    try:
        fig = grid_figure(cells, teacher)
    except ImportError:
        fig = None
    if fig is not None:
        tmp = out / f".{GRID_PNG}.tmp.png"
        fig.savefig(tmp, dpi=90)
        tmp.replace(out / GRID_PNG)
        paths[GRID_PNG] = str(out / GRID_PNG)
    text = grid_markdown(cells, teacher, meta, plot=GRID_PNG if fig is not None else None)
    doc = {"meta": meta or {}, "teacher": teacher, "cells": cells, "close_pairs": close_pairs(cells),
           "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs]}
    atomic_write_text(out / REPORT_JSON, json.dumps(doc, indent=1))
    atomic_write_text(out / REPORT_MD, text)
    paths.update({REPORT_JSON: str(out / REPORT_JSON), REPORT_MD: str(out / REPORT_MD)})
    return {"cells": cells, "markdown": text, "paths": paths}
