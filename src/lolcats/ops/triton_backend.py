"""Registers the ``triton`` attention backend (fused kernels in ``ops/triton``).

Imported lazily by :func:`lolcats.ops.get_backend`; without ``triton`` the ImportError is
swallowed there and ``auto`` falls back to ``torch``. The kernels run on CUDA tensors; CPU
tensors are accepted only when ``LOLCATS_TRITON_ON_CPU=1`` (tests, with ``TRITON_INTERPRET=1``),
so ``auto`` keeps choosing ``torch`` on CPU.
"""

from __future__ import annotations

import os

import torch

import triton  # noqa: F401  (ImportError here means: no triton backend)
from lolcats.ops import BACKENDS, Backend, register_backend
from lolcats.ops.triton import hybrid_attention_triton, linear_attention_triton
from lolcats.ops.triton.activation import silu_mul_triton
from lolcats.ops.triton.decode import decode_step_triton
from lolcats.ops.triton.feature_map import hedgehog_triton
from lolcats.ops.triton.norm import add_rms_norm_triton, rms_norm_triton
from lolcats.ops.triton.paged import kv_decode_triton, paged_decode_triton
from lolcats.ops.triton.rope_feature_map import rope_hedgehog_triton
from lolcats.ops.triton.sparse import sparse_prefill_triton
from lolcats.ops.triton.sparse import supports as sparse_supports


def supports(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("LOLCATS_TRITON_ON_CPU") == "1"


def _hybrid(q, k, v, fq, fk, window_factor, kind, window_size, scale, log_gate=None):
    return hybrid_attention_triton(q, k, v, fq, fk, window_factor, kind, window_size, scale, log_gate)


def _sparse_chunk(state, q, k, v, fq, fk, pos, valid, window_factor, kind, window_size, scale, score, sink=0):
    """The fused sparse-cache prefill where it applies (terraced window, no gradient; it writes the window slots
    too), else the reference."""
    if not sparse_supports(kind, score, q, k, v, fq, fk, window_factor, window=window_size):
        return BACKENDS["torch"].sparse_chunk(state, q, k, v, fq, fk, pos, valid, window_factor, kind, window_size,
                                              scale, score, sink)
    return sparse_prefill_triton(state, q, k, v, fq, fk, pos, valid, window_factor, window_size, scale, score, sink)


register_backend(Backend("triton", linear=linear_attention_triton, hybrid=_hybrid, decode=decode_step_triton,
                         supports=supports, hedgehog=hedgehog_triton, rope_hedgehog=rope_hedgehog_triton,
                         fused=frozenset({"linear", "hybrid"}), sparse_chunk=_sparse_chunk,
                         sparse_fused=sparse_supports, paged_decode=paged_decode_triton,
                         kv_decode=kv_decode_triton, rms_norm=rms_norm_triton, add_rms_norm=add_rms_norm_triton,
                         silu_mul=silu_mul_triton))
