"""One decode step of softmax attention over a paged key/value store: the reference.

The store (``attention/cache.py``'s ``PagedKVState``) is a pool of rows ``(pages * page, Hk, D)`` shared by every
sequence; sequence b's position t lives in pool row ``table[b, t // page] * page + t % page``. A query at position
``pos[b]`` attends positions 0 .. pos[b] (a full store: every earlier position is kept), its G = H / Hk query
heads sharing their KV head. The reference gathers the first ``length`` positions of every row and runs masked
scaled-dot-product attention over them; ``ops/triton/paged.py`` reads the pages in place instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_decode_naive(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                       pos: torch.Tensor, page: int, length: int, scale: float) -> torch.Tensor:
    """q (B, H, 1, D), pools (R, Hk, D) / (R, Hk, Dv), table (B, M) int64, pos (B,) int64 (pos < length)
    -> (B, H, 1, Dv)."""
    B, H, _, D = q.shape
    Hk = k_pool.shape[1]
    t = torch.arange(length, device=q.device)
    rows = table[:, t // page] * page + t % page  # (B, L)
    k, v = k_pool[rows].transpose(1, 2), v_pool[rows].transpose(1, 2)  # (B, Hk, L, D)
    mask = (t[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, L)
    y = F.scaled_dot_product_attention(q.reshape(B, Hk, H // Hk, D), k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                       scale=scale)  # (B, Hk, G, Dv): a group's query heads as query rows
    return y.reshape(B, H, 1, -1)
