"""The ablation flow: compression strategies side by side on one teacher, one data set and
one token budget, over several seeds.

    slimmoe ablate deployments/configs/ablation-demo.yaml

Each arm x seed is a subflow running the compress flow's stage steps (``compress_stage``).
What two arms or two seeds have in common is computed once and found in the task cache
by the others: the data, the teacher's evaluation, one importance pass on the teacher
(it scores every structure kind any arm cuts first), the first slimming of each arm
(deterministic, shared by all seeds), and the teacher's top-k outputs (one folder under
``<output_dir>/shared``). The seed changes distillation (data order) and the scratch init.

Outputs: ``<output_dir>/arms/<arm>/...`` (models), ``report.md``, ``report.json`` and two
PNGs in ``<output_dir>``; MLflow: one parent run, a nested run per arm and seed (tags
``arm``, ``seed``), stage runs nested under those.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow

from flows.common import fingerprint, flow_guard, stage_row, tracking_settings
from flows.compress import compress_stage
from slimmoe.io.loading import load_config
from slimmoe.pipeline import report
from slimmoe.pipeline.ablation_schema import AblationConfig
from slimmoe.pipeline.arms import check_ablation_inputs, scoring_targets
from slimmoe.pipeline.grid import chain_folder, expand_grid, teacher_tokens
from slimmoe.pipeline.grid_report import close_pairs, grid_cells
from slimmoe.pipeline.report import read_curve
from slimmoe.pipeline.resolve import anchor_paths
from slimmoe.pipeline.schema import StageConfig
from slimmoe.pipeline.steps import ImportanceRef, ModelRef, TokenBlocks
from tasks import lineage, steps
from tasks import report as rt
from tasks.caching import cached, open_step_cache
from tasks.tracking import TrackingSettings


@dataclass
class ArmOutputs:
    """Where a stage of an arm writes. The first stage's pruned model depends on neither
    the seed nor the arm's later stages, so every seed shares it (and its cache entry)."""

    root: Path
    arm: str
    seed: int
    stage: str
    shared_pruned: bool
    chained: bool = False  # a grid's stage: its folder is named by its chain of stages, not by its arm

    def _folder(self, seed: int | None) -> Path:
        if self.chained:  # <root>/stages/<stage 1>/<stage 2>/.../{seed<N>,pruned}
            base = self.root / "stages" / chain_folder(self.stage)
            return base if seed is None else base / f"seed{seed}"
        return self.root / "arms" / self.arm / ("shared" if seed is None else f"seed{seed}") / self.stage

    @property
    def scores(self) -> Path:
        return self._folder(self.seed) / "importance.pt"

    @property
    def pruned(self) -> Path:
        return self._folder(None if self.shared_pruned else self.seed) / "pruned"

    @property
    def model(self) -> Path:
        return self._folder(self.seed) / "model"


@flow(name="ablation", log_prints=True)
def ablation(config: AblationConfig) -> dict:
    with flow_guard(config, "ablation flow"):
        return _ablation(anchor_paths(config))


def _ablation(cfg: AblationConfig) -> dict:
    if cfg.grid is not None:
        return _grid(cfg)
    out = Path(cfg.output_dir)
    arms = check_ablation_inputs(cfg)
    teacher_cfg = load_config(cfg.teacher, "teacher")
    tracking = tracking_settings(cfg)
    for arm, stages in arms.items():
        sizes = ", ".join(f"{s.name.split('.', 1)[1]}: {s.targets().model_dump(exclude_none=True)} "
                          f"({s.distill.tokens:,} tokens)" for s in stages)
        print(f"arm {arm}: {sizes}")
    teacher, blocks, parent, teacher_metrics, scores = _shared_steps(cfg, out, arms, teacher_cfg, tracking)

    # the scratch arm's shape is the one-shot-slim model's: the same slim step (same name, same inputs)
    shape = arms["scratch"][0].model_copy(update={"name": "one-shot-slim.final"}) if "scratch" in arms else None
    runs = []
    for seed in cfg.seeds:
        for arm, stages in arms.items():
            runs.append(ablation_arm.with_options(flow_run_name=f"{arm}-seed{seed}")(
                cfg.name, out, arm, seed, stages, shape if arm == "scratch" else None,
                teacher, blocks, scores, teacher_metrics["perplexity"], tracking, parent))

    meta = {"name": cfg.name, "teacher": cfg.teacher, "data": cfg.data.train, "target": cfg.target.model_dump(exclude_none=True),
            "tokens per arm": f"{cfg.tokens:,}", "multi-stage stages": cfg.num_stages, "seeds": cfg.seeds,
            "distillation loss": cfg.distill.loss}
    teacher_row = {k: teacher_metrics[k] for k in ("perplexity", "total_params", "active_params")}
    return rt.publish_report(out, runs, teacher_row, meta, tracking, parent)


def _shared_steps(cfg: AblationConfig, out: Path, arms: dict, teacher_cfg, tracking: TrackingSettings):
    """What every arm (and every cell of a grid) starts from, each step cached in ``out``: the
    data, the parent MLflow run, the teacher's evaluation, and one importance pass scored for
    every arm's targets. Returns (teacher, blocks, parent run id, teacher metrics, scores)."""
    open_step_cache(out)
    teacher = fingerprint(cfg.teacher)
    blocks = cached(steps.prepare_data, out)(cfg.data, teacher, out / "data")
    parent = rt.start_ablation_run(cfg, teacher, blocks, tracking)
    teacher_metrics = cached(steps.evaluate, out)("teacher", teacher, blocks, cfg.eval, tracking, parent)
    shared_scores = out / "shared" / "importance.pt"
    scores = cached(steps.importance, out, shared_scores)(
        "teacher", teacher, None, blocks, cfg.importance, scoring_targets(arms, teacher_cfg), shared_scores,
        tracking, parent)
    return teacher, blocks, parent, teacher_metrics, scores


def _grid(cfg: AblationConfig) -> dict:
    """Every cell of the grid (slimmoe.pipeline.grid) in one output folder and one step cache:
    data, the teacher's evaluation and top-k cache and one importance pass serve every cell, and
    a stage several cells begin with is computed once. Writes a report per cell
    (``cells/<cell>/report.md``) as it goes, and the grid's report at the end. Then, with
    ``grid.close_pair_seeds``, the arms of every pair within twice its spread
    (:func:`~slimmoe.pipeline.grid_report.close_pairs`) run those seeds too, and the reports
    are written again with them."""
    out = Path(cfg.output_dir)
    arms = check_ablation_inputs(cfg)  # every cell's arms, keyed <cell>/<arm>
    teacher_cfg = load_config(cfg.teacher, "teacher")
    cells = expand_grid(cfg, teacher_cfg)
    tracking = tracking_settings(cfg)
    print(f"grid: {len(cells)} cells, {len(arms)} arms x {len(cfg.seeds)} seeds")
    teacher, blocks, parent, teacher_metrics, scores = _shared_steps(cfg, out, arms, teacher_cfg, tracking)
    teacher_row = {k: teacher_metrics[k] for k in ("perplexity", "total_params", "active_params")}
    meta = {"name": cfg.name, "teacher": cfg.teacher, "data": cfg.data.train, "seeds": cfg.seeds,
            "distillation loss": cfg.distill.loss, "teacher_tokens": teacher_tokens(cfg, cfg.grid),
            "teacher_expert_width": int(teacher_cfg.intermediate_size),
            "cuts": {c.cut.label: {"ratio": c.cut.ratio, "halve_kv": c.cut.halve_kv} for c in cells},
            "arms": {a: spec.model_dump(exclude_none=True) for a, spec in cfg.grid.arms.items()}}

    common = {k: v for k, v in meta.items() if k not in ("cuts", "arms", "teacher_expert_width")}

    def run_cells(seeds: list[int], runs: list[dict], only: set | None = None) -> list[dict]:
        """``seeds`` of every arm (of those in ``only``: (budget, cut label, arm)), appended to
        ``runs``; each cell's report is (re)written as soon as the cell is done."""
        for cell in cells:
            for seed in seeds:
                for arm, stages in cell.arms.items():
                    if only is not None and (cell.budget, cell.cut.label, arm) not in only:
                        continue
                    shape = cell.shape if cfg.grid.arms[arm].kind == "scratch" else None
                    res = ablation_arm.with_options(flow_run_name=f"{cell.label}.{arm}-seed{seed}")(
                        cfg.name, out, arm, seed, stages, shape, teacher, blocks, scores,
                        teacher_metrics["perplexity"], tracking, parent, chained=True)
                    runs.append({**res, "budget": cell.budget, "cut": cell.cut.label, "cell": cell.label})
            report.write_report(out / "cells" / cell.label, [r for r in runs if r["cell"] == cell.label], teacher_row,
                                {**common, "cell": cell.label, "tokens per arm": f"{cell.tokens:,}"})
        return runs

    runs = run_cells(cfg.seeds, [])
    extra = [s for s in cfg.grid.close_pair_seeds if s not in cfg.seeds]
    if extra:
        close = close_pairs(grid_cells(runs, teacher_row))
        only = {(c["budget"], c["cut"], arm) for c in close for arm in c["arms"]}
        print(f"grid: {len(close)} pairs within twice their spread; seeds {extra} for their {len(only)} arms")
        run_cells(extra, runs, only)
        meta["close_pair_seeds"] = extra
    return rt.publish_grid_report(out, runs, teacher_row, meta, tracking, parent)


@flow(name="ablation-arm", log_prints=True)
def ablation_arm(name: str, output_dir: Path, arm: str, seed: int, stages: list[StageConfig],
                 shape_stage: StageConfig | None, teacher: ModelRef, blocks: TokenBlocks, scores: ImportanceRef,
                 teacher_ppl: float, tracking: TrackingSettings, parent: str, chained: bool = False) -> dict:
    """One arm at one seed: its stages in order (the scratch arm, which has a ``shape_stage``:
    init, then train). ``chained``: a grid's arm, whose folders are named by stage chains."""
    out = Path(output_dir)
    stage_cfgs = [_seeded(s, seed) for s in stages]
    run = rt.start_arm_run(parent, name, arm, seed, stage_cfgs, teacher, blocks, tracking)
    if shape_stage is not None:
        rows = [_scratch(shape_stage, stage_cfgs[0], seed, teacher, blocks, scores, tracking, run, out, chained)]
    else:
        rows, current, version = [], teacher, None
        for i, stage in enumerate(stage_cfgs):
            where = ArmOutputs(out, arm, seed, stage.name, shared_pruned=i == 0, chained=chained)
            row, current, version = compress_stage(f"{name}-{arm}", stage, current, version, teacher, blocks,
                                                   tracking, run, where, scores=scores if i == 0 else None)
            rows.append(row)
    final = rows[-1]
    result = {"arm": arm, "seed": seed, "perplexity": final["perplexity"], "total_params": final["total_params"],
              "active_params": final["active_params"], "tokens": sum(r["tokens"] for r in rows),
              "loss": stage_cfgs[-1].distill.loss, "model": final["model"], "mlflow_run_id": run,
              "curve": read_curve([Path(r["model"]) / "losses.jsonl" for r in rows]),
              "stages": [{k: r[k] for k in ("stage", "expert_intermediate_size", "num_experts", "num_key_value_heads",
                                            "total_params", "active_params", "perplexity", "tokens")} for r in rows]}
    rt.finish_arm_run(arm, seed, {k: result[k] for k in ("perplexity", "total_params", "active_params", "tokens")},
                      teacher_ppl, tracking, run)
    return result


def _seeded(stage: StageConfig, seed: int) -> StageConfig:
    return stage.model_copy(update={"distill": stage.distill.model_copy(update={"seed": seed})})


def _scratch(shape: StageConfig, stage: StageConfig, seed: int, teacher: ModelRef, blocks: TokenBlocks,
             scores: ImportanceRef, tracking: TrackingSettings, arm_run: str, out: Path, chained: bool = False) -> dict:
    """The one-shot-slim shape (its slim step, shared through the cache), fresh weights, LM training."""
    pruned = ArmOutputs(out, "one-shot-slim", seed, shape.name, shared_pruned=True, chained=chained).pruned
    small = cached(steps.slim, out, pruned)(shape.name, teacher, scores, shape.targets(), shape.importance, pruned,
                                            tracking, arm_run)
    where = ArmOutputs(out, "scratch", seed, stage.name, shared_pruned=False, chained=chained)
    init_dir = where.model.with_name("init")
    init = cached(rt.scratch_init, out, init_dir)(small, seed, init_dir)
    run = lineage.start_stage_run(arm_run, stage, init, teacher, blocks, tracking)
    student = cached(steps.distill, out, where.model)(stage.name, init, teacher, blocks, stage.distill, where.model,
                                                      tracking, run)
    metrics = cached(steps.evaluate, out)(stage.name, student, blocks, stage.eval, tracking, run, teacher=teacher)
    no_registry = tracking.model_copy(update={"register_models": False})
    lineage.register_stage_model("scratch", stage.name, student, init, None, no_registry, run)
    return stage_row(stage.name, small, student, None, metrics, run, None)
