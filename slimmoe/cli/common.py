"""What every command shares: the exit code of bad input, the safety flags, the process
flags (``--nproc-per-node`` ...), and the one place that turns a ``UserError`` (or a
config's ValidationError) into ``error: ...``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from pydantic import ValidationError

from slimmoe.cli.flags import ModelFlags
from slimmoe.config import LaunchConfig, format_validation_error
from slimmoe.errors import UserError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def add_safety_flags(p: argparse.ArgumentParser) -> None:
    """Opt-ins of slimmoe.io.loading's safe defaults (safetensors only, no checkpoint code)."""
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickle weights (pytorch_model.bin); they can run code when loaded")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with a checkpoint (only for sources you trust)")


LAUNCH_FLAGS = ModelFlags(LaunchConfig, errors="flag", metavars={"master_addr": "HOST", "rdzv_endpoint": "HOST:PORT"})


def add_launch_flags(p: argparse.ArgumentParser) -> None:
    """``--nproc-per-node N [--nnodes M --node-rank R --master-addr A --master-port P]``."""
    LAUNCH_FLAGS.add_to(p, "processes (torchrun)")


def run_launched(args: argparse.Namespace) -> bool:
    """Start this very command in the processes the launch flags ask for and wait for them;
    False (nothing done) when one process is asked for, or inside a launched process."""
    cfg = LAUNCH_FLAGS.build(args)
    from slimmoe.parallel.launch import launch, launched

    if not cfg.is_multiprocess() or launched():
        return False
    launch(cfg, "slimmoe.cli", args.argv)
    return True


def _error_line(message: str) -> str:
    """``error: ...``, naming the rank inside a launched process group (the launcher reports
    the first such line as the error of the whole command)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if os.environ.get("SLIMMOE_LAUNCHED") == "1" and world > 1:
        return f"error: [rank {os.environ.get('RANK', '?')}] {message}"
    return f"error: {message}"


def run_guarded(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command under the loading policy its safety flags ask for; bad input is one
    ``error:`` line on stderr and exit code 2, never a traceback."""
    from slimmoe.io.loading import loading_policy

    try:
        with loading_policy(getattr(args, "trust_remote_code", False), getattr(args, "allow_pickle", False)):
            return int(func(args) or 0)
    except UserError as e:
        print(_error_line(str(e)), file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as e:
        print(_error_line(format_validation_error(e)), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
