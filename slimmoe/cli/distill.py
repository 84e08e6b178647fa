"""``slimmoe distill STUDENT TEACHER OUT --data PATH --tokens N``: one-stage distillation.

Wired into ``slimmoe.cli`` through :func:`add_parser` and :func:`run`. Also runnable as
``python -m slimmoe.cli.distill ...`` and under ``torchrun --nproc_per_node N -m
slimmoe.cli.distill ...`` for multi-process training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pydantic import Field, model_validator

from slimmoe.cli.common import add_launch_flags, add_safety_flags, run_guarded, run_launched
from slimmoe.cli.flags import ModelFlags
from slimmoe.config import DistillConfig, StrictModel
from slimmoe.errors import UserError


class DistillData(StrictModel):
    """Where the token blocks come from (these flags are not DistillConfig fields)."""

    data: str | None = Field(None, description="training text (file, folder or hub id); "
                             "random tokens when absent")
    eval_data: str | None = Field(None, description="held-out text (default: the last --eval-fraction of --data)")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="share of the blocks held out for evaluation")
    seq_len: int = Field(128, ge=2, description="tokens per block")
    random_blocks: int = Field(256, gt=0, description="blocks of random tokens when --data is absent")
    max_blocks: int | None = Field(None, gt=0, description="cap on train blocks")

    @model_validator(mode="after")
    def _local_paths_exist(self) -> DistillData:
        for name in ("data", "eval_data"):
            value = getattr(self, name)
            if value is not None and _looks_local(value) and not Path(value).exists():
                raise ValueError(f"--{name.replace('_', '-')}: no such file or folder: {value}")
        return self


DATA_FLAGS = ModelFlags(DistillData, errors="flag", metavars={"data": "PATH", "eval_data": "PATH"})
DISTILL_FLAGS = ModelFlags(DistillConfig, aliases={"teacher_cache_dir": ["--teacher-cache"]},
                           metavars={"checkpoint_every": "STEPS", "eval_every": "STEPS", "teacher_cache_dir": "DIR",
                                     "teacher_device_map": "MAP"})


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "distill",
        help="distil a student from a teacher (one stage, resumable)",
        description="Distil STUDENT from TEACHER on --data; write the final student to OUT. "
        "Running the same command again after a crash resumes from OUT/checkpoints. "
        "The training flags are the fields of slimmoe.config.DistillConfig.",
    )
    p.add_argument("student", help="student checkpoint folder")
    p.add_argument("teacher", help="teacher checkpoint folder ('none' with --loss lm)")
    p.add_argument("out", help="output folder")
    DATA_FLAGS.add_to(p, "data")
    DISTILL_FLAGS.add_to(p, "distillation (DistillConfig)")
    add_launch_flags(p)
    add_safety_flags(p)
    p.set_defaults(func=run)
    return p


def _check_model_dir(path: str, field: str) -> Path:
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"{field}: {path}: no such model folder (config.json missing)")
    return p


def _vocab_size(path: Path) -> int | None:
    try:
        doc = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path / 'config.json'}: unreadable ({e})") from None
    return doc.get("vocab_size") or doc.get("text_config", {}).get("vocab_size")


def run(args) -> int:
    if run_launched(args):  # --nproc-per-node N: the same command in N processes
        return 0
    out = Path(args.out)
    from slimmoe.distill.loop import DONE_FILE

    if (out / DONE_FILE).is_file():
        if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 speaks
            print(f"slimmoe distill: {out} is already done (remove {out / DONE_FILE} to run again)",
                  file=sys.stderr)
        return 0
    cfg = DISTILL_FLAGS.build(args)
    data = DATA_FLAGS.build(args)
    student = _check_model_dir(args.student, "STUDENT")
    no_teacher = args.teacher.lower() == "none"
    if no_teacher and cfg.loss != "lm":
        raise UserError("TEACHER: 'none' is only allowed with --loss lm")
    teacher = None if no_teacher else _check_model_dir(args.teacher, "TEACHER")
    vs = _vocab_size(student)
    if cfg.loss != "lm" and vs is not None and cfg.topk > vs:
        raise UserError(f"--topk: {cfg.topk} is larger than the vocabulary ({vs} tokens)")
    if teacher is not None and _vocab_size(teacher) != vs:
        raise UserError(f"TEACHER: vocab size {_vocab_size(teacher)} differs from STUDENT's {vs}")

    from slimmoe.io.loading import has_tokenizer

    tok_dir = next((d for d in (teacher, student) if d is not None and has_tokenizer(d)), None)
    train, evalb = _load_data(data, tok_dir, vs, cfg.seed)

    from slimmoe.distill.loop import distill

    result = distill(str(student), None if teacher is None else str(teacher), out, train, evalb, cfg)
    from slimmoe.parallel.topology import topology

    if topology().is_main:
        if tok_dir is not None:
            from slimmoe.io.loading import load_tokenizer, save_tokenizer

            save_tokenizer(load_tokenizer(str(tok_dir)), out)
        print(f"slimmoe distill: wrote {out} ({result.steps} steps, {result.tokens} tokens"
              + (f", best held-out at step {result.best_step}" if result.best_step is not None else "") + ")",
              file=sys.stderr)
    return 0


def _looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or Path(value).suffix != "" or "/" not in value


def _load_data(d: DistillData, tok_dir: Path | None, vocab_size: int, seed: int):
    from slimmoe.io.data import load_blocks, random_blocks

    if d.data is None:
        train = random_blocks(vocab_size, d.random_blocks, d.seq_len, seed=seed)
        n_eval = int(round(d.random_blocks * d.eval_fraction))
        evalb = random_blocks(vocab_size, n_eval, d.seq_len, seed=seed + 1) if n_eval else None
        return train, evalb
    if tok_dir is None:
        raise UserError("TEACHER: no tokenizer in the teacher or student folder; needed to tokenize --data")
    from slimmoe.io.loading import load_tokenizer

    tok = load_tokenizer(str(tok_dir))
    if tok is None:
        raise UserError(f"TEACHER: the tokenizer in {tok_dir} cannot be loaded")
    train, evalb = load_blocks(d.data, tok, d.seq_len, eval_fraction=d.eval_fraction,
                               eval_path=d.eval_data, max_blocks=d.max_blocks, fields=("--data", "--eval-data"))
    if train.shape[0] == 0:
        raise UserError(f"--data: {d.data} gives no block of {d.seq_len} tokens")
    if int(train.max()) >= vocab_size:
        raise UserError(f"--data: token id {int(train.max())} >= vocab size {vocab_size}")
    return train, (evalb if evalb.shape[0] else None) if evalb is not None else None  # tensor or ShardBlocks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimmoe")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = ["distill", *(sys.argv[1:] if argv is None else argv)]
    args = parser.parse_args(argv)
    args.argv = argv
    return run_guarded(run, args)


if __name__ == "__main__":
    sys.exit(main())
