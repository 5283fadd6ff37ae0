"""Sparse global cache (LoLA, arXiv 2505.23666): which pairs it keeps, and the eviction step.

Not a reference: there is no kernel of it, and every path (the reference decode step and prefill, the
Triton decode step) runs these functions.

With ``attention.sparse_cache = G > 0`` each KV head keeps, beside the window and the linear state
(kv, ks), up to G key-value pairs that left the window:

    sparse_k (B, Hk, G, D), sparse_v (B, Hk, G, Dv), sparse_fk (B, Hk, G, F)   keys, values, phi(k)
    sparse_pos (B, Hk, G) int64    position of each pair, -1 where the slot is empty

A pair leaving the window is not folded into (kv, ks) at once: it becomes a candidate. At every step
where pairs leave the window (sliding: every token once the window is full; terraced: each block
start, when a whole block leaves), the candidates and the cached pairs are all scored against the
*current* (kv, ks); the G best are kept and the rest are folded into (kv, ks). Cached pairs are
re-scored at each such step because the state changed since they were last scored; this is LoLA's
rule (its reference re-computes the heap's scores with the current state at every chunk update).

Scores (:data:`SCORES`, higher = kept; :func:`register_score` adds one):

* ``self_recall``: LoLA's self-recall error ``|| v - phi(k)^T kv / (phi(k)^T ks + eps) ||_2``, how
  badly the linear state returns the pair's own value when queried with its own key (a state that
  holds nothing returns 0, so the score is then ||v||);
* ``recency``: the position: the cache holds the latest pairs to leave the window (an ablation: as
  much extra softmax memory, chosen without looking at the state).

A sink (``attention.sparse_sink = N``, N < G): the pairs of positions 0..N-1 are always kept, whatever
the score (attention sinks; the base model's passkey retrieval needs its system prompt and instructions
as much as the key, experiments/recall_masks.py).

Attention over the cache: cached pairs join the softmax part of the hybrid formula, weighted by the
window factor and under the same max stabiliser as the window (LoLA's "window + sparse" mask on the
LoLCATs formula), see ``ops/hybrid/naive.py`` (``fold_pos``) and ``ops/decode/naive.py``; the chunk
reference of a prefill with the cache is ``ops/sparse/naive.py``.

Where this differs from LoLA's code (lukemcdermotttt/LoLA): there the cache is per query head (keys
are repeated for GQA before it), here per KV head, as the rest of the state; its chunked variant
mixes softmax and linear terms with an affine gate (g, 1 - g), here the trained LoLCATs formula is
kept (window factor g on the softmax terms, 1 on the linear ones), as in its prefill variant; its
window moves in chunks of w tokens (our terraced kind), here both window kinds are supported, a
sliding window evicting one token per step.

The functions here take plain tensors (and, for :func:`evict_to_cache`, any object with the
:class:`~lolcats.ops.decode.state.DecodeState` fields), keep every shape fixed by G and sync nothing
with the host, so a decode step using them can be captured in a CUDA graph.
"""

from __future__ import annotations

from typing import Callable

import torch

from lolcats.ops.common import EPS

Pairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # k, v, fk (B, Hk, N, X); pos (B, Hk, N)
ScoreFn = Callable[..., torch.Tensor]  # (v, fk, pos, kv, ks) -> (B, Hk, N) float32


def self_recall_error(v, fk, pos, kv, ks) -> torch.Tensor:
    """|| v - phi(k) kv / (phi(k) . ks + eps) ||: v (B, Hk, N, Dv), fk (B, Hk, N, F) -> (B, Hk, N)."""
    fkf = fk.float()
    num = torch.einsum("bhnf,bhfd->bhnd", fkf, kv.float())
    den = torch.einsum("bhnf,bhf->bhn", fkf, ks.float())
    return (v.float() - num / (den[..., None] + EPS)).norm(dim=-1)


def recency(v, fk, pos, kv, ks) -> torch.Tensor:
    return pos.float()


SCORES: dict[str, ScoreFn] = {"self_recall": self_recall_error, "recency": recency}


def register_score(name: str, fn: ScoreFn) -> None:
    SCORES[name] = fn


def get_score(name: str) -> ScoreFn:
    if name not in SCORES:
        raise ValueError(f"unknown sparse-cache score {name!r}; known: {', '.join(SCORES)}")
    return SCORES[name]


def merge_candidates(cache: Pairs, cand: Pairs, cand_ok: torch.Tensor, kv: torch.Tensor, ks: torch.Tensor,
                     score: str, sink: int = 0) -> tuple[Pairs, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the G best of the cached pairs and the candidates; fold the others into (kv, ks). Pairs at
    positions below ``sink`` are always kept (sink < G).

    cache: G pairs (empty where pos < 0); cand: M pairs, taking part where ``cand_ok`` (B, Hk, M).
    Returns (the new G cached pairs, kv, ks, keep (B, Hk, G) indices into [cache, cand], fold
    (B, Hk, G + M) bool: the pairs folded). Nothing is written in place.
    """
    G = cache[3].shape[-1]
    k, v, fk = (torch.cat([a, b.to(a.dtype)], 2) for a, b in zip(cache[:3], cand[:3]))  # (B, Hk, G+M, X)
    pos = torch.cat([cache[3], torch.where(cand_ok, cand[3], -1)], -1)  # (B, Hk, G+M)
    live = pos >= 0
    with torch.no_grad():
        s = get_score(score)(v, fk, pos, kv, ks).masked_fill(live & (pos < sink), float("inf"))
        s = s.masked_fill(~live, float("-inf"))
        keep = s.topk(G, dim=-1).indices  # (B, Hk, G); picks of -inf are empty slots (pos -1)
    fold = live & ~torch.zeros_like(live).scatter(-1, keep, True)
    w = fold.to(torch.float32)[..., None]  # (B, Hk, G+M, 1)
    kv = kv + torch.einsum("bhnf,bhnd->bhfd", fk.float() * w, v.float())
    ks = ks + (fk.float() * w).sum(2)
    pick = lambda x: x.gather(2, keep[..., None].expand(*keep.shape, x.shape[-1]))  # noqa: E731
    return (pick(k), pick(v), pick(fk), pos.gather(-1, keep)), kv, ks, keep, fold


def leaving_per_step(kind: str, window_size: int) -> int:
    """Most tokens that leave the window at one step: 1 (sliding), a block of w (terraced)."""
    return 1 if kind == "sliding_window" else window_size


def evict_to_cache(state, leave: torch.Tensor, score: str, most: int, sink: int = 0) -> None:
    """Window slots where ``leave`` (B, S) (at most ``most`` a row) go through the sparse cache, in
    place: it keeps the G best of its pairs and the leaving ones, the rest fold into (kv, ks)."""
    B, Hk = state.kv.shape[:2]
    idx = leave.float().topk(most, dim=-1).indices  # (B, most): the leaving slots first
    take = lambda x: x.gather(2, idx[:, None, :, None].expand(B, Hk, most, x.shape[-1]))  # noqa: E731
    cand = (take(state.win_k), take(state.win_v), take(state.win_fk),
            state.win_pos.gather(1, idx)[:, None].expand(B, Hk, most))
    ok = leave.gather(1, idx)[:, None].expand(B, Hk, most)
    cache = (state.sparse_k, state.sparse_v, state.sparse_fk, state.sparse_pos)
    new, kv, ks, _, _ = merge_candidates(cache, cand, ok, state.kv, state.ks, score, sink)
    for buf, x in zip(cache, new):
        buf.copy_(x)
    state.kv.copy_(kv)
    state.ks.copy_(ks)
    state.win_pos.masked_fill_(leave, -1)
