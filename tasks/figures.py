"""The plots a stage's MLflow run carries: the distillation loss curve (from ``losses.jsonl``)
and one importance histogram per layer. matplotlib's object API only (no pyplot: its
global state is not thread-safe, and Prefect runs tasks in threads)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from matplotlib.figure import Figure


def as_float(v: Any) -> float | None:
    """A finite-or-inf float, or None for None / NaN / non-numbers (tensors and numpy ok)."""
    if v is None or isinstance(v, str):
        return None
    try:
        x = float(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError, RuntimeError):
        return None
    return None if math.isnan(x) else x


def read_series(path: Path, rename: Callable[[str], str]) -> dict[str, dict[int, float]]:
    """{metric name: {step: value}}; blank, torn (crash) and step-less lines are skipped;
    a step seen twice (resume) keeps its last value."""
    series: dict[str, dict[int, float]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError):
            continue
        for k, v in rec.items():
            if k != "step" and (x := as_float(v)) is not None:
                series.setdefault(rename(k), {})[step] = x
    return series


def loss_figure(series: dict[str, dict[int, float]]) -> Figure:
    evals = {k: v for k, v in series.items() if "held_out" in k}
    fig = Figure(figsize=(10 if evals else 6, 3.5), layout="constrained")
    axes = fig.subplots(1, 2 if evals else 1, squeeze=False)[0]
    train = {k: v for k, v in series.items() if k.endswith("loss") and k not in evals}
    for k, pts in train.items():
        steps = sorted(pts)
        axes[0].plot(steps, [pts[s] for s in steps], label=k, linewidth=1)
    axes[0].set(xlabel="step", ylabel="loss", title="distillation loss")
    axes[0].legend(fontsize=8)
    if evals:
        for k, pts in evals.items():
            steps = sorted(pts)
            axes[1].plot(steps, [pts[s] for s in steps], marker="o", label=k)
        axes[1].set(xlabel="step", title="held-out eval")
        if all(v > 0 for pts in evals.values() for v in pts.values()):
            axes[1].set_yscale("log")
        axes[1].legend(fontsize=8)
    return fig


def importance_figure(layer: int, t: dict[str, Any]) -> Figure:
    """Histogram of neuron scores (log x when all positive), bars for KV groups / experts."""
    import numpy as np

    panels = [k for k in ("neurons", "kv_groups", "experts") if t.get(k) is not None
              or (k == "neurons" and t.get("shared") is not None)]
    fig = Figure(figsize=(4.2 * max(len(panels), 1), 3.2), layout="constrained")
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    fig.suptitle(f"layer {layer}")
    for ax, kind in zip(axes, panels):
        if kind == "neurons":
            parts = {n: t[n].detach().double().flatten().numpy() for n in ("neurons", "shared")
                     if t.get(n) is not None and t[n].numel()}
            vals = np.concatenate(list(parts.values())) if parts else np.zeros(0)
            vals_f = vals[np.isfinite(vals)]
            log = vals_f.size > 0 and vals_f.min() > 0 and vals_f.max() > vals_f.min()
            bins = np.geomspace(vals_f.min(), vals_f.max(), 50) if log else 50
            for n, v in parts.items():
                ax.hist(v[np.isfinite(v)], bins=bins, alpha=0.7, label=f"{n} ({v.size})")
            if log:
                ax.set_xscale("log")
            ax.set(title="neuron scores", xlabel="score", ylabel="count")
            if parts:
                ax.legend(fontsize=7)
        else:
            v = t[kind].detach().double().flatten().numpy()
            ax.bar(np.arange(v.size), v, color="tab:orange" if kind == "experts" else "tab:green")
            if v.size <= 32:
                ax.set_xticks(np.arange(v.size))
            ax.set(title="KV-group scores" if kind == "kv_groups" else "expert scores",
                   xlabel="KV group" if kind == "kv_groups" else "expert")
    return fig
