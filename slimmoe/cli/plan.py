"""``slimmoe plan CONFIG``: memory per process and disk of every step of a pipeline, and
whether each step fits the devices, from config.json files alone (no weights are read,
nothing is downloaded beyond configs). The memory model is written out in
``slimmoe/pipeline/footprint.py``; ``slimmoe/pipeline/fit.py`` judges and advises."""

from __future__ import annotations

import json

from slimmoe.cli.flags import ModelFlags
from slimmoe.config import LaunchConfig
from slimmoe.errors import UserError

# the launch fields that change memory per process; rendezvous settings do not
PLAN_LAUNCH_FLAGS = ModelFlags(LaunchConfig, errors="flag", metavars={"device_memory": "SIZE"},
                               skip=("node_rank", "master_addr", "master_port", "rdzv_endpoint", "rdzv_id"))
STEP_COLUMNS = ("weights", "grads", "optimizer", "teacher", "activations", "total")
DISK_COLUMNS = ("scores", "pruned", "teacher_cache", "checkpoints", "best", "model")


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="memory per process and disk of every step of a pipeline (configs only)",
                       description="Read the teacher's config.json, resolve every stage's shape, and print for each "
                                   "step (importance, teacher cache, distill, evaluate) the memory per process and "
                                   "the disk, with whether it fits and what to change. No weights are read.")
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override any config field, e.g. stages.0.distill.micro_batch_size=1")
    p.add_argument("--json", dest="as_json", action="store_true", help="print one JSON object instead of tables")
    PLAN_LAUNCH_FLAGS.add_to(p, "processes and devices (default: the config's launch section; device memory: "
                                "the GPU's when there is one)")
    p.set_defaults(func=run)


def launch_of(cfg, args) -> LaunchConfig:
    """The config's ``launch`` section with the flags given on top."""
    base = getattr(cfg, "launch", None)
    values = base.model_dump() if base is not None else {}
    for key, value in PLAN_LAUNCH_FLAGS.given(args).items():
        values[key] = value
    return PLAN_LAUNCH_FLAGS.validate(values)


def run(args) -> int:
    from slimmoe.io.loading import loading_policy
    from slimmoe.pipeline.fit import device_memory_bytes, plan_pipeline
    from slimmoe.pipeline.schema import load_pipeline_config
    from slimmoe.resources import parse_size

    if getattr(args, "device_memory", None) is not None:
        parse_size(args.device_memory, "--device-memory")  # named as typed, before any work
    try:
        cfg = load_pipeline_config(args.config, args.overrides)
    except ValueError as e:
        if hasattr(e, "errors"):  # a ValidationError: run_guarded names the field
            raise
        raise UserError(str(e)) from None
    launch = launch_of(cfg, args)
    memory = device_memory_bytes(launch)  # launch.device_memory, else the GPU's, else None
    with loading_policy(cfg.trust_remote_code, cfg.allow_pickle):
        plan = plan_pipeline(cfg, launch, memory)
    print(json.dumps(plan.as_dict(), indent=1) if args.as_json else format_plan(plan))
    return 0


def _gib(n: int | None) -> str:
    return "?" if n is None else "-" if n == 0 else f"{n / (1 << 30):.1f}"


def _sizes(sizes: dict) -> str:
    """``width 960, 8 KV heads (32 query heads), 16 experts (top-2)``."""
    parts = [f"width {sizes['expert_intermediate_size']}"]
    if sizes.get("num_key_value_heads"):
        parts.append(f"{sizes['num_key_value_heads']} KV heads ({sizes.get('num_attention_heads')} query heads)")
    parts.append(f"{sizes.get('num_experts')} experts (top-{sizes.get('num_experts_per_tok')})")
    if sizes.get("shared_intermediate_size"):
        parts.append(f"shared width {sizes['shared_intermediate_size']}")
    return ", ".join(parts)


def _verdict(step) -> str:
    if step.fits is None:
        return "?"
    return "yes" if step.fits else f"NO: {step.advice}"


def format_plan(plan) -> str:
    """The plan as tables: stages, memory per process per step, disk."""
    t, launch = plan.teacher_shape, plan.launch
    lines = [f"{plan.name}: teacher {plan.teacher} ({plan.model_type}, {t.params:,} parameters, {t.dtype})"]
    procs = f"{launch.world_size} process{'es' if launch.world_size > 1 else ''}"
    if launch.nnodes > 1:
        procs += f" ({launch.nnodes} nodes x {launch.nproc_per_node})"
    if plan.device_memory is None:
        lines.append(f"{procs}; device memory unknown (no GPU here, no --device-memory): no verdicts")
    else:
        lines.append(f"{procs} on devices of {_gib(plan.device_memory)} GiB: {_gib(plan.usable)} GiB usable each "
                     "(1 GiB + 5% kept for the CUDA context and the allocator)")
    d = plan.data
    blocks = "unknown" if d.train_blocks is None else f"{d.train_blocks:,}"
    lines += [f"data: {blocks} train blocks of {d.seq_len} tokens ({d.how})", ""]
    for st in plan.stages:
        lines.append(f"stage {st.name}: {_sizes(st.sizes)}; {st.shape.params:,} total / {st.active_params:,} active "
                     "parameters")
    lines += ["", "memory per process (GiB)"]
    rows = [("stage", "step", "procs", *STEP_COLUMNS, "fits")]
    for name, step in plan.steps():
        mem = step.memory.as_dict()
        rows.append((name, step.name, str(step.processes), *(_gib(mem[k]) for k in STEP_COLUMNS), _verdict(step)))
    lines += _table(rows)
    lines += ["", "disk (GiB)"]
    rows = [("stage", *DISK_COLUMNS, "")]
    rows += [(st.name, *(_gib(st.disk[k]) for k in DISK_COLUMNS), "") for st in plan.stages]
    lines += _table(rows, names=1)
    lines.append(_disk_line(plan))
    return "\n".join(lines)


def _disk_line(plan) -> str:
    disk = plan.disk
    data = "?" if disk["data_bytes"] is None else _gib(disk["data_bytes"])
    total = disk["total_bytes"]
    if total is None:
        per = ", ".join(f"{n} {_gib(b)} GiB" for n, b in disk["teacher_cache_bytes_per_million_tokens"].items())
        unknown = f" + {_gib(disk['data_bytes_per_million_tokens'])} GiB of tokenised data"
        unknown += f" and teacher cache ({per})" if per else ""
        return (f"data {data} GiB; total {_gib(disk['total_known_bytes'])} GiB{unknown} per million training tokens; "
                f"{_gib(disk['free_bytes'])} GiB free under output_dir")
    verdict = "fits" if disk["fits"] else "does NOT fit"
    return f"data {data} GiB; total {_gib(total)} GiB; {_gib(disk['free_bytes'])} GiB free under output_dir: {verdict}"


def _table(rows: list[tuple[str, ...]], names: int = 2) -> list[str]:
    """``names`` left-aligned columns, right-aligned numbers, the last column as it is."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for r in rows:
        cells = [c.ljust(w) if i < names else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells + [r[-1]]).rstrip())
    return out
