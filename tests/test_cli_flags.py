"""The CLI is generated from the Pydantic configs (slimmoe.cli.flags): flags, help, choices
and defaults come from the fields, and the parsed flags go back into the models."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from slimmoe.cli import build_parser, main
from slimmoe.cli import distill as cli_distill
from slimmoe.cli import eval as cli_eval
from slimmoe.cli import prune as cli_prune
from slimmoe.cli.flags import ModelFlags
from slimmoe.config import (
    DistillConfig,
    ImportanceConfig,
    NeuronScore,
    PruneConfig,
    SlimTargets,
    Strategy,
    StrictModel,
)
from slimmoe.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def command(name: str) -> argparse.ArgumentParser:
    """The sub-parser of the real ``slimmoe`` command."""
    return build_parser()._subparsers._group_actions[0].choices[name]


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings}


def parse(name: str, *argv: str) -> argparse.Namespace:
    positionals = {"distill": ["s", "t", "o"], "prune": ["m", "o"], "eval": ["m"]}[name]
    return command(name).parse_args([*positionals, *argv])


def flag_of(name: str, default) -> str:
    return ("--no-" if default is True else "--") + name.replace("_", "-")


def test_every_distill_config_field_is_a_flag_of_slimmoe_distill():
    opts = options(command("distill"))
    for name, field in DistillConfig.model_fields.items():
        flag = flag_of(name, field.default)
        assert flag in opts, f"{name}: no {flag} in slimmoe distill"
        assert opts[flag].dest == name
        assert field.description and field.description in opts[flag].help.replace("%%", "%")
        ann = field.annotation  # Literal[...] or Literal[...] | None
        inner = [a for a in typing.get_args(ann) if a is not type(None)] if typing.get_origin(ann) is not Literal else [ann]
        choices = typing.get_args(inner[0]) if len(inner) == 1 and typing.get_origin(inner[0]) is Literal else None
        assert opts[flag].choices == (list(choices) if choices else None), name


@pytest.mark.parametrize("model", [DistillConfig, PruneConfig, ImportanceConfig, SlimTargets,
                                   cli_distill.DistillData, cli_prune.PruneOptions, cli_eval.EvalOptions])
def test_every_field_has_help(model):
    missing = [name for name, f in model.model_fields.items() if not f.description]
    assert not missing, f"{model.__name__}: no description for {missing}"


@pytest.mark.parametrize("name", ["distill", "prune", "eval"])
def test_every_generated_flag_of_a_command_has_help_text(name):
    parser = command(name)
    empty = [a.option_strings for a in parser._actions if a.option_strings and not (a.help or "").strip()]
    assert not empty
    parser.format_help()  # a stray % in a description would break this


def test_today_flags_keep_their_meaning(tmp_path):
    (tmp_path / "held.txt").write_text("held out")
    args = parse("distill", "--tokens", "640", "--teacher-cache", "/tmp/tc", "--no-progress", "--sharding", "fsdp",
                 "--micro-batch-size", "2", "--eval-fraction", "0.25", "--random-blocks", "32", "--seq-len", "16",
                 "--max-blocks", "9", "--eval-data", str(tmp_path / "held.txt"), "--gradient-checkpointing", "--checkpoint-every", "5")
    cfg = cli_distill.DISTILL_FLAGS.build(args)
    assert (cfg.teacher_cache_dir, cfg.progress, cfg.sharding) == (Path("/tmp/tc"), False, "fsdp")
    assert (cfg.micro_batch_size, cfg.gradient_checkpointing, cfg.checkpoint_every) == (2, True, 5)
    data = cli_distill.DATA_FLAGS.build(args)
    assert (data.eval_fraction, data.random_blocks, data.seq_len, data.max_blocks, data.eval_data) == (
        0.25, 32, 16, 9, str(tmp_path / "held.txt"))


def test_given_values_reach_the_config_and_the_rest_are_the_models_defaults():
    args = parse("distill", "--tokens", "640", "--lr", "1e-3", "--betas", "0.8", "0.99", "--loss", "kl",
                 "--max-grad-norm", "none")
    assert cli_distill.DISTILL_FLAGS.given(args) == {"tokens": 640, "lr": 1e-3, "betas": [0.8, 0.99],
                                                      "loss": "kl", "max_grad_norm": None}
    cfg = cli_distill.DISTILL_FLAGS.build(args)
    assert cfg == DistillConfig(tokens=640, lr=1e-3, betas=(0.8, 0.99), loss="kl", max_grad_norm=None)
    assert cfg.model_fields_set == {"tokens", "lr", "betas", "loss", "max_grad_norm"}
    assert (cfg.batch_size, cfg.topk, cfg.keep_best) == (8, 8, True)  # DistillConfig's own defaults


def test_nested_models_are_flattened_into_prune_flags():
    args = parse("prune", "--expert-intermediate-size", "8", "--samples", "4", "--score", "magnitude",
                 "--seed", "3", "--data", ".")
    cfg = cli_prune.PRUNE_FLAGS.build(args)
    assert cfg.targets == SlimTargets(expert_intermediate_size=8)
    assert (cfg.importance.samples, cfg.importance.score, cfg.importance.seed) == (4, "magnitude", 3)
    assert cfg.importance.seq_len == ImportanceConfig().seq_len and cfg.data == Path(".")
    assert vars(args)["importance.samples"] == 4  # dest = the field's path


def test_choices_come_from_the_literals():
    opts = options(command("prune"))
    assert opts["--strategy"].choices == list(typing.get_args(Strategy))
    assert opts["--score"].choices == list(typing.get_args(NeuronScore))
    assert options(command("distill"))["--loss"].choices == ["kd_topk", "kd_topk_renorm", "kl", "lm"]


@pytest.mark.parametrize("argv", [
    ["distill", "s", "t", "o", "--tokens", "64", "--loss", "mse"],
    ["distill", "s", "t", "o", "--tokens", "64", "--sharding", "horovod"],
    ["prune", "m", "o", "--strategy", "shrink"],
    ["prune", "m", "o", "--score", "gradient"],
    ["distill", "s", "t", "o"],  # --tokens is required: DistillConfig.tokens has no default
])
def test_argparse_enforces_choices_and_required_fields(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err or "required" in err


def test_a_true_bool_can_be_switched_off_and_a_false_one_on():
    assert cli_distill.DISTILL_FLAGS.build(parse("distill", "--tokens", "8")).keep_best is True
    cfg = cli_distill.DISTILL_FLAGS.build(parse("distill", "--tokens", "8", "--no-keep-best", "--no-progress"))
    assert (cfg.keep_best, cfg.progress) == (False, False)
    opts = cli_prune.OPTION_FLAGS.build(parse("prune", "--no-progress", "--force"))
    assert (opts.progress, opts.force) == (False, True)
    assert "--progress" not in options(command("distill")) and "--keep-best" not in options(command("distill"))


class Extended(DistillConfig):
    schedule: Literal["cosine", "linear"] = Field("cosine", description="shape of the learning-rate decay")
    warm_restarts: bool = Field(True, description="restart the schedule each epoch")


def test_a_field_added_to_a_model_becomes_a_flag_with_its_help_choices_and_default():
    flags = ModelFlags(Extended, aliases={"teacher_cache_dir": ["--teacher-cache"]})
    parser = argparse.ArgumentParser(prog="x", formatter_class=lambda prog: argparse.HelpFormatter(prog, width=200))
    flags.add_to(parser)
    text = parser.format_help()
    assert "--schedule {cosine,linear}" in text and "shape of the learning-rate decay (default: cosine)" in text
    assert "--no-warm-restarts" in text and "restart the schedule each epoch (on by default)" in text
    assert flags.build(parser.parse_args(["--tokens", "8"])).schedule == "cosine"
    cfg = flags.build(parser.parse_args(["--tokens", "8", "--schedule", "linear", "--no-warm-restarts"]))
    assert (cfg.schedule, cfg.warm_restarts) == ("linear", False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--tokens", "8", "--schedule", "step"])


def test_the_distill_command_picks_up_a_new_field(monkeypatch, capsys):
    monkeypatch.setattr(cli_distill, "DISTILL_FLAGS", ModelFlags(Extended))
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    assert "--schedule {cosine,linear}" in capsys.readouterr().out


def test_bad_values_name_the_field_or_the_flag():
    with pytest.raises(UserError, match=r"^batch_size: Input should be greater than 0"):
        cli_distill.DISTILL_FLAGS.build(parse("distill", "--tokens", "8", "--batch-size", "0"))
    with pytest.raises(UserError, match=r"^importance\.samples: Input should be greater than 0"):
        cli_prune.PRUNE_FLAGS.build(parse("prune", "--samples", "0"))
    with pytest.raises(UserError, match=r"^--seq-len: Input should be greater than or equal to 2"):
        cli_distill.DATA_FLAGS.build(parse("distill", "--tokens", "8", "--seq-len", "1"))
    with pytest.raises(UserError, match=r"^--seq-len: must be positive"):
        cli_eval.EVAL_FLAGS.build(parse("eval", "--seq-len", "0"))
    with pytest.raises(UserError, match=r"^--total-params: expected a parameter count"):
        cli_prune.OPTION_FLAGS.build(parse("prune", "--total-params", "lots"))


def test_a_field_with_a_before_validator_parses_its_own_text():
    opts = cli_prune.OPTION_FLAGS.build(parse("prune", "--total-params", "3.8B", "--active-params", "500M"))
    assert (opts.total_params, opts.active_params) == (3_800_000_000, 500_000_000)


def test_skip_unknown_names_and_unsupported_types():
    class WithDict(StrictModel):
        n: int = Field(1, description="a number")
        table: dict[str, int] = Field(default_factory=dict, description="no flag for this")

    with pytest.raises(TypeError, match="table"):
        ModelFlags(WithDict)
    flags = ModelFlags(WithDict, skip=["table"])
    assert [f.name for f in flags.flags] == ["--n"]
    with pytest.raises(ValueError, match="no such field: tabel"):
        ModelFlags(WithDict, skip=["tabel"])
    with pytest.raises(ValueError, match="no such field: importance.sampels"):
        ModelFlags(PruneConfig, aliases={"importance.sampels": ["--n"]})
    assert "--samples" not in [f.name for f in ModelFlags(PruneConfig, skip=["importance"]).flags]
    parser = argparse.ArgumentParser()
    parser.add_argument("n")
    with pytest.raises(ValueError, match="dest already used"):
        flags.add_to(parser)


def test_building_the_cli_imports_neither_torch_nor_transformers():
    code = ("import sys; from slimmoe.cli import build_parser; p = build_parser(); "
            "[c.format_help() for c in p._subparsers._group_actions[0].choices.values()]; "
            "bad = [m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_python_m_slimmoe_cli_distill_still_parses():
    proc = subprocess.run([sys.executable, "-m", "slimmoe.cli.distill", "--help"], check=False, capture_output=True,
                          text=True, cwd=ROOT, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0 and "--teacher-cache-dir DIR, --teacher-cache DIR" in proc.stdout
