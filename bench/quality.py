"""Quality of the compression strategies on the demo teacher: held-out perplexity of every
ablation arm over the teacher's, mean ± sample std over seeds (not part of `make test`).

    python bench/quality.py                        # outputs/demo/teacher, 3 seeds, ~20 min on 2 cores
    python bench/quality.py --teacher PATH --set tokens=100000

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
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default torch's); 1 is faster on a machine shared by several jobs")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

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


if __name__ == "__main__":
    sys.exit(main())
