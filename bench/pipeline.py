"""The cost of orchestration: the compress flow (Prefect + MLflow) vs the same steps as plain calls.

    .venv/bin/python bench/pipeline.py                  # about 80 s on 2 idle CPU cores
    .venv/bin/python bench/pipeline.py --tokens 131072  # quicker; the fixed cost weighs more

Builds a small phimoe teacher (hidden 64, 2 layers, 4 experts of width 64, BPE vocab 512
trained on the bundled corpus) and a two-stage pipeline (width 64 -> 32 -> 16, KV 2 -> 1),
then measures in one process, each with fresh output and data-cache folders:
  1. direct: slimmoe.pipeline.steps.prepare_data / score / slim / distill_stage / evaluate_stage;
  2. flow:   the compress flow on a local Prefect server (started before timing), logging
             to a fresh MLflow sqlite store;
  3. cached: the compress flow again with the same config (every step Cached).
Prints flow/direct (target <= 1.15) and cached/flow (target <= 0.1).

The orchestration cost is about 4 s per pipeline whatever its size (creating the MLflow
sqlite store ~1.4 s, importance histograms and loss-curve PNGs, ~20 Prefect task runs),
so the ratio approaches 1 as the distillation budget grows; a cached re-run costs ~1 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_teacher(folder: Path) -> tuple[Path, Path]:
    from tiny_models import tiny_teacher_with_tokenizer

    return tiny_teacher_with_tokenizer(folder, corpus_chars=200_000, hidden_size=64, intermediate_size=64,
                                       max_position_embeddings=128)


def pipeline_config(teacher: Path, corpus: Path, out: Path, tokens: int) -> dict:
    distill = {"tokens": tokens, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 20, "progress": False}
    return {
        "name": "bench-pipeline", "teacher": str(teacher), "output_dir": str(out),
        "data": {"train": str(corpus), "eval_fraction": 0.05, "seq_len": 64},
        "stages": [
            {"name": "mid", "expert_intermediate_size": 32, "importance": {"samples": 32}, "distill": distill},
            {"name": "final", "expert_intermediate_size": 16, "num_key_value_heads": 1, "importance": {"samples": 32},
             "distill": distill},
        ],
        "tracking": {"experiment": "bench"},
    }


def run_direct(cfg) -> None:
    """The same steps as the flow, called as library functions, no Prefect, no MLflow."""
    from slimmoe.pipeline import steps

    out = Path(cfg.output_dir)
    d = cfg.data
    blocks = steps.prepare_data(d.train, cfg.teacher, out / "data", d.seq_len, eval_fraction=d.eval_fraction)

    def evaluate(model_dir: str, eval_cfg) -> None:  # as the evaluate task calls it: KL to the teacher etc.
        steps.evaluate_stage(model_dir, blocks.path, teacher_dir=cfg.teacher, **eval_cfg.model_dump())

    evaluate(cfg.teacher, cfg.stages[0].eval)
    current, teacher = cfg.teacher, cfg.teacher
    for st in cfg.stages:
        root = out / st.name
        scores = steps.score(current, None if current == teacher else teacher, blocks.path, st.importance,
                             st.targets(), root / "importance.pt", progress=False)
        small = steps.slim(current, scores.path, st.targets(), root / "pruned")
        student = steps.distill_stage(small.path, teacher, blocks.path, st.distill, root / "model")
        evaluate(student.path, st.eval)
        current = student.path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=524288, help="distillation tokens per stage")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="slimmoe-bench-pipeline-"))
    os.environ["PREFECT_HOME"] = str(work / "prefect")
    teacher, corpus = build_teacher(work / "teacher")

    from prefect.testing.utilities import prefect_test_harness

    from flows.compress import compress
    from slimmoe.pipeline.schema import PipelineConfig

    times = {}
    os.environ["SLIMMOE_CACHE"] = str(work / "cache-direct")
    cfg = PipelineConfig.model_validate(pipeline_config(teacher, corpus, work / "direct", args.tokens))
    t0 = time.perf_counter()
    run_direct(cfg)
    times["direct"] = time.perf_counter() - t0

    with prefect_test_harness(server_startup_timeout=60):
        os.environ["SLIMMOE_CACHE"] = str(work / "cache-flow")
        cfg = PipelineConfig.model_validate(pipeline_config(teacher, corpus, work / "flow", args.tokens))
        for name in ("flow", "cached"):
            t0 = time.perf_counter()
            compress(cfg)
            times[name] = time.perf_counter() - t0

    print(f"\nteacher: hidden 64, 2 layers, 4 experts x 64; 2 stages x {args.tokens} distillation tokens; work dir {work}")
    for name, t in times.items():
        print(f"{name:8s}{t:9.1f} s")
    print(f"flow / direct:  {times['flow'] / times['direct']:.3f}  (target <= 1.15)")
    print(f"cached / flow:  {times['cached'] / times['flow']:.3f}  (target <= 0.1)")


if __name__ == "__main__":
    main()
