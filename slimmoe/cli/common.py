"""What every command shares: the exit code of bad input, the safety flags, and the one
place that turns a ``UserError`` (or a config's ValidationError) into ``error: ...``."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from pydantic import ValidationError

from slimmoe.config import format_validation_error
from slimmoe.errors import UserError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def add_safety_flags(p: argparse.ArgumentParser) -> None:
    """Opt-ins of slimmoe.io.loading's safe defaults (safetensors only, no checkpoint code)."""
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickle weights (pytorch_model.bin); they can run code when loaded")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with a checkpoint (only for sources you trust)")


def run_guarded(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command under the loading policy its safety flags ask for; bad input is one
    ``error:`` line on stderr and exit code 2, never a traceback."""
    from slimmoe.io.loading import loading_policy

    try:
        with loading_policy(getattr(args, "trust_remote_code", False), getattr(args, "allow_pickle", False)):
            return int(func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as e:
        print(f"error: {format_validation_error(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
