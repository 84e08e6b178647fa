"""How the processes of a distillation run share the student: ``sharding: fsdp | ddp | none``.

A :class:`Runtime` is everything the loop asks of the parallel engine: the device, the
rank, collectives, gradient synchronisation across micro-batches, backward, clipping and
autocast. Two engines implement it:

- :class:`AccelerateRuntime` (``none``: one process; ``ddp``: a replica per process) is the
  accelerate ``Accelerator`` the loop has always used, called exactly as before, so those
  runs stay bit-identical to earlier versions.
- :class:`FSDPRuntime` (``fsdp``) is FSDP2 (``torch.distributed.fsdp.fully_shard``) called
  directly: every decoder layer is one unit, then the root (``slimmoe.parallel``); the
  optimizer is built after sharding; mixed precision is a ``MixedPrecisionPolicy``.
  Pattern of torchtitan's ``apply_fsdp`` / ``Trainer.train_step``
  (torchtitan/models/llama3/infra/parallelize.py, torchtitan/train.py).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist

from slimmoe.config import DistillConfig
from slimmoe.errors import UserError
from slimmoe.parallel import all_reduce_sum, device_mesh, init_process_group, shard_decoder_layers, topology
from slimmoe.parallel.fsdp import mixed_precision


def choose_sharding(cfg: DistillConfig, world: int) -> str:
    """``cfg.sharding``, resolved: one process is always ``none`` (there is nothing to share);
    unset means ``fsdp`` with more than one process."""
    if world <= 1:
        return "none"
    if cfg.sharding == "none":
        raise UserError(f"sharding: 'none' runs in one process, this run has {world} (use fsdp or ddp)")
    return cfg.sharding or "fsdp"


def make_runtime(cfg: DistillConfig) -> Runtime:
    sharding = choose_sharding(cfg, topology().world)
    if sharding == "fsdp":
        if cfg.teacher_device_map:
            raise UserError("teacher_device_map: not with sharding fsdp (the teacher is sharded over the processes)")
        return FSDPRuntime(cfg)
    return AccelerateRuntime(cfg, sharding)


class Runtime:
    """The parallel engine as the loop sees it. Collective methods must be called by every rank."""

    sharding: str
    device: torch.device
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """The student, sharded before its optimizer is built (FSDP); unchanged otherwise."""
        return model

    def shard_teacher(self, model: torch.nn.Module) -> torch.nn.Module:
        """The frozen teacher placed for forward-only use (sharded under FSDP)."""
        return model.to(self.device)

    def prepare(self, model: torch.nn.Module, opt: torch.optim.Optimizer):
        """(model, optimizer) as the loop trains them."""
        return model, opt

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (collective)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (collective)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on every rank (collective)."""
        if self.world == 1:
            return bool(flag)
        return int(all_reduce_sum(torch.tensor([int(bool(flag))])).item()) == self.world


class AccelerateRuntime(Runtime):
    """``none`` and ``ddp``: accelerate's Accelerator (DDP with more than one process)."""

    def __init__(self, cfg: DistillConfig, sharding: str):
        from accelerate import Accelerator

        cuda = torch.cuda.is_available()
        mp = cfg.mixed_precision
        if mp == "auto":
            mp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
        self.acc = acc = Accelerator(cpu=not cuda, mixed_precision=mp)
        self.sharding, self.device, self.rank, self.world = sharding, acc.device, acc.process_index, acc.num_processes

    def prepare(self, model, opt):
        return self.acc.prepare(model, opt)

    def unwrap(self, model):
        return self.acc.unwrap_model(model)

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def autocast(self):
        return self.acc.autocast()

    def sync_gradients(self, model, sync: bool):
        """Context of one micro-batch's backward: DDP all-reduces only on the last (``sync``)."""
        return contextlib.nullcontext() if sync else self.acc.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        return self.acc.clip_grad_norm_(model.parameters(), max_norm)

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """``t`` summed (``op="sum"``) or averaged (``"mean"``) over the processes."""
        return self.acc.reduce(t, reduction=op) if self.world > 1 else t


class FSDPRuntime(Runtime):
    """``fsdp``: FSDP2 on a one-dimensional mesh over every process (gloo on CPU, nccl on GPU)."""

    sharding = "fsdp"

    def __init__(self, cfg: DistillConfig):
        topo = init_process_group()
        self.device, self.rank, self.world = topo.device, topo.rank, topo.world
        self.mesh = device_mesh(topo)
        if cfg.mixed_precision == "fp16":
            raise UserError("mixed_precision: fp16 is not supported with sharding fsdp (use bf16 or no)")
        # bf16 parameters for compute, fp32 gradient reduction; the sharded fp32 parameters and
        # the optimizer state stay fp32 (torch.distributed.fsdp.MixedPrecisionPolicy)
        self.mp = None if cfg.mixed_precision == "no" else mixed_precision(self.device)
        if cfg.mixed_precision == "bf16" and self.mp is None:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            self.mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    def shard(self, model):
        return shard_decoder_layers(model, self.mesh, mp_policy=self.mp)

    def shard_teacher(self, model):
        """Forward only: layers are gathered for their forward and freed right after."""
        return shard_decoder_layers(model, self.mesh, reshard_after_forward=True)

    def unwrap(self, model):
        return model

    def barrier(self) -> None:
        dist.barrier()

    def autocast(self):
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts

    def sync_gradients(self, model, sync: bool):
        """Gradients of non-last micro-batches accumulate unsharded; the last reduce-scatters
        (``FSDPModule.set_requires_gradient_sync``). FSDP2 averages over the processes, as DDP
        does, so ``loss / accum`` gives the same global mean as one process."""
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor over the shards

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        out = all_reduce_sum(t.clone())
        return out / self.world if op == "mean" else out
