"""How the teacher cache stores top-k log-probabilities and token ids (format 3).

Log-probs: the log-softmax is computed in float32 (:func:`slimmoe.losses.teacher_topk`), then
``float16`` (default) and ``bfloat16`` clamp it at ``LOGPROB_FLOOR`` (-1e4) and round once, to
nearest; ``float32`` stores it bit for bit. The floor: float16's range ends at -65504, exp() of
anything below about -104 is 0 in float32 (the losses cannot tell such values apart), and a
-inf (a masked logit) would turn a loss term into 0 x inf. Storing log-probabilities rather
than probabilities keeps every probability's relative error at |log p| x 2^-11 in float16
(0.05% at p = 0.37, 0.5% at p = 4.5e-5) and |log p| x 2^-8 in bfloat16; near p = 1 float16's
subnormals keep the residual mass 1 - p to ~6e-8. Decoding is exact (every stored value is a
float32 value): the losses get float32.

Ids: ``uint16`` when the vocabulary has at most 65536 entries (Phi's 32,064), else ``int32``;
read back as int64.
"""

from __future__ import annotations

import numpy as np
import torch

LOGPROB_FLOOR = -1.0e4  # 16-bit modes clamp log-probs below this (module docstring)
LOGPROB_DTYPES = {"float16": ("f16", np.float16), "bfloat16": ("bf16", np.uint16), "float32": ("f32", np.float32)}
INDEX_DTYPES = {"uint16": ("u16", np.uint16), "int32": ("i32", np.int32)}
UINT16_VOCAB = 1 << 16  # the largest vocabulary whose ids fit uint16


def index_dtype(vocab_size: int | None) -> str:
    """The smallest id dtype of a vocabulary: uint16 up to 65536 ids, else (or unknown) int32."""
    return "uint16" if vocab_size is not None and 0 < vocab_size <= UINT16_VOCAB else "int32"


def bytes_per_token(k: int, logprobs_dtype: str = "float16", vocab_size: int | None = None) -> int:
    """Bytes an entry holds per token: k log-probs and k ids."""
    lp = np.dtype(LOGPROB_DTYPES[logprobs_dtype][1]).itemsize
    return k * (lp + np.dtype(INDEX_DTYPES[index_dtype(vocab_size)][1]).itemsize)


def file_suffixes(index: dict) -> tuple[tuple[str, np.dtype], tuple[str, np.dtype]]:
    """(file suffix, numpy dtype on disk) of the log-probs and of the ids."""
    lp_ext, lp_np = LOGPROB_DTYPES[index["logprobs_dtype"]]
    idx_ext, idx_np = INDEX_DTYPES[index["indices_dtype"]]
    return (f"logprobs.{lp_ext}", np.dtype(lp_np)), (f"indices.{idx_ext}", np.dtype(idx_np))


def encode_logprobs(lp: torch.Tensor, dtype: str) -> bytes:
    """float32 top-k log-probs as stored: float32 as they are; 16-bit ones clamped to
    ``LOGPROB_FLOOR`` and rounded once to nearest (bfloat16 as its raw bits)."""
    lp = lp.detach().to("cpu", torch.float32)
    if dtype != "float32":
        lp = lp.clamp(min=LOGPROB_FLOOR).to(torch.float16 if dtype == "float16" else torch.bfloat16)
        if dtype == "bfloat16":
            lp = lp.view(torch.int16)
    return lp.contiguous().numpy().tobytes()


def decode_logprobs(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored log-probs back to float32 (exact: every stored value is a float32 value)."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def encode_ids(idx: torch.Tensor, dtype: str, vocab: int) -> bytes:
    if dtype == "uint16" and vocab > UINT16_VOCAB:
        raise ValueError(f"teacher cache: the teacher has {vocab} logits per position, more than uint16 ids hold; "
                         "the entry was created for a vocabulary of at most 65536")
    return idx.detach().to("cpu", torch.int32).contiguous().numpy().astype(INDEX_DTYPES[dtype][1]).tobytes()
