"""Importance of every expert neuron, shared-expert neuron, KV group and whole expert.

The paper's score (``taylor``) is the first-order sensitivity of a loss to removing a
structure S: |sum over w in S of w * dL/dw|. The signed sums are accumulated over the
calibration batches (so the result is the sensitivity of the summed loss) and the
absolute value is taken at the end.

Gradients are requested only for the tensors being scored, and each one is folded into
its per-structure sums by a post-accumulate-grad hook that then frees it: scoring never
holds a second full copy of the weights' gradients.

Baselines: ``magnitude`` (L1 norm of the structure's weights), ``activation`` (mean
|activation| of a neuron / of a KV group's attention output, Minitron-style), ``random``.
Whole experts: ``taylor`` (over the expert's gate/up/down weights; the router row is not
part of the structure), ``frequency`` (routing counts, SEER-MoE), ``reap`` (mean router
weight x expert output norm over the tokens routed to it), ``random``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from slimmoe import losses
from slimmoe.arch import MoEAdapter, MoEBlock, get_adapter
from slimmoe.config import ImportanceConfig
from slimmoe.errors import UserError
from slimmoe.io.atomic import atomic_torch_save
from slimmoe.prune.plan import resolve_targets
from slimmoe.resources import oom_hint


@dataclass
class ImportanceScores:
    """Scores per layer index; higher means more important. Float64 tensors on the CPU."""

    neurons: dict[int, torch.Tensor] = field(default_factory=dict)  # [E, I] per MoE layer
    shared: dict[int, torch.Tensor] = field(default_factory=dict)  # [S] per MoE layer with shared experts
    kv_groups: dict[int, torch.Tensor] = field(default_factory=dict)  # [KV] per layer
    experts: dict[int, torch.Tensor] = field(default_factory=dict)  # [E] per MoE layer
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        flat = {f"{kind}.{i}": t for kind in ("neurons", "shared", "kv_groups", "experts") for i, t in getattr(self, kind).items()}
        atomic_torch_save({"scores": flat, "meta": self.meta}, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> "ImportanceScores":
        blob = torch.load(path, weights_only=True)
        out = cls(meta=blob["meta"])
        for key, t in blob["scores"].items():
            kind, i = key.rsplit(".", 1)
            getattr(out, kind)[int(i)] = t
        return out


@dataclass
class Wanted:
    neurons: bool = True
    kv: bool = True
    experts: bool = True


def wanted_for(adapter: MoEAdapter, config, targets) -> Wanted:
    """Which structure kinds a plan to ``targets`` (SlimTargets) cuts, so only those are scored."""
    t = resolve_targets(adapter, config, targets)
    return Wanted(
        neurons=t["expert_intermediate_size"] < adapter.expert_size(config),
        kv=t["num_key_value_heads"] < adapter.num_kv_heads(config),
        experts=t["num_experts"] < adapter.num_experts(config),
    )


def _zeros(*shape) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.float64)


class _Scorer:
    """Holds the accumulators and the hooks of one scoring pass."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter, cfg: ImportanceConfig, want: Wanted):
        self.model, self.adapter, self.cfg, self.want = model, adapter, cfg, want
        mc = model.config
        self.blocks = adapter.moe_blocks(model)
        self.kv = adapter.num_kv_heads(mc)
        self.group = mc.num_attention_heads // self.kv
        self.head_dim = adapter.head_dim(mc)
        self.layers = adapter.layers(model)
        self.signed = ImportanceScores()  # taylor sums, signed
        self.act_sum = ImportanceScores()  # activation / reap / frequency sums
        self.act_count: dict[tuple[str, int], torch.Tensor] = {}
        self.handles: list = []
        self.scored_params: list[nn.Parameter] = []

    # ---- taylor: per-structure sums of w * dL/dw, folded in as soon as a grad exists ----
    def _grad_hook(self, param: nn.Parameter, fold) -> None:
        def hook(p: torch.Tensor) -> None:
            with torch.no_grad():
                fold((p.detach() * p.grad).double())
            p.grad = None

        param.requires_grad_(True)
        self.handles.append(param.register_post_accumulate_grad_hook(hook))
        self.scored_params.append(param)

    def _add(self, kind: str, i: int, value: torch.Tensor, start: int = 0) -> None:
        store = getattr(self.signed, kind)
        if i not in store:
            raise KeyError((kind, i))
        store[i][start : start + value.shape[0]] += value.cpu()

    def add_taylor_hooks(self, need_neurons: bool, need_experts: bool, need_kv: bool) -> None:
        for b in self.blocks if (need_neurons or need_experts) else []:
            E, I2 = b.experts.gate_up_proj.shape[:2]
            I, i = I2 // 2, b.layer_idx
            self.signed.neurons[i], self.signed.experts[i] = _zeros(E, I), _zeros(E)

            def fold_gate_up(wg, i=i, I=I):
                if need_neurons:
                    self._add("neurons", i, wg[:, :I].sum(-1) + wg[:, I:].sum(-1))
                self._add("experts", i, wg.sum((1, 2)))

            def fold_down(wg, i=i):
                if need_neurons:
                    self._add("neurons", i, wg.sum(1))
                self._add("experts", i, wg.sum((1, 2)))

            self._grad_hook(b.experts.gate_up_proj, fold_gate_up)
            self._grad_hook(b.experts.down_proj, fold_down)
            if need_neurons and b.shared:
                self.signed.shared[i] = _zeros(sum(m.gate_proj.weight.shape[0] for m in b.shared))
                offset = 0
                for m in b.shared:
                    off = offset
                    self._grad_hook(m.gate_proj.weight, lambda wg, i=i, o=off: self._add("shared", i, wg.sum(1), o))
                    self._grad_hook(m.up_proj.weight, lambda wg, i=i, o=off: self._add("shared", i, wg.sum(1), o))
                    self._grad_hook(m.down_proj.weight, lambda wg, i=i, o=off: self._add("shared", i, wg.sum(0), o))
                    offset += m.gate_proj.weight.shape[0]
        if need_kv:
            for i, layer in enumerate(self.layers):
                attn = self.adapter.attention(layer)
                self.signed.kv_groups[i] = _zeros(self.kv)
                fold = lambda wg, i=i: self._add("kv_groups", i, wg.reshape(self.kv, -1).sum(1))  # noqa: E731
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):  # rows laid out group by group
                    self._grad_hook(proj.weight, fold)
                    if proj.bias is not None:
                        self._grad_hook(proj.bias, fold)
                self._grad_hook(attn.o_proj.weight, lambda wg, i=i: self._add("kv_groups", i, wg.sum(0).reshape(self.kv, -1).sum(1)))

    # ---- forward statistics: activation, frequency, reap -------------------------------
    def _acc(self, kind: str, i: int, total: torch.Tensor, count: torch.Tensor) -> None:
        store = getattr(self.act_sum, kind)
        store[i] = store.get(i, 0) + total.double().cpu()
        self.act_count[(kind, i)] = self.act_count.get((kind, i), 0) + count.double().cpu()

    def add_forward_hooks(self, neuron_activation: bool, kv_activation: bool, expert_kind: str | None) -> None:
        for b in self.blocks:
            if neuron_activation or expert_kind in ("reap", "frequency"):
                self.handles.append(
                    b.experts.register_forward_hook(self._experts_hook(b, neuron_activation, expert_kind), with_kwargs=True)
                )
            if neuron_activation and b.shared:
                offset = 0
                for m in b.shared:
                    self.handles.append(m.down_proj.register_forward_pre_hook(self._shared_hook(b.layer_idx, offset, b)))
                    offset += m.gate_proj.weight.shape[0]
        if kv_activation:
            for i, layer in enumerate(self.layers):
                o_proj = self.adapter.attention(layer).o_proj
                self.handles.append(o_proj.register_forward_pre_hook(self._o_proj_hook(i)))

    def _experts_hook(self, b: MoEBlock, neuron_activation: bool, expert_kind: str | None):
        experts = b.experts

        def hook(module, args, kwargs, output):
            hs = args[0] if args else kwargs["hidden_states"]
            top_idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            top_w = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            E, I2, _ = experts.gate_up_proj.shape
            with torch.no_grad():
                act_total, counts, reap_total = _zeros(E, I2 // 2), _zeros(E), _zeros(E)
                for e in range(E):
                    tok, pos = torch.where(top_idx == e)
                    counts[e] = tok.numel()
                    if tok.numel() == 0 or (expert_kind == "frequency" and not neuron_activation):
                        continue
                    gate, up = torch.nn.functional.linear(hs[tok], experts.gate_up_proj[e]).chunk(2, dim=-1)
                    a = experts.act_fn(gate) * up
                    act_total[e] = a.abs().sum(0).double().cpu()
                    if expert_kind == "reap":
                        out = torch.nn.functional.linear(a, experts.down_proj[e])
                        reap_total[e] = (top_w[tok, pos].float() * out.float().norm(dim=-1)).sum().double()
                if neuron_activation:
                    self._acc("neurons", b.layer_idx, act_total, counts[:, None].clamp(min=1))
                if expert_kind == "reap":
                    self._acc("experts", b.layer_idx, reap_total, counts.clamp(min=1))
                elif expert_kind == "frequency":
                    self._acc("experts", b.layer_idx, counts, torch.ones(()))

        return hook

    def _shared_hook(self, i: int, offset: int, b: MoEBlock):
        total = sum(m.gate_proj.weight.shape[0] for m in b.shared)

        def hook(module, args):
            x = args[0].detach()
            full = _zeros(total)
            full[offset : offset + x.shape[-1]] = x.abs().reshape(-1, x.shape[-1]).sum(0).double().cpu()
            self._acc("shared", i, full, torch.tensor(float(x.numel() // x.shape[-1])) / len(b.shared))

        return hook

    def _o_proj_hook(self, i: int):
        def hook(module, args):
            x = args[0].detach()
            per_group = x.abs().reshape(-1, self.kv, x.shape[-1] // self.kv).mean(-1).sum(0)
            self._acc("kv_groups", i, per_group, torch.tensor(float(x.numel() // x.shape[-1])))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _magnitude(scorer: _Scorer, out: ImportanceScores, need_kv: bool) -> None:
    with torch.no_grad():
        for b in scorer.blocks:
            gu, dn = b.experts.gate_up_proj.detach().abs(), b.experts.down_proj.detach().abs()
            I = gu.shape[1] // 2
            out.neurons[b.layer_idx] = (gu[:, :I].sum(-1) + gu[:, I:].sum(-1) + dn.sum(1)).double().cpu()
            if b.shared:
                out.shared[b.layer_idx] = torch.cat(
                    [(m.gate_proj.weight.abs().sum(1) + m.up_proj.weight.abs().sum(1) + m.down_proj.weight.abs().sum(0)) for m in b.shared]
                ).double().cpu()
        if need_kv:
            for i, layer in enumerate(scorer.layers):
                attn, kv = scorer.adapter.attention(layer), scorer.kv
                s = sum(p.abs().reshape(kv, -1).sum(1) for proj in (attn.q_proj, attn.k_proj, attn.v_proj) for p in proj.parameters())
                s = s + attn.o_proj.weight.abs().sum(0).reshape(kv, -1).sum(1)
                out.kv_groups[i] = s.double().cpu()


def calibration_loss(model: nn.Module, ids: torch.Tensor, cfg: ImportanceConfig, teacher: nn.Module | None) -> torch.Tensor:
    """The loss whose sensitivity is scored. With no teacher, the model is its own teacher."""
    logits = model(input_ids=ids).logits
    if cfg.loss == "lm":
        return losses.lm_loss(logits[:, :-1], ids[:, 1:])
    with torch.no_grad():
        t_logits = logits.detach() if teacher is None else teacher(input_ids=ids.to(teacher.device)).logits.to(logits.device)
        t_lp, t_idx = losses.teacher_topk(t_logits, k=cfg.topk, temperature=cfg.temperature)
    fn = losses.kd_topk_renorm_loss if cfg.loss == "kd_topk_renorm" else losses.kd_topk_loss
    return fn(logits, t_lp, t_idx, temperature=cfg.temperature)


def estimate_importance(
    model: nn.Module,
    blocks: torch.Tensor,
    cfg: ImportanceConfig,
    teacher: nn.Module | None = None,
    want: Wanted | None = None,
    progress: bool = True,
    absolute: bool = True,
) -> ImportanceScores:
    """Score ``model`` on calibration token blocks [N, T] (the first ``cfg.samples`` are used).

    ``want`` limits the work to the structure kinds a plan will actually cut.
    ``absolute=False`` returns taylor scores signed (sum of w * dL/dw), for checking.
    """
    adapter = get_adapter(model.config)
    want = want or Wanted()
    want.kv = want.kv and adapter.kv_refusal is None
    if cfg.loss == "kd_topk" and teacher is None and (cfg.score == "taylor" or cfg.expert_score == "taylor"):
        raise UserError(
            "importance.loss: kd_topk (residual bucket) has zero gradient when the model is its own teacher; "
            "use kd_topk_renorm or lm"
        )
    blocks = blocks[: cfg.samples]
    if blocks.shape[0] == 0:
        raise UserError("importance.samples: no calibration samples")
    scorer = _Scorer(model, adapter, cfg, want)
    taylor_neurons = want.neurons and cfg.score == "taylor"
    taylor_experts = want.experts and cfg.expert_score == "taylor"
    taylor_kv = want.kv and cfg.score == "taylor"
    needs_grad = taylor_neurons or taylor_experts or taylor_kv
    needs_forward = needs_grad or (want.neurons or want.kv) and cfg.score == "activation" or (
        want.experts and cfg.expert_score in ("frequency", "reap")
    )
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None  # a stale gradient would be folded into the scores
        if needs_grad:
            scorer.add_taylor_hooks(taylor_neurons, taylor_experts, taylor_kv)
        scorer.add_forward_hooks(
            neuron_activation=want.neurons and cfg.score == "activation",
            kv_activation=want.kv and cfg.score == "activation",
            expert_kind=cfg.expert_score if want.experts and cfg.expert_score in ("frequency", "reap") else None,
        )
        if needs_forward:
            device = next(model.parameters()).device
            batches = blocks.split(cfg.batch_size)
            with oom_hint("importance", {"batch_size": cfg.batch_size, "seq_len": blocks.shape[1]}):
                for ids in tqdm(batches, desc="importance", unit="batch", disable=not progress):
                    ids = ids.to(device)
                    if needs_grad:
                        calibration_loss(model, ids, cfg, teacher).backward()
                    else:
                        with torch.no_grad():
                            model(input_ids=ids)
    finally:
        scorer.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
            p.grad = None
        model.train(was_training)
    return _finish(scorer, cfg, want, absolute)


def _finish(scorer: _Scorer, cfg: ImportanceConfig, want: Wanted, absolute: bool = True) -> ImportanceScores:
    out = ImportanceScores(meta={"score": cfg.score, "expert_score": cfg.expert_score, "loss": cfg.loss, "samples": cfg.samples})
    kinds = [("neurons", want.neurons, cfg.score), ("shared", want.neurons, cfg.score), ("kv_groups", want.kv, cfg.score), ("experts", want.experts, cfg.expert_score)]
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.score == "magnitude":
        _magnitude(scorer, out, want.kv)
    for kind, wanted, how in kinds:
        if not wanted:
            continue
        if how == "taylor":
            setattr(out, kind, {i: t.abs() if absolute else t.clone() for i, t in getattr(scorer.signed, kind).items()})
        elif how in ("activation", "reap", "frequency"):
            setattr(out, kind, {i: t / scorer.act_count[(kind, i)] for i, t in getattr(scorer.act_sum, kind).items()})
        elif how == "random":
            setattr(out, kind, {i: torch.rand(t.shape, generator=gen, dtype=torch.float64) for i, t in _shapes(scorer, kind).items()})
    return out


def _shapes(scorer: _Scorer, kind: str) -> dict[int, torch.Tensor]:
    """Placeholder tensors of the right shape per layer, for random scores."""
    if kind == "kv_groups":
        return {i: _zeros(scorer.kv) for i in range(len(scorer.layers))}
    out = {}
    for b in scorer.blocks:
        E, I2 = b.experts.gate_up_proj.shape[:2]
        if kind == "neurons":
            out[b.layer_idx] = _zeros(E, I2 // 2)
        elif kind == "experts":
            out[b.layer_idx] = _zeros(E)
        elif kind == "shared" and b.shared:
            out[b.layer_idx] = _zeros(sum(m.gate_proj.weight.shape[0] for m in b.shared))
    return out
