"""``slimmoe plan``: memory per process and disk of every step of a pipeline, whether each
fits a device, and what to change when it does not, from config.json files alone.

The numbers come from :mod:`slimmoe.pipeline.footprint` (the memory model, written out
there). A step fits when its total is at most the device's memory less a reserve of
1 GiB + 5% (CUDA context, NCCL buffers, allocator fragmentation). A step that does not
fit names the first single change that makes it fit, tried in this order: a switch
(gradient checkpointing, the teacher cache, FSDP), a smaller batch, more processes,
then all of those together; else the device size it would need.

Disk (what stays under output_dir, and the teacher cache): the scores (float64), the
pruned model and the final model (parameters x their dtype), distillation checkpoints at
their peak ((keep_checkpoints + 1) x 12 B/param: fp32 weights and two AdamW moments;
only with distill.checkpoint_every), ``best_student.pt`` (4 B/param, with eval_every and
keep_best), the tokenised data (8 B/token) and the teacher cache (train blocks x
seq_len x topk x (2 or 4 B per log-prob, distill.teacher_cache_dtype, + 2 B per id up to
65536 tokens, else 4), once per topk / temperature / dtype). See :mod:`slimmoe.pipeline.disk`
for how the number of training blocks is estimated.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from slimmoe.arch import get_adapter
from slimmoe.config import LaunchConfig
from slimmoe.errors import UserError
from slimmoe.io.loading import load_config
from slimmoe.pipeline import footprint as fp
from slimmoe.pipeline.disk import (
    DataEstimate,
    cache_bytes,
    distill_disk,
    estimate_data,
    pipeline_disk,
    stage_disk,
)
from slimmoe.pipeline.preflight import cut
from slimmoe.pipeline.resolve import expand_schedule, resolve_stages
from slimmoe.pipeline.schema import PipelineConfig
from slimmoe.prune.schedule import estimate_active_params

RESERVE_BYTES = 1 << 30
RESERVE_FRACTION = 0.05
MAX_PROCESSES = 4096
KD_CACHEABLE = ("kd_topk", "kd_topk_renorm")


def usable_bytes(device_memory: int) -> int:
    return int(device_memory - RESERVE_BYTES - RESERVE_FRACTION * device_memory)


def device_needed(total: int) -> int:
    """The smallest device whose usable memory holds ``total`` bytes."""
    return int((total + RESERVE_BYTES) / (1 - RESERVE_FRACTION)) + 1


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 30):.1f} GiB"


@dataclass
class Step:
    """One step of one stage: its memory per process, what it writes, and the verdict."""

    name: str
    processes: int
    memory: fp.Memory
    disk: int | None
    settings: dict
    fits: bool | None = None
    advice: str | None = None

    def as_dict(self) -> dict:
        return {"processes": self.processes, "per_rank_bytes": self.memory.as_dict(), "fits": self.fits,
                "advice": self.advice, "disk_bytes": self.disk, "settings": self.settings}


Estimate = Callable[[dict], fp.Memory]
Option = tuple[str, dict]


@dataclass
class Planned:
    """A step before its verdict: how to estimate it for other knobs, and what may help."""

    step: Step
    estimate: Estimate
    knobs: dict
    switches: list[Option] = field(default_factory=list)  # one-setting changes, in order of preference
    lower: list[tuple[str, str, list[int]]] = field(default_factory=list)  # (knob, config field, values high->low)
    scalable: bool = True  # runs in as many processes as the launch asks for

    def judge(self, usable: int | None) -> Step:
        if usable is not None:
            self.step.fits = self.step.memory.total <= usable
            self.step.advice = None if self.step.fits else advise(self, usable)
        return self.step


def _lowered(p: Planned) -> Iterator[Option]:
    for knob, name, values in p.lower:
        for v in values:
            yield f"lower {name} to {v} (now {p.knobs[knob]})", {knob: v}


def _more_processes(p: Planned, base: dict, prefix: str) -> Iterator[Option]:
    if not p.scalable:
        return
    nproc = p.knobs.get("nproc_per_node", 1)
    for n in range(p.knobs["world"] + 1, MAX_PROCESSES + 1):
        nodes = f": {-(-n // nproc)} nodes x {nproc}" if 1 < nproc < n else ""
        yield f"{prefix}use more processes (needs >= {n} at this size{nodes})", {**base, "world": n}


def advise(p: Planned, usable: int) -> str:
    """The first change (see the module docstring for the order) that makes the step fit."""
    fits = lambda change: p.estimate({**p.knobs, **change}).total <= usable
    singles: Iterable[Option] = [*p.switches, *_lowered(p)]
    for phrase, change in singles:
        if fits(change):
            return phrase
    scalable_fix = p.switches[-1] if p.switches and "sharding" in p.switches[-1][1] else None
    base = scalable_fix[1] if scalable_fix else {}
    for phrase, change in _more_processes(p, base, f"{scalable_fix[0]} and " if scalable_fix else ""):
        if fits(change):
            return phrase
    lowest = {knob: (name, values[-1]) for knob, name, values in p.lower if values}
    switches = [(ph, ch) for ph, ch in p.switches if not set(ch) & set(lowest)]  # lowering wins over raising
    everything: dict = {knob: v for knob, (_, v) in lowest.items()}
    for _, change in switches:
        everything.update(change)
    names = [ph for ph, _ in switches] + [f"lower {name} to {v}" for name, v in lowest.values()]
    together = ", ".join(names)
    if names and fits(everything):
        return together
    for phrase, change in _more_processes(p, everything, f"{together} and " if names else ""):
        if fits(change):
            return phrase
    need = gib(device_needed(p.estimate({**p.knobs, **everything}).total))
    after = f", even after: {together}" if names else ""
    if not p.scalable:
        return f"{p.step.name} runs in one process: it needs a device of >= {need}{after}"
    return f"does not fit at up to {MAX_PROCESSES} processes; needs a device of >= {need}{after}"


def _micro_values(batch_size: int, world: int, micro: int) -> list[int]:
    """Smaller micro-batches the batch geometry allows (batch_size a multiple of micro x world)."""
    return [m for m in range(micro - 1, 0, -1) if batch_size % (m * world) == 0]


@dataclass
class StagePlan:
    name: str
    sizes: dict
    shape: fp.ModelShape
    active_params: int
    steps: list[Step]
    disk: dict

    def as_dict(self) -> dict:
        return {"name": self.name, "sizes": self.sizes, "total_params": self.shape.params,
                "estimated_total_params": self.shape.estimated, "active_params": self.active_params,
                "dtype": self.shape.dtype, "steps": {s.name: s.as_dict() for s in self.steps},
                "disk_bytes": self.disk}


@dataclass
class Plan:
    name: str
    teacher: str
    model_type: str
    teacher_shape: fp.ModelShape
    teacher_active: int
    launch: LaunchConfig
    device_memory: int | None
    teacher_eval: Step
    stages: list[StagePlan]
    data: DataEstimate
    disk: dict

    @property
    def usable(self) -> int | None:
        return None if self.device_memory is None else usable_bytes(self.device_memory)

    def steps(self) -> Iterator[tuple[str, Step]]:
        yield "teacher", self.teacher_eval
        for st in self.stages:
            for s in st.steps:
                yield st.name, s

    @property
    def fits(self) -> bool | None:
        verdicts = [s.fits for _, s in self.steps()]
        return None if any(v is None for v in verdicts) else all(verdicts)

    def first_misfit(self) -> tuple[str, Step] | None:
        return next(((n, s) for n, s in self.steps() if s.fits is False), None)

    def as_dict(self) -> dict:
        t = self.teacher_shape
        return {"name": self.name,
                "teacher": {"path": self.teacher, "model_type": self.model_type, "dtype": t.dtype,
                            "total_params": t.params, "estimated_total_params": t.estimated,
                            "active_params": self.teacher_active, "steps": {"evaluate": self.teacher_eval.as_dict()}},
                "launch": {"nproc_per_node": self.launch.nproc_per_node, "nnodes": self.launch.nnodes,
                           "world_size": self.launch.world_size},
                "device_memory_bytes": self.device_memory, "usable_bytes": self.usable,
                "data": self.data.as_dict(), "stages": [s.as_dict() for s in self.stages], "disk": self.disk,
                "fits": self.fits}


def plan_pipeline(cfg: PipelineConfig, launch: LaunchConfig | None = None, device_memory: int | None = None) -> Plan:
    """Every step of ``cfg`` (stages resolved from the teacher's config.json, no weights read)
    for ``launch`` (default: ``cfg.launch``, else one process) on devices of ``device_memory``
    bytes (None: no verdicts)."""
    launch = launch or getattr(cfg, "launch", None) or LaunchConfig()
    teacher_cfg = load_config(cfg.teacher, "teacher")
    adapter = get_adapter(teacher_cfg)
    stages = resolve_stages(expand_schedule(cfg, teacher_cfg), teacher_cfg).stages
    teacher = fp.model_shape(teacher_cfg)
    usable = None if device_memory is None else usable_bytes(device_memory)
    data = estimate_data(cfg.data)
    T, world = cfg.data.seq_len, launch.world_size
    knobs = {"world": world, "nproc_per_node": launch.nproc_per_node}

    teacher_eval = evaluate_step(teacher, None, stages[0].eval, T, launch.nproc_per_node).judge(usable)
    current, current_cfg, caches, planned = teacher, copy.deepcopy(teacher_cfg), {}, []
    for i, stage in enumerate(stages):
        sizes = cut(adapter, current_cfg, stage.targets(), f"stages.{i}.")
        d = stage.distill
        saved = fp.config_dtype(teacher_cfg) if d is None or d.save_dtype == "auto" else d.save_dtype
        shape = fp.with_dtype(fp.model_shape(current_cfg), current.dtype if d is None else saved)
        steps = [importance_step(current, teacher if i > 0 else None, stage.importance, T, knobs)]
        cache_key = (str(d.teacher_cache_dir), d.topk, d.temperature, d.teacher_cache_dtype) if d and _cached(d) else None
        cache = None if cache_key is None else "reuse" if cache_key in caches else "build"
        if d is not None:
            if cache == "build":
                caches[cache_key] = stage.name
                steps.append(cache_step(shape, teacher, d, T, knobs, data))
            steps.append(distill_step(shape, teacher, d, T, knobs, cache))
        steps.append(evaluate_step(shape, teacher if stage.eval.kl_to_teacher else None, stage.eval, T,
                                   launch.nproc_per_node))
        steps = [s.judge(usable) for s in steps]
        disk = stage_disk(current, shape, stage, data, new_cache=cache == "build")
        planned.append(StagePlan(stage.name, {k: v for k, v in sizes.items() if v is not None}, shape,
                                 estimate_active_params(current_cfg), steps, disk))
        current = shape
    return Plan(cfg.name, cfg.teacher, teacher_cfg.model_type, teacher, estimate_active_params(teacher_cfg), launch,
                device_memory, teacher_eval, planned, data, pipeline_disk(cfg.output_dir, stages, planned, data))


def _cached(d) -> bool:
    return d.teacher_cache_dir is not None and d.loss in KD_CACHEABLE


def importance_step(m: fp.ModelShape, t: fp.ModelShape | None, imp, seq_len: int, knobs: dict) -> Planned:
    def estimate(k: dict) -> fp.Memory:
        return fp.importance_memory(m, t, batch=k["batch"], seq_len=seq_len, world=k["world"],
                                    teacher_forward=imp.loss != "lm")

    kn = {**knobs, "batch": imp.batch_size}
    return Planned(Step("importance", kn["world"], estimate(kn), 8 * m.score_elements,
                        {"batch_size": imp.batch_size, "seq_len": seq_len}), estimate, kn,
                   lower=[("batch", "importance.batch_size", list(range(imp.batch_size - 1, 0, -1)))])


def _sharding(chosen: str | None, world: int) -> str:
    """distill.sharding as it applies at ``world`` processes (None: fsdp when more than one)."""
    return "none" if world == 1 else (chosen or "fsdp")


def teacher_mode(d, cache: str | None) -> str:
    """How the distill step holds the teacher (footprint.distill_memory): ``cache`` is "build"
    (this stage builds the top-k cache), "reuse" (an earlier stage built it) or None."""
    if d.eval_every is not None:
        return "live"  # held-out KL against the live teacher
    if d.loss == "lm" or cache == "reuse":
        return "none"
    return "resident" if cache == "build" else "live"


def distill_step(s: fp.ModelShape, t: fp.ModelShape, d, seq_len: int, knobs: dict, cache: str | None) -> Planned:
    world = knobs["world"]
    micro = d.micro_batch_size or max(1, d.batch_size // world)
    a = fp.compute_bytes(d.mixed_precision)
    buffers = 2 if d.loss != "lm" and d.alpha < 1 else 1

    def estimate(k: dict) -> fp.Memory:
        return fp.distill_memory(s, t, micro=k["micro"], seq_len=seq_len, world=k["world"],
                                 sharding=_sharding(k["sharding"], k["world"]),
                                 a=a, checkpointing=k["ckpt"], chunk=d.chunk_size, loss_buffers=buffers,
                                 teacher=teacher_mode(d, k["cache"]), accumulate=d.batch_size > k["micro"] * k["world"])

    kn = {**knobs, "micro": micro, "ckpt": d.gradient_checkpointing, "cache": cache, "sharding": d.sharding}
    switches: list[Option] = []
    if not d.gradient_checkpointing:
        switches.append(("set distill.gradient_checkpointing: true", {"ckpt": True}))
    if cache is None and d.loss in KD_CACHEABLE and d.eval_every is None:
        switches.append(("set distill.teacher_cache_dir", {"cache": "build"}))
    whole = d.batch_size // world  # one micro-batch per step: FSDP keeps no whole-model gradients
    if world > 1 and d.sharding in (None, "fsdp") and whole > micro and d.batch_size % world == 0:
        switches.append((f"set distill.micro_batch_size: {whole} (one micro-batch per step)", {"micro": whole}))
    if d.sharding in ("ddp", "none"):
        switches.append(("set distill.sharding: fsdp", {"sharding": "fsdp"}))
    settings = {"micro_batch_size": micro, "accumulation_steps": max(1, d.batch_size // (micro * world)),
                "seq_len": seq_len, "sharding": _sharding(d.sharding, world),
                "gradient_checkpointing": d.gradient_checkpointing, "compute_bytes": a,
                "teacher": teacher_mode(d, cache)}
    disk = sum(distill_disk(s, d).values())
    return Planned(Step("distill", world, estimate(kn), disk, settings), estimate, kn, switches,
                   [("micro", "distill.micro_batch_size", _micro_values(d.batch_size, world, micro))])


def cache_step(s: fp.ModelShape, t: fp.ModelShape, d, seq_len: int, knobs: dict, data: DataEstimate) -> Planned:
    world = knobs["world"]
    micro = d.micro_batch_size or max(1, d.batch_size // world)

    def estimate(k: dict) -> fp.Memory:
        return fp.cache_memory(s, t, micro=k["micro"], seq_len=seq_len, world=k["world"],
                               sharding=_sharding(k["sharding"], k["world"]))

    kn = {**knobs, "micro": micro, "sharding": d.sharding}
    switches = [("set distill.sharding: fsdp", {"sharding": "fsdp"})] if d.sharding in ("ddp", "none") else []
    disk = cache_bytes(data, d, t.vocab)
    step = Step("teacher_cache", world, estimate(kn), disk, {"micro_batch_size": micro, "seq_len": seq_len,
                                                              "topk": d.topk, "sharding": _sharding(d.sharding, world)})
    return Planned(step, estimate, kn, switches,
                   [("micro", "distill.micro_batch_size", _micro_values(d.batch_size, world, micro))])


def evaluate_step(m: fp.ModelShape, t: fp.ModelShape | None, ev, seq_len: int, devices: int = 1) -> Planned:
    """One process; its models spread over the node's ``devices`` GPUs (device_map="auto")."""
    def estimate(k: dict) -> fp.Memory:
        return fp.evaluate_memory(m, t if k["kl"] else None, batch=k["batch"], kl_batch=min(k["batch"], ev.batch_size),
                                  seq_len=seq_len, devices=devices)

    batch = max([ev.batch_size, *ev.throughput_batch_sizes])
    kn = {"world": 1, "batch": batch, "kl": t is not None}
    switches = [("set eval.kl_to_teacher: false", {"kl": False})] if t is not None else []
    step = Step("evaluate", 1, estimate(kn), 0, {"batch_size": batch, "seq_len": seq_len, "kl_to_teacher": t is not None,
                                                 "devices": devices})
    return Planned(step, estimate, kn, switches,
                   [("batch", "eval.batch_size and eval.throughput_batch_sizes", list(range(batch - 1, 0, -1)))],
                   scalable=False)


def device_memory_bytes(launch: LaunchConfig | None) -> int | None:
    """``launch.device_memory`` in bytes; else the first GPU's total memory; else None."""
    from slimmoe.resources import parse_size

    if launch is not None and launch.device_memory:
        return parse_size(launch.device_memory, "launch.device_memory")
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(0).total_memory)
    return None


def check_fits(cfg: PipelineConfig, launch: LaunchConfig | None, device_memory_bytes: int | None, *,
               skip: Iterable[str] = ()) -> None:
    """Raise a one-line UserError naming the first step of ``cfg`` that does not fit devices of
    ``device_memory_bytes`` (None: nothing is checked) and what to change. Steps named in
    ``skip`` (importance, teacher_cache, distill, evaluate) are not checked."""
    if device_memory_bytes is None:
        return
    plan = plan_pipeline(cfg, launch, device_memory_bytes)
    bad = next(((n, s) for n, s in plan.steps() if s.fits is False and s.name not in set(skip)), None)
    if bad is None:
        return
    stage, step = bad
    where = "teacher" if stage == "teacher" else f"stages.{[s.name for s in plan.stages].index(stage)} ({stage})"
    per = "per process" if step.processes > 1 else "on its one device"
    raise UserError(f"{where}: the {step.name} step needs ~{gib(step.memory.total)} {per}, more than the "
                    f"{gib(plan.usable)} usable of a {gib(device_memory_bytes)} device; {step.advice} "
                    f"(slimmoe plan CONFIG shows every step)")
