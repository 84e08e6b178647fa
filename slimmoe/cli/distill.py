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

from slimmoe.cli.common import add_safety_flags, run_guarded
from slimmoe.errors import UserError
from slimmoe.io.loading import has_tokenizer


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "distill",
        help="distil a student from a teacher (one stage, resumable)",
        description="Distil STUDENT from TEACHER on --data; write the final student to OUT. "
        "Running the same command again after a crash resumes from OUT/checkpoints.",
    )
    p.add_argument("student", help="student checkpoint folder")
    p.add_argument("teacher", help="teacher checkpoint folder ('none' with --loss lm)")
    p.add_argument("out", help="output folder")
    p.add_argument("--data", help="training text (file, folder or hub id); random tokens when absent")
    p.add_argument("--eval-data", help="held-out text (default: the last --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.0)
    p.add_argument("--tokens", type=int, required=True, help="token budget")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--random-blocks", type=int, default=256, help="blocks of random tokens when --data is absent")
    p.add_argument("--max-blocks", type=int, default=None, help="cap on train blocks")
    p.add_argument("--batch-size", type=int, default=8, help="global sequences per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=3.0e-4)
    p.add_argument("--loss", default="kd_topk", choices=["kd_topk", "kd_topk_renorm", "kl", "lm"])
    p.add_argument("--alpha", type=float, default=1.0, help="KD weight; 1-alpha on next-token loss")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=None, metavar="STEPS")
    p.add_argument("--early-stopping-patience", type=int, default=None)
    p.add_argument("--teacher-cache", default=None, metavar="DIR", help="cache teacher top-k outputs here")
    p.add_argument("--teacher-device-map", default=None)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--experts-implementation", default="auto", choices=["auto", "eager", "batched_mm", "grouped_mm"])
    p.add_argument("--distributed", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--no-progress", action="store_true")
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


def _build_config(args):
    from pydantic import ValidationError

    from slimmoe.config import DistillConfig, format_validation_error

    try:
        return DistillConfig(
            tokens=args.tokens, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lr=args.lr,
            loss=args.loss, alpha=args.alpha, topk=args.topk, temperature=args.temperature, seed=args.seed,
            checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
            eval_every=args.eval_every, early_stopping_patience=args.early_stopping_patience,
            teacher_cache_dir=args.teacher_cache, teacher_device_map=args.teacher_device_map,
            gradient_checkpointing=args.gradient_checkpointing,
            experts_implementation=args.experts_implementation, distributed=args.distributed,
            progress=not args.no_progress,
        )
    except ValidationError as e:
        raise UserError(format_validation_error(e)) from None


def run(args) -> int:
    out = Path(args.out)
    from slimmoe.distill.loop import DONE_FILE

    if (out / DONE_FILE).is_file():
        if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 speaks
            print(f"slimmoe distill: {out} is already done (remove {out / DONE_FILE} to run again)",
                  file=sys.stderr)
        return 0
    cfg = _build_config(args)
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
    for name in ("data", "eval_data"):
        value = getattr(args, name)
        if value is not None and _looks_local(value) and not Path(value).exists():
            raise UserError(f"--{name.replace('_', '-')}: no such file or folder: {value}")
    if args.seq_len < 2:
        raise UserError(f"--seq-len: must be >= 2, got {args.seq_len}")

    tok_dir = next((d for d in (teacher, student) if d is not None and has_tokenizer(d)), None)
    train, evalb = _load_data(args, tok_dir, vs)

    from slimmoe.distill.loop import distill

    result = distill(str(student), None if teacher is None else str(teacher), out, train, evalb, cfg)
    from accelerate import PartialState

    if PartialState().is_main_process:
        if tok_dir is not None:
            from slimmoe.io.loading import load_tokenizer

            load_tokenizer(str(tok_dir)).save_pretrained(str(out))
        print(f"slimmoe distill: wrote {out} ({result.steps} steps, {result.tokens} tokens"
              + (f", best held-out at step {result.best_step}" if result.best_step is not None else "") + ")",
              file=sys.stderr)
    return 0


def _looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or Path(value).suffix != "" or "/" not in value


def _load_data(args, tok_dir: Path | None, vocab_size: int):
    import torch

    from slimmoe.io.data import load_blocks, random_blocks

    if args.data is None:
        train = random_blocks(vocab_size, args.random_blocks, args.seq_len, seed=args.seed)
        n_eval = int(round(args.random_blocks * args.eval_fraction))
        evalb = random_blocks(vocab_size, n_eval, args.seq_len, seed=args.seed + 1) if n_eval else None
        return train, evalb
    if tok_dir is None:
        raise UserError("TEACHER: no tokenizer in the teacher or student folder; needed to tokenize --data")
    from slimmoe.io.loading import load_tokenizer

    tok = load_tokenizer(str(tok_dir))
    if tok is None:
        raise UserError(f"TEACHER: the tokenizer in {tok_dir} cannot be loaded")
    train, evalb = load_blocks(args.data, tok, args.seq_len, eval_fraction=args.eval_fraction,
                               eval_path=args.eval_data, max_blocks=args.max_blocks, fields=("--data", "--eval-data"))
    if train.shape[0] == 0:
        raise UserError(f"--data: {args.data} gives no block of {args.seq_len} tokens")
    if int(train.max()) >= vocab_size:
        raise UserError(f"--data: token id {int(train.max())} >= vocab size {vocab_size}")
    return train, (evalb if evalb.shape[0] else None) if isinstance(evalb, torch.Tensor) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimmoe")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["distill", *(sys.argv[1:] if argv is None else argv)])
    return run_guarded(run, args)


if __name__ == "__main__":
    sys.exit(main())
