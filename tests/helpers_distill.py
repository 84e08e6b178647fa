"""Tiny phimoe teacher/student folders and subprocess runners for the distillation tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128


def tiny_phimoe(seed: int, scale: float | None = None, intermediate_size: int = 64, vocab: int = VOCAB):
    """Random phimoe (hidden 32, 2 layers, 4 experts, top-2). ``scale`` widens the init so the
    output distribution is far from uniform (a teacher worth imitating)."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "phimoe", hidden_size=32, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        vocab_size=vocab, max_position_embeddings=128,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    if scale is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0, scale)
            model.get_output_embeddings().weight.normal_(0, scale)
    return model


def tiny_qwen2_moe(seed: int, scale: float | None = None, moe_intermediate_size: int = 32, dtype=torch.float32):
    """Random qwen2_moe (hidden 32, 2 layers, 4 experts top-2, a shared expert of 32)."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "qwen2_moe", hidden_size=32, intermediate_size=64, moe_intermediate_size=moe_intermediate_size,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, vocab_size=VOCAB, max_position_embeddings=128,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    if scale is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0, scale)
            model.get_output_embeddings().weight.normal_(0, scale)
    return model.to(dtype)


def save_pair(tmp: Path, teacher_scale: float = 0.3, student_intermediate: int = 32) -> tuple[Path, Path]:
    t_dir, s_dir = tmp / "teacher", tmp / "student"
    tiny_phimoe(0, scale=teacher_scale).save_pretrained(t_dir)
    tiny_phimoe(1, intermediate_size=student_intermediate).save_pretrained(s_dir)
    return s_dir, t_dir


def env(tmp: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.update(HF_HOME=str(tmp / "hf"), HF_DATASETS_CACHE=str(tmp / "ds"), SLIMMOE_CACHE=str(tmp / "sc"),
             HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false",
             OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning")
    return e


def cli_cmd(student: Path, teacher: Path, out: Path, *extra: str, nproc: int = 1) -> list[str]:
    head = [sys.executable, "-m", "slimmoe.cli.distill"]
    if nproc > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", "slimmoe.cli.distill"]
    return [*head, str(student), str(teacher), str(out), "--no-progress", *extra]


def run_cli(tmp: Path, *args, nproc: int = 1, timeout: int = 240, extra_env: dict[str, str] | None = None,
            **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd(*args, nproc=nproc, **kw), env={**env(tmp), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def read_losses(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "losses.jsonl").read_text().splitlines() if ln.strip()]


def load_params(out: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(out).state_dict().items()}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP
    barriers make every op wait for descheduled threads (measured 4 ms -> 250 ms per step)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
