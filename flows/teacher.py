"""The teacher flow: a BPE tokenizer and a small phimoe MoE trained from scratch on a text
corpus with the distillation loop's LM loss, saved as an HF checkpoint.

    slimmoe demo                                  # the offline demo's teacher, then its compression
    prefect deployment run teacher/demo           # through a work pool (deployments/)
    python -m flows.teacher deployments/configs/teacher-gutenberg.yaml   # the quality benchmark's teacher

A teacher YAML holds the flow's parameters: ``config`` (slimmoe.pipeline.demo_teacher.TeacherConfig),
``output_dir``, optionally ``split`` (slimmoe.io.books.BookSplitConfig: the corpus's books cut into
training text and held-out tails, written first; the teacher then trains on its ``train/`` folder
and evaluates on ``eval/``), ``tracking_uri`` and ``experiment``. Both steps are cached, and a
killed training resumes from its last checkpoint when the same command runs again.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from slimmoe.config import StrictModel, apply_overrides, load_yaml
from slimmoe.io.books import BookSplitConfig, split_books
from slimmoe.pipeline.demo_teacher import TeacherConfig, teacher_fingerprint, train_teacher
from tasks.caching import cached, open_step_cache, step_policy
from tasks.steps import tracker
from tasks.tracking import TrackingSettings, metric_name


@task(name="train-teacher", retries=1, cache_policy=step_policy())
def train_teacher_task(config: TeacherConfig, corpus_fingerprint: str, output_dir: Path,
                       tracking: TrackingSettings) -> dict:
    """Train (or resume, or find finished) the teacher; log it to its own MLflow run."""
    tr = tracker(tracking)
    params = config.model_dump(mode="json")
    run_id = tr.start_pipeline("teacher", params, tags={"slimmoe.kind": "teacher"})
    result = train_teacher(config, output_dir,
                           metrics_callback=lambda step, m: tr.log_metrics(run_id, {metric_name(k): v for k, v in m.items()}, step))
    tr.log_metrics(run_id, {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    losses = Path(output_dir) / "losses.jsonl"
    if losses.exists():
        tr.log_loss_curve(run_id, str(losses))
    tr.finish(run_id)
    create_table_artifact(key="demo-teacher", table=[{k: v for k, v in result.items() if not isinstance(v, dict)}],
                          description="The offline demo teacher")
    return {**result, "mlflow_run_id": run_id}


@task(name="split-books", cache_policy=step_policy())
def split_books_task(split: BookSplitConfig, fingerprint: str) -> dict:
    """The corpus's books as training heads and held-out tails (slimmoe.io.books)."""
    return split_books(split)


@flow(name="teacher", log_prints=True)
def teacher(config: TeacherConfig = TeacherConfig(), output_dir: str = "outputs/demo/teacher",
            tracking_uri: str | None = None, experiment: str = "slimmoe-demo",
            split: BookSplitConfig | None = None) -> dict:
    out = Path(os.path.abspath(output_dir))
    tracking = TrackingSettings.for_output(tracking_uri, experiment, out.parent)
    open_step_cache(out.parent)  # the cache lies beside the teacher folder, not inside
    if split is not None:
        config = with_split(config, split)
        split = split.model_copy(update={k: Path(os.path.abspath(getattr(split, k)))
                                         for k in ("source", "books", "output_dir")})
        from slimmoe.io.books import split_fingerprint

        cached(split_books_task, out.parent, split.output_dir)(split, split_fingerprint(split))
    config = config.model_copy(update={k: Path(os.path.abspath(v)) for k in ("corpus", "eval_corpus")
                                       if (v := getattr(config, k)) is not None})
    return cached(train_teacher_task, out.parent)(config, teacher_fingerprint(config), out, tracking)


def with_split(config: TeacherConfig, split: BookSplitConfig) -> TeacherConfig:
    """The teacher config reading the split's folders: ``train/`` to train on, ``eval/`` held out."""
    root = Path(split.output_dir)
    return config.model_copy(update={"corpus": root / "train", "eval_corpus": root / "eval"})


class TeacherParams(StrictModel):
    """A teacher YAML: the teacher flow's parameters."""

    config: TeacherConfig = TeacherConfig()
    output_dir: str
    tracking_uri: str | None = None
    experiment: str = "slimmoe-teacher"
    split: BookSplitConfig | None = None


def teacher_params(data: dict) -> dict:
    """The flow's parameters from a teacher YAML's mapping, validated; with ``split``, the
    corpus comes from the split and a ``config.corpus`` besides it is refused."""
    from slimmoe.errors import UserError

    given = {"corpus", "eval_corpus"} & set(data.get("config") or {}) if data.get("split") else set()
    if given:
        raise UserError(f"config.{sorted(given)[0]}: split gives the corpus (its output_dir's train/ and eval/); "
                        "leave it out")
    params = TeacherParams.model_validate(data)
    return {k: getattr(params, k) for k in TeacherParams.model_fields}


def load_teacher_params(path: str | Path, overrides: list[str] | None = None) -> dict:
    """:func:`teacher_params` of a teacher YAML with ``--set`` overrides applied."""
    return teacher_params(apply_overrides(load_yaml(path), overrides or []))


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.teacher TEACHER.yaml [--set key.path=value ...]``: bad input is one line, exit 2."""
    import argparse

    from slimmoe.cli.common import run_guarded

    p = argparse.ArgumentParser(prog="python -m flows.teacher", description="Train a teacher from a teacher YAML "
                                "(split the corpus first when it has split:); cached and resumable.")
    p.add_argument("config", metavar="TEACHER.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads (default torch's); 1 on a machine other jobs share (measured on a busy 2-core "
                        "box: 2 threads trained the Gutenberg teacher 4x slower per CPU-second than 1)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    def _run(a) -> int:
        try:
            params = load_teacher_params(a.config, a.overrides)
        except ValueError as e:
            if hasattr(e, "errors"):
                raise
            from slimmoe.errors import UserError

            raise UserError(str(e)) from None
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        result = teacher(**params)
        print({k: v for k, v in result.items() if not isinstance(v, dict)})
        return 0

    return run_guarded(_run, args)


if __name__ == "__main__":
    sys.exit(main())
