"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over the decoder layers of a causal LM.

Each decoder layer is one FSDP unit, then the root (embeddings, final norm, head): the
layer's parameters are gathered just for its own forward and backward. Parameters shard on
dim 0, so fused expert tensors ``[E, 2I, H]`` are split by expert. See torchtitan's
``apply_fsdp`` for the same pattern.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from slimmoe.parallel.topology import Topology


def device_mesh(topo: Topology) -> DeviceMesh:
    """A one-dimensional mesh over every process (data parallel, fully sharded)."""
    return init_device_mesh(topo.device.type, (topo.world,))


def mixed_precision(device: torch.device, enabled: bool = True) -> MixedPrecisionPolicy | None:
    """bf16 compute with fp32 gradient reduction (and fp32 parameters and optimizer state)
    on a GPU that supports bf16; None (full precision) elsewhere."""
    if not enabled or device.type != "cuda" or not torch.cuda.is_bf16_supported():
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_decoder_layers(model: torch.nn.Module, mesh: DeviceMesh, *, mp_policy: MixedPrecisionPolicy | None = None,
                         reshard_after_forward: bool = True) -> torch.nn.Module:
    """``fully_shard`` every decoder layer, then the whole model, in place; returns ``model``.

    ``reshard_after_forward=True`` frees a layer's gathered parameters after its forward (a
    training student re-gathers them in backward; a frozen teacher never needs them again).
    """
    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for layer in model.get_decoder().layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model
