"""The ablation report from plain dicts: one row per arm, mean and sample spread over seeds
(checked against the statistics module), curves of multi-stage arms laid end to end."""

from __future__ import annotations

import json
import statistics

import pytest

from slimmoe.pipeline.report import read_curve, summarize_arms, write_report

TEACHER = {"perplexity": 50.0, "total_params": 1000, "active_params": 400}


def run(arm, seed, ppl, loss="kd_topk"):
    return {"arm": arm, "seed": seed, "perplexity": ppl, "total_params": 300, "active_params": 200, "tokens": 64,
            "loss": loss, "curve": [[32, 2.0 + seed], [64, 1.0 + seed]]}


RUNS = [run("a", 1, 60.0), run("a", 0, 55.0), run("a", 2, 58.5), run("b", 0, 70.0, "lm"), run("b", 1, 71.0, "lm")]


def test_one_row_per_arm_with_mean_and_sample_spread():
    rows = summarize_arms(RUNS, TEACHER)
    assert [r["arm"] for r in rows] == ["a", "b"]
    a, b = rows
    assert a["seeds"] == [0, 1, 2]
    assert a["perplexity_mean"] == pytest.approx(statistics.mean([60.0, 55.0, 58.5]))
    assert a["perplexity_std"] == pytest.approx(statistics.stdev([60.0, 55.0, 58.5]))
    assert a["ratio_mean"] == pytest.approx(statistics.mean([1.2, 1.1, 1.17]))
    assert a["ratio_std"] == pytest.approx(statistics.stdev([1.2, 1.1, 1.17]))
    assert (a["perplexity_min"], a["perplexity_max"]) == (55.0, 60.0)
    assert b["perplexity_std"] == pytest.approx(statistics.stdev([70.0, 71.0]))
    assert summarize_arms([run("c", 0, 40.0)], TEACHER)[0]["perplexity_std"] == 0.0


def test_write_report_files(tmp_path):
    res = write_report(tmp_path, RUNS, TEACHER, {"name": "t", "seeds": [0, 1, 2]})
    doc = json.loads((tmp_path / "report.json").read_text())
    assert [r["arm"] for r in doc["arms"]] == ["a", "b"] and len(doc["runs"]) == 5
    assert all("curve" not in r for r in doc["runs"])
    md = (tmp_path / "report.md").read_text()
    assert md == res["markdown"]
    lines = [line for line in md.splitlines() if line.startswith(("| a |", "| b |"))]
    assert len(lines) == 2 and f"{statistics.mean([60.0, 55.0, 58.5]):.3f} ± " in lines[0]
    for png in ("perplexity_vs_active.png", "loss_curves.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_read_curve_lays_stages_end_to_end(tmp_path):
    one, two = tmp_path / "1.jsonl", tmp_path / "2.jsonl"
    one.write_text('{"step": 1, "loss": 3.0, "tokens": 10}\n{"step": 2, "loss": 2.5, "tokens": 20}\n')
    two.write_text('{"step": 1, "loss": 2.0, "tokens": 10}\ntorn line\n{"step": 2, "loss": 1.5, "tokens": 20}\n')
    assert read_curve([one, tmp_path / "missing.jsonl", two]) == [[10, 3.0], [20, 2.5], [30, 2.0], [40, 1.5]]
