"""The student in training and its state: sharded state dicts for checkpoints (DCP), full
state dicts gathered on rank 0 (best state, final model), and the final Hugging Face
checkpoint in the dtype it is saved in.

State dicts go through ``torch.distributed.checkpoint.state_dict`` (``get_state_dict`` /
``set_state_dict``), which handle a plain module, DDP and FSDP2 alike and key the optimizer
state by parameter name, so a checkpoint written under one sharding or world size loads
under another (torchtitan/components/checkpoint.py does the same).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from slimmoe.distill.runtime import Runtime
from slimmoe.io.atomic import save_pretrained_atomic

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def init_adamw_state(opt: torch.optim.Optimizer) -> None:
    """Give every parameter the state AdamW creates on its first step (step 0, zero moments).

    ``get_state_dict`` would otherwise initialise an empty optimizer by running a step with
    zero gradients, which leaves ``step`` at 1 and changes the bias correction of the next
    real step. Mirrors ``Adam._init_group`` (torch/optim/adam.py; not fused, not capturable).
    """
    from torch.optim.optimizer import _get_scalar_dtype

    for group in opt.param_groups:
        for p in group["params"]:
            if not opt.state.get(p):
                opt.state[p] = {"step": torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu"),
                                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass
class Student:
    """``model`` as the runtime trains it (plain, DDP-wrapped, or FSDP-sharded) and
    ``unwrapped``, the PreTrainedModel. Methods marked collective must run on every rank."""

    model: torch.nn.Module
    unwrapped: Any
    rt: Runtime

    @property
    def sharded(self) -> bool:
        return self.rt.sharding == "fsdp"

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The full model state dict on rank 0, on the CPU under FSDP; None elsewhere. Collective."""
        if self.sharded:  # gathered layer by layer onto rank 0's CPU
            sd = get_model_state_dict(self.model, options=_FULL)
            return sd if self.rt.is_main else None
        return self.unwrapped.state_dict() if self.rt.is_main else None

    def load_full(self, sd: dict[str, torch.Tensor] | None) -> None:
        """Load a full model state dict. Under FSDP only rank 0's ``sd`` is read (broadcast and
        sharded); otherwise every rank loads its own. Collective."""
        if self.sharded:
            opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_model_state_dict(self.model, sd if self.rt.is_main else {}, options=opts)
        else:
            self.unwrapped.load_state_dict(sd)

    def train_state(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """``{"model", "optimizer"}`` state dicts for DCP: this rank's shards (DTensors) under
        FSDP, the tensors themselves otherwise; the optimizer keyed by parameter name."""
        init_adamw_state(opt)
        model_sd, optim_sd = get_state_dict(self.model, opt)
        return {"model": model_sd, "optimizer": optim_sd}

    def load_train_state(self, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        set_state_dict(self.model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def save_dtype(name: str, teacher_dtype: torch.dtype | None, student_dtype: torch.dtype) -> torch.dtype:
    """``save_dtype`` resolved: ``auto`` is the teacher's dtype, the student's without a teacher."""
    if name != "auto":
        return DTYPES[name]
    return teacher_dtype or student_dtype


def config_dtype(config, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a transformers config says its weights are stored in."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else default


def save_final(model, sd: dict[str, torch.Tensor], out: Path, dtype: torch.dtype, max_shard_size: str) -> None:
    """Write ``sd`` (a full state dict) as a stock Hugging Face checkpoint in ``dtype``.

    The weights go through a parameter-less skeleton of the model's class built in ``dtype``
    on the meta device, so ``config.json`` names the dtype of the files whatever the trained
    model was (fp32, or FSDP-sharded)."""
    from transformers import AutoModelForCausalLM

    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=dtype)
    skeleton.generation_config = copy.deepcopy(model.generation_config)
    save_pretrained_atomic(skeleton, out, cast, max_shard_size=max_shard_size)
