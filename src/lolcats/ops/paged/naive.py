"""One decode step of softmax attention over a key/value store, contiguous or paged: the references.

A contiguous store (``attention/cache.py``'s full ``KVState``) holds position t of row b in slot t of its
(B, Hk, N, D) keys and values (:func:`kv_decode_naive`). A paged store (``PagedKVState``) is a pool of rows
``(pages * page, Hk, D)`` shared by every sequence; sequence b's position t lives in pool row
``table[b, t // page] * page + t % page``. A query at position
``pos[b]`` attends positions 0 .. pos[b] (a full store: every earlier position is kept), its G = H / Hk query
heads sharing their KV head. The paged reference gathers the first ``length`` positions of every row into a
contiguous store and runs the contiguous one, masked scaled-dot-product attention; ``ops/triton/paged.py`` reads
either store in place instead (split-K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kv_decode_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """q (B, H, 1, D), k / v (B, Hk, N, D | Dv) with slot t holding position t, pos (B,) int64 (pos < N): each row's
    query attends slots 0 .. pos[b] -> (B, H, 1, Dv)."""
    B, H, _, D = q.shape
    Hk, N = k.shape[1], k.shape[2]
    mask = (torch.arange(N, device=q.device)[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, N)
    y = F.scaled_dot_product_attention(q.reshape(B, Hk, H // Hk, D), k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                       scale=scale)  # (B, Hk, G, Dv): a group's query heads as query rows
    return y.reshape(B, H, 1, -1)


def paged_decode_naive(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                       pos: torch.Tensor, page: int, length: int, scale: float) -> torch.Tensor:
    """q (B, H, 1, D), pools (R, Hk, D) / (R, Hk, Dv), table (B, M) int64, pos (B,) int64 (pos < length)
    -> (B, H, 1, Dv)."""
    t = torch.arange(length, device=q.device)
    rows = table[:, t // page] * page + t % page  # (B, L)
    k, v = k_pool[rows].transpose(1, 2), v_pool[rows].transpose(1, 2)  # (B, Hk, L, D)
    return kv_decode_naive(q, k, v, pos, scale)
