"""The ablation grid (issue 14) in one config: the shipped grid validates and expands to the
cells counted here by hand; bad grid fields are one line naming the field; two cells that begin
with the same stage compute the same cache keys for it (so the second finds it cached); and
the grid report's tables and plot from synthetic results."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from transformers import PhimoeConfig

import slimmoe.cli
from slimmoe.config import format_validation_error
from slimmoe.errors import UserError
from slimmoe.pipeline.ablation_schema import load_ablation_config
from slimmoe.pipeline.grid import CHAIN_SEP, expand_grid
from slimmoe.pipeline.grid_report import GRID_PNG, write_grid_report
from slimmoe.pipeline.steps import ImportanceRef, ModelRef, TokenBlocks

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "deployments" / "configs" / "ablation-gutenberg-grid.yaml"
TEACHER_TOKENS = 20_000_000
# the Gutenberg teacher's shape (deployments/configs/teacher-gutenberg.yaml); expansion reads only the config
GUTENBERG = PhimoeConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                         tie_word_embeddings=True, attention_bias=True)


def shipped(*overrides: str):
    return load_ablation_config(GRID, [f"grid.teacher_tokens={TEACHER_TOKENS}", *overrides])


def test_shipped_grid_expands_to_the_cells_of_issue_14():
    cfg = shipped()
    cells = expand_grid(cfg, GUTENBERG)
    # by hand: 2 budgets x 3 cuts = 6 cells; arms per budget: 4x all 7, 16x 6 (no drop), 8x 2 -> 15
    assert [(c.budget, c.cut.label) for c in cells] == [(b, cut) for b in (0.025, 0.10)
                                                       for cut in ("4x", "16x-kv-half", "8x")]
    assert sum(len(c.arms) for c in cells) == 2 * (7 + 6 + 2) == 30
    assert len(cfg.seeds) == 2  # so 60 arm runs
    by = {(c.budget, c.cut.label): c for c in cells}
    assert [c.tokens for c in cells] == [500_000] * 3 + [2_000_000] * 3  # 2.5% and 10% of 20M
    four, sixteen, eight = by[0.025, "4x"], by[0.025, "16x-kv-half"], by[0.025, "8x"]
    assert list(four.arms) == ["one-shot-slim", "two-stage-even", "two-stage-25-75", "three-stage", "one-shot-drop",
                               "slim-drop", "scratch"]
    assert list(eight.arms) == ["one-shot-slim", "two-stage-even"]
    # final shapes: width 256 / ratio; KV 2 -> 1 at 16x only, in the last stage only
    for cell, width, kv in ((four, 64, None), (sixteen, 16, 1), (eight, 32, None)):
        for arm in ("one-shot-slim", "two-stage-even", "two-stage-25-75", "three-stage"):
            if arm not in cell.arms:
                continue
            stages = cell.arms[arm]
            assert (stages[-1].expert_intermediate_size, stages[-1].num_key_value_heads) == (width, kv)
            assert all(s.num_key_value_heads is None for s in stages[:-1])
            assert sum(s.distill.tokens for s in stages) == cell.tokens
    # stage widths and tokens, by hand: 256 -> 64 -> 16 (geometric), 256 -> 104 -> 40 -> 16 (x 16^(-1/3), to 8)
    two = sixteen.arms["two-stage-25-75"]
    assert [(s.expert_intermediate_size, s.distill.tokens) for s in two] == [(64, 125_000), (16, 375_000)]
    three = sixteen.arms["three-stage"]
    assert [s.expert_intermediate_size for s in three] == [104, 40, 16]
    assert [s.distill.tokens for s in three] == [166_650, 166_650, 166_700]
    # the scratch arm: the one-shot shape, LM loss, every token; drop arms: whole experts at the one-shot total
    scratch = four.arms["scratch"]
    assert len(scratch) == 1 and scratch[0].distill.loss == "lm" and scratch[0].distill.tokens == 500_000
    assert four.shape.name == four.arms["one-shot-slim"][0].name
    drop = four.arms["one-shot-drop"][0]
    assert drop.num_experts == 2 and drop.expert_intermediate_size in (None, 256)


def test_cells_beginning_with_the_same_stage_name_it_the_same():
    cells = {(c.budget, c.cut.label): c for c in expand_grid(shipped(), GUTENBERG)}
    one_shot_4x = cells[0.025, "4x"].arms["one-shot-slim"][0]
    back_loaded_16x = cells[0.10, "16x-kv-half"].arms["two-stage-25-75"]
    # 25% of 10% is 2.5%: the first stage of 10%'s back-loaded 16x arm is 2.5%'s one-shot 4x model
    assert back_loaded_16x[0].name == one_shot_4x.name == "slim-w64-t500000"
    assert back_loaded_16x[1].name == f"slim-w64-t500000{CHAIN_SEP}slim-w16-kv1-t1500000"
    assert back_loaded_16x[0].distill == one_shot_4x.distill
    # the even split at 10% begins with a different stage (more tokens): not shared
    assert cells[0.10, "16x-kv-half"].arms["two-stage-even"][0].name == "slim-w64-t1000000"


def _first_stage_keys(cfg, stage, arm: str, seed: int) -> dict[str, str]:
    """The slim and distill cache keys the grid flow computes for an arm's first stage."""
    from flows.ablation import ArmOutputs, _seeded
    from tasks import steps
    from tasks.caching import step_key
    from tasks.tracking import TrackingSettings

    out = Path(cfg.output_dir)
    teacher = ModelRef(path="/t", fingerprint="teacher-fp")
    blocks = TokenBlocks(path="/d", fingerprint="data-fp", source="train", seq_len=256, train_blocks=9, eval_blocks=1)
    scores = ImportanceRef(path="/s", fingerprint="scores-fp", calibration_tokens=1)
    small = ModelRef(path="/p", fingerprint="pruned-fp")  # the slim step's result, identical when its key is
    tracking = TrackingSettings(uri="sqlite:///x.db", experiment="e")
    seeded = _seeded(stage, seed)
    where = ArmOutputs(out, arm, seed, seeded.name, shared_pruned=True, chained=True)
    return {"slim": step_key(steps.slim, stage=seeded.name, model=teacher, scores=scores, targets=seeded.targets(),
                             settings=seeded.importance, out_dir=where.pruned, tracking=tracking, run_id=arm),
            "distill": step_key(steps.distill, stage=seeded.name, student=small, teacher=teacher, blocks=blocks,
                                settings=seeded.distill, out_dir=where.model, tracking=tracking, run_id=arm)}


def test_two_cells_sharing_a_first_stage_compute_the_same_cache_keys_for_it():
    cfg = shipped()
    cells = {(c.budget, c.cut.label): c for c in expand_grid(cfg, GUTENBERG)}
    one_shot = cells[0.025, "4x"].arms["one-shot-slim"][0]
    back_loaded = cells[0.10, "16x-kv-half"].arms["two-stage-25-75"][0]
    even = cells[0.10, "16x-kv-half"].arms["two-stage-even"][0]
    a = _first_stage_keys(cfg, one_shot, "one-shot-slim", seed=0)
    b = _first_stage_keys(cfg, back_loaded, "two-stage-25-75", seed=0)
    assert a == b  # other arm, other cell, same stage: the second run finds both steps cached
    assert _first_stage_keys(cfg, one_shot, "one-shot-slim", seed=1)["distill"] != a["distill"]  # seeds differ
    assert _first_stage_keys(cfg, even, "two-stage-even", seed=0)["distill"] != a["distill"]  # other tokens


@pytest.mark.parametrize("override, field", [
    ("grid.budgets=[0.025, 1.5]", "grid.budgets"),
    ("grid.cuts.1.arms=[one-shot-slim, nope]", "grid: cuts.1.arms"),
    ("grid.cuts.0.ratio=1", "grid.cuts.0.ratio"),
    ("grid.arms.three-stage.split=[0.5, 0.4]", "grid.arms.three-stage: split"),
    ("grid.arms.one-shot-drop.split=[1]", "grid.arms.one-shot-drop: split"),
    ("grid.arms.scratch.kind=dropout", "grid.arms.scratch.kind"),
    ("grid.colour=red", "grid.colour"),
    ("tokens=1000", "tokens"),
    ("arms=[scratch]", "arms"),
    ("num_stages=3", "num_stages"),
    ("importance.expert_score=taylor", "importance: expert_score"),
])
def test_a_bad_grid_field_is_one_line_naming_it(override, field):
    with pytest.raises(ValidationError) as e:
        shipped(override)
    line = format_validation_error(e.value)
    assert "\n" not in line and line.startswith(field), line


def test_a_cut_the_teacher_cannot_take_is_named_before_anything_runs(tmp_path, capsys):
    cfg = shipped("grid.cuts.2.ratio=3")
    with pytest.raises(UserError, match=r"^grid\.cuts\.2\.ratio: 3 does not divide"):
        expand_grid(cfg, GUTENBERG)
    # without teacher_tokens and no teacher record: the field to give is named, by `slimmoe ablate` too
    path = tmp_path / "grid.yaml"
    data = yaml.safe_load(GRID.read_text())
    data.update(teacher=str(tmp_path / "no-teacher"), output_dir=str(tmp_path / "out"))
    path.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert slimmoe.cli.main(["ablate", str(path)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: teacher"), err
    assert not (tmp_path / "out").exists()


def _synthetic_runs() -> list[dict]:
    ppl = {("one-shot-slim", "4x"): [11.0, 11.4], ("two-stage-even", "4x"): [12.0, 12.0],
           ("one-shot-slim", "16x"): [20.0, 22.0, 24.0], ("scratch", "4x"): [15.0, 17.0]}
    runs = []
    for budget in (0.025, 0.1):
        for (arm, cut), values in ppl.items():
            for seed, p in enumerate(values):
                runs.append({"budget": budget, "cut": cut, "arm": arm, "seed": seed, "perplexity": p * (1 + budget),
                             "total_params": 1000 if cut == "4x" else 400, "active_params": 500 if cut == "4x" else 200,
                             "tokens": int(budget * 1e6), "curve": [[1, 2.0]]})
    return runs


def test_grid_report_has_a_table_per_budget_with_hand_computed_mean_and_std(tmp_path):
    teacher = {"perplexity": 10.0, "total_params": 4000, "active_params": 1500}
    res = write_grid_report(tmp_path, _synthetic_runs(), teacher, {"name": "synthetic", "teacher_tokens": 1_000_000})
    md = (tmp_path / "report.md").read_text()
    tables = md.split("## Budget ")[1:]
    assert len(tables) == 2 and tables[0].startswith("2.5% of the teacher's tokens (25,000 tokens)")
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in tables[0].splitlines() if ln.startswith("| ")}
    assert rows["arm"] == "| arm | 4x | 16x |"
    # one-shot 4x at 2.5%: ppl 11.275, 11.685 -> / 10 -> mean 1.1480, std |11.685 - 11.275| / sqrt(2) / 10 = 0.0290
    assert rows["one-shot-slim"] == "| one-shot-slim | 1.1480 ± 0.0290 (n=2) | 2.2550 ± 0.2050 (n=3) |"
    # two-stage 4x: equal seeds -> std 0; not run at 16x -> a dash
    assert rows["two-stage-even"] == "| two-stage-even | 1.2300 ± 0.0000 (n=2) | — |"
    assert rows["scratch"] == "| scratch | 1.6400 ± 0.1450 (n=2) | — |"
    doc = json.loads((tmp_path / "report.json").read_text())
    cell = next(c for c in doc["cells"] if (c["budget"], c["cut"], c["arm"]) == (0.1, "16x", "one-shot-slim"))
    expected = [p * 1.1 for p in (20.0, 22.0, 24.0)]
    assert cell["perplexity_mean"] == pytest.approx(statistics.mean(expected))
    assert cell["perplexity_std"] == pytest.approx(statistics.stdev(expected))
    assert cell["ratio_mean"] == pytest.approx(2.42) and cell["seeds"] == [0, 1, 2]
    assert all("curve" not in r for r in doc["runs"]) and len(doc["runs"]) == 18
    pytest.importorskip("matplotlib")
    assert (tmp_path / GRID_PNG).read_bytes()[:4] == b"\x89PNG" and f"]({GRID_PNG})" in md
    assert res["paths"][GRID_PNG] == str(tmp_path / GRID_PNG)


def test_grid_report_says_when_there_is_no_matplotlib(tmp_path, monkeypatch):
    import slimmoe.pipeline.grid_report as gr

    def no_matplotlib(*a, **k):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(gr, "grid_figure", no_matplotlib)
    teacher = {"perplexity": 10.0, "total_params": 4000, "active_params": 1500}
    gr.write_grid_report(tmp_path, _synthetic_runs(), teacher, {"name": "synthetic"})
    assert "matplotlib is not installed" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / GRID_PNG).exists()


@pytest.mark.timeout(900)
def test_a_tiny_grid_serves_a_shared_first_stage_from_the_cache(tmp_path, monkeypatch):
    """Budgets 25% and 100% of 1,024 teacher tokens; cuts 2x (one-shot) and 4x (two-stage 25/75,
    whose first stage is the 2x model with 25% of 100% = 256 tokens): the 100% cell's first stage
    is the 25% cell's one-shot 2x stage, found in the task cache. Then close_pair_seeds [1] runs
    seed 1 for the arms close_pairs names (stubbed: one seed has no spread), and only those."""
    import torch

    import flows.ablation

    asked = []

    def close_pairs(cells):
        asked.append(sorted((c["budget"], c["cut"], c["arm"], tuple(c["seeds"])) for c in cells))
        return [{"budget": 1.0, "cut": "4x", "arms": ["back-loaded"], "difference": 0.0, "spread": 0.0}]

    monkeypatch.setattr(flows.ablation, "close_pairs", close_pairs)
    from helpers_prefect import newest_flow_runs, settled_task_runs
    from prefect.testing.utilities import prefect_test_harness
    from tiny_models import tiny_teacher_with_tokenizer

    teacher, corpus = tiny_teacher_with_tokenizer(tmp_path / "teacher", corpus_chars=12000)  # width 16, 4 experts
    config = {"name": "tiny-grid", "teacher": str(teacher), "output_dir": str(tmp_path / "out"),
              "data": {"train": str(corpus), "eval_fraction": 0.1, "seq_len": 32}, "seeds": [0],
              "grid": {"budgets": [0.25, 1.0], "teacher_tokens": 1024,
                       "cuts": [{"ratio": 2, "arms": ["one-shot"]}, {"ratio": 4, "arms": ["back-loaded"]}],
                       "close_pair_seeds": [1],
                       "arms": {"one-shot": {"kind": "slim"}, "back-loaded": {"kind": "slim", "split": [0.25, 0.75]}}},
              "importance": {"samples": 4}, "distill": {"batch_size": 8, "lr": 1e-3, "progress": False},
              "eval": {"max_blocks": 2, "generation": False, "throughput_batch_sizes": [1], "kl_to_teacher": False},
              "tracking": {"experiment": "tiny-grid"}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with prefect_test_harness(server_startup_timeout=60):
            assert slimmoe.cli.main(["ablate", str(path)]) == 0
            flow_runs = newest_flow_runs(n=50)
            task_runs = settled_task_runs([fr.id for fr in flow_runs])
    finally:
        torch.set_num_threads(threads)
    states: dict[str, list[str]] = {}
    for r in sorted(task_runs, key=lambda r: r.start_time or r.expected_start_time):
        states.setdefault(r.name, []).append(r.state.name)
    # computed by the 25% cell's one-shot arm, then served to the 100% cell's back-loaded arm;
    # last, seed 1 of the back-loaded arm: a new distillation, the same (seedless) slimming
    assert states["distill-slim-w8-t256"] == ["Completed", "Cached", "Completed"], states
    assert states["slim-slim-w8-t256"] == ["Completed", "Cached", "Cached"], states
    assert states["distill-slim-w8-t256__slim-w4-t768"] == ["Completed", "Completed"], states
    assert asked == [[(0.25, "2x", "one-shot", (0,)), (0.25, "4x", "back-loaded", (0,)),
                      (1.0, "2x", "one-shot", (0,)), (1.0, "4x", "back-loaded", (0,))]]
    assert states["importance-teacher"] == ["Completed"]  # one pass for every cell
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted((c["budget"], c["cut"], c["arm"], tuple(c["seeds"])) for c in doc["cells"]) == [
        (0.25, "2x", "one-shot", (0,)), (0.25, "4x", "back-loaded", (0,)), (1.0, "2x", "one-shot", (0,)),
        (1.0, "4x", "back-loaded", (0, 1))]
    assert doc["meta"]["close_pair_seeds"] == [1]
    # what schedule_rule reads from a committed report: each cut's ratio and each arm's budget split
    assert doc["meta"]["cuts"] == {"2x": {"ratio": 2, "halve_kv": False}, "4x": {"ratio": 4, "halve_kv": False}}
    assert doc["meta"]["arms"] == {"one-shot": {"kind": "slim", "split": [1.0]},
                                   "back-loaded": {"kind": "slim", "split": [0.25, 0.75]}}
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.count("## Budget ") == 2 and "| arm | 2x | 4x |" in md
    # (yaml.safe_dump sorted the arms by name)
    assert "* arms: back-loaded (slim, budget split 25/75), one-shot (slim, budget split 100)" in md
    cell_md = (tmp_path / "out" / "cells" / "b100pct-4x" / "report.md").read_text()
    assert "| back-loaded | 2 |" in cell_md and "cuts:" not in cell_md
    assert "(n=2)" in md  # the grid table too
    assert (tmp_path / "out" / "cells" / "b25pct-2x" / "report.md").is_file()


def test_budgets_are_fractions_of_the_teachers_recorded_token_budget(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "teacher.json").write_text(json.dumps({"config": {"tokens": 20_000_000},
                                                      "result": {"tokens": 20_000_768}}))
    cfg = load_ablation_config(GRID, [f"teacher={teacher}"])
    assert [c.tokens for c in expand_grid(cfg, GUTENBERG)][::3] == [500_000, 2_000_000]
    (teacher / "teacher.json").write_text("{}")
    with pytest.raises(UserError, match="^grid.teacher_tokens: not given"):
        expand_grid(cfg, GUTENBERG)


def test_stages_that_would_not_shrink_are_refused():
    small = PhimoeConfig(**{**GUTENBERG.to_dict(), "intermediate_size": 16})  # 16 -> 8: no room for 3 stages
    cfg = shipped("grid.cuts=[{ratio: 2}]", "grid.teacher_tokens=1000")
    with pytest.raises(UserError, match=r"^grid\.cuts\.0: arm two-stage-even: 2 stages from expert width 16 to 8"):
        expand_grid(cfg, small)
    four = next(c for c in expand_grid(shipped(), GUTENBERG) if c.cut.label == "4x")
    assert [s.expert_intermediate_size for s in four.arms["three-stage"]] == [160, 104, 64]


def test_arms_within_twice_their_spread_are_listed_for_a_third_seed(tmp_path):
    from slimmoe.pipeline.grid_report import close_pairs, grid_cells

    teacher = {"perplexity": 10.0, "total_params": 4000, "active_params": 1500}
    # ratios: a 1.00, 1.04 (mean 1.02, std 0.0283); b 1.03, 1.05 (1.04, 0.0141); c 1.21; d one seed
    ppl = {"a": [10.0, 10.4], "b": [10.3, 10.5], "c": [12.0, 12.2], "d": [10.1]}
    runs = [{"budget": 0.1, "cut": "4x", "arm": arm, "seed": s, "perplexity": p, "total_params": 1, "active_params": 1}
            for arm, values in ppl.items() for s, p in enumerate(values)]
    pairs = close_pairs(grid_cells(runs, teacher))
    # by hand: |1.02 - 1.04| = 0.02 < 2 x 0.0283 -> close; c (1.21) is far from both; d has one seed
    assert [(p["arms"], round(p["difference"], 4), round(p["spread"], 4)) for p in pairs] == [(["a", "b"], 0.02, 0.0283)]
    write_grid_report(tmp_path, runs, teacher, {"name": "close"})
    assert "* 10%, 4x: a vs b (difference 0.0200, spread 0.0283)" in (tmp_path / "report.md").read_text()


def test_findings_compare_stages_slim_drop_and_scratch_by_hand():
    from slimmoe.pipeline.grid_findings import cell_findings, findings_markdown

    arms = {"one-shot-slim": {"kind": "slim", "split": [1.0]}, "two-stage-even": {"kind": "slim", "split": [0.5, 0.5]},
            "one-shot-drop": {"kind": "drop"}, "slim-drop": {"kind": "slim-drop"}, "scratch": {"kind": "scratch"}}

    def c(arm, mean, std):
        return {"budget": 0.1, "cut": "4x", "arm": arm, "seeds": [0, 1], "ratio_mean": mean, "ratio_std": std}

    cells = [c("one-shot-slim", 1.10, 0.01), c("two-stage-even", 1.05, 0.01), c("one-shot-drop", 1.30, 0.02),
             c("slim-drop", 1.09, 0.01), c("scratch", 2.20, 0.1)]
    (f,) = cell_findings(cells, arms)
    assert f["multi_wins"] and f["best_compression"]["arm"] == "two-stage-even"
    text = "\n".join(findings_markdown([f]))
    # 1.10 - 1.05 = 0.05 >= 2 x 0.01; 1.30 - 1.10 = 0.20 >= 2 x 0.02; 1.10 - 1.09 = 0.01 < 2 x 0.01; 2.20 / 1.05
    assert ("* stages: two-stage-even 1.0500 ± 0.0100 vs one-shot-slim 1.1000 ± 0.0100: 0.0500 lower (told apart)"
            " -> multi-stage wins") in text
    assert "* slim vs drop: one-shot-slim 1.1000 ± 0.0100 vs one-shot-drop 1.3000 ± 0.0200: 0.2000 lower (told apart)" in text
    assert ("* slim vs slim+drop: one-shot-slim 1.1000 ± 0.0100 vs slim-drop 1.0900 ± 0.0100: 0.0100 higher "
            "(within 2x the spread)") in text
    assert "scratch 2.2000 ± 0.1000: scratch 2.10x the perplexity" in text
    cells[1] = c("two-stage-even", 1.09, 0.01)  # 0.01 < 2 x 0.01: not told apart -> one stage
    assert not cell_findings(cells, arms)[0]["multi_wins"]
    assert "-> one stage" in "\n".join(findings_markdown(cell_findings(cells, arms)))


def test_bench_quality_report_only_rewrites_the_report_from_its_runs(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    teacher = {"perplexity": 10.0, "total_params": 4000, "active_params": 1500}
    meta = {"name": "synthetic", "arms": {"one-shot-slim": {"kind": "slim", "split": [1.0]},
                                          "two-stage-even": {"kind": "slim", "split": [0.5, 0.5]},
                                          "scratch": {"kind": "scratch"}}}
    write_grid_report(tmp_path, _synthetic_runs(), teacher, {"name": "synthetic"})  # an older report: no findings
    doc = json.loads((tmp_path / "report.json").read_text())
    doc["meta"] = meta
    (tmp_path / "report.json").write_text(json.dumps(doc))
    (tmp_path / "report.md").unlink()
    out = subprocess.run([sys.executable, str(root / "bench" / "quality.py"), "--grid",
                          str(root / "deployments" / "configs" / "ablation-gutenberg-grid.yaml"),
                          "--output-dir", str(tmp_path), "--report-only"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    md = (tmp_path / "report.md").read_text()
    assert "## Findings" in md and "**2.5%, 4x**" in md and md.strip() in out.stdout
    assert len(json.loads((tmp_path / "report.json").read_text())["runs"]) == len(_synthetic_runs())
