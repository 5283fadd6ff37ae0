"""A chunk through window, sparse cache and linear state: the reference prefill with a sparse cache.

What the cache keeps depends on the data, so the state side is a loop over the chunk's *eviction
steps* (the positions at which tokens leave the window: every token for a sliding window once it is
full, every block start for a terraced one), each one :func:`~lolcats.ops.sparse.cache.merge_candidates`
on fixed-size tensors, as the decode step does. The loop records, per KV head, the position at which
each token was folded into (kv, ks). The chunk's outputs then come from one batched
``hybrid_attention_naive`` over [the cache at the chunk's start, the window slots, the chunk] with
those fold positions (``fold_pos``): a key past the window is a softmax term until it is folded.

Memory: the (B, H, T, G + S + T) scores of the plain reference prefill plus G columns (the caller
cuts long prompts into pieces). Time: one small step per eviction step, T of them for a sliding
window, T / w for a terraced one. The state and the outputs are those of ``decode_step_naive``
token by token (up to float rounding).
"""

from __future__ import annotations

import torch

from lolcats.ops.decode.naive import absorb_chunk
from lolcats.ops.decode.state import DecodeState
from lolcats.ops.hybrid.naive import hybrid_attention_naive
from lolcats.ops.sparse.cache import leaving_per_step, merge_candidates

FAR = -(2**40)  # position given to cached keys: past every window of every query
NEVER = 2**62  # fold position of a key not folded in this chunk


def leave_steps(pos: torch.Tensor, kind: str, window_size: int) -> torch.Tensor:
    """The position at which a token at ``pos`` leaves the window (the decode step's eviction)."""
    if kind == "sliding_window":
        return pos + window_size
    return (pos // window_size + 2) * window_size  # terraced: when block b + 2 starts


def _leave_columns(ppos: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, kind: str, w: int) -> torch.Tensor:
    """(B, N) the chunk column whose token's step evicts each pooled token; T where none does."""
    T = pos.shape[1]
    srt, order = torch.where(valid, pos, NEVER).sort(-1)  # (B, T) the chunk's steps, ascending
    e = leave_steps(ppos, kind, w)  # (B, N)
    i = torch.searchsorted(srt, e).clamp(max=T - 1)
    hit = (srt.gather(1, i) == e) & (ppos >= 0)
    return torch.where(hit, order.gather(1, i), T)


def sparse_chunk(state: DecodeState, q, k, v, fq, fk, pos, valid, window_factor, kind: str, window_size: int,
                 scale: float, score: str, sink: int = 0) -> tuple[torch.Tensor, DecodeState]:
    """Outputs (B, H, T, Dv) of a chunk continuing ``state`` and the state after it (a new one:
    ``state`` is only read, so this runs under autograd too).

    q (B, H, T, D), k/v (B, Hk, T, D|Dv), fq (B, H, T, F), fk (B, Hk, T, F), pos (B, T), valid (B, T).
    """
    B, Hk, T, _ = k.shape
    G, S, dt = state.sparse_size, state.win_pos.shape[1], state.win_k.dtype
    pool = [torch.cat([a, b.to(dt)], 2) for a, b in ((state.win_k, k), (state.win_v, v), (state.win_fk, fk))]
    ppos = torch.cat([state.win_pos, torch.where(valid, pos, -1)], 1)  # (B, N): window slots, then the chunk
    N = S + T
    col = _leave_columns(ppos, pos, valid, kind, window_size)
    by_col, rank = col.sort(dim=-1, stable=True)  # pooled tokens in the order they leave
    steps = torch.unique(col[col < T])  # sorted chunk columns with an eviction step in some row
    L = leaving_per_step(kind, window_size)
    first = torch.searchsorted(by_col, steps[None].expand(B, -1).contiguous())  # (B, E)
    span = torch.arange(L, device=k.device)

    cache = (state.sparse_k, state.sparse_v, state.sparse_fk, state.sparse_pos)
    kv, ks = state.kv, state.ks
    ids = torch.arange(G, device=k.device).expand(B, Hk, G)  # ids: cache 0..G-1, then G + pooled index
    fold_pos = torch.full((B, Hk, G + N + 1), NEVER, dtype=torch.long, device=k.device)  # last: a scratch id
    for e, t in enumerate(steps.tolist()):
        idx = rank.gather(1, (first[:, e:e + 1] + span).clamp(max=N - 1))  # (B, L)
        ok = (col.gather(1, idx) == t)[:, None].expand(B, Hk, L)
        cand = [x.gather(2, idx[:, None, :, None].expand(B, Hk, L, x.shape[-1])) for x in pool]
        cand.append(ppos.gather(1, idx)[:, None].expand(B, Hk, L))
        cache, kv, ks, keep, fold = merge_candidates(cache, tuple(cand), ok, kv, ks, score, sink)
        every = torch.cat([ids, (G + idx)[:, None].expand(B, Hk, L)], -1)  # (B, Hk, G + L)
        fold_pos.scatter_(-1, torch.where(fold, every, G + N), pos[:, t, None, None].expand(B, Hk, G + L))
        ids = every.gather(-1, keep)

    cat = lambda *xs: torch.cat([x.float() for x in xs], 2)  # noqa: E731
    k_pos = torch.cat([pos.new_full((B, G), FAR), state.win_pos, pos], 1)
    k_mask = torch.cat([state.sparse_pos >= 0, (state.win_pos >= 0)[:, None].expand(B, Hk, S),
                        valid[:, None].expand(B, Hk, T)], -1)  # (B, Hk, G + N)
    y, _ = hybrid_attention_naive(q, cat(state.sparse_k, state.win_k, k), cat(state.sparse_v, state.win_v, v), fq,
                                  cat(state.sparse_fk, state.win_fk, fk), window_factor, kind, window_size, scale,
                                  pos, k_pos, k_mask, (state.kv, state.ks), fold_pos=fold_pos[..., :G + N])
    after = DecodeState(state.win_k.clone(), state.win_v.clone(), state.win_fk.clone(), state.win_pos.clone(),
                        kv, ks, *cache)
    absorb_chunk(after, k, v, fk, pos, valid, kind, window_size, fold=False)
    return y.to(v.dtype), after
