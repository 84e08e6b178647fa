"""Slimming equals masking: the saved smaller model reproduces the original model with the
removed neurons / KV groups / experts masked out, for every supported architecture.

The masked reference is built here directly on the original weights (zeroed down-projection
columns, zeroed o_proj columns, router logits of dropped experts set to -inf); it shares no
code with the slicing under test.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import CONFIGS, tiny_model
from transformers import AutoModelForCausalLM

from slimmoe.arch import get_adapter
from slimmoe.prune.plan import LayerPlan, SlimPlan
from slimmoe.prune.slim import apply_plan, save_slimmed

KV_REFUSED = {"olmoe", "deepseek_v3"}


def hand_plan(model, keep_experts: bool, keep_kv: bool) -> SlimPlan:
    """A plan chosen by hand: a different half of the neurons in every expert, the second KV
    group only, and experts 0, 2, 3 (all layers)."""
    ad = get_adapter(model.config)
    cfg = model.config
    E, I, kv = ad.num_experts(cfg), ad.expert_size(cfg), ad.num_kv_heads(cfg)
    g = torch.Generator().manual_seed(1)
    layers = []
    moe = {b.layer_idx: b for b in ad.moe_blocks(model)}
    for i in range(cfg.num_hidden_layers):
        lp = LayerPlan(layer=i, kv_groups=list(range(kv)) if keep_kv else [kv - 1])
        if i in moe:
            lp.experts = list(range(E)) if keep_experts else [0, 2, 3]
            lp.expert_neurons = [sorted(torch.randperm(I, generator=g)[: I // 2].tolist()) for _ in lp.experts]
            if moe[i].shared:
                S = sum(m.gate_proj.weight.shape[0] for m in moe[i].shared)
                lp.shared_neurons = sorted(torch.randperm(S, generator=g)[: S // 2].tolist())
        layers.append(lp)
    return SlimPlan(model_type=cfg.model_type, source={}, target={}, layers=layers)


@contextlib.contextmanager
def routers_masked(routers: dict, dropped: dict):
    """Within the block, router logits of dropped experts are -inf (sigmoid routers: score 0
    and never chosen, via an -inf score-correction bias)."""
    original = torch.nn.functional.linear
    by_weight = {id(r.weight): dropped[i] for i, r in routers.items()}

    def linear(x, w, b=None):
        out = original(x, w, b)
        if id(w) in by_weight and by_weight[id(w)]:
            out = out.clone()
            out[..., by_weight[id(w)]] = float("-inf")
        return out

    saved = {}
    for i, r in routers.items():
        bias = getattr(r, "e_score_correction_bias", None)
        if bias is not None and dropped[i]:
            saved[i] = bias.clone()
            bias[dropped[i]] = float("-inf")
    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = original
        for i, b in saved.items():
            routers[i].e_score_correction_bias.copy_(b)


def masked_logits(model, plan: SlimPlan, ids: torch.Tensor) -> torch.Tensor:
    ad = get_adapter(model.config)
    cfg = model.config
    head_dim = ad.head_dim(cfg)
    group = cfg.num_attention_heads // ad.num_kv_heads(cfg)
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ref.load_state_dict(model.state_dict())
    moe = {b.layer_idx: b for b in ad.moe_blocks(ref)}
    routers, dropped = {}, {}
    with torch.no_grad():
        for lp in plan.layers:
            if lp.layer in moe:
                b = moe[lp.layer]
                E, I = b.experts.down_proj.shape[0], b.experts.down_proj.shape[2]
                for e, neurons in zip(lp.experts, lp.expert_neurons):
                    removed = [j for j in range(I) if j not in neurons]
                    b.experts.down_proj[e][:, removed] = 0
                routers[lp.layer] = b.router
                dropped[lp.layer] = [e for e in range(E) if e not in lp.experts]
                if lp.shared_neurons is not None:
                    col = 0
                    for m in b.shared:
                        w = m.down_proj.weight
                        for j in range(w.shape[1]):
                            if col + j not in lp.shared_neurons:
                                w[:, j] = 0
                        col += w.shape[1]
            attn = ad.attention(ad.layers(ref)[lp.layer])
            for kvg in range(ad.num_kv_heads(cfg)):
                if kvg not in lp.kv_groups:
                    for h in range(kvg * group, (kvg + 1) * group):
                        attn.o_proj.weight[:, h * head_dim : (h + 1) * head_dim] = 0
        with routers_masked(routers, dropped):
            return ref(ids).logits


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_slimmed_checkpoint_equals_masked_original(model_type, tmp_path):
    model = tiny_model(model_type)
    plan = hand_plan(model, keep_experts=False, keep_kv=model_type in KV_REFUSED)
    slim = apply_plan(model, plan)
    save_slimmed(slim, plan, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # stock loader

    ad = get_adapter(loaded.config)
    assert ad.expert_size(loaded.config) == 8
    assert ad.num_experts(loaded.config) == 3
    blk = ad.moe_blocks(loaded)[0]
    assert tuple(blk.experts.gate_up_proj.shape) == (3, 16, 32)
    assert tuple(blk.experts.down_proj.shape) == (3, 32, 8)
    if model_type not in KV_REFUSED:
        assert loaded.config.num_key_value_heads == 1 and loaded.config.num_attention_heads == 2
    assert SlimPlan.load(tmp_path / "out").layers[0].experts == [0, 2, 3]

    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = loaded(ids).logits
    want = masked_logits(model, plan, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_keeping_everything_reproduces_logits_exactly(model_type):
    model = tiny_model(model_type)
    plan = hand_plan(model, keep_experts=True, keep_kv=True)
    for lp in plan.layers:  # keep every neuron too
        if lp.expert_neurons is not None:
            lp.expert_neurons = [list(range(len(n) * 2)) for n in lp.expert_neurons]
        if lp.shared_neurons is not None:
            lp.shared_neurons = list(range(len(lp.shared_neurons) * 2))
    slim = apply_plan(model, plan).eval()
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(slim(ids).logits, model(ids).logits)


def test_original_model_is_left_unchanged():
    model = tiny_model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_plan(model, hand_plan(model, keep_experts=False, keep_kv=False))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
