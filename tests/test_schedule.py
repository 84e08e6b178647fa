"""The automatic stage schedule: parameter estimate vs. real models, geometric spacing, validity."""

import copy
import itertools
import math

import pytest
import torch
from tiny_models import CONFIGS, tiny_config
from transformers import AutoModelForCausalLM

from slimmoe.arch import get_adapter
from slimmoe.config import SlimTargets
from slimmoe.errors import UserError
from slimmoe.prune.plan import resolve_targets
from slimmoe.prune.schedule import estimate_total_params, format_schedule, interpolate_stages


def slimmed_config(config, targets: SlimTargets):
    """The config of ``config``'s model slimmed to ``targets`` (as slimmoe.prune.slim writes it)."""
    adapter = get_adapter(config)
    sizes = resolve_targets(adapter, config, targets)
    new = copy.deepcopy(config)
    adapter.update_config(
        new,
        expert_size=sizes["expert_intermediate_size"],
        shared_size=sizes["shared_intermediate_size"],
        kv_heads=sizes["num_key_value_heads"],
        num_experts=sizes["num_experts"],
    )
    return new


def built_params(config) -> int:
    """Parameter count of the real transformers model (on the meta device: no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def teacher(**overrides):
    """A tiny phimoe with room to slim on every axis: width 256, 8 experts, 8 heads in 4 KV groups."""
    kw = dict(intermediate_size=256, num_local_experts=8, num_attention_heads=8, num_key_value_heads=4)
    return tiny_config("phimoe", **{**kw, **overrides})


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@pytest.mark.parametrize("tied", [False, True])
def test_estimate_equals_built_model(model_type, tied):
    config = tiny_config(model_type, tie_word_embeddings=tied)
    adapter = get_adapter(config)
    assert estimate_total_params(config) == built_params(config)
    options = [SlimTargets(expert_intermediate_size=8), SlimTargets(num_experts=2)]
    if adapter.kv_refusal is None:
        options.append(SlimTargets(expert_intermediate_size=4, num_key_value_heads=1, num_experts=3))
    for t in options:
        slim = slimmed_config(config, t)
        assert estimate_total_params(config, **t.model_dump()) == built_params(slim), (model_type, t)


def _resolved(config, stages):
    """Cumulative sizes of every stage, checking each stage is a valid target of the previous one."""
    out, cur = [], config
    for st in stages:
        resolve_targets(get_adapter(cur), cur, st)  # raises if a stage is invalid from its source
        cur = slimmed_config(cur, st)
        out.append(cur)
    return out


@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_stages_are_geometric_in_built_parameters(num_stages):
    config = teacher()
    final = SlimTargets(expert_intermediate_size=32, num_key_value_heads=1, num_experts=4)
    stages = interpolate_stages(config, final, num_stages)
    counts = [built_params(config)] + [built_params(c) for c in _resolved(config, stages)]
    ideal = (counts[-1] / counts[0]) ** (1 / num_stages)
    ratios = [b / a for a, b in zip(counts, counts[1:])]
    # rounding widths to multiples of 8 and counts to integers moves each stage a little
    assert all(abs(r / ideal - 1) < 0.08 for r in ratios), (ratios, ideal)
    assert counts[-1] < counts[0] * ideal ** (num_stages - 1)  # the last step really shrinks


def test_width_only_schedule_is_close_to_exact_geometry():
    config = teacher(intermediate_size=1024)
    stages = interpolate_stages(config, SlimTargets(expert_intermediate_size=64), 3)
    counts = [built_params(config)] + [built_params(c) for c in _resolved(config, stages)]
    logs = [math.log(b / a) for a, b in zip(counts, counts[1:])]
    assert max(logs) - min(logs) < 0.03, counts


def test_last_stage_is_final_and_sizes_never_grow():
    config = teacher()
    for I, kv, E, n in itertools.product([None, 8, 64, 100], [None, 1, 2, 4], [None, 2, 5, 8], [1, 2, 3, 5]):
        final = SlimTargets(expert_intermediate_size=I, num_key_value_heads=kv, num_experts=E)
        stages = interpolate_stages(config, final, n)
        assert len(stages) == n
        assert stages[-1] == final
        sizes = [(256, 4, 8)] + [
            (c.intermediate_size, c.num_key_value_heads, c.num_local_experts) for c in _resolved(config, stages)
        ]
        for prev, cur in zip(sizes, sizes[1:]):
            assert all(c <= p for c, p in zip(cur, prev)), (final, n, sizes)
        for st in stages[:-1]:
            for field in ("expert_intermediate_size", "num_key_value_heads", "num_experts"):
                assert (getattr(st, field) is None) == (getattr(final, field) is None)
            w = st.expert_intermediate_size
            assert w is None or w < 64 or w % 8 == 0 or w in (256, I)


def test_intermediate_kv_heads_divide_query_heads():
    config = teacher(num_attention_heads=24, num_key_value_heads=12, hidden_size=48)
    stages = interpolate_stages(config, SlimTargets(num_key_value_heads=1), 4)
    kvs = [s.num_key_value_heads for s in stages]
    assert kvs[-1] == 1 and kvs[0] < 12
    heads = 24
    for kv in kvs:
        assert heads % kv == 0, kvs
        heads = kv * 2  # group size 2 is kept


def test_single_stage_is_the_final_target():
    final = SlimTargets(expert_intermediate_size=64, num_experts=4)
    assert interpolate_stages(teacher(), final, 1) == [final]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_bad_num_stages(bad):
    with pytest.raises(UserError, match="num_stages"):
        interpolate_stages(teacher(), SlimTargets(expert_intermediate_size=64), bad)


@pytest.mark.parametrize(
    "final, field",
    [
        (SlimTargets(expert_intermediate_size=512), "expert_intermediate_size"),
        (SlimTargets(num_key_value_heads=8), "num_key_value_heads"),
        (SlimTargets(num_key_value_heads=3), "num_key_value_heads"),
        (SlimTargets(num_experts=9), "num_experts"),
    ],
)
def test_final_larger_than_teacher_names_field(final, field):
    with pytest.raises(UserError, match=f"final.{field}"):
        interpolate_stages(teacher(), final, 3)


def test_non_moe_teacher_is_refused():
    from transformers import LlamaConfig

    with pytest.raises(UserError, match="not a Mixture-of-Experts"):
        interpolate_stages(LlamaConfig(), SlimTargets(expert_intermediate_size=8), 2)


def test_format_schedule_rows_match_stages():
    config = teacher()
    stages = interpolate_stages(config, SlimTargets(expert_intermediate_size=32, num_experts=4), 3)
    lines = format_schedule(stages, config).splitlines()
    assert len(lines) == 2 + len(stages)  # header, teacher, stages
    assert lines[1].split()[0] == "teacher" and lines[-1].split()[0] == "final"
    resolved = _resolved(config, stages)
    for line, cfg in zip(lines[2:], resolved):
        cells = line.split()
        assert int(cells[1]) == cfg.intermediate_size
        assert int(cells[2]) == cfg.num_key_value_heads
        assert int(cells[3]) == cfg.num_local_experts
        assert float(cells[5]) == pytest.approx(built_params(cfg) / built_params(config), abs=1e-3)
