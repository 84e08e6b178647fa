"""Several processes: who this process is (topology), the process group, FSDP2 sharding of
decoder layers, and starting the processes (torchrun). Plain torch.distributed; nothing
here knows about distillation or scoring."""

from slimmoe.parallel.fsdp import device_mesh, shard_decoder_layers
from slimmoe.parallel.launch import LAUNCHED_ENV, launch, launched, torchrun_command
from slimmoe.parallel.topology import Topology, all_reduce_sum, barrier, init_process_group, topology

__all__ = ["LAUNCHED_ENV", "Topology", "all_reduce_sum", "barrier", "device_mesh", "init_process_group", "launch",
           "launched", "shard_decoder_layers", "topology", "torchrun_command"]
