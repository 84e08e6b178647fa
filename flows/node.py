"""One node's share of a pipeline step launched across several nodes.

With ``launch: {nnodes: M, ...}`` the compress flow's importance and distill tasks run on
node 0: each writes the step's spec to the output folder (a filesystem every node shares),
starts this flow once per other node through the ``node/default`` deployment, on the work
queue ``node-<r>`` that a worker on node r serves, and then starts node 0's own processes.
Each node's torchrun joins the same rendezvous; rank 0 writes the result, which node 0's
task reads. docs/deployments.md, "Several nodes", has the commands.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from slimmoe.config import LaunchConfig
from slimmoe.io.loading import loading_policy
from slimmoe.pipeline.steps.launched import run_spec


@flow(name="node", log_prints=True)
def node(spec: str, result: str, launch: LaunchConfig, trust_remote_code: bool = False,
         allow_pickle: bool = False) -> None:
    """Start this node's processes (``launch.node_rank``) of the step in ``spec`` and wait."""
    with loading_policy(trust_remote_code, allow_pickle):
        run_spec(launch, Path(spec), Path(result), read_result=False)
