"""Typed settings of every stage (Pydantic v2). Unknown keys are errors.

Errors from these models are turned into one-line messages naming the field by
:func:`format_validation_error`, which the CLI prints as ``error: ...``.
"""

from __future__ import annotations

import difflib
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


NeuronScore = Literal["taylor", "magnitude", "activation", "random"]
ExpertScore = Literal["taylor", "frequency", "reap", "random"]
# Names follow DESIGN.md: `kd_topk` is the residual-bucket form, `kd_topk_renorm` the
# soft cross-entropy to the renormalised top-k distribution. Only the latter (and `lm`)
# have a non-zero gradient when the model under scoring equals the teacher, which is
# why it is the importance default.
ImportanceLoss = Literal["kd_topk_renorm", "kd_topk", "lm"]
# How a stage reaches a parameter target (slimmoe.prune.strategies): ``slim`` solves the
# expert width, ``drop`` the number of experts, ``slim+drop`` both.
Strategy = Literal["slim", "drop", "slim+drop"]
STRATEGIES: tuple[str, ...] = typing.get_args(Strategy)
DROP_STRATEGIES = ("drop", "slim+drop")  # they remove whole experts ...
DROP_EXPERT_SCORES = ("frequency", "reap")  # ... scored by one of these


def parse_param_count(v: Any) -> Any:
    """Accept 3800000000, 3.8e9, "3.8e9", "3.8B", "500M", "120K" as a parameter count."""
    if isinstance(v, str):
        s = v.strip().replace("_", "").upper()
        scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(s[-1:], 1)
        try:
            v = float(s[:-1] if scale != 1 else s) * scale
        except ValueError:
            raise ValueError(f"expected a parameter count like 3800000000, 3.8e9 or 3.8B, got {v!r}") from None
    if isinstance(v, float):
        if not v.is_integer() and v < 1e3:
            raise ValueError(f"expected a whole number of parameters, got {v!r}")
        v = int(round(v))
    return v


class ImportanceConfig(StrictModel):
    """How structures are scored before slimming."""

    samples: int = Field(64, gt=0, description="calibration sequences")
    seq_len: int = Field(128, gt=1, description="tokens per calibration sequence")
    batch_size: int = Field(4, gt=0, description="calibration sequences per forward/backward pass")
    score: NeuronScore = Field("taylor", description="score of expert neurons and KV groups")
    expert_score: ExpertScore = Field("taylor", description="score of whole experts, to drop some "
                               "(strategies drop and slim+drop use reap unless given)")
    loss: ImportanceLoss = Field("kd_topk_renorm", description="loss whose sensitivity taylor scores measure")
    topk: int = Field(8, gt=0, description="teacher logits kept by the KD loss")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KD loss")
    seed: int = Field(0, description="seed of the calibration sample and of random scores")
    device_map: str | None = Field(
        None, description="where the scored model (and teacher) are placed: auto (layers spread over the visible "
        "GPUs; weights offloaded to the CPU are refused), cpu, cuda:N, or a JSON map of module names to devices; "
        "unset: one device")

    @field_validator("device_map", mode="before")
    @classmethod
    def _device_map_text(cls, v: Any) -> Any:
        """A YAML mapping is kept as its JSON text; text is checked (parse_device_map)."""
        if isinstance(v, dict):
            v = json.dumps(v)
        if isinstance(v, str):
            parse_device_map(v)
        return v


DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(text: str | None) -> str | dict[str, str | int] | None:
    """``device_map`` as ``from_pretrained`` takes it: a strategy name, one device, or a JSON map
    of module names to devices (``"disk"`` is refused: offloaded weights get no gradient)."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as e:
            raise ValueError(f"not a JSON map of module names to devices ({e})") from None
        if not isinstance(value, dict) or not all(isinstance(d, (str, int)) for d in value.values()):
            raise ValueError("expected a JSON map of module names to devices such as \"cpu\", \"cuda:0\" or 0")
        if "disk" in value.values():
            raise ValueError("disk offload is not supported for scoring (offloaded weights get no gradient)")
        return value
    if text in DEVICE_MAP_NAMES or re.fullmatch(r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?|\d+", text):
        return int(text) if text.isdigit() else text
    raise ValueError(f"expected {', '.join(DEVICE_MAP_NAMES)}, a device (cpu, cuda:0) or a JSON map, got {text!r}")


class SlimTargets(StrictModel):
    """Target sizes of one slimming step. None keeps the source's size."""

    expert_intermediate_size: int | None = Field(None, gt=0, description="target width of every expert")
    num_key_value_heads: int | None = Field(None, gt=0, description="target KV groups (query heads follow)")
    num_experts: int | None = Field(None, gt=0, description="target experts per layer (drops the lowest-scored)")

    def is_noop(self) -> bool:
        return all(v is None for v in self.model_dump().values())


SaveDtype = Literal["auto", "float32", "bfloat16", "float16"]


class PruneConfig(StrictModel):
    """Everything `slimmoe prune` needs: targets, scoring and calibration data."""

    targets: SlimTargets = Field(SlimTargets(), description="target sizes; a size left out keeps the source's")
    importance: ImportanceConfig = Field(ImportanceConfig(), description="how structures are scored")
    data: Path | None = Field(None, description="calibration text; random tokens when absent")
    save_dtype: SaveDtype = Field("auto", description="dtype of the slimmed model; auto: the source's")
    max_shard_size: str = Field("5GB", description="largest safetensors file of the slimmed model")

    @field_validator("data")
    @classmethod
    def _data_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).exists():
            raise ValueError(f"no such file or folder: {v}")
        return v

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, v: str) -> str:
        """What save_pretrained accepts (huggingface_hub's parse_size_to_int): a number and KB, MB, GB or TB."""
        if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]B\s*", v, flags=re.IGNORECASE):
            raise ValueError(f"expected a size like 5GB or 500MB, got {v!r}")
        return v


def format_validation_error(err: ValidationError) -> str:
    """One line naming the first offending field: ``importance.samples: must be > 0``.

    An unknown key gets the closest known one: ``stages.0.distil: unknown key (did you
    mean 'distill'?)``.
    """
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = " ".join(first["msg"].split())
    if first["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")  # our validators' own words
        if not loc:
            return msg  # a whole-model check, which names its fields itself
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
        known = _fields_at(_model_named(err.title), first["loc"][:-1])
        close = difflib.get_close_matches(str(first["loc"][-1]), known, n=1, cutoff=0.6)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
        elif known:
            msg += f" (known keys: {', '.join(sorted(known))})"
    return f"{loc or 'config'}: {msg}"


def _model_named(title: str) -> type[BaseModel] | None:
    """The StrictModel subclass a ValidationError is about (its ``title``)."""
    todo = [StrictModel]
    while todo:
        cls = todo.pop()
        if cls.__name__ == title:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def _fields_at(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """Field names of the model reached from ``model`` by following ``loc`` (list indices skipped)."""
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        model = _inner_model(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _inner_model(annotation) -> type[BaseModel] | None:
    """The BaseModel inside ``X``, ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping raises ValueError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such config file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: cannot be read as UTF-8 text ({getattr(e, 'strerror', None) or e})") from None
    try:
        data = yaml.safe_load(text)  # safe: no !!python/... tags, so reading a config runs no code
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ValueError(f"--set {key}: value is not valid YAML ({' '.join(str(e).split())[:200]})") from None
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[_list_index(part, key, len(node))]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise ValueError(f"--set {key}: {'.'.join(parts[:depth])} is a {type(node).__name__}, not a section")
            if node is None:
                raise ValueError(f"--set {key}: {'.'.join(parts[:depth + 1])} is null, not a section")
        if isinstance(node, list):
            node[_list_index(parts[-1], key, len(node))] = value
        elif isinstance(node, dict):
            node[parts[-1]] = value
        else:
            raise ValueError(f"--set {key}: {'.'.join(parts[:-1])} is a {type(node).__name__}, not a section")
    return data


def _list_index(part: str, key: str, length: int) -> int:
    try:
        i = int(part)
    except ValueError:
        raise ValueError(f"--set {key}: {part!r} is not a list index") from None
    if not 0 <= i < length:
        raise ValueError(f"--set {key}: index {i} is out of range (the list has {length} items)")
    return i


DistillLoss = Literal["kd_topk", "kd_topk_renorm", "kl", "lm"]


class DistillConfig(StrictModel):
    """One distillation run (see docs/distill.md). ``batch_size`` is the global batch in
    sequences per optimizer step; it is split over processes and micro-batches."""

    tokens: int = Field(..., gt=0, description="training token budget (input tokens)")
    batch_size: int = Field(8, gt=0, description="global sequences per optimizer step")
    micro_batch_size: int | None = Field(None, gt=0, description="sequences per forward per process")
    lr: float = Field(3.0e-4, gt=0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * this")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="share of the steps spent warming up linearly")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not on biases and norms)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm to this")
    loss: DistillLoss = Field("kd_topk", description="distillation loss (docs/distill.md); lm = next-token loss only")
    alpha: float = Field(1.0, ge=0, le=1, description="weight of the KD term; 1 - alpha goes to LM loss")
    topk: int = Field(8, gt=0, description="teacher logits kept per position by the top-k losses")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of teacher and student")
    chunk_size: int = Field(512, gt=0, description="positions per loss chunk (memory vs vocab x chunk)")
    router_aux_loss_coef: float = Field(0.0, ge=0, description="student load-balancing loss weight")
    seed: int = Field(0, description="seed of the batch order and of per-step randomness (router noise)")
    checkpoint_every: int | None = Field(None, gt=0, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, gt=0, description="newest checkpoints kept on disk")
    eval_every: int | None = Field(None, gt=0, description="optimizer steps between held-out evals")
    eval_batch_size: int = Field(8, gt=0, description="sequences per forward of a held-out eval")
    keep_best: bool = Field(True, description="final model = best held-out checkpoint")
    early_stopping_patience: int | None = Field(None, gt=0, description="evals without improvement")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (less memory)")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field("auto", description="auto: bf16 where the GPU supports it")
    experts_implementation: Literal["auto", "eager", "batched_mm", "grouped_mm"] = Field(
        "auto", description="transformers' experts kernel; auto = fastest measured on the device")
    teacher_cache_dir: Path | None = Field(None, description="folder caching the teacher's top-k outputs (off when unset)")
    teacher_cache_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="how the teacher cache stores top-k log-probs (rounded once from float32; ids take "
        "uint16 up to 65536 tokens): float16 = 32 B/token at topk 8")
    teacher_device_map: str | None = Field(None, description="e.g. 'auto' to spread a large teacher")
    sharding: Literal["fsdp", "ddp", "none"] | None = Field(
        None, description="how processes share the student: fsdp (FSDP2, sharded), ddp (replicated), none "
        "(one process); default: fsdp with more than one process, none otherwise")
    max_shard_size: str = Field("5GB", description="largest safetensors file of the final model (save_pretrained)")
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the saved model; auto: the teacher's (the student's without a teacher)")
    log_every: int = Field(1, gt=0, description="optimizer steps between logged metrics")
    progress: bool = Field(True, description="progress bar on stderr")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss or gradient norm: stop with an error, or skip that batch's update")
    max_nonfinite_skips: int = Field(10, ge=0, description="with nonfinite: skip, stop after this many skips")


class LaunchConfig(StrictModel):
    """How many processes a step runs in, started by ``torchrun`` (``torch.distributed.run``).

    One node: ``nproc_per_node`` processes on this machine. Several: the same command on
    every node with its ``node_rank``, all pointing at one ``master_addr``:``master_port``
    (static rendezvous), or at a c10d ``rdzv_endpoint`` shared by all (elastic rendezvous).
    """

    nproc_per_node: int = Field(1, gt=0, description="processes per node (one per GPU)")
    nnodes: int = Field(1, gt=0, description="nodes taking part")
    node_rank: int = Field(0, ge=0, description="this node's index, 0 .. nnodes-1 (static rendezvous)")
    master_addr: str = Field("127.0.0.1", description="address of node 0 (static rendezvous)")
    master_port: int | None = Field(None, gt=0, lt=65536, description="port on node 0; default: a free port "
                                    "on one node, 29500 on several")
    rdzv_endpoint: str | None = Field(None, description="host:port of a c10d rendezvous (elastic launch); "
                                      "replaces master_addr/port and node_rank")
    rdzv_id: str = Field("slimmoe", description="job id shared by the nodes of one c10d rendezvous")
    device_memory: str | None = Field(None, description="memory of one device, e.g. 80GiB; slimmoe run stops "
                                      "before starting when a step would not fit (default: the GPU's, if any)")

    @field_validator("node_rank")
    @classmethod
    def _node_rank_in_range(cls, v: int, info) -> int:
        nnodes = info.data.get("nnodes", 1)
        if v >= nnodes:
            raise ValueError(f"must be below nnodes ({nnodes}), got {v}")
        return v

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def is_multiprocess(self) -> bool:
        return self.world_size > 1
