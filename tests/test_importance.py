"""The taylor score is what it claims: a directional derivative of the calibration loss.

For a structure S, (L(w with S scaled by 1-eps) - L(w with S scaled by 1+eps)) / (2 eps)
equals -sum over S of w * dL/dw. eps is not tiny because parts of the stock models (router
softmax, rotary tables) compute in float32 even in a float64 model; the central difference
keeps the truncation error at O(eps^2). L is computed here with a plain float64 cross-entropy,
independently of the scoring code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from slimmoe.arch import get_adapter
from slimmoe.config import ImportanceConfig
from slimmoe.prune.importance import Wanted, estimate_importance

EPS = 1e-3


def lm_loss64(model, ids):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def kd_renorm_loss64(model, teacher, ids, k=8):
    logits = model(input_ids=ids).logits
    t = torch.softmax(teacher(input_ids=ids).logits, -1)
    top, idx = t.topk(k, -1)
    target = top / top.sum(-1, keepdim=True)
    logq = torch.log_softmax(logits, -1).gather(-1, idx)
    return -(target * logq).sum(-1).mean().item()


def directional(model, tensors_and_slices, loss_fn) -> float:
    """Central difference of the loss along w restricted to S (scale S by 1 -/+ eps)."""
    values = []
    with torch.no_grad():
        for scale in (1 - EPS, 1 + EPS):
            saved = [t[sl].clone() for t, sl in tensors_and_slices]
            for t, sl in tensors_and_slices:
                t[sl] *= scale
            values.append(loss_fn())
            for (t, sl), s in zip(tensors_and_slices, saved):
                t[sl] = s
    return (values[0] - values[1]) / (2 * EPS)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("qwen2_moe", dtype=torch.float64, seed=3)
    model.set_experts_implementation("eager")
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(5))
    return model, ids


def structures(model, layer=1, expert=2, neuron=5, group=1, shared_neuron=7):
    ad = get_adapter(model.config)
    b = ad.moe_blocks(model)[layer]
    ex = b.experts
    I = ex.down_proj.shape[2]
    attn = ad.attention(ad.layers(model)[layer])
    hd, grp = ad.head_dim(model.config), model.config.num_attention_heads // ad.num_kv_heads(model.config)
    q = slice(group * grp * hd, (group + 1) * grp * hd)
    kv = slice(group * hd, (group + 1) * hd)
    sh = b.shared[0]
    return {
        "neuron": [(ex.gate_up_proj, (expert, neuron)), (ex.gate_up_proj, (expert, I + neuron)), (ex.down_proj, (expert, slice(None), neuron))],
        "expert": [(ex.gate_up_proj, expert), (ex.down_proj, expert)],
        "kv_group": [(attn.q_proj.weight, q), (attn.q_proj.bias, q), (attn.k_proj.weight, kv), (attn.k_proj.bias, kv),
                     (attn.v_proj.weight, kv), (attn.v_proj.bias, kv), (attn.o_proj.weight, (slice(None), q))],
        "shared": [(sh.gate_proj.weight, shared_neuron), (sh.up_proj.weight, shared_neuron), (sh.down_proj.weight, (slice(None), shared_neuron))],
    }


@pytest.mark.parametrize("loss", ["lm", "kd_topk_renorm"])
def test_taylor_score_matches_directional_finite_difference(setup, loss):
    model, ids = setup
    teacher = tiny_model("qwen2_moe", dtype=torch.float64, seed=4)
    teacher.set_experts_implementation("eager")
    cfg = ImportanceConfig(samples=2, batch_size=2, loss=loss)
    scores = estimate_importance(model, ids, cfg, teacher=teacher if loss != "lm" else None, progress=False, absolute=False)
    fn = (lambda: lm_loss64(model, ids)) if loss == "lm" else (lambda: kd_renorm_loss64(model, teacher, ids))
    S = structures(model)
    got = {
        "neuron": scores.neurons[1][2, 5].item(),
        "expert": scores.experts[1][2].item(),
        "kv_group": scores.kv_groups[1][1].item(),
        "shared": scores.shared[1][7].item(),
    }
    for name, parts in S.items():
        fd = directional(model, parts, fn)
        assert abs(fd) > 1e-4, f"{name}: degenerate structure, pick another"
        assert -got[name] == pytest.approx(fd, rel=2e-3), name


def test_scoring_holds_one_gradient_at_a_time_and_cleans_up(setup):
    model, ids = setup
    live = []

    def watch(p):
        live.append(sum(q.grad is not None for q in model.parameters()))

    handles = [p.register_post_accumulate_grad_hook(watch) for p in model.parameters()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        estimate_importance(model, ids, ImportanceConfig(samples=2, batch_size=1, loss="lm"), progress=False)
    finally:
        for h in handles:
            h.remove()
    assert live, "no gradient was taken"
    assert max(live) == 1  # only the tensor being folded holds a gradient
    assert model.get_input_embeddings().weight.grad is None
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_own_teacher_residual_kd_is_refused(setup):
    from slimmoe.errors import UserError

    model, ids = setup
    with pytest.raises(UserError, match="importance.loss"):
        estimate_importance(model, ids, ImportanceConfig(loss="kd_topk"), progress=False)


def test_frequency_counts_every_routed_token(setup):
    model, ids = setup
    cfg = ImportanceConfig(samples=2, expert_score="frequency", score="random")
    scores = estimate_importance(model, ids, cfg, want=Wanted(neurons=False, kv=False), progress=False)
    top_k = model.config.num_experts_per_tok
    for counts in scores.experts.values():
        assert counts.sum().item() == ids.numel() * top_k


def test_magnitude_is_l1_norm_of_the_structure(setup):
    model, ids = setup
    scores = estimate_importance(model, ids, ImportanceConfig(score="magnitude", expert_score="random"), progress=False)
    S = structures(model)
    want = sum(t[sl].abs().sum().item() for t, sl in S["neuron"])
    assert scores.neurons[1][2, 5].item() == pytest.approx(want, rel=1e-12)
    want_kv = sum(t[sl].abs().sum().item() for t, sl in S["kv_group"])
    assert scores.kv_groups[1][1].item() == pytest.approx(want_kv, rel=1e-12)


def test_activation_score_is_mean_abs_activation_over_routed_tokens():
    model = tiny_model("mixtral", dtype=torch.float64, seed=2)
    model.set_experts_implementation("eager")
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    scores = estimate_importance(model, ids, ImportanceConfig(score="activation", expert_score="reap"), progress=False)
    # hand-written reference for layer 0: hidden states entering the MoE block, routed token by token
    ad = get_adapter(model.config)
    layer = ad.layers(model)[0]
    captured = {}
    h = layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: captured.setdefault("x", o.detach()))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    x = captured["x"].reshape(-1, 32)
    blk = ad.moe_blocks(model)[0]
    W, D = blk.experts.gate_up_proj, blk.experts.down_proj
    probs = torch.softmax(x @ blk.router.weight.T, -1)
    topv, topi = probs.topk(2, -1)
    topv = topv / topv.sum(-1, keepdim=True)
    act_sum, reap_sum, n = torch.zeros(4, 16, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), torch.zeros(4)
    for t in range(x.shape[0]):
        for slot in range(2):
            e = topi[t, slot].item()
            g, u = (W[e] @ x[t]).chunk(2)
            a = F.silu(g) * u
            act_sum[e] += a.abs()
            reap_sum[e] += topv[t, slot] * (D[e] @ a).norm()
            n[e] += 1
    torch.testing.assert_close(scores.neurons[0], act_sum / n.clamp(min=1)[:, None].double())
    torch.testing.assert_close(scores.experts[0], reap_sum / n.clamp(min=1).double())


def test_random_scores_are_seeded(setup):
    model, ids = setup
    cfg = ImportanceConfig(score="random", expert_score="random", seed=7)
    a = estimate_importance(model, ids, cfg, progress=False)
    b = estimate_importance(model, ids, cfg, progress=False)
    c = estimate_importance(model, ids, cfg.model_copy(update={"seed": 8}), progress=False)
    assert torch.equal(a.neurons[0], b.neurons[0]) and not torch.equal(a.neurons[0], c.neurons[0])
