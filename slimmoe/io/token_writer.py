"""Tokenise a corpus into flat token-id shards on disk (``slimmoe tokenize``), resumably.

Documents are read in order (:mod:`slimmoe.io.token_sources`), tokenised in batches (in
``num_proc`` worker processes when asked; results are taken back in submission order, so
the output does not depend on ``num_proc``) and joined with EOS exactly as
``slimmoe.io.data.load_blocks`` joins them: EOS between documents, not after the last,
empty documents add nothing. The token stream is cut into shards of ``shard_tokens``
tokens (a multiple of ``seq_len``): each is written to ``.<name>.tmp``, fsynced, renamed to
``<stream>-<k>.bin``, and only then given a marker ``.progress/<stream>-<k>.json`` with
its token count, sha256 and the document position where the next shard starts. A rerun
keeps the shards whose marker and checksum agree and resumes after them; a killed
write never leaves a shard that reads as complete. ``index.json`` is written last.

Layout: :mod:`slimmoe.io.token_shards` (the reader) documents the folder.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimmoe.errors import UserError
from slimmoe.faults import crash_point
from slimmoe.io.atomic import atomic_write_text, fsync_dir
from slimmoe.io.data import _check_eval_fraction, _check_seq_len, tokenizer_fingerprint
from slimmoe.io.lock import output_lock
from slimmoe.io.token_encode import Encoder, join_with_eos, skip_documents
from slimmoe.io.token_shards import FORMAT, INDEX_FILE, file_sha256, read_index, verify_shards
from slimmoe.io.token_sources import SourceSpec, iter_text_batches, local_files

SHARD_TOKENS = 1 << 25  # 32 Mi tokens: 64 MiB of uint16 per shard
JOB_FILE = "tokenize.json"  # what the folder is a tokenisation of (a rerun must match it)
PROGRESS_DIR = ".progress"


@dataclass(frozen=True)
class TokenizeJob:
    """Everything that determines a tokenised folder's content."""

    train: SourceSpec
    tokenizer_dir: str
    seq_len: int
    eval: SourceSpec | None = None
    eval_fraction: float = 0.0
    max_tokens: int | None = None  # cap on the train stream's tokens (eval is not capped)
    max_train_blocks: int | None = None  # cap on train blocks recorded in the index (shards keep all)
    shard_tokens: int = SHARD_TOKENS
    fields: tuple[str, str] = ("SOURCE", "--eval")
    batch_size: int = field(default=1000, compare=False)
    num_proc: int = field(default=1, compare=False)


def tokenize_corpus(job: TokenizeJob, out: str | os.PathLike, tokenizer: Any, progress: bool = True,
                    verify: bool = False) -> dict[str, Any]:
    """Write (or finish, or reuse) the tokenised folder ``out``; returns its index."""
    _check_job(job)
    out = Path(out).expanduser()
    tok_fp = tokenizer_fingerprint(tokenizer)
    identity = json.dumps(_identity(job, tok_fp), sort_keys=True, indent=1)
    _claim(out, identity)
    with output_lock(out, what="slimmoe tokenize"):  # one writer per folder
        return _tokenize_locked(job, out, tokenizer, tok_fp, progress, verify)


def _tokenize_locked(job: TokenizeJob, out: Path, tokenizer: Any, tok_fp: str, progress: bool,
                     verify: bool) -> dict[str, Any]:
    if (out / INDEX_FILE).is_file():
        index = read_index(out)
        if verify:
            verify_shards(out, index)
        shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)  # left by a kill after index.json was written
        return index
    vocab = len(tokenizer)
    dtype = "uint16" if vocab <= np.iinfo(np.uint16).max + 1 else "uint32"
    shard_tokens = max(job.seq_len, job.shard_tokens // job.seq_len * job.seq_len)
    eos = getattr(tokenizer, "eos_token_id", None)
    encoder = Encoder(tokenizer, job.tokenizer_dir, job.num_proc, job.batch_size)
    try:
        train = _write_stream(out, "train", job.train, job.fields[0], encoder, eos, dtype, job.seq_len,
                              shard_tokens, job.max_tokens, progress)
        held = None
        if job.eval is not None:
            held = _write_stream(out, "eval", job.eval, job.fields[1], encoder, eos, dtype, job.seq_len,
                                 shard_tokens, None, progress)
    finally:
        encoder.close()
    index = _index(job, tok_fp, vocab, eos, dtype, train, held)
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=1, sort_keys=True) + "\n")
    fsync_dir(out)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    return index


# ---------------------------------------------------------------------------- the job


def _check_job(job: TokenizeJob) -> None:
    _check_seq_len(job.seq_len)
    _check_eval_fraction(job.eval_fraction)
    for name, value in (("num_proc", job.num_proc), ("max_tokens", job.max_tokens),
                        ("max_blocks", job.max_train_blocks), ("shard_tokens", job.shard_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{name}: must be a positive integer, got {value!r}")


def _identity(job: TokenizeJob, tok_fp: str) -> dict[str, Any]:
    """The job as JSON, with the local source files' sizes and mtimes (a rerun after the
    files changed must not resume into the old shards)."""
    out = {"format": FORMAT, "tokenizer": tok_fp, "seq_len": job.seq_len, "eval_fraction": float(job.eval_fraction),
           "max_tokens": job.max_tokens, "max_train_blocks": job.max_train_blocks, "shard_tokens": job.shard_tokens}
    for name, spec in (("train", job.train), ("eval", job.eval)):
        found = local_files(spec, job.fields[0 if name == "train" else 1]) if spec is not None else None
        if found is None:
            out[name] = None if spec is None else spec.identity()
        else:  # local files by absolute path (not as spelled: another working directory is the same job)
            out[name] = {**spec.identity(), "source": None, "files": [
                [str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in found]}
    return out


def _claim(out: Path, identity: str) -> None:
    """Create ``out`` for this job, or accept it when it holds (part of) the same job."""
    job_file = out / JOB_FILE
    if job_file.is_file():
        if job_file.read_text() != identity:
            raise UserError(f"OUT: {out} holds a tokenisation of other input or settings ({JOB_FILE} differs); "
                            "remove it or choose another folder")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"OUT: {out} exists and is not an (unfinished) slimmoe tokenize folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job_file, identity)


def _index(job: TokenizeJob, tok_fp: str, vocab: int, eos, dtype: str, train: list[dict],
           held: list[dict] | None) -> dict[str, Any]:
    T = job.seq_len
    n = sum(s["tokens"] for s in train) // T
    if held is not None:
        n_eval = sum(s["tokens"] for s in held) // T
        train_range, eval_range = [0, n], {"stream": "eval", "start": 0, "stop": n_eval}
    else:
        n_eval = 0
        if job.eval_fraction > 0 and n >= 2:
            n_eval = min(n - 1, max(1, int(math.floor(n * job.eval_fraction + 0.5))))
        train_range, eval_range = [0, n - n_eval], {"stream": "train", "start": n - n_eval, "stop": n}
    if job.max_train_blocks is not None:
        train_range[1] = min(train_range[1], job.max_train_blocks)
    shards = [{k: s[k] for k in ("file", "stream", "tokens", "sha256", "max_token_id")} for s in train + (held or [])]
    index = {"format": FORMAT, "dtype": dtype, "seq_len": T, "num_tokens": sum(s["tokens"] for s in shards),
             "train_blocks": train_range[1] - train_range[0], "eval_blocks": eval_range["stop"] - eval_range["start"],
             "train": {"stream": "train", "start": train_range[0], "stop": train_range[1]}, "eval": eval_range,
             "shards": shards, "tokenizer": tok_fp, "vocab_size": vocab, "eos_token_id": eos,
             "source": {"train": job.train.identity(), "eval": None if job.eval is None else job.eval.identity(),
                        "eval_fraction": float(job.eval_fraction), "max_tokens": job.max_tokens}}
    index["fingerprint"] = content_fingerprint(index)
    return index


def content_fingerprint(index: dict[str, Any]) -> str:
    """sha256 of what the blocks are: dtype, seq_len, the ranges, tokenizer and every shard's
    stream, token count and sha256 (not file names or where the folder lies)."""
    content = json.dumps({k: index[k] for k in ("format", "dtype", "seq_len", "train", "eval", "tokenizer")}
                         | {"shards": [(s["stream"], s["tokens"], s["sha256"]) for s in index["shards"]]},
                         sort_keys=True)
    return _sha256_text(content)


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------- shards of one stream


def shard_name(stream: str, k: int) -> str:
    return f"{stream}-{k:05d}.bin"


def _write_stream(out: Path, stream: str, spec: SourceSpec, field: str, encoder: Encoder, eos, dtype: str,
                  seq_len: int, shard_tokens: int, max_tokens: int | None, progress: bool) -> list[dict]:
    """Write (or finish) the shards of one stream; their markers, in order."""
    from tqdm.auto import tqdm

    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    done = _completed_shards(out, stream, dtype)
    if done and done[-1]["next_doc"] is None:  # the stream was finished
        return _fills_a_block(done, field, spec, seq_len)
    _drop_from(out, stream, len(done))
    sink = _ShardSink(out, stream, dtype, shard_tokens, done, max_tokens)
    start_doc, start_off = (done[-1]["next_doc"], done[-1]["next_offset"]) if done else (0, 0)
    batches = skip_documents(iter_text_batches(spec, field, batch_size=encoder.batch_size), start_doc)
    seen = sink.written > 0
    with tqdm(total=max_tokens, initial=sink.written, unit="tok", unit_scale=True, desc=f"tokenising {stream}",
              disable=None if progress else True) as bar:
        for first, n, flat, lengths in encoder.map(batches):
            seq, starts = join_with_eos(flat, lengths, eos, seen)
            seen = seen or seq.size > 0
            trim = start_off if first == start_doc else 0
            seq, starts = seq[trim:], starts - trim

            def position(p: int, first=first, n=n, starts=starts, size=seq.size) -> tuple[int, int]:
                if p >= size:  # canonical: the next batch's first document, whatever the batching
                    return first + n, 0
                j = int(np.searchsorted(starts, p, side="right")) - 1
                return first + j, int(p - starts[j])

            capped = sink.add(seq, position)
            bar.update(seq.size)
            if capped:
                break
    return _fills_a_block(sink.finish(), field, spec, seq_len)


def _fills_a_block(shards: list[dict], field: str, spec: SourceSpec, seq_len: int) -> list[dict]:
    total = sum(s["tokens"] for s in shards)
    if total < seq_len:  # the message load_blocks gives
        raise UserError(f"{field}: {spec.source}: corpus has {total} tokens, fewer than seq_len={seq_len} "
                        "needed for one block")
    return shards


class _ShardSink:
    """Appends tokens to the current shard's temporary file; closes full shards."""

    def __init__(self, out: Path, stream: str, dtype: str, shard_tokens: int, done: list[dict],
                 max_tokens: int | None):
        self.out, self.stream, self.np_dtype = out, stream, np.dtype(dtype).newbyteorder("<")
        self.shard_tokens, self.max_tokens, self.shards = shard_tokens, max_tokens, list(done)
        self.written = sum(s["tokens"] for s in done)
        self.fh = None

    def add(self, seq: np.ndarray, position) -> bool:
        """Write ``seq``; ``position(i)`` is the (document, offset) of ``seq[i]``. True when
        ``max_tokens`` is reached (the stream ends there)."""
        i = 0
        while i < seq.size:
            if self.fh is None:
                self._open()
            room = self.shard_tokens - self.count
            if self.max_tokens is not None:
                room = min(room, self.max_tokens - self.written)
            part = seq[i : i + room].astype(self.np_dtype)
            self.fh.write(part.tobytes())
            self.hash.update(part.tobytes())
            self.count, self.written, i = self.count + part.size, self.written + part.size, i + part.size
            self.max_id = max(self.max_id, int(part.max()))
            capped = self.max_tokens is not None and self.written >= self.max_tokens
            if self.count == self.shard_tokens or capped:
                self._close(None if capped else position(i))
                crash_point("tokenize", shard=len(self.shards) - 1)  # tests: die with this shard complete
                if capped:
                    return True
            else:
                crash_point("tokenize", partial=len(self.shards))  # tests: die with this shard half written
        return False

    def finish(self) -> list[dict]:
        if self.fh is not None:
            if self.count:
                self._close(None)
            else:
                self.fh.close()
                self.tmp.unlink(missing_ok=True)
        return self.shards

    def _open(self) -> None:
        import hashlib

        self.name = shard_name(self.stream, len(self.shards))
        self.tmp = self.out / f".{self.name}.tmp"
        self.fh, self.hash, self.count, self.max_id = open(self.tmp, "wb"), hashlib.sha256(), 0, 0

    def _close(self, next_position: tuple[int, int] | None) -> None:
        """fsync, rename into place, then the marker (so a shard never reads as complete early)."""
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.fh = None
        os.replace(self.tmp, self.out / self.name)
        fsync_dir(self.out)
        marker = {"file": self.name, "stream": self.stream, "tokens": self.count, "sha256": self.hash.hexdigest(),
                  "max_token_id": self.max_id, "next_doc": None if next_position is None else next_position[0],
                  "next_offset": None if next_position is None else next_position[1]}
        atomic_write_text(self.out / PROGRESS_DIR / f"{self.name}.json", json.dumps(marker, sort_keys=True))
        self.shards.append(marker)


def _completed_shards(out: Path, stream: str, dtype: str) -> list[dict]:
    """The leading shards whose marker, size and sha256 agree (a rerun keeps these)."""
    itemsize, shards = np.dtype(dtype).itemsize, []
    for k in itertools.count():
        marker = out / PROGRESS_DIR / f"{shard_name(stream, k)}.json"
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            break
        f = out / info.get("file", "")
        if not f.is_file() or f.stat().st_size != info["tokens"] * itemsize or file_sha256(f) != info["sha256"]:
            break
        shards.append(info)
        if info["next_doc"] is None:
            break
    return shards


def _drop_from(out: Path, stream: str, k: int) -> None:
    """Remove shards ``k`` on of a stream, their markers and temporaries (a killed write's)."""
    for f in list(out.glob(f"{stream}-*.bin")) + list(out.glob(f".{stream}-*.bin.tmp")):
        if int(f.name.strip(".").split("-")[1].split(".")[0]) >= k:
            f.unlink(missing_ok=True)
    for f in (out / PROGRESS_DIR).glob(f"{stream}-*.bin.json"):
        if int(f.name.split("-")[1].split(".")[0]) >= k:
            f.unlink(missing_ok=True)


def write_view(source: str | os.PathLike, out: str | os.PathLike, max_train_blocks: int | None,
               copy_across_devices: bool = False) -> dict[str, Any]:
    """``out`` as a view of the tokenised folder ``source``: its shards hard-linked (across
    file systems: copied, or symlinked when ``copy_across_devices`` is false), the index
    with train capped at ``max_train_blocks``."""
    source, out = Path(source).expanduser().resolve(), Path(out)
    index = read_index(source)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for shard in index["shards"]:
        try:
            os.link(source / shard["file"], tmp / shard["file"])
        except OSError:
            if copy_across_devices:
                shutil.copyfile(source / shard["file"], tmp / shard["file"])
            else:
                os.symlink(source / shard["file"], tmp / shard["file"])
    train = dict(index["train"])
    if max_train_blocks is not None:
        train["stop"] = min(train["stop"], train["start"] + max_train_blocks)
    view = {**index, "train": train, "train_blocks": train["stop"] - train["start"]}
    view["fingerprint"] = content_fingerprint(view)
    atomic_write_text(tmp / INDEX_FILE, json.dumps(view, indent=1, sort_keys=True) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return view
