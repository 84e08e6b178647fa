"""``slimmoe quantize`` end to end: llm-compressor in its own environment quantizes a tiny
phimoe, experts included, and the checkpoint loads back in slimmoe's environment (transformers
+ compressed-tensors) with the error the format allows.

Needs llm-compressor's environment (``make test-quantize`` creates it with
scripts/install-llmcompressor); skipped without it.

Bounds, from the formats (weights drawn N(0, 0.2) and trained a little: every group holds near-Gaussian values):
- FP8 e4m3 keeps 3 mantissa bits: rounding to nearest moves a weight by at most 1/16 of its
  value, about 2.6% root-mean-square over many weights; with one scale per output channel
  the scale itself adds nothing. Bound 4%.
- W4A16 (int4, symmetric, one scale = max|w| / 7 per 32 columns): the error is uniform in
  half a step, RMS = max / (7 sqrt 12); the max of 32 Gaussians is ~2.1 sigma, so ~9% of
  sigma. Bound 15%, and above 2% (a weight left unquantized would give 0).
- W8A8 (int8 per output channel, scale max|w| / 127): RMS error max / (127 sqrt 12), ~2.3 sigma
  for 64 Gaussians, so ~0.5%. Bound 2%, above 0.1%.
- Perplexity on held-out text, after a little training: the FP8 model's within 2% of the
  unquantized one, W4A16's within 5%, W8A8's within 1% (measured: +0.11%, +0.97%, -0.16%);
  an expert left random or dropped (what a wrong key layout gives) fails the weight bounds first.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from slimmoe.quantize import QuantizeConfig, quantize_model, resolve_python
from tests.tiny_models import tiny_teacher_with_tokenizer

PYTHON = resolve_python()
pytestmark = pytest.mark.skipif(
    PYTHON is None or not PYTHON.is_file(),
    reason="no llm-compressor environment (.venv-llmcompressor); run scripts/install-llmcompressor or "
           "make test-quantize")

SHAPE = dict(hidden_size=64, intermediate_size=64)  # 4 heads x 16: every input width is 64
BOUNDS = {"FP8_DYNAMIC": (0.0, 0.04, 0.02), "W4A16": (0.02, 0.15, 0.05),  # weight error min, max; ppl
          "W8A8": (0.001, 0.02, 0.01)}
SCHEMES = {"FP8_DYNAMIC": {}, "W4A16": {"group_size": 32}, "W8A8": {}}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A tiny phimoe trained a little (40 AdamW steps, ~10 s) on the bundled corpus: a random one
    puts so much weight on its few largest logits that its perplexity swings by ~2% under FP8
    alone (measured: 1073 -> 1095), which says nothing about the format. Held-out blocks: the last 16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("quant")
    model, text = tiny_teacher_with_tokenizer(root, **SHAPE)
    ids = torch.tensor(AutoTokenizer.from_pretrained(model)(text.read_text())["input_ids"])
    blocks = ids[: (ids.numel() // 64) * 64].view(-1, 64)
    train, held_out = blocks[:-16], blocks[-16:]
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(model)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    for _ in range(40):
        batch = train[torch.randint(0, len(train), (8,))]
        lm(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    lm.save_pretrained(model)
    return model, held_out


@pytest.fixture(scope="module")
def quantized(teacher, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    model, _ = teacher
    root = tmp_path_factory.mktemp("out")
    out = {}
    for scheme, extra in SCHEMES.items():
        folder = root / scheme
        out[scheme] = folder, quantize_model(model, folder, QuantizeConfig(scheme=scheme, **extra))
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_experts_are_quantized_on_disk(quantized, scheme):
    folder, report = quantized[scheme]
    t = tensors(folder)
    w1 = "model.layers.0.block_sparse_moe.experts.3.w1"  # the released Phi-3.5-MoE names
    if scheme in ("FP8_DYNAMIC", "W8A8"):
        dtype = torch.float8_e4m3fn if scheme == "FP8_DYNAMIC" else torch.int8
        assert t[f"{w1}.weight"].dtype == dtype and t[f"{w1}.weight_scale"].shape == (64, 1)
    else:
        assert t[f"{w1}.weight_packed"].dtype == torch.int32 and t[f"{w1}.weight_packed"].shape == (64, 8)
        assert t[f"{w1}.weight_scale"].shape == (64, 2)  # 64 columns in groups of 32
    n_experts = 2 * 4 * 3  # layers x experts x (w1, w2, w3)
    assert report["quantized_expert_weights"] == n_experts and report["unquantized_expert_weights"] == 0
    assert report["quantized_weights"] == n_experts + 2 * 4  # + q, k, v, o per layer
    assert report["unquantized_weights"] == ["lm_head", "model.embed_tokens", "model.layers.0.block_sparse_moe.gate",
                                             "model.layers.1.block_sparse_moe.gate"]
    assert not [k for k in t if "gate_proj" in k or "experts.gate_up_proj" in k]
    assert (folder / "tokenizer.json").is_file() and (folder / ".complete").is_file()


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_loads_in_slimmoe_with_the_format_error(teacher, quantized, scheme, tmp_path):
    """FP8 and W4A16 through stock from_pretrained (transformers' compressed-tensors loading); W8A8,
    whose int8 experts transformers 5.24 does not dequantize, through slimmoe's dequantized copy."""
    from slimmoe.evaluation.quality import perplexity
    from slimmoe.io.loading import load_model
    from slimmoe.quantize.checkpoint import dequantize_checkpoint, needs_dequantized_copy

    model_dir, blocks = teacher
    folder = quantized[scheme][0]
    assert needs_dequantized_copy(folder) == (scheme == "W8A8")
    base = load_model(model_dir)
    q = load_model(dequantize_checkpoint(folder, tmp_path / "plain") if scheme == "W8A8" else folder)
    lo, hi, ppl_bound = BOUNDS[scheme]
    # first a forward pass: transformers leaves dense Linears compressed until the first one
    p0, p1 = perplexity(base, blocks), perplexity(q, blocks)
    assert math.isfinite(p1) and abs(p1 / p0 - 1) < ppl_bound, (scheme, p0, p1)
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                 "model.layers.0.self_attn.o_proj.weight"):
        a, b = base.get_parameter(name), q.get_parameter(name)
        assert b.dtype == a.dtype and b.shape == a.shape
        rel = ((b - a).norm() / a.norm()).item()
        assert lo < rel < hi, f"{scheme} {name}: relative weight error {rel:.4f} outside ({lo}, {hi})"
    assert torch.equal(base.get_parameter("model.layers.0.mlp.router.weight"),
                       q.get_parameter("model.layers.0.mlp.router.weight"))  # routers stay as they were


@pytest.mark.parametrize("model_type,expert,router", [
    ("mixtral", "model.layers.0.block_sparse_moe.experts.3.w2", "model.layers.0.block_sparse_moe.gate"),
    ("qwen3_moe", "model.layers.0.mlp.experts.3.down_proj", "model.layers.0.mlp.gate"),
])
def test_other_families_keep_their_checkpoint_names(tmp_path, model_type, expert, router):
    """FP8 on a random tiny mixtral and qwen3_moe: experts quantized under the names the family's
    released checkpoints use, the router kept, and stock from_pretrained reads it back."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import tiny_model

    model = tiny_model(model_type)
    model.save_pretrained(tmp_path / "model")
    report = quantize_model(tmp_path / "model", tmp_path / "fp8", QuantizeConfig(scheme="FP8_DYNAMIC"))
    assert report["quantized_expert_weights"] == 24 and report["unquantized_expert_weights"] == 0
    t = tensors(tmp_path / "fp8")
    assert t[f"{expert}.weight"].dtype == torch.float8_e4m3fn and f"{expert}.weight_scale" in t
    assert t[f"{router}.weight"].dtype == torch.float32 and f"{router}.weight_scale" not in t
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8")
    name = "model.layers.0.mlp.experts.down_proj"
    a, b = model.get_parameter(name), back.get_parameter(name)
    assert 0 < ((b - a).norm() / a.norm()).item() < 0.04  # FP8, as above
