"""The automatic schedule's stage count and budget split come from the committed grid results
(slimmoe/pipeline/measured/gutenberg-grid.json), through slimmoe.pipeline.schedule_rule."""

from __future__ import annotations

import json
import math

import pytest
from tiny_models import tiny_config

from slimmoe.config import SlimTargets
from slimmoe.errors import UserError
from slimmoe.pipeline import schedule_rule
from slimmoe.pipeline.resolve import expand_schedule, plan_schedule
from slimmoe.pipeline.schedule_rule import cell_choices, choose, expert_ratio, split_tokens
from slimmoe.pipeline.schema import PipelineConfig

ARMS = {"one-shot-slim": {"kind": "slim", "split": [1.0]}, "two-stage-even": {"kind": "slim", "split": [0.5, 0.5]},
        "two-stage-25-75": {"kind": "slim", "split": [0.25, 0.75]},
        "three-stage": {"kind": "slim", "split": [0.3333, 0.3333, 0.3334]}, "one-shot-drop": {"kind": "drop"}}
BASE = {"name": "p", "teacher": "t", "output_dir": "o", "data": {"train": "d.txt"}}


def cell(budget, cut, arm, mean, std, seeds=(0, 1)):
    return {"budget": budget, "cut": cut, "arm": arm, "seeds": list(seeds), "ratio_mean": mean, "ratio_std": std}


def doc(cells, cuts=None):
    cuts = cuts or {"4x": {"ratio": 4}, "16x-kv-half": {"ratio": 16, "halve_kv": True}}
    return {"meta": {"arms": ARMS, "cuts": cuts}, "cells": cells}


def test_a_multi_stage_arm_is_chosen_only_when_it_wins_by_twice_the_spread():
    cells = cell_choices(doc([
        cell(0.1, "4x", "one-shot-slim", 1.10, 0.002), cell(0.1, "4x", "two-stage-even", 1.097, 0.002),
        cell(0.1, "4x", "one-shot-drop", 1.00, 0.001),  # a drop arm never sets the slim schedule
        cell(0.1, "16x-kv-half", "one-shot-slim", 1.50, 0.01), cell(0.1, "16x-kv-half", "two-stage-25-75", 1.45, 0.01),
        cell(0.1, "16x-kv-half", "three-stage", 1.47, 0.001)]))
    four, sixteen = cells
    # 1.100 - 1.097 = 0.003 < 2 x 0.002: not told apart from one-shot -> one stage
    assert (four.cut, four.num_stages, four.split, four.arm) == ("4x", 1, (1.0,), "one-shot-slim")
    assert four.best_multi == ("two-stage-even", 1.097, 0.002) and "does not beat" in four.evidence()
    # 1.50 - 1.45 = 0.05 >= 2 x 0.01: the best multi-stage arm (lowest mean), with its split
    assert (sixteen.num_stages, sixteen.split, sixteen.arm) == (2, (0.25, 0.75), "two-stage-25-75")
    assert "two-stage-25-75 1.4500 ± 0.0100 vs one-shot 1.5000 ± 0.0100: wins" in sixteen.evidence()


def test_one_seed_is_never_enough_to_pick_more_stages():
    (only,) = cell_choices(doc([cell(0.1, "4x", "one-shot-slim", 1.5, 0.0, seeds=[0]),
                                cell(0.1, "4x", "three-stage", 1.2, 0.0, seeds=[0])]))
    assert only.num_stages == 1


def test_choose_takes_the_nearest_cut_in_log_ratio_at_the_chosen_budget():
    cells = cell_choices(doc([
        cell(0.025, "4x", "one-shot-slim", 1.2, 0.01), cell(0.025, "4x", "three-stage", 1.1, 0.01),
        cell(0.025, "16x-kv-half", "one-shot-slim", 1.9, 0.01), cell(0.025, "16x-kv-half", "two-stage-even", 1.95, 0.01),
        cell(0.1, "4x", "one-shot-slim", 1.1, 0.01), cell(0.1, "4x", "two-stage-even", 1.09, 0.01),
        cell(0.1, "16x-kv-half", "one-shot-slim", 1.5, 0.01), cell(0.1, "16x-kv-half", "two-stage-25-75", 1.4, 0.01)]))
    # default budget: the largest measured (10%)
    assert choose(4.0, cells=cells).split == (1.0,)
    assert choose(7.9, cells=cells).cell.cut == "4x"      # |log 7.9/4| < |log 16/7.9|
    assert choose(8.1, cells=cells).split == (0.25, 0.75)  # nearer 16x
    assert choose(14.3, cells=cells).num_stages == 2
    # budget_fraction picks the nearest measured budget in log
    low = choose(4.0, budget_fraction=0.02, cells=cells)
    assert (low.num_stages, low.cell.budget) == (3, 0.025) and "2.5% of the teacher's tokens" in low.reason
    assert choose(16, budget_fraction=0.04, cells=cells).num_stages == 1  # 0.04 is nearer 0.025 than 0.1 in log
    far = choose(64.0, cells=cells)
    assert far.cell.cut == "16x-kv-half" and "outside the measured 4x-16x" in far.reason
    assert choose(1.0, cells=cells).split == (1.0,) and choose(1.0, cells=cells).cell is None


def test_expert_ratio_counts_width_and_experts():
    config = tiny_config("phimoe")
    width, experts = config.intermediate_size, config.num_local_experts
    assert expert_ratio(config, SlimTargets(expert_intermediate_size=width // 4)) == pytest.approx(4)
    assert expert_ratio(config, SlimTargets(num_experts=experts // 2)) == pytest.approx(2)
    assert expert_ratio(config, SlimTargets(num_key_value_heads=1)) == 1


def test_split_tokens_adds_up():
    assert split_tokens(1000, [0.25, 0.75]) == [250, 750]
    assert split_tokens(1000, [0.3333, 0.3333, 0.3334]) == [333, 333, 334]
    assert sum(split_tokens(999_999, [0.5, 0.5])) == 999_999


def committed_choice_by_hand(ratio: float) -> tuple[int, tuple[float, ...]]:
    """An independent reading of the committed results: the largest budget, the cut nearest in
    log ratio, and there the lowest slim arm unless it is one-shot's equal within 2 spreads."""
    results = json.loads(schedule_rule.RESULTS.read_text())
    arms, cuts = results["meta"]["arms"], results["meta"]["cuts"]
    budget = max(c["budget"] for c in results["cells"])
    slim = [c for c in results["cells"] if c["budget"] == budget and arms[c["arm"]]["kind"] == "slim"
            and c["cut"] in cuts]
    cut = min({c["cut"] for c in slim}, key=lambda k: abs(math.log(cuts[k]["ratio"] / ratio)))
    here = [c for c in slim if c["cut"] == cut]
    one = [c for c in here if len(arms[c["arm"]]["split"]) == 1][0]
    best = min(here, key=lambda c: c["ratio_mean"])
    margin = 2 * max(one["ratio_std"], best["ratio_std"])
    if best is one or one["ratio_mean"] - best["ratio_mean"] < margin or len(best["seeds"]) < 2:
        return 1, (1.0,)
    return len(arms[best["arm"]]["split"]), tuple(arms[best["arm"]]["split"])


@pytest.mark.parametrize("ratio", [3.0, 4.0, 6.67, 8.0, 14.3, 16.0])
def test_the_committed_grid_decides_the_schedule(ratio):
    got = choose(ratio)
    assert (got.num_stages, got.split) == committed_choice_by_hand(ratio)
    assert got.reason.startswith(f"{ratio:.1f}x expert cut -> measured cell")


def test_a_schedule_without_num_stages_follows_the_rule_and_shares_out_the_tokens():
    config = tiny_config("phimoe", intermediate_size=128)
    cfg = PipelineConfig.model_validate({**BASE, "schedule": {"final": {"expert_intermediate_size": 8},
                                                              "distill": {"tokens": 100_000}}})
    out, reason = plan_schedule(cfg, config)
    want = choose(16.0)
    assert len(out.stages) == want.num_stages and out.stages[-1].expert_intermediate_size == 8
    assert [s.distill.tokens for s in out.stages] == split_tokens(100_000, want.split)
    assert reason.startswith("stages and budget split from the measured grid: 16.0x expert cut")


def test_an_explicit_stage_count_splits_evenly_or_as_told():
    config = tiny_config("phimoe", intermediate_size=128)
    even = PipelineConfig.model_validate({**BASE, "schedule": {"num_stages": 2, "final": {"expert_intermediate_size": 32},
                                                               "distill": {"tokens": 1000}}})
    assert [s.distill.tokens for s in expand_schedule(even, config).stages] == [500, 500]
    told = even.model_copy(update={"schedule": even.schedule.model_copy(update={"split": [0.25, 0.75]})})
    assert [s.distill.tokens for s in expand_schedule(told, config).stages] == [250, 750]
    pruned = even.model_copy(update={"schedule": even.schedule.model_copy(update={"distill": None})})
    assert [s.distill for s in expand_schedule(pruned, config).stages] == [None, None]


@pytest.mark.parametrize("schedule,needle", [
    ({"num_stages": 2, "split": [0.5, 0.3, 0.2]}, "split: 3 shares for num_stages 2"),
    ({"split": [0.5, 0.6]}, "split: shares must be positive and add up to 1"),
    ({"split": [1.5, -0.5]}, "split: shares must be positive"),
    ({"budget_fraction": 0}, "budget_fraction"),
])
def test_bad_schedule_fields_are_named(schedule, needle):
    with pytest.raises(ValueError, match=needle):
        PipelineConfig.model_validate({**BASE, "schedule": {"final": {"expert_intermediate_size": 8}, **schedule}})


def test_a_split_that_does_not_fit_the_measured_stage_count_is_refused():
    config = tiny_config("phimoe", intermediate_size=128)
    n = choose(16.0).num_stages
    split = [0.5, 0.5] if n != 2 else [0.2, 0.3, 0.5]
    cfg = PipelineConfig.model_validate({**BASE, "schedule": {"final": {"expert_intermediate_size": 8}, "split": split}})
    with pytest.raises(UserError, match=f"schedule.split: {len(split)} shares, but the measured rule chose {n}"):
        expand_schedule(cfg, config)


def test_an_unreadable_results_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "grid.json"
    bad.write_text("{}")
    with pytest.raises(UserError, match="the measured grid .*grid.json cannot be read"):
        schedule_rule.load_results(bad)


def test_export_and_quantize_of_a_schedule_go_to_its_final_stage():
    config = tiny_config("phimoe", intermediate_size=128)
    cfg = PipelineConfig.model_validate({**BASE, "schedule": {
        "num_stages": 2, "final": {"expert_intermediate_size": 32}, "export": ["vllm"],
        "quantize": {"scheme": "FP8_DYNAMIC"}}})
    first, final = expand_schedule(cfg, config).stages
    assert (first.export, first.quantize) == ([], None)
    assert final.export == ["vllm"] and final.quantize.scheme == "FP8_DYNAMIC"
    with pytest.raises(ValueError, match="export"):
        PipelineConfig.model_validate({**BASE, "schedule": {"final": {"expert_intermediate_size": 8},
                                                            "export": ["vllm", "vllm"]}})


def test_the_rule_table_has_a_row_per_measured_cell():
    cells = cell_choices(doc([cell(0.1, "4x", "one-shot-slim", 1.10, 0.002), cell(0.1, "4x", "two-stage-25-75", 1.05, 0.002)]))
    table = schedule_rule.rule_markdown(cells).splitlines()
    assert table[2] == ("| 10% | 4x | 2 | 25/75 | two-stage-25-75 1.0500 ± 0.0020 vs one-shot 1.1000 ± 0.0020: wins |")
    assert len(table) == 3
