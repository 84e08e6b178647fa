"""Each chunked loss against a plain float64 reference written independently here."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_distill import one_torch_thread  # noqa: F401 - autouse fixture

from slimmoe import losses

B, T, V, K = 3, 7, 50, 5  # 21 positions: chunk sizes 4 and 8 do not divide it


def _ref_logsoftmax(x, temp):
    x = x.double() / temp
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        m = x[i].max()
        out[i] = x[i] - m - torch.log(torch.exp(x[i] - m).sum())
    return out


def _positions(mask, n):
    return [i for i in range(n) if mask is None or bool(mask.reshape(-1)[i])]


def ref_kd_topk(s, t_lp, t_idx, mask, temp):
    s = s.reshape(-1, s.shape[-1])
    t_lp, t_idx = t_lp.reshape(-1, K).double(), t_idx.reshape(-1, K)
    s_lp = _ref_logsoftmax(s, temp)
    vals = []
    for i in _positions(mask, s.shape[0]):
        p = [math.exp(v) for v in t_lp[i].tolist()]
        q = [math.exp(s_lp[i, j].item()) for j in t_idx[i].tolist()]
        p_rest, q_rest = 1 - sum(p), 1 - sum(q)
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        if p_rest > 0:
            kl += p_rest * math.log(p_rest / q_rest)
        vals.append(kl)
    return sum(vals) / len(vals) * temp**2


def ref_kd_renorm(s, t_lp, t_idx, mask, temp):
    s = s.reshape(-1, s.shape[-1])
    t_lp, t_idx = t_lp.reshape(-1, K).double(), t_idx.reshape(-1, K)
    s_lp = _ref_logsoftmax(s, temp)
    vals = []
    for i in _positions(mask, s.shape[0]):
        p = torch.exp(t_lp[i])
        p = p / p.sum()
        vals.append(-sum(p[j].item() * s_lp[i, t_idx[i, j]].item() for j in range(K)))
    return sum(vals) / len(vals) * temp**2


def ref_kl(s, t, mask, temp):
    s_lp = _ref_logsoftmax(s.reshape(-1, V), temp)
    t_lp = _ref_logsoftmax(t.reshape(-1, V), temp)
    vals = [(t_lp[i].exp() * (t_lp[i] - s_lp[i])).sum().item() for i in _positions(mask, s_lp.shape[0])]
    return sum(vals) / len(vals) * temp**2


def ref_lm(logits, labels, mask):
    lp = _ref_logsoftmax(logits.reshape(-1, V), 1.0)
    labels = labels.reshape(-1)
    vals = [
        -lp[i, labels[i]].item()
        for i in _positions(mask, lp.shape[0])
        if labels[i].item() != -100
    ]
    return sum(vals) / len(vals)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, T, V, generator=g) * 2
    t = torch.randn(B, T, V, generator=g) * 2
    mask = torch.rand(B, T, generator=g) > 0.3
    return s, t, mask


def test_teacher_topk_matches_sorted_logsoftmax(data):
    _, t, _ = data
    lp, idx = losses.teacher_topk(t, k=K, temperature=2.0, chunk_size=4)
    assert lp.shape == (B, T, K) and idx.shape == (B, T, K) and lp.dtype == torch.float32
    ref = _ref_logsoftmax(t.reshape(-1, V), 2.0)
    top = ref.sort(dim=-1, descending=True)
    torch.testing.assert_close(lp.reshape(-1, K).double(), top.values[:, :K], atol=1e-5, rtol=0)
    torch.testing.assert_close(idx.reshape(-1, K), top.indices[:, :K])


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("chunk", [4, 8, 4096])
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_kd_losses_match_reference(data, use_mask, chunk, temp):
    s, t, mask = data
    mask = mask if use_mask else None
    t_lp, t_idx = losses.teacher_topk(t, k=K, temperature=temp)
    got = losses.kd_topk_loss(s, t_lp, t_idx, mask=mask, temperature=temp, chunk_size=chunk)
    assert got.shape == ()
    assert got.item() == pytest.approx(ref_kd_topk(s, t_lp, t_idx, mask, temp), rel=1e-4, abs=1e-6)
    got_r = losses.kd_topk_renorm_loss(s, t_lp, t_idx, mask=mask, temperature=temp, chunk_size=chunk)
    assert got_r.item() == pytest.approx(ref_kd_renorm(s, t_lp, t_idx, mask, temp), rel=1e-4)
    got_kl = losses.kl_loss(s, t, mask=mask, temperature=temp, chunk_size=chunk)
    assert got_kl.item() == pytest.approx(ref_kl(s, t, mask, temp), rel=1e-4)


@pytest.mark.parametrize("chunk", [4, 4096])
def test_lm_loss_matches_reference_with_ignore_and_mask(data, chunk):
    s, _, mask = data
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    labels[0, :3] = -100
    for m in (None, mask):
        got = losses.lm_loss(s, labels, mask=m, chunk_size=chunk)
        assert got.item() == pytest.approx(ref_lm(s, labels, m), rel=1e-5)


def test_flat_inputs_equal_batched(data):
    s, t, mask = data
    t_lp, t_idx = losses.teacher_topk(t, k=K)
    a = losses.kd_topk_loss(s, t_lp, t_idx, mask=mask, chunk_size=5)
    b = losses.kd_topk_loss(s.reshape(-1, V), t_lp.reshape(-1, K), t_idx.reshape(-1, K), mask=mask.reshape(-1))
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_kd_topk_zero_at_teacher_renorm_not(data):
    _, t, _ = data
    t_lp, t_idx = losses.teacher_topk(t, k=K)
    s = t.clone().requires_grad_(True)
    kd = losses.kd_topk_loss(s, t_lp, t_idx, chunk_size=4)
    assert abs(kd.item()) < 1e-5
    s2 = t.clone().requires_grad_(True)
    losses.kd_topk_renorm_loss(s2, t_lp, t_idx, chunk_size=4).backward()
    assert s2.grad.abs().max().item() > 1e-3


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    fn(x).backward()
    return x.grad


@pytest.mark.parametrize("temp", [1.0, 1.5])
def test_gradients_match_float64_autograd_reference(data, temp):
    """Chunked + checkpointed gradients equal float64 autograd of an unchunked formula."""
    s, t, mask = data
    t_lp, t_idx = losses.teacher_topk(t, k=K, temperature=temp)
    m = mask.reshape(-1)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))

    def ref_kd(x):
        lp = torch.log_softmax(x.double().reshape(-1, V) / temp, -1)[m]
        q = lp.gather(-1, t_idx.reshape(-1, K)[m]).exp()
        p = t_lp.reshape(-1, K)[m].double().exp()
        pr, qr = 1 - p.sum(-1), 1 - q.sum(-1)
        kl = (p * (p.log() - q.log())).sum(-1) + pr * (pr.log() - qr.log())
        return kl.mean() * temp**2

    def ref_renorm(x):
        lp = torch.log_softmax(x.double().reshape(-1, V) / temp, -1)[m]
        p = torch.softmax(t_lp.reshape(-1, K)[m].double(), -1)
        return -(p * lp.gather(-1, t_idx.reshape(-1, K)[m])).sum(-1).mean() * temp**2

    def ref_kl(x):
        lp = torch.log_softmax(x.double().reshape(-1, V) / temp, -1)[m]
        tp = torch.log_softmax(t.double().reshape(-1, V) / temp, -1)[m]
        return (tp.exp() * (tp - lp)).sum(-1).mean() * temp**2

    def ref_ce(x):
        lp = torch.log_softmax(x.double().reshape(-1, V), -1)[m]
        return -lp.gather(-1, labels.reshape(-1)[m][:, None]).mean()

    pairs = [
        (lambda x: losses.kd_topk_loss(x, t_lp, t_idx, mask=mask, temperature=temp, chunk_size=4), ref_kd),
        (lambda x: losses.kd_topk_renorm_loss(x, t_lp, t_idx, mask=mask, temperature=temp, chunk_size=4), ref_renorm),
        (lambda x: losses.kl_loss(x, t, mask=mask, temperature=temp, chunk_size=4), ref_kl),
        (lambda x: losses.lm_loss(x, labels, mask=mask, chunk_size=4), ref_ce),
    ]
    for ours, ref in pairs:
        g, gr = _grad(ours, s), _grad(ref, s.double())
        torch.testing.assert_close(g.double(), gr, atol=1e-6, rtol=1e-4)
        assert g.reshape(-1, V)[~m].abs().max().item() == 0.0  # masked positions get no gradient


def test_residual_bucket_stable_when_topk_holds_all_mass():
    """A teacher with (almost) all mass on its top-k must give a finite loss and gradient."""
    t = torch.full((4, V), -1e4)
    t[:, :K] = 10.0
    t_lp, t_idx = losses.teacher_topk(t, k=K)
    s = t.clone().requires_grad_(True)
    loss = losses.kd_topk_loss(s, t_lp, t_idx)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert abs(loss.item()) < 1e-4


def test_all_masked_gives_zero_and_mixed_loss():
    s = torch.randn(2, 3, V)
    labels = torch.zeros(2, 3, dtype=torch.long)
    assert losses.lm_loss(s, labels, mask=torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0
    kd, lm = torch.tensor(2.0), torch.tensor(4.0)
    assert losses.mixed_loss(kd, lm, 0.25).item() == pytest.approx(0.25 * 2 + 0.75 * 4)


def test_gradient_scales_through_mixed_loss(data):
    """Backward with an upstream gradient != 1 (mixed loss weights) scales the chunked gradient."""
    s, t, mask = data
    t_lp, t_idx = losses.teacher_topk(t, k=K)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))

    def mixed(x):
        kd = losses.kd_topk_loss(x, t_lp, t_idx, mask=mask, chunk_size=4)
        return losses.mixed_loss(kd, losses.lm_loss(x, labels, mask=mask, chunk_size=8), 0.3)

    def parts(x):
        kd = 0.3 * losses.kd_topk_loss(x, t_lp, t_idx, mask=mask, chunk_size=4096)
        return kd + 0.7 * losses.lm_loss(x, labels, mask=mask, chunk_size=4096)

    torch.testing.assert_close(_grad(mixed, s), _grad(parts, s), atol=1e-7, rtol=1e-5)
    g_kd = _grad(lambda x: losses.kd_topk_loss(x, t_lp, t_idx, mask=mask), s)
    torch.testing.assert_close(_grad(lambda x: 2.5 * losses.kd_topk_loss(x, t_lp, t_idx, mask=mask), s), 2.5 * g_kd)


def test_bfloat16_logits_give_float32_loss_and_bf16_gradient(data):
    s, t, mask = data
    t_lp, t_idx = losses.teacher_topk(t, k=K)
    x = s.to(torch.bfloat16).requires_grad_(True)
    loss = losses.kd_topk_loss(x, t_lp, t_idx, mask=mask, chunk_size=4)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    ref = _grad(lambda y: losses.kd_topk_loss(y, t_lp, t_idx, mask=mask), x.detach().float())
    torch.testing.assert_close(x.grad.float(), ref, atol=2e-4, rtol=2e-2)
    assert loss.item() == pytest.approx(ref_kd_topk(x.detach().float(), t_lp, t_idx, mask, 1.0), rel=1e-4)
