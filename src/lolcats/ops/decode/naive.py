"""One decoding step of hybrid (or linear) attention with a constant-size state: reference.

Per layer the state holds a window buffer of S slots (S = w for ``sliding_window``, 2w for
``terraced_window``, 0 for ``linear``) and the linear-attention state:

    win_k (B, Hk, S, D), win_v (B, Hk, S, Dv), win_fk (B, Hk, S, F)   keys, values, phi(k)
    win_pos (B, S) int64    position of the token in each slot, -1 where empty
    kv (B, Hk, F, Dv), ks (B, Hk, F)    float32: sum of phi(k_j) v_j^T and of phi(k_j)

A token at position p lives in slot p % S. Before it is written, tokens that leave the
window move into (kv, ks):
  * sliding: the token in slot p % S (position p - w) leaves;
  * terraced: when p starts a block (p % w == 0), the whole half of the buffer it is about
    to write (block b - 2) leaves.
Then the query attends over every filled slot with softmax (weighted by the window factor,
stabilised by the max over the window, as in ``ops/hybrid/naive.py``) and over (kv, ks)
through phi(q), with one shared normaliser. Positions are per row, so rows of a left-padded
batch keep their own windows; ``valid`` (B,) False leaves a row's state unchanged (a pad).
This equals ``hybrid_attention_naive`` / ``linear_attention_quadratic`` on the full sequence.

With a log forget gate ``log_gate`` (B, Hk) for this token (``ops/gate.py``), (kv, ks) are first
multiplied by exp(log_gate) (rows where ``valid``), then the leaving slots are folded in: keys
decay from the step they leave the window. The state layout does not change.

With a sparse cache (``sparse`` = G > 0 slots per KV head, ``ops/sparse/cache.py``) the state also
holds ``sparse_k, sparse_v, sparse_fk`` (B, Hk, G, X) and ``sparse_pos`` (B, Hk, G); tokens leaving
the window go through the cache (which folds the pairs it does not keep into (kv, ks)) and the
cached pairs join the window's softmax terms. With G = 0 these buffers are empty and the step is the
one above.

The state type is ``ops/decode/state.py``; the eviction steps every decode step shares are
``ops/decode/evict.py``.
"""

from __future__ import annotations

import torch

from lolcats.ops.common import EPS, expand_kv_heads
from lolcats.ops.decode.evict import decay, evict_sparse, fold_slots, leaving_slots
from lolcats.ops.decode.state import DecodeState
from lolcats.ops.gate import arrival_positions, cumulative_log_gate, masked_log_gate
from lolcats.ops.hybrid.naive import window_masks


def decode_step_naive(
    q: torch.Tensor,  # (B, H, D)
    k: torch.Tensor,  # (B, Hk, D)
    v: torch.Tensor,  # (B, Hk, Dv)
    fq: torch.Tensor,  # (B, H, F)
    fk: torch.Tensor,  # (B, Hk, F)
    state: DecodeState,  # updated in place
    pos: torch.Tensor,  # (B,) int64 position of this token
    window_factor: torch.Tensor | None,  # (H,) in (0, 1); None for linear
    kind: str,
    window_size: int,
    scale: float,
    valid: torch.Tensor | None = None,  # (B,) bool
    log_gate: torch.Tensor | None = None,  # (B, Hk) float32, <= 0
    sparse_score: str = "self_recall",  # what the sparse cache keeps (when the state has one)
    evict: bool = True,  # False: the caller knows no window slot leaves now (a sparse cache's eviction is skipped)
    sparse_sink: int = 0,  # the sparse cache always keeps the pairs of positions below this
) -> torch.Tensor:  # (B, H, Dv)
    B, H, _ = q.shape
    S = state.win_pos.shape[1]
    valid = torch.ones(B, dtype=torch.bool, device=q.device) if valid is None else valid
    if log_gate is not None:  # decay, then fold: a key decays from the step it leaves the window
        decay(state, torch.where(valid[:, None], log_gate.float(), 0.0))
    if kind == "linear":
        m = valid.float()[:, None, None]
        state.kv += m[..., None] * fk.float()[..., None] * v.float()[:, :, None, :]
        state.ks += m * fk.float()
    else:
        slot = pos % S  # (B,)
        slots = torch.arange(S, device=q.device)[None, :]  # (1, S)
        if state.sparse_size:  # the decay ran above
            evict_sparse(state, pos, valid, kind, window_size, None, sparse_score, evict, sparse_sink)
        else:
            fold_slots(state, leaving_slots(state, pos, kind, window_size) & valid[:, None])
        write = (slots == slot[:, None]) & valid[:, None]  # (B, S)
        wk = write[:, None, :, None]
        state.win_k.copy_(torch.where(wk, k[:, :, None, :].to(state.win_k.dtype), state.win_k))
        state.win_v.copy_(torch.where(wk, v[:, :, None, :].to(state.win_v.dtype), state.win_v))
        state.win_fk.copy_(torch.where(wk, fk[:, :, None, :].to(state.win_fk.dtype), state.win_fk))
        state.win_pos.copy_(torch.where(write, pos[:, None], state.win_pos))

    qf, fqf = q.float(), fq.float()
    num = torch.einsum("bhf,bhfd->bhd", fqf, expand_kv_heads(state.kv, H))
    den = torch.einsum("bhf,bhf->bh", fqf, expand_kv_heads(state.ks, H))
    if kind != "linear":
        keys, values, empty = _softmax_slots(state, H)
        s = torch.einsum("bhd,bhsd->bhs", qf, expand_kv_heads(keys.float(), H)) * scale
        s = s.masked_fill(empty, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        a = window_factor.float().view(1, H, 1) * torch.exp(s - m)  # (B, H, S [+ G])
        num = num + torch.einsum("bhs,bhsd->bhd", a, expand_kv_heads(values.float(), H))
        den = den + a.sum(-1)
        y = torch.where(den[..., None] > 0, num / den.clamp_min(1e-30)[..., None], 0.0)
    else:
        y = num / (den[..., None] + EPS)
    return y.to(v.dtype)


def _fold_weights(state: DecodeState, log_gate, pos, valid, key_pos, kind: str, window_size: int):
    """Decay the state over a chunk's tokens; weights (B, Hk, N, 1) of keys at ``key_pos`` (B, N) folded in it.

    A key that leaves the window at position a decays by the gates of the chunk's tokens after a
    (1 without a gate): the state the gated decode step reaches token by token.
    """
    if log_gate is None:
        return 1.0
    lg = masked_log_gate(log_gate.float(), valid)  # (B, Hk, T)
    total = lg.sum(-1)  # (B, Hk): every token of the chunk is after the old state
    decay(state, total)
    lam = cumulative_log_gate(lg, pos, arrival_positions(key_pos, kind, window_size))  # (B, Hk, N)
    return torch.exp(total[..., None] - lam)[..., None]


def _softmax_slots(state: DecodeState, H: int):
    """Keys (B, Hk, N, D), values (B, Hk, N, Dv) of the softmax terms and where they are empty
    (B, 1 | H, N): the window's S slots, then the sparse cache's G (N = S + G)."""
    empty = state.win_pos[:, None, :] < 0
    if not state.sparse_size:
        return state.win_k, state.win_v, empty
    B, Hk, S = *state.kv.shape[:2], state.win_pos.shape[1]
    empty = torch.cat([empty.expand(B, Hk, S), state.sparse_pos < 0], -1)
    return (torch.cat([state.win_k, state.sparse_k], 2), torch.cat([state.win_v, state.sparse_v], 2),
            expand_kv_heads(empty, H))


def absorb_chunk(state: DecodeState, k, v, fk, pos, valid, kind: str, window_size: int, log_gate=None,
                 fold: bool = True) -> None:
    """Write a chunk into ``state`` as :func:`decode_step_naive` would token by token (in place).

    k (B, Hk, T, D), v (B, Hk, T, Dv), fk (B, Hk, T, F), pos (B, T) int64, valid (B, T) bool,
    log_gate (B, Hk, T) or None. A token stays in the window iff it is in the softmax window of
    the row's last position P; otherwise it is folded into (kv, ks) (``fold=False``: only dropped
    from the window, for a caller that has placed the leaving tokens itself, as the sparse cache
    does). That is the state the decode step reaches token by token, because the positions of a
    row are consecutive.
    """
    fk_r = fk.to(state.win_fk.dtype)  # the window stores phi(k) in the state dtype; fold what it would fold
    v_r = v.to(state.win_v.dtype)
    if kind == "linear":
        if fold:
            w = valid.to(torch.float32)[:, None, :, None] * _fold_weights(state, log_gate, pos, valid, pos, kind,
                                                                             window_size)
            state.kv += torch.einsum("bhtf,bhtd->bhfd", fk_r.float() * w, v_r.float())
            state.ks += (fk_r.float() * w).sum(2)
        return
    S = state.win_pos.shape[1]
    old_pos, old_filled = state.win_pos, state.win_pos >= 0
    last = torch.maximum(old_pos.amax(-1), torch.where(valid, pos, -1).amax(-1))  # (B,) last position, -1 = none
    stay_old = window_masks(last[:, None], old_pos, kind, window_size)[0][:, 0, 0] & old_filled  # (B, S)
    stay_new = window_masks(last[:, None], pos, kind, window_size)[0][:, 0, 0] & valid  # (B, T)
    if fold:
        fold_old = (old_filled & ~stay_old).to(torch.float32)[:, None, :, None]
        fold_new = (valid & ~stay_new).to(torch.float32)[:, None, :, None]
        if log_gate is not None:
            w = _fold_weights(state, log_gate, pos, valid, torch.cat([old_pos, pos], 1), kind, window_size)
            fold_old, fold_new = fold_old * w[:, :, :S], fold_new * w[:, :, S:]
        state.kv += torch.einsum("bhsf,bhsd->bhfd", state.win_fk.float() * fold_old, state.win_v.float())
        state.kv += torch.einsum("bhtf,bhtd->bhfd", fk_r.float() * fold_new, v_r.float())
        state.ks += (state.win_fk.float() * fold_old).sum(2) + (fk_r.float() * fold_new).sum(2)
    state.win_pos.masked_fill_(old_filled & ~stay_old, -1)
    slot = torch.where(stay_new, pos % S, S)  # (B, T); S = a scratch slot dropped below
    for buf, x in ((state.win_k, k), (state.win_v, v_r), (state.win_fk, fk_r)):
        ext = torch.cat([buf, buf.new_zeros(*buf.shape[:2], 1, buf.shape[3])], 2)  # (B, Hk, S+1, X)
        ext.scatter_(2, slot[:, None, :, None].expand(*x.shape[:3], buf.shape[3]), x.to(buf.dtype))
        buf.copy_(ext[:, :, :S])
    ext = torch.cat([state.win_pos, state.win_pos.new_full((state.win_pos.shape[0], 1), -1)], 1)
    ext.scatter_(1, slot, pos)
    state.win_pos.copy_(ext[:, :S])
