"""Compression strategies: parameter targets solved into sizes, checked on real slimmed checkpoints."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml
from tiny_models import CONFIGS, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, PhimoeConfig

from slimmoe.arch import get_adapter
from slimmoe.cli import main
from slimmoe.config import PruneConfig, SlimTargets
from slimmoe.errors import UserError
from slimmoe.evaluation.params import parameter_counts
from slimmoe.pipeline.resolve import check_config, resolve_stages
from slimmoe.pipeline.schema import PipelineConfig, StageConfig, load_pipeline_config
from slimmoe.prune.one_shot import prune
from slimmoe.prune.plan import resolve_targets
from slimmoe.prune.schedule import estimate_active_params, estimate_total_params
from slimmoe.prune.strategies import resolve_sizes

# Room on every axis: width 128, 8 experts (top-2), 2 layers; qwen2_moe adds a shared expert of 24.
ROOMY = {"phimoe": dict(intermediate_size=128, num_local_experts=8),
         "qwen2_moe": dict(moe_intermediate_size=128, num_experts=8)}
WIDTH = 128


def slimmed_config(config, targets: SlimTargets):
    adapter = get_adapter(config)
    s = resolve_targets(adapter, config, targets)
    new = copy.deepcopy(config)
    adapter.update_config(new, expert_size=s["expert_intermediate_size"], shared_size=s["shared_intermediate_size"],
                          kv_heads=s["num_key_value_heads"], num_experts=s["num_experts"])
    return new


def built_counts(config) -> dict:
    with torch.device("meta"):
        return parameter_counts(AutoModelForCausalLM.from_config(config))


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_active_estimate_equals_parameter_counts_of_built_models(model_type):
    config = tiny_config(model_type)
    adapter = get_adapter(config)
    fewest = 1 if model_type not in ("phimoe", "deepseek_v3") else 2  # these refuse fewer experts than top-k
    options = [SlimTargets(), SlimTargets(expert_intermediate_size=5), SlimTargets(num_experts=3),
               SlimTargets(num_experts=fewest)]
    if adapter.kv_refusal is None:
        options.append(SlimTargets(expert_intermediate_size=4, num_key_value_heads=1, num_experts=3))
    for t in options:
        got = built_counts(slimmed_config(config, t))
        assert estimate_active_params(config, **t.model_dump()) == got["active_params"], (model_type, t)
        assert estimate_total_params(config, **t.model_dump()) == got["total_params"], (model_type, t)


def one_structure(config, strategy: str, field: str, sizes: SlimTargets) -> int:
    """Parameters of one step of the solved axis, from the config alone: one width step (8 neurons,
    widths being multiples of 8) of every (active) expert of every layer, the shared expert
    shrinking in proportion, or one expert per layer."""
    H, L = config.hidden_size, config.num_hidden_layers
    adapter = get_adapter(config)
    I0, E = adapter.expert_size(config), sizes.num_experts
    if strategy == "drop":
        return L * (3 * H * I0 + H)
    experts = E if field == "total_params" else min(E, adapter.top_k(config))
    shared = adapter.shared_size(config)
    step = 8 if sizes.expert_intermediate_size >= 8 else 1
    return L * 3 * H * (experts * step + (math.ceil(shared * step / I0) if shared else 0))


CASES = [(mt, s, f) for mt in ROOMY for s in ("slim", "drop", "slim+drop") for f in ("total_params", "active_params")
         if (s, f) != ("drop", "active_params")]


@pytest.mark.parametrize("model_type,strategy,field", CASES)
def test_strategy_reaches_target_and_reloads_with_stock_transformers(tmp_path, model_type, strategy, field):
    src = tmp_path / "src"
    tiny_model(model_type, **ROOMY[model_type]).save_pretrained(src)
    config = AutoModelForCausalLM.from_pretrained(src).config
    before = built_counts(config)
    target = int(before[field] * (0.55 if field == "total_params" else 0.75))
    stage = StageConfig(name="s", strategy=strategy, **{field: target},
                        importance={"samples": 4, "seq_len": 16, "batch_size": 4})
    sizes = resolve_sizes(config, strategy, stage.total_params, stage.active_params, stage.targets())
    if strategy == "slim":
        assert sizes.num_experts == 8 and sizes.expert_intermediate_size < WIDTH
    elif strategy == "drop":
        assert sizes.expert_intermediate_size == WIDTH and sizes.num_experts < 8
        assert stage.importance.expert_score == "reap"
    else:
        assert sizes.expert_intermediate_size < WIDTH and sizes.num_experts < 8

    prune(str(src), tmp_path / "out", PruneConfig(targets=sizes, importance=stage.importance), progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # stock loader, no remote code
    got = parameter_counts(model)[field]
    assert 0 <= target - got < one_structure(config, strategy, field, sizes), (sizes, target, got)
    assert model.config.num_key_value_heads == config.num_key_value_heads  # KV kept unless asked
    logits = model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits
    assert torch.isfinite(logits).all()


def phi35():
    return PhimoeConfig(hidden_size=4096, intermediate_size=6400, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, num_local_experts=16, num_experts_per_tok=2, vocab_size=32064)


def test_paper_shapes_are_recovered_from_their_parameter_counts():
    """Phi-mini-MoE (width 960) and Phi-tiny-MoE (448, 4 KV groups) from their counts (config only)."""
    c = phi35()
    assert estimate_total_params(c) == pytest.approx(41.9e9, rel=0.01)
    assert estimate_active_params(c) == pytest.approx(6.6e9, rel=0.01)
    mini = resolve_sizes(c, "slim", total_params=estimate_total_params(c, 960))
    assert mini == SlimTargets(expert_intermediate_size=960, num_key_value_heads=8, num_experts=16)
    tiny = resolve_sizes(c, "slim", active_params=estimate_active_params(c, 448, 4),
                         explicit=SlimTargets(num_key_value_heads=4))
    assert tiny.expert_intermediate_size == 448 and tiny.num_key_value_heads == 4
    # widths >= 64 are multiples of 8: the count lands within 8 neurons of every expert of the target
    odd = resolve_sizes(c, "slim", total_params=7_600_000_000)
    assert odd.expert_intermediate_size % 8 == 0
    assert 0 <= 7.6e9 - estimate_total_params(c, odd.expert_intermediate_size) < 32 * 16 * 3 * 4096 * 8


@pytest.mark.parametrize("kwargs,needle", [
    (dict(strategy="drop", active_params=5_000_000_000), "active_params: target 5,000,000,000 is below"),
    (dict(strategy="slim", total_params=50_000_000_000), "total_params: target 50,000,000,000 is larger"),
    (dict(strategy="slim", total_params=1_000_000), "total_params: target 1,000,000 is below"),
    (dict(strategy="slim", total_params=10, active_params=10), "active_params: give total_params or"),
    (dict(strategy="slim", total_params=9e9, explicit=SlimTargets(num_experts=4)), "total_params: a parameter target"),
    (dict(strategy="slim", total_params=9e9, explicit=SlimTargets(num_key_value_heads=3)), "num_key_value_heads"),
    (dict(strategy="shrink", total_params=9e9), "strategy: expected one of"),
])
def test_bad_targets_are_one_line_errors_naming_the_field(kwargs, needle):
    kwargs = {k: int(v) if isinstance(v, float) else v for k, v in kwargs.items()}
    with pytest.raises(UserError, match=needle) as e:
        resolve_sizes(phi35(), **kwargs)
    assert "\n" not in str(e.value)
    if kwargs.get("strategy") == "drop":
        assert "top-k (2)" in str(e.value)


BASE = {"name": "p", "teacher": "t", "output_dir": "o", "data": {"train": "d.txt"}}


def test_stages_resolve_in_order_from_the_previous_stage(tmp_path):
    config = tiny_config("phimoe", **ROOMY["phimoe"])
    t0 = estimate_total_params(config)
    cfg = PipelineConfig.model_validate({**BASE, "stages": [
        {"name": "a", "strategy": "drop", "total_params": int(t0 * 0.8)},
        {"name": "b", "strategy": "slim", "total_params": int(t0 * 0.5), "num_key_value_heads": 1}]})
    out = resolve_stages(cfg, config)
    a, b = out.stages
    assert a.num_experts < 8 and a.expert_intermediate_size == WIDTH and a.total_params is None
    assert b.num_experts == a.num_experts and b.num_key_value_heads == 1  # slim keeps what stage a left
    assert estimate_total_params(config, **b.targets().model_dump()) <= int(t0 * 0.5)
    assert a.importance.expert_score == "reap" and cfg.stages[0].total_params == int(t0 * 0.8)  # input untouched
    assert PipelineConfig.model_validate(out.model_dump()) == out  # a resolved config is a valid config


def write_run(tmp_path, stages):
    tiny_config("phimoe", **ROOMY["phimoe"]).save_pretrained(tmp_path / "t")
    (tmp_path / "d.txt").write_text("some text")
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({**BASE, "teacher": str(tmp_path / "t"), "data": {"train": str(tmp_path / "d.txt")},
                                    "output_dir": str(tmp_path / "o"), "stages": stages}))
    return path


def test_run_config_with_drop_and_total_params_validates_and_resolves(tmp_path, capsys):
    from slimmoe.pipeline.resolve import resolve_pipeline

    path = write_run(tmp_path, [{"name": "final", "strategy": "drop", "total_params": "120K", "distill": None}])
    cfg = load_pipeline_config(path)
    assert cfg.stages[0].total_params == 120_000 and cfg.stages[0].importance.expert_score == "reap"
    check_config(cfg)  # the teacher here is a config.json only: check_inputs would also want weights and data
    resolved = resolve_pipeline(cfg)
    st = resolved.stages[0]
    assert st.expert_intermediate_size == WIDTH and 2 <= st.num_experts < 8
    printed = capsys.readouterr().out
    assert "final" in printed and "est. active params" in printed
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stages,needle", [
    ([{"name": "a", "strategy": "drop", "active_params": 1000}], "stages.0.active_params: target 1,000 is below"),
    ([{"name": "a", "total_params": 30000}, {"name": "b", "total_params": 40000}],
     "stages.1.total_params: target 40,000 is larger than the source's"),
    ([{"name": "a", "total_params": 100}], "stages.0.total_params: target 100 is below"),
    ([{"name": "a", "total_params": 9, "active_params": 9}], "stages.0.active_params"),
    ([{"name": "a", "total_params": 9, "expert_intermediate_size": 8}], "stages.0.total_params"),
    ([{"name": "a", "strategy": "drop", "importance": {"expert_score": "taylor"}}], "stages.0.strategy"),
    ([{"name": "a", "total_params": "lots"}], "stages.0.total_params"),
])
def test_run_errors_exit_2_naming_the_field(tmp_path, capsys, stages, needle):
    assert main(["run", str(write_run(tmp_path, stages))]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_prune_cli_solves_a_parameter_target(tmp_path, capsys):
    src = tmp_path / "src"
    tiny_model("phimoe", **ROOMY["phimoe"]).save_pretrained(src)
    target = int(estimate_total_params(tiny_config("phimoe", **ROOMY["phimoe"])) * 0.6)
    args = ["prune", str(src), str(tmp_path / "out"), "--strategy", "drop", "--total-params", str(target),
            "--samples", "4", "--seq-len", "16", "--no-progress"]
    assert main(args) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.intermediate_size == WIDTH and model.config.num_local_experts < 8
    assert 0 <= target - parameter_counts(model)["total_params"] < 2 * (3 * 32 * WIDTH + 32)
    plan = yaml.safe_load((tmp_path / "out" / "slim_plan.json").read_text())
    assert plan["scores"]["expert_score"] == "reap"
    capsys.readouterr()
    for extra, needle in ((["--active-params", "1000"], "--active-params: target 1,000 is below"),
                          (["--total-params", "lots"], "--total-params: expected a parameter count"),
                          (["--expert-score", "taylor"], "--expert-score: --strategy drop")):
        bad = args[:3] + ["--strategy", "drop", *extra, "--no-progress"]
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and needle in err, err


def test_schedule_with_a_parameter_target_steps_down_to_the_solved_sizes():
    from slimmoe.pipeline.resolve import expand_schedule

    config = tiny_config("phimoe", **ROOMY["phimoe"])
    target = int(estimate_total_params(config) * 0.4)
    cfg = PipelineConfig.model_validate({**BASE, "schedule": {"num_stages": 2, "strategy": "slim+drop",
                                                              "total_params": target}})
    stages = expand_schedule(cfg, config).stages
    final = resolve_sizes(config, "slim+drop", total_params=target)
    assert stages[-1].targets() == final and final.num_experts < 8 and final.expert_intermediate_size < WIDTH
    assert [s.strategy for s in stages] == ["slim+drop"] * 2 and stages[0].importance.expert_score == "reap"
    assert estimate_total_params(config, **stages[0].targets().model_dump()) > estimate_total_params(
        config, **final.model_dump())
    with pytest.raises(UserError, match="schedule.total_params: target 10 is below"):
        expand_schedule(cfg.model_copy(update={"schedule": cfg.schedule.model_copy(update={"total_params": 10})}),
                        config)
