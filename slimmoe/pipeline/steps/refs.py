"""What steps hand each other: small typed records of paths, content fingerprints and counts.

A record names where a result lies (``path``) and what it is (``fingerprint``, counts).
:meth:`StepRecord.cache_identity` is the part a cache key may hash: what the result *is*,
never where it was written or how the path was spelled, so a run from the CLI and one from
a work pool (another working directory, relative instead of absolute paths) find the same
cached results.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from slimmoe.io.fingerprint import file_fingerprint, folder_fingerprint

__all__ = ["DistilledModel", "ImportanceRef", "ModelRef", "QuantizeEngine", "QuantizedModel", "SlimmedModel",
           "StepRecord", "TokenBlocks", "file_fingerprint", "folder_fingerprint"]


class StepRecord(BaseModel):
    """Base of the records; immutable, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    fingerprint: str

    def cache_identity(self) -> dict[str, Any]:
        """What a cache key hashes of this record: every field but ``path``."""
        return self.model_dump(mode="json", exclude={"path"})


class ModelRef(StepRecord):
    """A checkpoint folder (or a hub id, fingerprinted by its name)."""

    @classmethod
    def of(cls, path: str | Path) -> "ModelRef":
        p = Path(path)
        fp = folder_fingerprint(p) if p.is_dir() else hashlib.sha256(str(path).encode()).hexdigest()[:24]
        return cls(path=str(path), fingerprint=fp)

    def cache_identity(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint}


class TokenBlocks(StepRecord):
    """The tokenised corpus (``tokens-<fingerprint>/``, token shards + index.json): train and held-out
    blocks of ``seq_len``."""

    source: str  # data.train as given (for MLflow's dataset record; not part of the identity)
    seq_len: int
    train_blocks: int
    eval_blocks: int

    def cache_identity(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"path", "source"})


class ImportanceRef(StepRecord):
    """A scores file (``importance.pt``) and how many calibration tokens made it."""

    calibration_tokens: int


class SlimmedModel(ModelRef):
    """A slimmed checkpoint, its parameter counts and the sizes it was cut to."""

    total_params: int
    active_params: int
    target: dict[str, int | None]


class DistilledModel(ModelRef):
    """A distilled checkpoint and what its run did (``slimmoe.distill.DistillResult`` fields)."""

    distill: dict[str, Any]


class QuantizedModel(ModelRef):
    """A compressed-tensors checkpoint of a stage's model (``slimmoe.quantize``): its scheme and
    what was quantized (``describe_checkpoint`` fields, llm-compressor's versions)."""

    scheme: str
    report: dict[str, Any]


class QuantizeEngine(BaseModel):
    """llm-compressor's environment as a quantize step uses it: where its Python is (not part of
    any key: it depends on the machine), and what decides the result (the worker's hash, the
    versions there: :func:`slimmoe.quantize.runner.engine_identity`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    python: str
    worker: str
    versions: dict[str, str]

    def cache_identity(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"python"})
