"""A Phi-shaped model with the SentencePiece tokenizer llama.cpp's Phi-3 vocabulary reader
takes, and greedy decoding in transformers and in llama.cpp: shared by
``tests/test_engines_llama_cpp.py`` and ``bench/serve.py``."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

CORPUS = Path(__file__).parents[1] / "data" / "tinyshakespeare.txt"


def sentencepiece_tokenizer(folder: Path, text: str, vocab_size: int = 512):
    """A SentencePiece BPE (``folder/tokenizer.model``), the kind Phi-3.5-MoE ships, loaded as
    transformers loads Phi's (``LlamaTokenizer(vocab_file=...)`` in transformers 5 builds an
    empty vocabulary; ``from_pretrained`` converts the model file)."""
    import json

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1, minloglevel=2,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tok = LlamaTokenizer.from_pretrained(folder)
    assert len(tok) == vocab_size, f"the tokenizer read {len(tok)} of {vocab_size} pieces"
    return tok


FAMILY_DEFAULTS = {  # Phi-3.5-MoE's biases and router noise; Mixtral has neither
    "phimoe": {"attention_bias": True, "lm_head_bias": True, "router_jitter_noise": 0.01, "input_jitter_noise": 0.0},
    "mixtral": {"router_jitter_noise": 0.0},
}


def moe_with_sentencepiece(folder: Path, text: str, model_type: str = "phimoe", train_steps: int = 0, seed: int = 0,
                           **shape):
    """A phimoe or mixtral (``shape`` overrides a Phi-mini-like tiny default: head_dim =
    hidden / heads) with a SentencePiece tokenizer trained on ``text``, optionally trained
    ``train_steps`` AdamW steps on ``text`` so greedy choices are decided by margins well above
    float noise; saved to ``folder`` like a checkpoint. Returns ``folder``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = sentencepiece_tokenizer(folder, text)
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **{
        "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
        "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2, **FAMILY_DEFAULTS[model_type], **shape})
    model = AutoModelForCausalLM.from_config(cfg)
    if train_steps:
        ids = torch.tensor(tok(text)["input_ids"])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(train_steps):
            starts = torch.randint(0, len(ids) - 65, (8,), generator=gen)
            batch = torch.stack([ids[s:s + 65] for s in starts])
            model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss.backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@contextmanager
def llama_cpp_phimoe_math(model):
    """Make a transformers PhiMoE compute what llama.cpp's PhiMoE computes, read from its
    source (``src/models/phi3.cpp``, the graph ``llama_model_phimoe`` reuses): every LayerNorm
    becomes ``build_norm(..., LLM_NORM_RMS)`` (RMS normalisation, then weight and bias), and
    routing is ``build_moe_ffn(..., norm_w=true, LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX)``:
    softmax over all experts, top-k, weights renormalised to sum to one, in place of
    transformers' ``sparsemixer``. An independent reference for llama.cpp's output."""
    import transformers.models.phimoe.modeling_phimoe as phimoe

    def softmax_top_k(scores, jitter_eps, training, top_k=2):
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(top_k, dim=-1)
        return (weights / weights.sum(-1, keepdim=True)).to(scores.dtype), experts

    def rms_forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias).to(x.dtype)

    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    saved = phimoe.sparsemixer
    phimoe.sparsemixer = softmax_top_k
    for m in norms:
        m.forward = rms_forward.__get__(m)
    try:
        yield model
    finally:
        phimoe.sparsemixer = saved
        for m in norms:
            del m.forward


def held_out_prompt(tokenizer, n: int = 24) -> list[int]:
    """The first ``n`` tokens of the first speech in the corpus's last 20k characters."""
    tail = CORPUS.read_text()[-20_000:]
    speech = tail[tail.index("\n\n") + 2:][:1000]
    ids = tokenizer(speech)["input_ids"][:n]
    assert len(ids) == n
    return ids


def transformers_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy ``generate``: the new tokens and the logits that chose each."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), torch.stack([step[0] for step in out.logits])


def llama_cpp_model(gguf: Path, logits_all: bool = True, kv_f32: bool = True):
    """llama.cpp on CPU; ``kv_f32`` keeps the KV cache in float32 (llama.cpp's default is
    float16, which alone moves float32 logits by ~1e-3)."""
    import llama_cpp

    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if kv_f32 else {}
    return llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=min(2, os.cpu_count() or 1),
                           logits_all=logits_all, verbose=False, **kv)


def llama_cpp_greedy(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """llama.cpp's greedy continuation, step by step: evaluate, take the argmax of the last
    logits (``logits_all`` model), repeat; the tokens and the logits that chose each."""
    llm.reset()
    llm.eval(prompt)
    tokens, logits = [], []
    for _ in range(new_tokens):
        step = torch.tensor(llm.scores[llm.n_tokens - 1], dtype=torch.float32)
        logits.append(step)
        tokens.append(int(step.argmax()))
        llm.eval([tokens[-1]])
    return tokens, torch.stack(logits)
