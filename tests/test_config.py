"""Typed settings: unknown keys and bad numbers are errors that name the field."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from tiny_models import tiny_model

from slimmoe.arch import get_adapter
from slimmoe.config import ImportanceConfig, PruneConfig, apply_overrides, format_validation_error, load_yaml
from slimmoe.errors import UserError
from slimmoe.prune.plan import LayerPlan, SlimPlan
from slimmoe.prune.slim import apply_plan


def message(data: dict) -> str:
    with pytest.raises(ValidationError) as e:
        PruneConfig.model_validate(data)
    return format_validation_error(e.value)


def test_unknown_key_is_named():
    assert message({"importance": {"sampels": 4}}) == "importance.sampels: unknown key (did you mean 'samples'?)"


@pytest.mark.parametrize("data,field", [
    ({"importance": {"samples": 0}}, "importance.samples"),
    ({"importance": {"score": "gradient"}}, "importance.score"),
    ({"importance": {"loss": "mse"}}, "importance.loss"),
    ({"targets": {"num_experts": 0}}, "targets.num_experts"),
    ({"targets": {"expert_intermediate_size": -4}}, "targets.expert_intermediate_size"),
])
def test_bad_values_name_their_field(data, field):
    assert message(data).startswith(field + ":")


def test_defaults_are_the_papers():
    cfg = ImportanceConfig()
    assert (cfg.score, cfg.loss, cfg.topk) == ("taylor", "kd_topk_renorm", 8)


def test_overrides_reach_nested_fields_and_lists():
    data = {"stages": [{"name": "a", "distill": {"tokens": 10}}], "importance": {}}
    apply_overrides(data, ["stages.0.distill.tokens=2000", "importance.score=magnitude", "new.key=1.5e-4"])
    assert data["stages"][0]["distill"]["tokens"] == 2000
    assert data["importance"]["score"] == "magnitude"
    assert data["new"]["key"] == pytest.approx(1.5e-4)
    with pytest.raises(ValueError, match="key.path=value"):
        apply_overrides(data, ["nonsense"])


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="no such config file"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_yaml(bad)


def test_top_k_never_exceeds_the_number_of_experts():
    model = tiny_model("mixtral")
    layers = [LayerPlan(layer=i, experts=[1], expert_neurons=[list(range(16))], kv_groups=[0, 1]) for i in range(2)]
    slim = apply_plan(model, SlimPlan("mixtral", {}, {}, layers))
    assert slim.config.num_local_experts == 1 and slim.config.num_experts_per_tok == 1
    ids = torch.randint(3, 96, (1, 6))
    assert torch.isfinite(slim(ids).logits).all()


def test_phimoe_keeps_at_least_two_experts():
    model = tiny_model("phimoe")
    with pytest.raises(UserError, match="num_experts"):
        get_adapter(model.config).check_expert_dropping(model.config, 1)


def test_nonuniform_plan_is_refused():
    model = tiny_model("mixtral")
    layers = [LayerPlan(layer=0, experts=[0, 1], expert_neurons=[list(range(8)), list(range(4))], kv_groups=[0, 1]),
              LayerPlan(layer=1, experts=[0, 1], expert_neurons=[list(range(8))] * 2, kv_groups=[0, 1])]
    with pytest.raises(UserError, match="same in every layer"):
        apply_plan(model, SlimPlan("mixtral", {}, {}, layers))
