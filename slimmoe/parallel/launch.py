"""Starting N processes with torchrun (``python -m torch.distributed.run``) and waiting for them.

The CLI (``slimmoe distill|prune ... --nproc-per-node N``) and the pipeline's tasks (a
config's ``launch:`` section) run a module under torchrun this way. The children know they
were launched (:data:`LAUNCHED_ENV`), so they do the work instead of launching again, and
a child that fails on bad input prints ``error: [rank R] ...``.

torchrun runs with ``--tee 3``, so every line a worker prints comes prefixed with its
local rank (``[default1]:...``). The launcher passes on the lines of local rank 0 (the one
that reports progress) without the prefix, turns the first ``error:`` line of any rank
into the one error line of the whole command, and keeps everything else (other ranks,
torchrun's own failure report) for the message of a failure that is not bad input.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Sequence

from slimmoe.config import LaunchConfig
from slimmoe.errors import UserError

LAUNCHED_ENV = "SLIMMOE_LAUNCHED"
_WORKER = re.compile(r"^\[[A-Za-z_]*(\d+)\]:(.*)$")  # "[default1]:text" (torchrun --tee)
_ERROR = re.compile(r"^error: (?:\[rank (\d+)\] )?(.*)$")


def launched() -> bool:
    """True inside a process this module started (it must not launch again)."""
    return os.environ.get(LAUNCHED_ENV) == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(cfg: LaunchConfig, module: str, args: Sequence[str]) -> list[str]:
    """The torchrun command line that runs ``python -m module *args`` in every process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.nproc_per_node}",
           f"--nnodes={cfg.nnodes}", "--tee=3"]
    if cfg.rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}", f"--rdzv-id={cfg.rdzv_id}"]
    else:
        port = cfg.master_port or (free_port() if cfg.nnodes == 1 else 29500)
        cmd += [f"--node-rank={cfg.node_rank}", f"--master-addr={cfg.master_addr}", f"--master-port={port}"]
    return [*cmd, "-m", module, *map(str, args)]


def launch(cfg: LaunchConfig, module: str, args: Sequence[str], *, cwd: str | Path | None = None,
           env: dict[str, str] | None = None, echo=sys.stderr) -> None:
    """Run ``module`` in ``cfg.world_size`` processes and wait for all of them.

    Their output is passed to ``echo`` as it comes. A process that failed on bad input
    (``error: ...``) ends the launch with that line as a :class:`UserError` (exit 2 at the
    CLI); any other failure is a RuntimeError holding the last lines of output.
    """
    full_env = {**os.environ, **(env or {}), LAUNCHED_ENV: "1", "PYTHONUNBUFFERED": "1"}
    full_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc_per_node)))
    proc = subprocess.Popen(torchrun_command(cfg, module, args), cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    errors: list[tuple[str | None, str]] = []
    tail: list[str] = []
    reader = threading.Thread(target=_relay, args=(proc, echo, errors, tail), daemon=True)
    reader.start()
    try:
        rc = proc.wait()
    except BaseException:
        proc.kill()  # torchrun takes its workers down with it
        proc.wait()
        raise
    reader.join()
    if rc == 0:
        return
    if errors:
        rank, message = errors[0]
        raise UserError(message + (f" (rank {rank})" if rank is not None else ""))
    raise RuntimeError(f"torchrun exited with {rc}; last output:\n" + "".join(tail[-40:]))


def _relay(proc: subprocess.Popen, echo, errors: list, tail: list) -> None:
    for line in proc.stdout:
        worker = _WORKER.match(line.rstrip("\n"))
        text = worker.group(2) if worker else line.rstrip("\n")
        m = _ERROR.match(text) if worker else None
        if m:
            errors.append((m.group(1) or worker.group(1), m.group(2)))
            continue
        tail.append(line)
        del tail[:-200]
        if worker and worker.group(1) == "0":
            echo.write(text + "\n")
            echo.flush()
