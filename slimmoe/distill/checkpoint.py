"""Training checkpoints for exact resume of distillation.

A checkpoint is a folder ``step-00000012`` holding ``model.pt``, ``optimizer.pt``,
``scheduler.pt``, ``rng.pt`` and, written last, ``state.json`` with the training
position and a manifest (size + sha256) of the other files. It is written under a
temporary name and renamed into place, so a folder with the final name is complete
unless the disk itself lies; the manifest catches that case too. Loading walks from the
newest folder to the oldest and skips (with a warning) any that fails to verify or load.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimmoe.faults import crash_point
from slimmoe.io.atomic import atomic_write_text, fsync_dir

STATE_FILE = "state.json"
_PAYLOAD_FILES = ("model", "optimizer", "scheduler", "rng")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (python, numpy, torch CPU and CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(root: Path) -> list[Path]:
    """Completed-looking checkpoint folders, oldest first (temporary folders excluded)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def save_checkpoint(root: Path, step: int, payload: dict[str, Any], state: dict[str, Any], keep: int) -> Path:
    """Write ``payload`` (model/optimizer/scheduler/rng objects) and ``state`` atomically.

    Keeps the newest ``keep`` checkpoints. Call from one process only.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    manifest = {}
    for name in _PAYLOAD_FILES:
        path = tmp / f"{name}.pt"
        with open(path, "wb") as f:
            torch.save(payload[name], f)
            f.flush()
            os.fsync(f.fileno())
        manifest[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        crash_point("checkpoint:write")  # tests: die with the checkpoint half written
    doc = dict(state, step=step, manifest=manifest)
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # a stale folder of the same step from an earlier attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _load_one(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    state = json.loads((path / STATE_FILE).read_text())
    for fname, meta in state["manifest"].items():
        f = path / fname
        if f.stat().st_size != meta["size"] or _sha256(f) != meta["sha256"]:
            raise ValueError(f"{f}: size or checksum does not match the manifest")
    payload = {name: torch.load(path / f"{name}.pt", map_location="cpu", weights_only=False) for name in _PAYLOAD_FILES}
    return state, payload


def load_latest_checkpoint(root: Path) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """(folder, state, payload) of the newest checkpoint that verifies, or None.

    Broken checkpoints are skipped with a ``UserWarning`` naming them.
    """
    for path in reversed(checkpoint_dirs(Path(root))):
        try:
            state, payload = _load_one(path)
        except Exception as e:  # noqa: BLE001 - any failure means "not usable"
            warnings.warn(f"skipping unreadable checkpoint {path}: {type(e).__name__}: {e}", stacklevel=2)
            continue
        return path, state, payload
    return None


def full_model_state(fsdp: bool, acc, model, unwrapped) -> dict | None:
    """The full student state dict on rank 0 (a collective call under FSDP; None elsewhere)."""
    if fsdp:
        return acc.get_state_dict(model)
    return unwrapped.state_dict() if acc.is_main_process else None


def full_train_state(fsdp: bool, acc, model, unwrapped, opt):
    if fsdp:  # untested here (needs GPUs): full, CPU-offloaded states via DCP helpers
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, opt.optimizer, options=opts)
    if not acc.is_main_process:
        return None, None
    return unwrapped.state_dict(), opt.state_dict()


def load_train_state(fsdp: bool, model, unwrapped, opt, payload: dict) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        opts = StateDictOptions(full_state_dict=True)
        optimizers = [] if opt is None else [opt.optimizer]
        set_state_dict(model, optimizers, model_state_dict=payload["model"],
                       optim_state_dict=payload.get("optimizer", {}) if opt is not None else {}, options=opts)
        return
    unwrapped.load_state_dict(payload["model"])
    if opt is not None:
        opt.load_state_dict(payload["optimizer"])


def all_finite(obj: Any) -> bool:
    """No NaN/inf in any floating tensor of a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


def _record_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # blank, or torn by a kill mid-write
        return None


def truncate_jsonl(path: Path, keep_upto: int) -> None:
    """Drop per-step records past the resume point (written before a crash) and torn lines."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines if _record_step(ln) is not None and _record_step(ln) <= keep_upto]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))
