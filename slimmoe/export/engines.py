"""What each serving engine loads: the ``architectures`` name it registers for every MoE
family slimmoe produces (keyed by config.json's ``model_type``), and the limits of its
implementation that a slimmed model can break.

Names and rules are read from the engines' own source (checked 2026-12):

- vLLM: ``vllm/model_executor/models/registry.py`` (``_TEXT_GENERATION_MODELS``: e.g.
  ``"PhiMoEForCausalLM": ("phimoe", "PhiMoEForCausalLM")``); top-2 from
  ``vllm/model_executor/models/phimoe.py`` ``phimoe_routing_function``:
  ``assert topk == 2, "Only top-2 routing is supported"``.
  Its ``PhiMoEAttention`` builds ``qkv_proj``/``o_proj`` with ``bias=True`` and its lm_head with
  ``bias=True``; it normalises with ``nn.LayerNorm`` and routes with ``sparsemixer`` as
  transformers does (``jitter_eps`` fixed at 0.01, Phi-3.5-MoE's ``router_jitter_noise``).
- SGLang: ``python/sglang/srt/models/<family>.py`` ``EntryClass`` (``phimoe.py``:
  ``EntryClass = PhiMoEForCausalLM``; ``deepseek_v2.py`` lists ``DeepseekV3ForCausalLM``).
  SGLang's PhiMoE reads ``head_dim`` from the config.
- llama.cpp: ``convert_hf_to_gguf.py`` ``@ModelBase.register(...)`` lines
  (``@ModelBase.register("PhiMoEForCausalLM") class PhiMoeModel(Phi3MiniModel)``; Mixtral
  goes through ``LlamaModel``). ``PhiMoeModel`` inherits ``Phi3MiniModel``'s hyper-parameters,
  which derive the head size as hidden_size / num_attention_heads and ignore ``head_dim``
  (llama.cpp issue 22524: such a checkpoint converts to a broken GGUF): in
  ``Phi3MiniModel.set_gguf_parameters``, ``rope_dims = int(rot_pct * n_embd) // n_head``.
  The same class also reads ``rope_parameters["original_max_position_embeddings"]`` and a
  SentencePiece ``tokenizer.model`` (or a GPT2Tokenizer llama.cpp recognises); a model
  without them fails inside the converter, which ``slimmoe export`` reports as one line.
  The runtime's ``src/models/phimoe.cpp`` (``llama_model_phimoe::load_arch_tensors``) creates
  ``output.bias`` and every layer's ``attn_output.bias`` as required tensors (flag 0, not
  ``TENSOR_NOT_REQUIRED``), and ``n_embd_head = n_embd / n_head`` again: a PhiMoE without the
  lm_head and attention biases Phi-3.5-MoE has converts but does not load. vLLM and SGLang
  build them as parameters too; ``slimmoe/export/biases.py`` adds them as zeros for all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from slimmoe.errors import UserError

Check = Callable[[dict], "str | None"]  # config.json -> the broken limit in words, or None
Fixup = Callable[[dict], dict]  # config.json -> the config.json the engine's loader needs (same model)


@dataclass(frozen=True)
class Engine:
    name: str  # as typed after --for
    label: str  # as written in messages
    architectures: dict[str, str]  # model_type -> the architectures name the engine registers
    checks: dict[str, tuple[Check, ...]]  # model_type -> its limits in this engine
    fixups: dict[str, Fixup] = field(default_factory=dict)  # model_type -> keys its loader insists on
    caveats: dict[str, str] = field(default_factory=dict)  # model_type -> how the engine's math differs


def _phimoe_top2(cfg: dict) -> str | None:
    k = cfg.get("num_experts_per_tok")
    if k != 2:
        return f"PhiMoE in vLLM routes top-2 only; this model has num_experts_per_tok={k}"
    return None


def _phimoe_head_dim(cfg: dict) -> str | None:
    hidden, heads, head_dim = cfg.get("hidden_size"), cfg.get("num_attention_heads"), cfg.get("head_dim")
    if head_dim is None or not hidden or not heads:
        return None
    if head_dim * heads != hidden:
        return (f"llama.cpp's PhiMoE converter ignores head_dim and uses hidden_size / num_attention_heads "
                f"({hidden} / {heads}); this model has head_dim={head_dim} (llama.cpp issue 22524)")
    return None


def _phimoe_original_context(cfg: dict) -> dict:
    """llama.cpp's ``Phi3MiniModel.set_gguf_parameters`` reads
    ``rope_parameters["original_max_position_embeddings"]`` unconditionally (a ``KeyError``
    otherwise; the top-level key is mirrored into it). transformers 5 writes neither for a
    model without long-context rope scaling, whose trained context is then
    ``max_position_embeddings``; with no ``long_factor`` llama.cpp only records the value."""
    rope = cfg.get("rope_parameters") or {}
    if "original_max_position_embeddings" in rope or "original_max_position_embeddings" in cfg:
        return cfg
    return {**cfg, "original_max_position_embeddings": cfg.get("max_position_embeddings")}


# Today all three engines register every family under the same name (each read from its own
# source, above); an engine that diverges gets its own table.
_REGISTERED = {
    "phimoe": "PhiMoEForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "granitemoe": "GraniteMoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}

VLLM = Engine(
    name="vllm", label="vLLM",
    architectures=dict(_REGISTERED),
    checks={"phimoe": (_phimoe_top2,)},
)

SGLANG = Engine(
    name="sglang", label="SGLang",
    architectures=dict(_REGISTERED),
    checks={},
)

LLAMA_CPP = Engine(
    name="llama.cpp", label="llama.cpp",
    architectures=dict(_REGISTERED),
    checks={"phimoe": (_phimoe_head_dim,)},
    fixups={"phimoe": _phimoe_original_context},
    caveats={"phimoe": (
        "llama.cpp computes PhiMoE with RMSNorm and softmax top-2 routing (src/models/phi3.cpp) where the "
        "model uses LayerNorm and sparsemixer, so its outputs differ from transformers' and vLLM's "
        "(make test-engines measures it); vLLM serves this model as trained")},
)

ENGINES: dict[str, Engine] = {e.name: e for e in (VLLM, SGLANG, LLAMA_CPP)}


def get_engine(name: str) -> Engine:
    if name not in ENGINES:
        raise UserError(f"--for: unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    return ENGINES[name]


def engine_caveat(engine: Engine, cfg: dict) -> str | None:
    """How ``engine`` computes this family differently from transformers, or None."""
    return engine.caveats.get(cfg.get("model_type"))


def engine_config(engine: Engine, cfg: dict) -> dict:
    """``cfg`` with the keys ``engine``'s loader needs and transformers leaves out filled in."""
    fixup = engine.fixups.get(cfg.get("model_type"))
    return fixup(cfg) if fixup else cfg


def check_config(engine: Engine, cfg: dict) -> str:
    """The ``architectures`` name ``engine`` loads this config.json as; a ``UserError``
    naming the limit when the engine lacks the family or the model breaks one of its limits."""
    model_type = cfg.get("model_type")
    if model_type not in engine.architectures:
        known = ", ".join(sorted(engine.architectures))
        raise UserError(f"--for {engine.name}: {engine.label} has no implementation for model_type "
                        f"{model_type!r} here; supported: {known}")
    for check in engine.checks.get(model_type, ()):
        broken = check(cfg)
        if broken:
            raise UserError(f"--for {engine.name}: {broken}")
    return engine.architectures[model_type]
