"""Quality of the compression strategies on the demo teacher: held-out perplexity of every
ablation arm over the teacher's, mean ± sample std over seeds (not part of `make test`).

    python bench/quality.py                        # outputs/demo/teacher, 3 seeds, ~20 min on 2 cores
    python bench/quality.py --teacher PATH --set tokens=100000
    python bench/quality.py --grid deployments/configs/ablation-gutenberg-grid.yaml   # issue 14's grid

``--grid CONFIG`` runs a grid config through ``slimmoe ablate`` (cached: a rerun continues where
one stopped) and writes ``report.md`` / ``report.json`` in the grid's output_dir: a table per
budget (rows: arms, columns: width cuts; ppl / teacher, mean ± std over seeds), the findings
(slimmoe.pipeline.grid_findings) and a plot of perplexity against active parameters per budget;
it prints the wall time. ``--grid CONFIG --report-only`` rewrites the report from its runs.

Runs the ablation flow (deployments/configs/ablation-demo.yaml) in-process: about a third
of the teacher's parameters, one token budget per arm. Prints the numbers as they come.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="outputs/demo/teacher")
    p.add_argument("--output-dir", default="outputs/bench-quality")
    p.add_argument("--config", default=str(ROOT / "deployments" / "configs" / "ablation-demo.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--grid", metavar="CONFIG", default=None,
                   help="run this grid config through `slimmoe ablate` (--teacher/--output-dir/--set apply to it)")
    p.add_argument("--report-only", action="store_true",
                   help="with --grid: rewrite report.md / report.json / the plot from the runs in report.json "
                        "(e.g. after a newer slimmoe changed the report), running nothing")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default torch's); 1 is faster on a machine shared by several jobs")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if args.grid:
        return run_grid(args)

    from slimmoe.pipeline.ablation_schema import load_ablation_config
    from slimmoe.pipeline.arms import check_ablation_inputs

    cfg = load_ablation_config(args.config, [f"teacher={args.teacher}", f"output_dir={args.output_dir}",
                                             f"data.train={ROOT / 'data' / 'tinyshakespeare.txt'}", *args.overrides])
    check_ablation_inputs(cfg)
    from flows.ablation import ablation

    t0 = time.perf_counter()
    result = ablation(cfg)
    minutes = (time.perf_counter() - t0) / 60
    print(f"\nablation on {cfg.teacher}: target {cfg.target.model_dump(exclude_none=True)}, {cfg.tokens:,} tokens "
          f"per arm, seeds {cfg.seeds}, {minutes:.1f} min")
    print(f"{'arm':18s}{'total':>11s}{'active':>11s}   ppl / teacher (mean ± std over seeds)")
    for r in result["arms"]:
        print(f"{r['arm']:18s}{r['total_params']:>11,}{r['active_params']:>11,}   "
              f"{r['ratio_mean']:.4f} ± {r['ratio_std']:.4f}")
    print(f"\nreport: {Path(cfg.output_dir) / 'report.md'}")
    return 0


def run_grid(args) -> int:
    """The grid through `slimmoe ablate`; then its report (tables per budget) and the wall time."""
    import json

    import slimmoe.cli
    from slimmoe.io.atomic import atomic_write_text
    from slimmoe.pipeline.ablation_schema import load_ablation_config

    overrides = list(args.overrides)
    if args.teacher != "outputs/demo/teacher":
        overrides.append(f"teacher={args.teacher}")
    if args.output_dir != "outputs/bench-quality":
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_ablation_config(args.grid, overrides)
    report = Path(cfg.output_dir) / "report.json"
    if args.report_only:
        from slimmoe.pipeline.grid_report import write_grid_report

        doc = json.loads(report.read_text())
        res = write_grid_report(cfg.output_dir, doc["runs"], doc["teacher"], doc["meta"])
        print(res["markdown"])
        return 0
    t0 = time.perf_counter()
    code = slimmoe.cli.main(["ablate", args.grid, *[a for o in overrides for a in ("--set", o)]])
    hours = (time.perf_counter() - t0) / 3600
    if code:
        return code
    doc = json.loads(report.read_text())
    doc["meta"]["wall_hours_this_run"] = round(hours, 3)  # a rerun that found everything cached is short
    atomic_write_text(report, json.dumps(doc, indent=1))
    print(f"\ngrid {cfg.name}: {len(doc['runs'])} arm runs, {hours:.2f} h wall this run; "
          f"report: {report.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
