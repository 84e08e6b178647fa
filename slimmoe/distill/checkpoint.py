"""Training checkpoints for exact resume of distillation.

A checkpoint is a folder ``step-00000012`` holding ``model.pt``, ``optimizer.pt``,
``scheduler.pt``, ``rng.pt`` and, written last, ``state.json`` with the training
position and a manifest (size + sha256) of the other files. It is written under a
temporary name and renamed into place, so a folder with the final name is complete
unless the disk itself lies; the manifest catches that case too. Loading walks from the
newest folder to the oldest and skips (with a warning) any that fails to verify or load.

``Checkpointer`` is the loop's side of it (when to save, refusing non-finite state,
resume); ``Student`` gathers and loads the full state dicts it saves.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimmoe.config import DistillConfig
from slimmoe.distill.messages import nonfinite_error, warn_caller
from slimmoe.distill.state import LoopState
from slimmoe.faults import crash_point
from slimmoe.io.atomic import atomic_write_text, fsync_dir
from slimmoe.resources import check_disk, tensor_bytes

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


@dataclass
class Student:
    """The student in training: ``model`` as accelerate prepared it (DDP/FSDP wrapper) and
    ``unwrapped``, the PreTrainedModel inside. Under FSDP gathering or loading full state
    dicts is collective: every rank calls."""

    model: torch.nn.Module
    unwrapped: Any
    acc: Any
    fsdp: bool

    def full_state(self) -> dict | None:
        """The full student state dict on rank 0 (None elsewhere)."""
        if self.fsdp:
            return self.acc.get_state_dict(self.model)
        return self.unwrapped.state_dict() if self.acc.is_main_process else None

    def full_train_state(self, opt) -> tuple[dict | None, dict | None]:
        """Full model and optimizer state dicts on rank 0 (None elsewhere)."""
        if self.fsdp:  # untested here (needs GPUs): full, CPU-offloaded states via DCP helpers
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_state_dict(self.model, opt.optimizer, options=opts)
        if not self.acc.is_main_process:
            return None, None
        return self.unwrapped.state_dict(), opt.state_dict()

    def load(self, payload: dict, opt=None) -> None:
        """Load ``payload["model"]`` (and ``payload["optimizer"]`` into ``opt`` when given)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            opts = StateDictOptions(full_state_dict=True)
            optimizers = [] if opt is None else [opt.optimizer]
            set_state_dict(self.model, optimizers, model_state_dict=payload["model"],
                           optim_state_dict=payload.get("optimizer", {}) if opt is not None else {}, options=opts)
            return
        self.unwrapped.load_state_dict(payload["model"])
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


class Checkpointer:
    """The checkpoints of one run: when to save (every ``checkpoint_every`` steps, not at the
    end, where the final model is written instead), never saving non-finite state, and
    resuming from the newest good checkpoint into model, optimizer, scheduler, RNG and loop state."""

    def __init__(self, root: Path, cfg: DistillConfig, student: Student, opt, sched, state: LoopState,
                 total_steps: int):
        self.root, self.cfg, self.student, self.opt, self.sched = Path(root), cfg, student, opt, sched
        self.state, self.total_steps = state, total_steps
        self.last: Path | None = None  # the newest checkpoint written or resumed from

    def resume(self) -> int | None:
        """Load the newest checkpoint that verifies; its step, or None when there is none."""
        found = load_latest_checkpoint(self.root)
        if found is None:
            return None
        path, saved, payload = found
        self.last = path
        self.student.load(payload, self.opt)
        self.sched.load_state_dict(payload["scheduler"])
        restore_rng_state(payload["rng"])
        self.state.load_state_dict(saved)
        now = self.cfg.model_dump(mode="json")
        changed = sorted(k for k, v in saved.get("config", {}).items() if k != "progress" and now.get(k) != v)
        if changed:
            warn_caller(f"resuming {path} with settings changed since it was written: {', '.join(changed)}")
        if self.student.acc.is_main_process:
            print(f"slimmoe distill: resuming from checkpoint {path} (step {saved['step']}/{self.total_steps})",
                  file=sys.stderr, flush=True)
        return saved["step"]

    def should_save(self, step: int) -> bool:
        every = self.cfg.checkpoint_every
        return bool(every) and step % every == 0 and step < self.total_steps

    def save(self, step: int) -> None:
        """Checkpoint ``step``: gathered on all ranks, written by rank 0, then a barrier."""
        acc = self.student.acc
        model_sd, opt_sd = self.student.full_train_state(self.opt)
        finite = all_finite(self.student.unwrapped.state_dict() if model_sd is None else model_sd) and all_finite(
            self.opt.state_dict() if opt_sd is None else opt_sd)
        if not finite:  # every rank decides alike (DDP replicas hold the same state)
            raise nonfinite_error("parameters or optimizer state hold NaN/inf (checkpoint not written)",
                                  step, self.last, self.cfg, self.state.nonfinite_skips)
        if acc.is_main_process:
            payload = {"model": model_sd, "optimizer": opt_sd, "scheduler": self.sched.state_dict(),
                       "rng": capture_rng_state()}
            check_disk(self.root, tensor_bytes(payload))
            loop_state = dict(self.state.state_dict(), config=self.cfg.model_dump(mode="json"))
            self.last = save_checkpoint(self.root, step, payload, loop_state, self.cfg.keep_checkpoints)
        acc.wait_for_everyone()
