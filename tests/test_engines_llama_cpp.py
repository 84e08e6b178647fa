"""An engine check no one here wrote: slimmed students exported with ``slimmoe export --for
llama.cpp`` through llama.cpp's own ``convert_hf_to_gguf.py`` run in llama.cpp
(``llama-cpp-python``, its C++ kernels), compared with transformers on a held-out prompt.

* Mixtral: llama.cpp computes what transformers computes; the greedy continuation is equal
  for 32 tokens and the logits agree to float32 tolerance.
* PhiMoE (Phi-mini-shaped: head_dim = hidden / heads): llama.cpp's PhiMoE is not transformers'
  PhiMoE. Its graph (``src/models/phi3.cpp``) normalises with RMSNorm where Phi-3.5-MoE uses
  LayerNorm, and routes with softmax top-2 renormalised where Phi-3.5-MoE uses sparsemixer.
  The GGUF is checked against an independent reference of exactly that math
  (``tests.helpers_engines.llama_cpp_phimoe_math``: equal greedy tokens, float32-close
  logits), and the gap to transformers' own PhiMoE is measured and must be real (if a
  llama.cpp release fixes it, this test says so, and ``slimmoe export``'s warning goes).

Needs the llama.cpp build and its converter: ``make test-engines`` installs both
(``scripts/install-llama-cpp``) and runs this file; ``make test`` skips it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimmoe.cli.main import main
from slimmoe.errors import UserError
from slimmoe.export.writer import find_converter
from tests.helpers_engines import (
    CORPUS,
    held_out_prompt,
    llama_cpp_greedy,
    llama_cpp_model,
    llama_cpp_phimoe_math,
    moe_with_sentencepiece,
    transformers_greedy,
)

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: run `make test-engines`")
try:
    find_converter()
except UserError as e:
    pytest.skip(f"llama.cpp's converter is not found ({e}): run `make test-engines`", allow_module_level=True)

TRAIN_CHARS = 200_000  # the teacher and the slimming calibration read only this prefix
NEW_TOKENS = 32
LOGIT_TOL = 1e-5  # of the largest logit: float32 kernels (and a float32 KV cache) summing in another order


def exported(root: Path, model_type: str, **shape) -> tuple[Path, Path]:
    """A tiny teacher trained 150 steps on Shakespeare, slimmed by ``slimmoe prune`` to half the
    expert width (Phi-mini's cut: heads kept), exported as a float32 GGUF."""
    text = CORPUS.read_text()[:TRAIN_CHARS]
    (root / "calibration.txt").write_text(text)
    teacher = moe_with_sentencepiece(root / "teacher", text, model_type, train_steps=150, **shape)
    student, served = root / "student", root / "gguf"
    assert main(["prune", str(teacher), str(student), "--expert-intermediate-size", "32", "--samples", "8",
                 "--seq-len", "64", "--data", str(root / "calibration.txt"), "--no-progress"]) == 0
    assert main(["export", str(student), str(served), "--for", "llama.cpp", "--gguf-type", "f32"]) == 0
    return student, served / "model.gguf"


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return exported(tmp_path_factory.mktemp("mixtral"), "mixtral")


@pytest.fixture(scope="module")
def phimoe(tmp_path_factory):
    # without an lm_head bias: the export adds the zero bias llama.cpp's PhiMoE requires
    return exported(tmp_path_factory.mktemp("phimoe"), "phimoe", lm_head_bias=False)


def compare(model, gguf: Path, prompt: list[int]) -> dict:
    """Greedy tokens and the logits that chose them, transformers vs llama.cpp."""
    ours, our_logits = transformers_greedy(model, prompt, NEW_TOKENS)
    theirs, their_logits = llama_cpp_greedy(llama_cpp_model(gguf), prompt, NEW_TOKENS)
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), NEW_TOKENS)
    top2 = our_logits.topk(2, dim=-1).values
    return {"agree": agree, "ours": ours, "theirs": theirs,
            "diff": (our_logits[:agree] - their_logits[:agree]).abs().max().item() if agree else float("nan"),
            "first_diff": (our_logits[0] - their_logits[0]).abs().max().item(),
            "scale": our_logits.abs().max().item(), "margin": (top2[:, 0] - top2[:, 1]).min().item()}


def load(student: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    return model, held_out_prompt(AutoTokenizer.from_pretrained(student))


def assert_same(r: dict, what: str) -> None:
    print(f"{what}: {r['agree']}/{NEW_TOKENS} greedy tokens equal, max |logit diff| {r['diff']:.2e} over them "
          f"(largest logit {r['scale']:.2f}, smallest top-2 margin {r['margin']:.2e})")
    assert r["agree"] == NEW_TOKENS, f"{what}: first divergence at token {r['agree']}: {r['ours']} vs {r['theirs']}"
    assert r["diff"] <= LOGIT_TOL * r["scale"], f"{what}: logits differ by {r['diff']:.3e}"


def test_mixtral_gguf_continues_a_held_out_prompt_as_transformers_does(mixtral):
    student, gguf = mixtral
    model, prompt = load(student)
    assert_same(compare(model, gguf, prompt), "mixtral, llama.cpp vs transformers")


def test_phimoe_gguf_computes_llama_cpps_phimoe_exactly(phimoe):
    student, gguf = phimoe
    model, prompt = load(student)
    with llama_cpp_phimoe_math(model):
        assert_same(compare(model, gguf, prompt), "phimoe, llama.cpp vs its RMSNorm + softmax-top-2 math")


def test_phimoe_gguf_differs_from_transformers_phimoe(phimoe):
    """The gap slimmoe export warns about: measured, and larger than float noise."""
    student, gguf = phimoe
    model, prompt = load(student)
    r = compare(model, gguf, prompt)
    print(f"phimoe, llama.cpp vs transformers' own PhiMoE (LayerNorm + sparsemixer): {r['agree']}/{NEW_TOKENS} "
          f"greedy tokens equal; at the first new token max |logit diff| {r['first_diff']:.3f} "
          f"(largest logit {r['scale']:.2f})")
    assert r["first_diff"] > 100 * LOGIT_TOL * r["scale"], \
        "llama.cpp's PhiMoE now matches transformers': drop the export warning (slimmoe/export/engines.py)"
