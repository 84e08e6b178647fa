"""Tiny random MoE models of every supported family, for tests and benchmarks.

Shapes are chosen so every slimming axis can be exercised: 4 experts, 4 query heads in
2 KV groups, intermediate 16, hidden 32, 2 layers.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96

COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

CONFIGS: dict[str, dict] = {
    "phimoe": dict(intermediate_size=16, num_local_experts=4, attention_bias=True),
    "mixtral": dict(intermediate_size=16, num_local_experts=4),
    "qwen2_moe": dict(
        intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_experts=4, qkv_bias=True, decoder_sparse_step=1, mlp_only_layers=[],
    ),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=16, num_experts=4, head_dim=8,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "olmoe": dict(intermediate_size=16, num_experts=4),
    "granitemoe": dict(intermediate_size=16, num_local_experts=4),
    "deepseek_v3": dict(
        intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
        n_group=1, topk_group=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4,
    ),
}


def tiny_config(model_type: str, **overrides):
    kw = {**COMMON, **CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A randomly initialised tiny model in eval mode with non-trivial weights everywhere."""
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)  # larger than the default init so masking is visible
            elif "norm" not in name:
                p.normal_(0, 0.1)  # biases, router score corrections
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.01)
    return model.eval()


def tiny_teacher_with_tokenizer(folder, corpus_chars: int = 20000, model_type: str = "phimoe", **overrides):
    """A tiny MoE plus a BPE tokenizer (vocab 300) trained on the start of the bundled
    corpus, saved like a real checkpoint: ``folder/model`` and the text ``folder/corpus.txt``."""
    from pathlib import Path

    from slimmoe.io.tokenizer import train_bpe_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "corpus.txt"
    corpus = Path(__file__).parents[1] / "data" / "tinyshakespeare.txt"
    text.write_text(corpus.read_text()[:corpus_chars])
    tok = train_bpe_tokenizer(text, vocab_size=300)
    tiny_model(model_type, vocab_size=len(tok), **overrides).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return folder / "model", text
