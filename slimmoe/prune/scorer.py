"""Carrying out a ScoringPasses on one model: the hooks that accumulate per-structure sums
during the calibration batches, and the scores made from those sums or from the weights alone.

Taylor: gradients are requested only for the tensors being scored, and each one is folded
into its per-structure sums by a post-accumulate-grad hook that then frees it, so scoring
never holds a second full copy of the weights' gradients. Forward statistics (activation,
frequency, reap) are summed by forward hooks together with the token counts they average over.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from slimmoe.arch import MoEAdapter, MoEBlock
from slimmoe.prune.passes import KINDS, ScoringPasses


def _zeros(*shape) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.float64)


class Scorer:
    """Scores of one model's structures: the hooks and sums of the data passes, and the
    data-free magnitude and random scores. Every score is a float64 tensor on the CPU."""

    def __init__(self, model: nn.Module, adapter: MoEAdapter):
        self.adapter = adapter
        self.blocks = adapter.moe_blocks(model)
        self.layers = adapter.layers(model)
        self.kv = adapter.num_kv_heads(model.config)
        self.signed: dict[str, dict[int, torch.Tensor]] = {kind: {} for kind in KINDS}  # taylor sums, signed
        self.stat_sum: dict[str, dict[int, torch.Tensor]] = {kind: {} for kind in KINDS}  # activation / reap / frequency
        self.stat_count: dict[tuple[str, int], torch.Tensor] = {}
        self.handles: list = []

    @contextmanager
    def hooked(self, passes: ScoringPasses):
        """The hooks ``passes`` needs, installed for the duration of the block."""
        try:
            self.add_taylor_hooks(passes.taylor)
            self.add_forward_hooks(passes.activation, passes.expert_statistic)
            yield self
        finally:
            for h in self.handles:
                h.remove()
            self.handles.clear()

    # ---- taylor: per-structure sums of w * dL/dw, folded in as soon as a grad exists ----
    def _grad_hook(self, param: nn.Parameter, fold) -> None:
        def hook(p: torch.Tensor) -> None:
            with torch.no_grad():
                fold((p.detach() * p.grad).double())
            p.grad = None

        param.requires_grad_(True)
        self.handles.append(param.register_post_accumulate_grad_hook(hook))

    def _add(self, kind: str, i: int, value: torch.Tensor, start: int = 0) -> None:
        store = self.signed[kind]
        if i not in store:
            raise KeyError((kind, i))
        store[i][start : start + value.shape[0]] += value.cpu()

    def add_taylor_hooks(self, kinds: frozenset[str]) -> None:
        for b in self.blocks:
            if "neurons" in kinds or "experts" in kinds:
                self._taylor_expert_hooks(b, "neurons" in kinds, "experts" in kinds)
            if "shared" in kinds and b.shared:
                self._taylor_shared_hooks(b)
        if "kv_groups" in kinds:
            for i, layer in enumerate(self.layers):
                self._taylor_kv_hooks(i, layer)

    def _taylor_expert_hooks(self, b: MoEBlock, neurons: bool, experts: bool) -> None:
        E, I2 = b.experts.gate_up_proj.shape[:2]
        I, i = I2 // 2, b.layer_idx
        if neurons:
            self.signed["neurons"][i] = _zeros(E, I)
        if experts:
            self.signed["experts"][i] = _zeros(E)

        def fold_gate_up(wg):
            if neurons:
                self._add("neurons", i, wg[:, :I].sum(-1) + wg[:, I:].sum(-1))
            if experts:
                self._add("experts", i, wg.sum((1, 2)))

        def fold_down(wg):
            if neurons:
                self._add("neurons", i, wg.sum(1))
            if experts:
                self._add("experts", i, wg.sum((1, 2)))

        self._grad_hook(b.experts.gate_up_proj, fold_gate_up)
        self._grad_hook(b.experts.down_proj, fold_down)

    def _taylor_shared_hooks(self, b: MoEBlock) -> None:
        i = b.layer_idx
        self.signed["shared"][i] = _zeros(sum(m.gate_proj.weight.shape[0] for m in b.shared))
        offset = 0
        for m in b.shared:  # the shared experts' neurons, concatenated
            self._grad_hook(m.gate_proj.weight, lambda wg, o=offset: self._add("shared", i, wg.sum(1), o))
            self._grad_hook(m.up_proj.weight, lambda wg, o=offset: self._add("shared", i, wg.sum(1), o))
            self._grad_hook(m.down_proj.weight, lambda wg, o=offset: self._add("shared", i, wg.sum(0), o))
            offset += m.gate_proj.weight.shape[0]

    def _taylor_kv_hooks(self, i: int, layer: nn.Module) -> None:
        attn = self.adapter.attention(layer)
        self.signed["kv_groups"][i] = _zeros(self.kv)

        def fold(wg):
            self._add("kv_groups", i, wg.reshape(self.kv, -1).sum(1))

        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):  # rows laid out group by group
            self._grad_hook(proj.weight, fold)
            if proj.bias is not None:
                self._grad_hook(proj.bias, fold)
        self._grad_hook(attn.o_proj.weight, lambda wg: self._add("kv_groups", i, wg.sum(0).reshape(self.kv, -1).sum(1)))

    # ---- forward statistics: activation, frequency, reap -------------------------------
    def _acc(self, kind: str, i: int, total: torch.Tensor, count: torch.Tensor) -> None:
        store = self.stat_sum[kind]
        store[i] = store.get(i, 0) + total.double().cpu()
        self.stat_count[(kind, i)] = self.stat_count.get((kind, i), 0) + count.double().cpu()

    def add_forward_hooks(self, activation: frozenset[str], expert_statistic: str | None) -> None:
        neuron_activation = "neurons" in activation
        for b in self.blocks:
            if neuron_activation or expert_statistic:
                hook = self._experts_hook(b, neuron_activation, expert_statistic)
                self.handles.append(b.experts.register_forward_hook(hook, with_kwargs=True))
            if "shared" in activation and b.shared:
                offset = 0
                for m in b.shared:
                    self.handles.append(m.down_proj.register_forward_pre_hook(self._shared_hook(b.layer_idx, offset, b)))
                    offset += m.gate_proj.weight.shape[0]
        if "kv_groups" in activation:
            for i, layer in enumerate(self.layers):
                o_proj = self.adapter.attention(layer).o_proj
                self.handles.append(o_proj.register_forward_pre_hook(self._o_proj_hook(i)))

    def _experts_hook(self, b: MoEBlock, neuron_activation: bool, expert_statistic: str | None):
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
                    if tok.numel() == 0 or (expert_statistic == "frequency" and not neuron_activation):
                        continue
                    gate, up = torch.nn.functional.linear(hs[tok], experts.gate_up_proj[e]).chunk(2, dim=-1)
                    a = experts.act_fn(gate) * up
                    act_total[e] = a.abs().sum(0).double().cpu()
                    if expert_statistic == "reap":
                        out = torch.nn.functional.linear(a, experts.down_proj[e])
                        reap_total[e] = (top_w[tok, pos].float() * out.float().norm(dim=-1)).sum().double()
                if neuron_activation:
                    self._acc("neurons", b.layer_idx, act_total, counts[:, None].clamp(min=1))
                if expert_statistic == "reap":
                    self._acc("experts", b.layer_idx, reap_total, counts.clamp(min=1))
                elif expert_statistic == "frequency":
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

    # ---- scores, once the data passes are over --------------------------------------------
    def taylor_scores(self, kind: str, absolute: bool = True) -> dict[int, torch.Tensor]:
        return {i: t.abs() if absolute else t.clone() for i, t in self.signed[kind].items()}

    def mean_statistics(self, kind: str) -> dict[int, torch.Tensor]:
        return {i: t / self.stat_count[(kind, i)] for i, t in self.stat_sum[kind].items()}

    def magnitude_scores(self, kinds: frozenset[str]) -> dict[str, dict[int, torch.Tensor]]:
        """L1 norm of each structure's weights, for ``kinds`` (no data needed)."""
        out: dict[str, dict[int, torch.Tensor]] = {kind: {} for kind in kinds}
        with torch.no_grad():
            for b in self.blocks:
                gu, dn = b.experts.gate_up_proj.detach().abs(), b.experts.down_proj.detach().abs()
                I = gu.shape[1] // 2
                if "neurons" in kinds:
                    out["neurons"][b.layer_idx] = (gu[:, :I].sum(-1) + gu[:, I:].sum(-1) + dn.sum(1)).double().cpu()
                if "shared" in kinds and b.shared:
                    out["shared"][b.layer_idx] = torch.cat(
                        [(m.gate_proj.weight.abs().sum(1) + m.up_proj.weight.abs().sum(1) + m.down_proj.weight.abs().sum(0)) for m in b.shared]
                    ).double().cpu()
            if "kv_groups" in kinds:
                for i, layer in enumerate(self.layers):
                    attn, kv = self.adapter.attention(layer), self.kv
                    s = sum(p.abs().reshape(kv, -1).sum(1) for proj in (attn.q_proj, attn.k_proj, attn.v_proj) for p in proj.parameters())
                    s = s + attn.o_proj.weight.abs().sum(0).reshape(kv, -1).sum(1)
                    out["kv_groups"][i] = s.double().cpu()
        return out

    def random_scores(self, kind: str, generator: torch.Generator) -> dict[int, torch.Tensor]:
        return {i: torch.rand(shape, generator=generator, dtype=torch.float64) for i, shape in self._shapes(kind).items()}

    def _shapes(self, kind: str) -> dict[int, tuple[int, ...]]:
        """The shape of ``kind``'s scores in every layer that has such structures."""
        if kind == "kv_groups":
            return {i: (self.kv,) for i in range(len(self.layers))}
        out = {}
        for b in self.blocks:
            E, I2 = b.experts.gate_up_proj.shape[:2]
            if kind == "neurons":
                out[b.layer_idx] = (E, I2 // 2)
            elif kind == "experts":
                out[b.layer_idx] = (E,)
            elif kind == "shared" and b.shared:
                out[b.layer_idx] = (sum(m.gate_proj.weight.shape[0] for m in b.shared),)
        return out
