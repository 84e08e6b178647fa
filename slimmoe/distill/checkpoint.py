"""Training checkpoints for exact resume of distillation.

A checkpoint is a folder ``step-00000012``. Written under a temporary name
(``.tmp-step-00000012-<pid of rank 0>``) and renamed into place by rank 0 once every rank
has written its part, so a folder with the final name is complete unless the disk itself
lies; ``state.json``, written last, holds the training position and a manifest (size +
sha256) of every other file, which catches that case too. Loading walks from the newest
folder to the oldest and skips (with a warning) any that fails to verify or load.

What a distillation run puts in it (:class:`Checkpointer`), under every sharding::

    dcp/                 model and optimizer state, torch.distributed.checkpoint (DCP):
                         .metadata and one __<rank>_0.distcp per rank that holds shards
    scheduler.pt         the learning-rate schedule (rank 0)
    rng-<rank>.pt        every RNG of that rank (python, numpy, torch CPU, CUDA)
    state.json           step, loop bookkeeping, config, world size, sharding, manifest

DCP reshards on load, so a checkpoint written by N processes resumes in M (then not
bit-identical, float sums regroup). :func:`save_checkpoint` / :func:`load_latest_checkpoint`
are the same folder protocol for a single writer with torch.save payloads.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from slimmoe.config import DistillConfig
from slimmoe.distill.messages import nonfinite_error, warn_caller
from slimmoe.distill.state import LoopState
from slimmoe.distill.student import Student, local
from slimmoe.faults import crash_point
from slimmoe.io.atomic import atomic_write_text, fsync_dir
from slimmoe.resources import ResourceError, check_disk, tensor_bytes

STATE_FILE = "state.json"
DCP_DIR = "dcp"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entry(folder: Path, rel: str) -> dict[str, dict]:
    path = folder / rel
    return {rel: {"size": path.stat().st_size, "sha256": _sha256(path)}}


@contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """Silence DCP's warning that it runs without a process group (one process, on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        yield


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


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def new_tmp(root: Path, step: int, pid: int | None = None) -> Path:
    """An empty temporary folder for the checkpoint of ``step`` (named after the writer's pid)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step:08d}-{pid or os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish(root: Path, tmp: Path, step: int, state: dict[str, Any], manifest: dict, keep: int) -> Path:
    """Write ``state.json`` (the manifest inside) last, rename ``tmp`` into place, keep the
    newest ``keep`` checkpoints and drop temporaries of killed writers. One process."""
    doc = dict(state, step=step, manifest=manifest)
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    final = root / f"step-{step:08d}"
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


def save_checkpoint(root: Path, step: int, payload: dict[str, Any], state: dict[str, Any], keep: int) -> Path:
    """Write ``payload`` (name -> object, one ``<name>.pt`` each) and ``state`` atomically,
    from one process; keeps the newest ``keep`` checkpoints."""
    root = Path(root)
    tmp = new_tmp(root, step)
    manifest: dict[str, dict] = {}
    for name, obj in payload.items():
        _torch_save(obj, tmp / f"{name}.pt")
        manifest.update(_entry(tmp, f"{name}.pt"))
        crash_point("checkpoint:write")  # tests: die with the checkpoint half written
    return publish(root, tmp, step, state, manifest, keep)


def verify(path: Path, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """The folder's state.json, after checking the manifest: every file's size, and the
    sha256 of this rank's share of the files (all of them with one process). Raises if not."""
    state = json.loads((path / STATE_FILE).read_text())
    for i, (rel, meta) in enumerate(sorted(state["manifest"].items())):
        f = path / rel
        if f.stat().st_size != meta["size"] or (i % world == rank and _sha256(f) != meta["sha256"]):
            raise ValueError(f"{f}: size or checksum does not match the manifest")
    return state


def load_latest_checkpoint(root: Path) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """(folder, state, payload) of the newest checkpoint that verifies, or None; the payload
    holds every top-level ``<name>.pt`` by name. Broken ones are skipped with a ``UserWarning``."""
    for path in reversed(checkpoint_dirs(Path(root))):
        try:
            state = verify(path)
            payload = {rel[:-3]: torch.load(path / rel, map_location="cpu", weights_only=False)
                       for rel in state["manifest"] if rel.endswith(".pt") and "/" not in rel}
        except Exception as e:  # noqa: BLE001 - any failure means "not usable"
            warnings.warn(f"skipping unreadable checkpoint {path}: {type(e).__name__}: {e}", stacklevel=2)
            continue
        return path, state, payload
    return None


def read_train_state(path: Path) -> dict[str, Any]:
    """The full ``{"model", "optimizer"}`` state of a distillation checkpoint folder, in one
    process, whatever world size wrote it (for inspection and tests)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(Path(path) / DCP_DIR, Path(d) / "full.pt")
        return torch.load(Path(d) / "full.pt", map_location="cpu", weights_only=False)


def all_finite(obj: Any) -> bool:
    """No NaN/inf in any floating tensor of a (nested) state dict; this rank's shards of DTensors."""
    if isinstance(obj, torch.Tensor):
        t = local(obj)
        return not t.is_floating_point() or bool(torch.isfinite(t).all())
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
    resuming from the newest good checkpoint into model, optimizer, scheduler, RNG and loop
    state. Saving and resuming are collective: every rank calls them."""

    def __init__(self, root: Path, cfg: DistillConfig, student: Student, opt, sched, state: LoopState,
                 total_steps: int):
        self.root, self.cfg, self.student, self.opt, self.sched = Path(root), cfg, student, opt, sched
        self.state, self.total_steps, self.rt = state, total_steps, student.rt
        self.last: Path | None = None  # the newest checkpoint written or resumed from

    def should_save(self, step: int) -> bool:
        every = self.cfg.checkpoint_every
        return bool(every) and step % every == 0 and step < self.total_steps

    def save(self, step: int) -> None:
        """Checkpoint ``step``: every rank writes its DCP shards and RNG into rank 0's temporary
        folder; rank 0 writes the schedule, then, after every rank's manifest entries are in,
        state.json, and renames the folder into place."""
        rt = self.rt
        train_state = self.student.train_state(self.opt)
        if not rt.all_true(all_finite(train_state)):
            raise nonfinite_error("parameters or optimizer state hold NaN/inf (checkpoint not written)",
                                  step, self.last, self.cfg, self.state.nonfinite_skips)
        low_disk = None
        if rt.is_main:  # DTensors count with their global size: the bytes of the whole checkpoint
            try:
                check_disk(self.root, tensor_bytes(train_state))
            except ResourceError as e:
                low_disk = str(e)
        low_disk = rt.broadcast(low_disk)
        if low_disk:
            raise ResourceError(low_disk)
        tmp = rt.broadcast(new_tmp(self.root, step) if rt.is_main else None)  # exists once broadcast
        with _one_process_is_fine():
            dcp.save(train_state, checkpoint_id=tmp / DCP_DIR, no_dist=rt.world == 1)  # collective; files fsynced
        mine = [f"rng-{rt.rank:05d}.pt"]
        _torch_save(capture_rng_state(), tmp / mine[0])
        if rt.is_main:
            _torch_save(self.sched.state_dict(), tmp / "scheduler.pt")
            mine += ["scheduler.pt", f"{DCP_DIR}/.metadata"]
        crash_point("checkpoint:write", step=step, rank=rt.rank)  # tests: die with the checkpoint half written
        mine += [f"{DCP_DIR}/{p.name}" for p in (tmp / DCP_DIR).glob(f"__{rt.rank}_*.distcp")]
        manifest: dict[str, dict] = {}
        for part in rt.gather({rel: _entry(tmp, rel)[rel] for rel in mine}):  # each rank hashes its own files
            manifest.update(part)
        if rt.is_main:
            loop_state = dict(self.state.state_dict(), config=self.cfg.model_dump(mode="json"), world=rt.world,
                              sharding=rt.sharding)
            self.last = publish(self.root, tmp, step, loop_state, manifest, self.cfg.keep_checkpoints)
        self.last = rt.broadcast(self.last)  # and no rank goes on before the folder is in place

    def resume(self) -> int | None:
        """Load the newest checkpoint that verifies on every rank; its step, or None."""
        rt = self.rt
        for path in reversed(checkpoint_dirs(self.root)):
            why = None
            try:
                saved = verify(path, rt.rank, rt.world)
            except Exception as e:  # noqa: BLE001 - any failure means "not usable"
                why = f"{type(e).__name__}: {e}"
            if rt.all_true(why is None):
                try:  # DCP reads collectively and raises on every rank if one fails
                    self._load(path, saved)
                except Exception as e:  # noqa: BLE001
                    why = f"{type(e).__name__}: {e}"
                if rt.all_true(why is None):
                    self._resumed(path, saved)
                    return saved["step"]
            if rt.is_main:
                warn_caller(f"skipping unreadable checkpoint {path}: {why or 'it failed on another rank'}")
        return None

    def _load(self, path: Path, saved: dict[str, Any]) -> None:
        # DCP plans every read (keys, shapes) before it copies data into the live tensors, so
        # a checkpoint of another model fails before touching them.
        train_state = self.student.train_state(self.opt)
        with _one_process_is_fine():
            dcp.load(train_state, checkpoint_id=path / DCP_DIR, no_dist=self.rt.world == 1)
        self.student.load_train_state(self.opt, train_state)
        self.sched.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
        own = path / f"rng-{self.rt.rank:05d}.pt"
        rng = own if own.is_file() else path / "rng-00000.pt"  # a rank the writer did not have
        restore_rng_state(torch.load(rng, weights_only=False))
        self.state.load_state_dict(saved)

    def _resumed(self, path: Path, saved: dict[str, Any]) -> None:
        self.last = path
        if not self.rt.is_main:
            return
        now = self.cfg.model_dump(mode="json")
        changed = sorted(k for k, v in saved.get("config", {}).items() if k != "progress" and now.get(k) != v)
        if changed:
            warn_caller(f"resuming {path} with settings changed since it was written: {', '.join(changed)}")
        if saved.get("world", 1) != self.rt.world:
            warn_caller(f"resuming {path} in {self.rt.world} processes; it was written by {saved['world']}: the "
                        "state is resharded and the run continues, but not bit-identically to an uninterrupted one")
        print(f"slimmoe distill: resuming from checkpoint {path} (step {saved['step']}/{self.total_steps})",
              file=sys.stderr, flush=True)
