"""importance.device_map: the scored model (and teacher) placed by ``from_pretrained(device_map=...)``
give the scores of the plain path. This machine has no GPU: ``cpu``, an explicit per-module map
and ``auto`` (which places everything on the CPU here) are run; spreading over GPUs is not."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model

from slimmoe.cli import main
from slimmoe.config import ImportanceConfig, PruneConfig, SlimTargets
from slimmoe.errors import UserError
from slimmoe.io.loading import load_model
from slimmoe.prune.importance import KINDS, Wanted, estimate_importance, load_for_scoring, scoring_placement
from slimmoe.prune.one_shot import prune

PER_MODULE = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device_map") / "qwen2_moe"
    tiny_model("qwen2_moe").save_pretrained(folder)
    return folder


def scores_of(path, cfg: ImportanceConfig, teacher_path=None):
    placement = scoring_placement(cfg, distributed=False)
    model = load_model(path, **placement)
    teacher = load_model(teacher_path, "TEACHER", **placement) if teacher_path else None
    blocks = torch.randint(3, 96, (4, 12), generator=torch.Generator().manual_seed(0))
    return estimate_importance(model, blocks, cfg, teacher=teacher, want=Wanted(), progress=False)


def assert_same_scores(a, b):
    for kind in KINDS:
        ta, tb = getattr(a, kind), getattr(b, kind)
        assert sorted(ta) == sorted(tb), kind
        for i in ta:
            assert torch.equal(ta[i], tb[i]), (kind, i)


@pytest.mark.parametrize("device_map", ["cpu", json.dumps(PER_MODULE), "auto"], ids=["cpu", "per-module", "auto"])
@pytest.mark.parametrize("score, expert_score", [("taylor", "taylor"), ("activation", "reap"), ("magnitude", "frequency")])
def test_placed_model_scores_like_the_plain_one(source, device_map, score, expert_score):
    plain = ImportanceConfig(samples=4, seq_len=12, batch_size=2, score=score, expert_score=expert_score)
    placed = plain.model_copy(update={"device_map": device_map})
    assert_same_scores(scores_of(source, plain, source), scores_of(source, placed, source))


def test_scores_through_accelerate_hooks(source):
    """What a map over several devices installs (transformers dispatches only then): accelerate's
    AlignDevicesHook on every placed module (``dispatch_model(..., force_hooks=True)``, here all on the CPU)."""
    from accelerate import dispatch_model

    cfg = ImportanceConfig(samples=4, seq_len=12, batch_size=2)
    blocks = torch.randint(3, 96, (4, 12), generator=torch.Generator().manual_seed(0))
    plain = estimate_importance(load_model(source), blocks, cfg, want=Wanted(), progress=False)
    model = dispatch_model(load_model(source), device_map=PER_MODULE, force_hooks=True)
    assert model.hf_device_map == PER_MODULE and hasattr(model.model.layers[0], "_hf_hook")
    assert_same_scores(plain, estimate_importance(model, blocks, cfg, want=Wanted(), progress=False))


def test_offloaded_weights_are_refused(source, tmp_path, monkeypatch):
    """Weights accelerate offloads (next to GPUs: modules mapped to cpu; here: disk) sit on the meta
    device between forwards and would get no gradient: one error naming the field, no silent zeros."""
    from accelerate import dispatch_model

    import slimmoe.io.loading as loading

    plain_load = loading.load_model

    def load_offloaded(path, field="MODEL", **kwargs):
        return dispatch_model(plain_load(path, field), device_map={**PER_MODULE, "lm_head": "disk"},
                              offload_dir=str(tmp_path / "offload"))

    monkeypatch.setattr(loading, "load_model", load_offloaded)
    with pytest.raises(UserError, match=r"importance.device_map: 1 weights of MODEL \(the first: lm_head.weight\) "
                                        "are offloaded"):
        load_for_scoring(source, "MODEL", ImportanceConfig(device_map="auto"), distributed=False)


def test_prune_with_device_map_writes_what_the_plain_prune_writes(source, tmp_path):
    cfg = PruneConfig(targets=SlimTargets(expert_intermediate_size=8, num_key_value_heads=1),
                      importance=ImportanceConfig(samples=4, seq_len=12))
    prune(str(source), tmp_path / "plain", cfg, progress=False)
    placed = cfg.model_copy(update={"importance": cfg.importance.model_copy(update={"device_map": "auto"})})
    prune(str(source), tmp_path / "auto", placed, progress=False)
    a = torch.load(tmp_path / "plain" / "importance.pt", weights_only=True)["scores"]
    b = torch.load(tmp_path / "auto" / "importance.pt", weights_only=True)["scores"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plan_a = json.loads((tmp_path / "plain" / "slim_plan.json").read_text())
    plan_b = json.loads((tmp_path / "auto" / "slim_plan.json").read_text())
    assert plan_a["layers"] == plan_b["layers"]


def test_device_map_flag_and_its_errors(source, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["prune", str(source), str(out), "--expert-intermediate-size", "8", "--samples", "2", "--seq-len", "8",
            "--no-progress"]
    assert main([*argv, "--device-map", json.dumps(PER_MODULE)]) == 0
    assert json.loads((out / "slim_plan.json").read_text())["scores"]["device_map"] == json.dumps(PER_MODULE)
    for bad, says in (("gpu", "expected auto"), ('{"lm_head": "disk"}', "disk offload")):
        assert main([*argv, "--device-map", bad]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and err[0].startswith("error: importance.device_map:") and says in err[0], err
    with pytest.raises(UserError, match="importance.device_map: not with several processes"):
        scoring_placement(ImportanceConfig(device_map="auto"), distributed=True)
    assert ImportanceConfig(device_map=PER_MODULE).device_map == json.dumps(PER_MODULE)  # a YAML mapping
