"""Which passes a scoring run makes is decided from the config alone (plan_passes), and
estimate_importance runs exactly those."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_config, tiny_model

from slimmoe.arch import get_adapter
from slimmoe.config import ImportanceConfig
from slimmoe.prune import importance
from slimmoe.prune.importance import Wanted, estimate_importance
from slimmoe.prune.passes import ScoringPasses, plan_passes

MIXTRAL = get_adapter(tiny_config("mixtral"))
ALL = frozenset({"neurons", "shared", "kv_groups", "experts"})


def scored_kinds(p: ScoringPasses) -> frozenset[str]:
    return p.taylor | p.forward_statistics | p.magnitude | p.random


def test_magnitude_and_random_need_no_data():
    p = plan_passes(ImportanceConfig(score="magnitude", expert_score="random"), Wanted(), MIXTRAL)
    assert not p.data_pass and not p.gradient_pass
    assert p.magnitude == {"neurons", "shared", "kv_groups"} and p.random == {"experts"}
    assert not p.taylor and not p.forward_statistics


def test_magnitude_neurons_with_taylor_experts_runs_a_gradient_pass_for_the_experts_only():
    p = plan_passes(ImportanceConfig(score="magnitude", expert_score="taylor"), Wanted(), MIXTRAL)
    assert p.gradient_pass and p.taylor == {"experts"}
    assert p.magnitude == {"neurons", "shared", "kv_groups"}


def test_taylor_with_reap_runs_a_gradient_pass_with_reap_forward_hooks():
    p = plan_passes(ImportanceConfig(score="taylor", expert_score="reap"), Wanted(), MIXTRAL)
    assert p.gradient_pass and p.data_pass
    assert p.taylor == {"neurons", "shared", "kv_groups"}
    assert p.expert_statistic == "reap" and p.forward_statistics == {"experts"} and not p.activation


def test_activation_with_frequency_is_a_forward_only_pass():
    p = plan_passes(ImportanceConfig(score="activation", expert_score="frequency"), Wanted(), MIXTRAL)
    assert p.data_pass and not p.gradient_pass
    assert p.activation == {"neurons", "shared", "kv_groups"} and p.expert_statistic == "frequency"
    assert p.forward_statistics == ALL


@pytest.mark.parametrize("score", ["taylor", "activation", "random"])
def test_unwanted_kinds_get_no_hooks_and_no_scores(score):
    cfg = ImportanceConfig(score=score, expert_score="taylor")
    p = plan_passes(cfg, Wanted(neurons=False, kv=False, experts=True), MIXTRAL)
    assert scored_kinds(p) == {"experts"}
    assert scored_kinds(plan_passes(cfg, Wanted(), MIXTRAL)) == ALL


def test_nothing_wanted_runs_nothing():
    p = plan_passes(ImportanceConfig(), Wanted(neurons=False, kv=False, experts=False), MIXTRAL)
    assert not p.data_pass and not scored_kinds(p)


@pytest.mark.parametrize("model_type", ["olmoe", "deepseek_v3"])
@pytest.mark.parametrize("score", ["taylor", "activation", "magnitude", "random"])
def test_an_architecture_refusing_kv_slimming_never_scores_kv(model_type, score):
    adapter = get_adapter(tiny_config(model_type))
    assert adapter.kv_refusal
    want = Wanted()
    p = plan_passes(ImportanceConfig(score=score), want, adapter)
    assert "kv_groups" not in scored_kinds(p) and "neurons" in scored_kinds(p)
    assert "kv_groups" in scored_kinds(plan_passes(ImportanceConfig(score=score), want, MIXTRAL))
    assert want.kv  # the caller's Wanted is left alone


def test_estimate_importance_runs_the_planned_passes_only(monkeypatch):
    model = tiny_model("mixtral")
    ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        planned = ScoringPasses(random=frozenset({"experts"}))
        monkeypatch.setattr(importance, "plan_passes", lambda cfg, want, adapter: planned)
        scores = estimate_importance(model, ids, ImportanceConfig(), progress=False)  # taylor by config, not by plan
        assert not calls and scores.experts and not scores.neurons and not scores.kv_groups
        planned = ScoringPasses(activation=frozenset({"kv_groups"}))
        scores = estimate_importance(model, ids, ImportanceConfig(), progress=False)
        assert calls and scores.kv_groups and not scores.neurons and not scores.experts
    finally:
        handle.remove()
    assert all(p.grad is None for p in model.parameters())
