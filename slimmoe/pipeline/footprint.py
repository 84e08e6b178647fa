"""What one step of a pipeline needs per process (rank), from config.json alone.

Shapes come from a model built on the meta device (no weights, no memory): P its
parameters, R those outside the decoder layers (embeddings, final norm, head), Lmax
the largest decoder layer, Tmax the largest tensor in a layer (the fused gate_up of
the experts). Sizes: b sequences of T tokens, hidden H, L layers, vocabulary V, W
processes; ``shard(x) = ceil(x / W)``. Byte widths: ``dt`` the teacher's stored dtype
(config.json's ``dtype``/``torch_dtype``; float32 when absent), ``ds`` a saved model's
(distill.save_dtype, auto = the teacher's), ``a`` the compute dtype of training (2 for
bf16/fp16 mixed precision, ``auto`` counted as bf16; 4 for ``no``).

**Activations per token and decoder layer** (elements ``A_i``; what backward keeps):
attention ``2H`` (residual and normed input) + the outputs of its input projections
(``(nq + 2kv)·hd``) + the input of its output projection (``nq·hd``); an MoE layer
``2H + E + k·(2H + 3I)`` (router logits, and per routed copy its input, gate/up
``2I``, activated product ``I``, output ``H``) + ``3S + H`` with shared experts of width
S; a dense layer ``2H + 3D``. ``A = Σ_i A_i``; with gradient checkpointing
``A_ckpt = L·H + max_i A_i`` (each layer's input, plus one layer recomputed). A
forward without gradient holds one layer: ``max_i A_i``.
Chunked losses hold ``min(chunk, b·T)·V·4·2`` bytes (fp32 logits and log-softmax of
one chunk); the teacher's top-k is taken 4096 positions at a time.

**distill** (student in fp32 master weights, AdamW with 2 fp32 moments; ``micro`` =
distill.micro_batch_size or batch_size / W; sharding fsdp by default when W > 1):

* FSDP2: weights ``shard(4P) + a·(R + 2·Lmax)`` (the root and two layers, this one and
  the prefetched next, gathered in the compute dtype); grads ``shard(4P) + 4·(R + Lmax)``
  (unsharded gradients before their fp32 reduce-scatter), or ``shard(4P) + 4P`` when a step
  accumulates several micro-batches (batch_size > micro x W: slimmoe.distill.runtime turns
  gradient sync off for all but the last, and FSDP2 then keeps every unsharded gradient, in
  fp32, until it); optimizer ``shard(8P)``.
* DDP / one process: weights ``4P`` (+ ``2P`` of bf16 autocast copies when a = 2); grads
  ``4P`` (+ ``4P`` of DDP communication buckets with DDP); optimizer ``8P``.
* activations ``b·T·a·A`` (``A_ckpt`` with checkpointing) + logits and their gradient
  buffer ``b·T·V·a·2`` (one more buffer when KD is mixed with LM loss, alpha < 1) + one
  loss chunk.
* teacher (``live``): its weights ``dt·P_t`` (FSDP: ``shard(dt·P_t) + dt·(R_t + 2·Lmax_t)``)
  plus a forward of the micro-batch ``b·T·dt·(max A_t + V)`` and one top-k chunk; live
  without a teacher cache, and whenever distill.eval_every is set (held-out KL runs it).
  ``resident`` (its weights only): the run that builds the cache keeps the teacher it built
  it with (slimmoe.distill.loop.Trainer.open_teacher). ``none`` (0): a complete cache from
  an earlier stage, or loss lm, without eval_every.

**teacher_cache** (built once per cache key, before the first optimizer step): the
student's fp32 weights (sharded as above, nothing gathered) + the teacher as in distill,
forward of one micro-batch.

**importance** (the current model in its stored dtype ``ds``, no optimizer): weights
``ds·P`` (W > 1: ``shard(ds·P) + ds·(R + 2·Lmax)``); grads ``ds·Lmax + (ds + 8)·Tmax``
(hooks fold each scored gradient into the scores and free it: at most one layer's, plus
the product w·dL/dw of the largest tensor and its float64 copy; W > 1: of the rows held
here, ``shard(Tmax)``, slimmoe.prune.shards); teacher as in distill from stage 2 on (loaded
even with loss lm, then without its forward; stage 1 scores against itself: 0); activations
``b·T·ds·A + b·T·V·ds·2 + one chunk`` with b = importance.batch_size per process and T =
data.seq_len. The float64 score sums live on the CPU and are not counted.

**evaluate** (one process; with G = nproc_per_node GPUs each model is spread over all of
them by ``device_map="auto"``, layer by layer): weights ``ds·P`` (G > 1: ``shard(ds·P, G) +
ds·Lmax``, one layer for the uneven split); teacher ``dt·P_t`` likewise spread, + a forward
of eval.batch_size blocks when eval.kl_to_teacher; activations a forward of
``max(eval.batch_size, throughput_batch_sizes)`` blocks: ``b·T·ds·(max A + V)`` + one
chunk, all counted on one device (conservative).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

from slimmoe.arch import get_adapter
from slimmoe.prune.schedule import estimate_total_params

KEYS = ("weights", "grads", "optimizer", "teacher", "activations")
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8, "double": 8,
               "float8_e4m3fn": 1, "float8_e5m2": 1}
TOPK_CHUNK = 4096  # positions per chunk of losses.teacher_topk and of the importance loss
EVAL_CHUNK = 1024  # positions per chunk of the evaluate step's KL
LOSS_CHUNK_BYTES = 4 * 2  # fp32 logits + log-softmax of one chunk, per position and vocabulary entry


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs of one model, counted on the meta device."""

    params: int  # P: every parameter (tied embeddings once)
    estimated: int  # slimmoe.prune.schedule.estimate_total_params of the same config
    root: int  # R: parameters outside the decoder layers
    layer_max: int  # Lmax: parameters of the largest decoder layer
    tensor_max: int  # Tmax: elements of the largest tensor in a decoder layer
    act_layers: tuple[int, ...]  # A_i: activation elements per token of each decoder layer
    score_elements: int  # float64 importance scores: E·I + E + S per MoE layer, KV per layer
    hidden: int
    vocab: int
    dtype: str  # stored dtype (config.json)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 4)

    @property
    def layers(self) -> int:
        return len(self.act_layers)

    def activations(self, checkpointing: bool = False) -> int:
        """Elements per token that backward keeps over all layers (A, or A_ckpt)."""
        if checkpointing:
            return self.layers * self.hidden + max(self.act_layers)
        return sum(self.act_layers)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "act_layers"}


def config_dtype(config) -> str:
    """The stored dtype config.json names (``dtype``, or the older ``torch_dtype``); float32 if none."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(d).replace("torch.", "") if d else "float32"


def model_shape(config) -> ModelShape:
    """Build ``config``'s model on the meta device and measure it (no weights are read or made)."""
    import torch
    from transformers import AutoModelForCausalLM

    from slimmoe.io.loading import load_policy

    adapter = get_adapter(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                                 trust_remote_code=load_policy().trust_remote_code)
    layers = list(adapter.layers(model))
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    params = sum(p.numel() for p in model.parameters())
    blocks = {b.layer_idx: b for b in adapter.moe_blocks(model)}
    H = int(config.hidden_size)
    k = adapter.top_k(config)
    acts, scores = [], 0
    for i, layer in enumerate(layers):
        attn = adapter.attention(layer)
        kv = adapter.num_kv_heads(config)
        scores += kv
        a = 2 * H + _attention_elements(attn)
        b = blocks.get(i)
        if b is not None:
            E, I = b.experts.gate_up_proj.shape[0], b.experts.gate_up_proj.shape[1] // 2
            S = sum(m.gate_proj.weight.shape[0] for m in b.shared)
            a += 2 * H + E + k * (2 * H + 3 * I) + ((3 * S + H) if S else 0)
            scores += E * I + E + S
        else:
            a += 2 * H + 3 * _dense_width(layer, attn)
        acts.append(int(a))
    return ModelShape(params=int(params), estimated=estimate_total_params(config), root=int(params - sum(sizes)),
                      layer_max=int(max(sizes)), tensor_max=int(max(p.numel() for l in layers for p in l.parameters())),
                      act_layers=tuple(acts), score_elements=int(scores), hidden=H, vocab=int(config.vocab_size),
                      dtype=config_dtype(config))


def _attention_elements(attn) -> int:
    """Outputs of the attention's input projections + the input of its output projection."""
    from torch import nn

    n = 0
    for name, m in attn.named_modules():
        if isinstance(m, nn.Linear):
            n += m.in_features if name.split(".")[-1] == "o_proj" else m.out_features
    return n


def _dense_width(layer, attn) -> int:
    """D of a dense MLP layer: the input width of its down projection."""
    inside = {id(m) for m in attn.modules()}
    for name, m in layer.named_modules():
        if name.split(".")[-1] == "down_proj" and id(m) not in inside:
            return int(m.in_features)
    return 0


@dataclass
class Memory:
    """Bytes per process of one step, by what holds them."""

    weights: int = 0
    grads: int = 0
    optimizer: int = 0
    teacher: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.teacher + self.activations

    def as_dict(self) -> dict[str, int]:
        return {**{k: int(getattr(self, k)) for k in KEYS}, "total": int(self.total)}


def shard(nbytes: int, world: int) -> int:
    return -(-int(nbytes) // world)


def compute_bytes(mixed_precision: str) -> int:
    """a: 4 without mixed precision, else 2 (``auto`` counts as bf16: the plan is for a GPU)."""
    return 4 if mixed_precision == "no" else 2


def resident(m: ModelShape, nbytes: int, gathered: int, world: int, fsdp: bool) -> int:
    """A model's weights at ``nbytes`` per parameter: whole, or an FSDP2 shard plus the root
    and two decoder layers gathered at ``gathered`` bytes per parameter."""
    if not fsdp:
        return m.params * nbytes
    return shard(m.params * nbytes, world) + gathered * (m.root + 2 * m.layer_max)


def forward_bytes(m: ModelShape, tokens: int, nbytes: int, chunk: int = TOPK_CHUNK) -> int:
    """A forward without gradient of ``tokens`` tokens: one layer's activations, the logits
    and one fp32 chunk of the vocabulary-sized softmax that follows."""
    return tokens * nbytes * (max(m.act_layers) + m.vocab) + min(chunk, tokens) * m.vocab * LOSS_CHUNK_BYTES


def live_teacher(t: ModelShape, micro: int, seq_len: int, world: int, fsdp: bool, forward: bool = True) -> int:
    dt = t.dtype_bytes
    return resident(t, dt, dt, world, fsdp) + (forward_bytes(t, micro * seq_len, dt) if forward else 0)


def distill_memory(s: ModelShape, t: ModelShape, *, micro: int, seq_len: int, world: int, sharding: str,
                   a: int, checkpointing: bool, chunk: int, loss_buffers: int, teacher: str,
                   accumulate: bool) -> Memory:
    """The distill step per process (module docstring); ``teacher``: live, resident or none;
    ``accumulate``: several micro-batches per step."""
    fsdp = sharding == "fsdp" and world > 1
    P, tokens = s.params, micro * seq_len
    if fsdp:
        weights = resident(s, 4, a, world, True)
        grads = shard(4 * P, world) + 4 * (P if accumulate else s.root + s.layer_max)
        optimizer = shard(8 * P, world)
    else:
        weights = 4 * P + (2 * P if a == 2 else 0)
        grads = 4 * P + (4 * P if sharding == "ddp" and world > 1 else 0)
        optimizer = 8 * P
    acts = (tokens * a * s.activations(checkpointing) + tokens * s.vocab * a * (1 + loss_buffers)
            + min(chunk, tokens) * s.vocab * LOSS_CHUNK_BYTES)
    held = 0 if teacher == "none" else live_teacher(t, micro, seq_len, world, fsdp, forward=teacher == "live")
    return Memory(weights, grads, optimizer, held, acts)


def cache_memory(s: ModelShape, t: ModelShape, *, micro: int, seq_len: int, world: int, sharding: str) -> Memory:
    """Building the teacher cache: the student's fp32 weights, the teacher and its forward."""
    fsdp = sharding == "fsdp" and world > 1
    weights = shard(4 * s.params, world) if fsdp else 4 * s.params
    return Memory(weights=weights, teacher=live_teacher(t, micro, seq_len, world, fsdp))


def importance_memory(m: ModelShape, t: ModelShape | None, *, batch: int, seq_len: int, world: int,
                      teacher_forward: bool = True) -> Memory:
    """Scoring ``m`` (against the teacher ``t`` from stage 2 on, None at stage 1; loaded even
    with loss lm, which does not run it: ``teacher_forward`` False)."""
    ds, sharded, tokens = m.dtype_bytes, world > 1, batch * seq_len
    weights = resident(m, ds, ds, world, sharded)
    grads = ds * m.layer_max + (ds + 8) * (shard(m.tensor_max, world) if sharded else m.tensor_max)
    teacher = live_teacher(t, batch, seq_len, world, sharded, teacher_forward) if t is not None else 0
    acts = (tokens * ds * m.activations() + 2 * tokens * m.vocab * ds
            + min(TOPK_CHUNK, tokens) * m.vocab * LOSS_CHUNK_BYTES)
    return Memory(weights=weights, grads=grads, teacher=teacher, activations=acts)


def spread(m: ModelShape, devices: int) -> int:
    """Bytes of ``m``'s weights on the fullest of ``devices`` (device_map="auto" places whole
    layers, so one layer more than an even share)."""
    if devices <= 1:
        return m.params * m.dtype_bytes
    return shard(m.params * m.dtype_bytes, devices) + m.layer_max * m.dtype_bytes


def evaluate_memory(m: ModelShape, t: ModelShape | None, *, batch: int, kl_batch: int, seq_len: int,
                    devices: int = 1) -> Memory:
    """The evaluate step: one process, whole models in their stored dtype, each spread over
    ``devices`` GPUs."""
    teacher = 0
    if t is not None:
        teacher = spread(t, devices) + forward_bytes(t, kl_batch * seq_len, t.dtype_bytes, EVAL_CHUNK)
    return Memory(weights=spread(m, devices), teacher=teacher,
                  activations=forward_bytes(m, batch * seq_len, m.dtype_bytes, EVAL_CHUNK))


def with_dtype(m: ModelShape, dtype: str) -> ModelShape:
    """The same model saved in another dtype."""
    return m if dtype == m.dtype else ModelShape(**{**asdict(m), "dtype": dtype})
