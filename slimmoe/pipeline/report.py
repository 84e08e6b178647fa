"""The ablation report from plain dicts: one row per arm (mean and spread over seeds),
Markdown, JSON and two plots (held-out perplexity against active parameters; training
loss curves of every arm). No Prefect, no MLflow; matplotlib is imported only to plot.

A *run* is one arm at one seed::

    {"arm": "one-shot-slim", "seed": 0, "perplexity": 61.2, "total_params": ..., "active_params": ...,
     "tokens": 400000, "loss": "kd_topk", "curve": [[tokens_seen, loss], ...]}
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from slimmoe.io.atomic import atomic_write_text

REPORT_MD, REPORT_JSON = "report.md", "report.json"
PPL_PNG, LOSS_PNG = "perplexity_vs_active.png", "loss_curves.png"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    n = len(values)
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def summarize_arms(runs: list[dict], teacher: dict) -> list[dict]:
    """One row per arm, in the order arms first appear: sizes, seeds, perplexity and
    perplexity / teacher perplexity as mean, sample std, min and max over seeds."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        ppl = [float(r["perplexity"]) for r in mine]
        ratio = [p / float(teacher["perplexity"]) for p in ppl]
        (pm, ps), (rm, rs) = mean_std(ppl), mean_std(ratio)
        rows.append({"arm": arm, "seeds": [r["seed"] for r in mine], "total_params": mine[0]["total_params"],
                     "active_params": mine[0]["active_params"], "tokens": mine[0].get("tokens"),
                     "perplexity_mean": pm, "perplexity_std": ps, "perplexity_min": min(ppl), "perplexity_max": max(ppl),
                     "ratio_mean": rm, "ratio_std": rs})
    return rows


def markdown(rows: list[dict], teacher: dict, meta: dict | None = None) -> str:
    """The report as Markdown: the settings, then one table line per arm."""
    meta = meta or {}
    lines = [f"# Ablation: {meta.get('name', '')}".rstrip(), ""]
    for k, v in meta.items():
        if k != "name":
            lines.append(f"* {k}: {v}")
    lines += [f"* teacher: perplexity {teacher['perplexity']:.3f}, total / active parameters "
              f"{teacher['total_params']:,} / {teacher['active_params']:,}", "",
              "| arm | seeds | total params | active params | tokens | perplexity (mean ± std) | "
              "ppl / teacher (mean ± std) | min - max |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tokens = f"{r['tokens']:,}" if r.get("tokens") is not None else ""
        lines.append(f"| {r['arm']} | {len(r['seeds'])} | {r['total_params']:,} | {r['active_params']:,} | {tokens} | "
                     f"{r['perplexity_mean']:.3f} ± {r['perplexity_std']:.3f} | "
                     f"{r['ratio_mean']:.4f} ± {r['ratio_std']:.4f} | "
                     f"{r['perplexity_min']:.3f} - {r['perplexity_max']:.3f} |")
    lines += ["", "Spread is the sample standard deviation over seeds. The drop arms are matched on total "
              "parameters (dropping experts cannot lower the active count while top-k is unchanged).",
              "", f"![perplexity vs active parameters]({PPL_PNG})", "", f"![loss curves]({LOSS_PNG})", ""]
    return "\n".join(lines)


def perplexity_figure(rows: list[dict], teacher: dict):
    """Held-out perplexity (mean, error bar = std over seeds) against active parameters."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    for r in rows:
        ax.errorbar([r["active_params"]], [r["perplexity_mean"]], yerr=[r["perplexity_std"]], fmt="o", capsize=4,
                    label=f"{r['arm']} ({r['total_params'] / 1e6:.2f}M total)")
    ax.axhline(teacher["perplexity"], color="gray", linestyle="--", linewidth=1,
               label=f"teacher ({teacher['active_params'] / 1e6:.2f}M active)")
    ax.set(xlabel="active parameters", ylabel="held-out perplexity (log)", title="perplexity vs active parameters")
    ax.set_yscale("log")  # a from-scratch arm can be several times worse than the rest
    ax.legend(fontsize=7)
    return fig


def loss_figure(runs: list[dict]):
    """Training loss against tokens seen, one line per arm and seed; one panel per loss kind
    (KD and LM losses are on different scales)."""
    from matplotlib.figure import Figure

    kinds = list(dict.fromkeys(r.get("loss", "loss") for r in runs))
    fig = Figure(figsize=(5.5 * len(kinds), 3.8), layout="constrained")
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    colors = {arm: f"C{i}" for i, arm in enumerate(dict.fromkeys(r["arm"] for r in runs))}
    for ax, kind in zip(axes, kinds):
        seen = set()
        for r in runs:
            if r.get("loss", "loss") != kind or not r.get("curve"):
                continue
            x, y = zip(*r["curve"])
            ax.plot(x, y, color=colors[r["arm"]], linewidth=0.8, alpha=0.8,
                    label=None if r["arm"] in seen else r["arm"])
            seen.add(r["arm"])
        ax.set(xlabel="tokens seen", ylabel=kind, title=f"training loss ({kind})")
        ax.legend(fontsize=7)
    return fig


def read_curve(losses_files: list[str | Path]) -> list[list[float]]:
    """[tokens seen, loss] from the ``losses.jsonl`` of each stage, stages laid end to end."""
    curve, offset = [], 0
    for path in losses_files:
        last = 0
        if not Path(path).is_file():
            continue
        for line in Path(path).read_text().splitlines():
            try:
                rec = json.loads(line)
                curve.append([offset + int(rec["tokens"]), float(rec["loss"])])
                last = int(rec["tokens"])
            except (ValueError, KeyError, TypeError):
                continue
        offset += last
    return curve


def write_report(out_dir: str | Path, runs: list[dict], teacher: dict, meta: dict | None = None) -> dict:
    """Write report.md, report.json and the two PNGs into ``out_dir`` (each atomically).
    Returns the arm rows, the markdown and the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize_arms(runs, teacher)
    text = markdown(rows, teacher, meta)
    paths = {}
    for name, fig in ((PPL_PNG, perplexity_figure(rows, teacher)), (LOSS_PNG, loss_figure(runs))):
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=90)
        tmp.replace(out / name)
        paths[name] = str(out / name)
    doc = {"meta": meta or {}, "teacher": teacher, "arms": rows,
           "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs]}
    atomic_write_text(out / REPORT_JSON, json.dumps(doc, indent=1))
    atomic_write_text(out / REPORT_MD, text)
    paths.update({REPORT_JSON: str(out / REPORT_JSON), REPORT_MD: str(out / REPORT_MD)})
    return {"arms": rows, "markdown": text, "paths": paths}
