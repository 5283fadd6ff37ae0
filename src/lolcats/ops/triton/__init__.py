"""Fused Triton kernels: chunked linear / hybrid attention (training, prefill) and the decode step.

Importing this package needs ``triton``; ``lolcats.ops.triton_backend`` registers the kernels as
the ``triton`` attention backend. References: ``ops/{linear,hybrid,decode}/naive.py``.
"""

from __future__ import annotations

import torch

from lolcats.ops.common import EPS, State
from lolcats.ops.kinds import kind_id
from lolcats.ops.triton.chunked import CHUNK, ChunkedAttention

MAX_GRID_Y = 65_535  # CUDA's limit on a grid's second axis, where the kernels put batch x heads


def _rows_per_call(B: int, H: int) -> int:
    """Sequences per kernel call so that B x H programs fit the grid's second axis."""
    return max(1, min(B, MAX_GRID_Y // H))


def _rows(x: torch.Tensor | None, i: int, n: int) -> torch.Tensor | None:
    return None if x is None else x[i:i + n]


def linear_attention_triton(
    fq: torch.Tensor,  # (B, H, T, F)
    fk: torch.Tensor,  # (B, Hk, T, F)
    v: torch.Tensor,  # (B, Hk, T, Dv)
    initial_state: State | None = None,  # (kv (B, Hk, F, Dv), ks (B, Hk, F))
    output_final_state: bool = False,
    log_gate: torch.Tensor | None = None,  # (B, Hk, T) float32, <= 0
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, State | None]:
    """Same function as ``linear_attention_quadratic``: y (B, H, T, Dv) in v's dtype, float32 state."""
    n = _rows_per_call(*fq.shape[:2])
    if n < fq.shape[0]:  # batch x heads beyond the grid: in slices of the batch
        parts = [linear_attention_triton(fq[i:i + n], fk[i:i + n], v[i:i + n],
                                         None if initial_state is None else tuple(s[i:i + n] for s in initial_state),
                                         output_final_state, _rows(log_gate, i, n), chunk)
                 for i in range(0, fq.shape[0], n)]
        y = torch.cat([p[0] for p in parts])
        return y, (tuple(torch.cat(s) for s in zip(*(p[1] for p in parts))) if output_final_state else None)
    s0, z0 = initial_state if initial_state is not None else (None, None)
    y, kv, ks = ChunkedAttention.apply(None, None, v, fq, fk, None, s0, z0, log_gate, 0, 1, 1.0, EPS, chunk)
    return y, ((kv, ks) if output_final_state else None)


def hybrid_attention_triton(
    q: torch.Tensor,  # (B, H, T, D)
    k: torch.Tensor,  # (B, Hk, T, D)
    v: torch.Tensor,  # (B, Hk, T, Dv)
    fq: torch.Tensor,  # (B, H, T, F)
    fk: torch.Tensor,  # (B, Hk, T, F)
    window_factor: torch.Tensor,  # (H,) in (0, 1)
    kind: str = "sliding_window",
    window_size: int = 64,
    scale: float | None = None,
    log_gate: torch.Tensor | None = None,  # (B, Hk, T) float32, <= 0
    chunk: int = CHUNK,
) -> torch.Tensor:  # (B, H, T, Dv)
    """Same function as ``hybrid_attention_naive`` in its plain case (positions 0..T-1, no mask)."""
    if kind_id(kind) == 0:
        raise ValueError("hybrid attention needs a window kind (sliding_window or terraced_window), not linear")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    n = _rows_per_call(*q.shape[:2])
    if n < q.shape[0]:  # batch x heads beyond the grid: in slices of the batch
        return torch.cat([hybrid_attention_triton(q[i:i + n], k[i:i + n], v[i:i + n], fq[i:i + n], fk[i:i + n],
                                                  window_factor, kind, window_size, scale, _rows(log_gate, i, n), chunk)
                          for i in range(0, q.shape[0], n)])
    y, _, _ = ChunkedAttention.apply(q, k, v, fq, fk, window_factor, None, None, log_gate, kind_id(kind),
                                     window_size, scale, 0.0, chunk)
    return y


__all__ = ["linear_attention_triton", "hybrid_attention_triton"]
