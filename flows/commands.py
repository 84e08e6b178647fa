"""`slimmoe run` and `slimmoe demo`: the pipeline commands.

They live outside the library (which never imports Prefect or MLflow) and join the
``slimmoe`` command through the ``slimmoe.commands`` entry-point group (pyproject.toml).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from slimmoe.errors import UserError


def _quiet_prefect() -> None:
    # A temporary local server starts when no PREFECT_API_URL is set; its telemetry
    # otherwise logs a harmless "database is locked" error on the first start.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def add_run(sub) -> None:
    p = sub.add_parser("run", help="run the multi-stage compression pipeline of a YAML config",
                       description="Run the compress flow. Writes <output_dir>/<stage>/model/ per stage and "
                                   "<output_dir>/summary.json.")
    _config_args(p, "--set stages.0.distill.tokens=2000")
    p.set_defaults(func=run)


def _config_args(p, example: str) -> None:
    """CONFIG.yaml, ``--set`` and ``--force``: the arguments of the commands that run a flow."""
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help=f"override any config field, e.g. {example}")
    p.add_argument("--force", action="store_true",
                   help="write into output_dir even if it holds another pipeline's results")


def run(args) -> int:
    from slimmoe.pipeline.schema import load_pipeline_config

    cfg = _load(load_pipeline_config, args)
    with _guarded(cfg, check_run, "slimmoe run", args.force):
        from flows.compress import compress

        summary = compress(cfg)
    print(format_summary(summary))
    return 0


def check_run(cfg) -> None:
    """Everything `slimmoe run` checks before its flow starts: the inputs, then, when a device
    memory is known (launch.device_memory or the GPU's), that every step fits it
    (slimmoe.pipeline.fit, the model `slimmoe plan` prints)."""
    from slimmoe.pipeline.fit import check_fits, device_memory_bytes
    from slimmoe.pipeline.resolve import check_inputs

    check_inputs(cfg)
    check_fits(cfg, cfg.launch, device_memory_bytes(cfg.launch))


def _load(loader, args):
    """A config from ``args.config`` + ``--set``; file and override errors become one line."""
    try:
        return loader(args.config, args.overrides)
    except ValueError as e:
        if hasattr(e, "errors"):  # pydantic ValidationError: the CLI names the field
            raise
        raise UserError(str(e)) from None


@contextmanager
def _guarded(cfg, check, what: str, force: bool):
    """The safety switches on, ``check(cfg)`` passed, the output folder owned and locked:
    what every flow-running command needs before its flow starts."""
    from slimmoe.io.loading import loading_policy

    with loading_policy(cfg.trust_remote_code, cfg.allow_pickle):
        check(cfg)
        with _own_output(cfg, what, force):
            _quiet_prefect()
            yield


@contextmanager
def _own_output(cfg, what: str, force: bool):
    """Hold ``cfg.output_dir``'s lock and mark it as this pipeline's for the ``with`` block;
    refuse another pipeline's folder (unless ``force``) before writing anything."""
    from slimmoe.io.lock import check_output_owner, output_lock, write_output_owner

    check_output_owner(cfg.output_dir, cfg.name, force)
    with output_lock(cfg.output_dir, what):
        check_output_owner(cfg.output_dir, cfg.name, force)  # again, now that no one else writes
        write_output_owner(cfg.output_dir, cfg.name, cfg.teacher)
        yield


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="offline demo: train a small MoE teacher, compress it in two stages",
                       description="Train a small phimoe teacher on the bundled corpus, compress it in two stages "
                                   "with the compress flow, print the summary and where to look.")
    p.add_argument("--output-dir", default="outputs/demo")
    p.add_argument("--config", default=None, help="compress config (default deployments/configs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--force", action="store_true", help="write into --output-dir even if it holds other results")
    p.set_defaults(func=demo)


def demo(args) -> int:
    from slimmoe.pipeline.schema import load_pipeline_config

    root = Path(__file__).resolve().parents[1]
    config = args.config or str(root / "deployments" / "configs" / "demo.yaml")
    out = Path(args.output_dir)
    cfg = load_pipeline_config(config, [f"teacher={out / 'teacher'}", f"output_dir={out / 'compress'}",
                                        f"data.train={root / 'data' / 'tinyshakespeare.txt'}", *args.overrides])
    _quiet_prefect()
    from flows.compress import compress
    from flows.teacher import teacher
    from slimmoe.pipeline.demo_teacher import TeacherConfig

    with _own_output(cfg, "slimmoe demo", args.force):  # before the teacher: it logs into output_dir's mlflow.db
        teacher(TeacherConfig(corpus=root / "data" / "tinyshakespeare.txt"), output_dir=str(out / "teacher"),
                tracking_uri=cfg.tracking_uri(), experiment=cfg.tracking.experiment)
        summary = compress(cfg)
    print(format_summary(summary))
    print(f"\nsummary:  {Path(cfg.output_dir) / 'summary.json'}")
    ui = summary["mlflow"]["ui"]
    print(f"MLflow:   {ui} --host 127.0.0.1   then open http://127.0.0.1:5000" if ui
          else f"MLflow:   {summary['mlflow']['tracking_uri']}")
    print("Prefect:  prefect server start --host 127.0.0.1   then open http://127.0.0.1:4200 (runs of this demo used a temporary "
          "server unless PREFECT_API_URL was set; see README, 'Deployments')")
    return 0


def format_summary(summary: dict) -> str:
    head = f"{'stage':10s}{'width':>7s}{'KV':>4s}{'experts':>8s}{'total':>12s}{'active':>12s}{'ppl':>9s}{'tokens':>10s}"
    lines = [head, "-" * len(head)]
    for r in summary["stages"]:
        lines.append(f"{r['stage']:10s}{r['expert_intermediate_size']:>7}{r['num_key_value_heads']:>4}{r['num_experts']:>8}"
                     f"{r['total_params']:>12,}{r['active_params']:>12,}{r['perplexity']:>9.2f}{r['tokens']:>10,}")
    return "\n".join(lines)


def add_ablate(sub) -> None:
    p = sub.add_parser("ablate", help="compare compression strategies side by side (ablation flow)",
                       description="Run the ablation flow: one-shot slim, multi-stage slim, one-shot drop, slim+drop "
                                   "and a from-scratch baseline on one teacher, data set and token budget, over seeds. "
                                   "Writes <output_dir>/report.md, report.json and plots.")
    _config_args(p, "--set tokens=100000 --set seeds=[0]")
    p.set_defaults(func=ablate)


def ablate(args) -> int:
    from slimmoe.pipeline.ablation_schema import load_ablation_config
    from slimmoe.pipeline.arms import check_ablation_inputs

    cfg = _load(load_ablation_config, args)
    with _guarded(cfg, lambda c: check_ablation_inputs(c, preflight=True), "slimmoe ablate", args.force):
        from flows.ablation import ablation

        result = ablation(cfg)
    if "cells" in result:  # a grid: its report holds a table per budget
        print((Path(cfg.output_dir) / "report.md").read_text())
    else:
        print(format_ablation(result["arms"]))
    print(f"\nreport: {Path(cfg.output_dir) / 'report.md'}")
    return 0


def format_ablation(arms: list[dict]) -> str:
    head = f"{'arm':18s}{'total':>12s}{'active':>12s}{'ppl mean':>10s}{'± std':>8s}{'ppl/teacher':>13s}{'± std':>8s}"
    lines = [head, "-" * len(head)]
    for r in arms:
        lines.append(f"{r['arm']:18s}{r['total_params']:>12,}{r['active_params']:>12,}{r['perplexity_mean']:>10.3f}"
                     f"{r['perplexity_std']:>8.3f}{r['ratio_mean']:>13.4f}{r['ratio_std']:>8.4f}")
    return "\n".join(lines)
