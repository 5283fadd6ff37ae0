"""Window slots leaving a :class:`~lolcats.ops.decode.state.DecodeState`, in PyTorch: shared by every decode step.

The reference step (``ops/decode/naive.py``) runs all of it; the Triton step (``ops/triton/decode.py``) folds
plain leaving slots itself and runs :func:`evict_sparse` first when the state has a sparse cache (choosing
what the cache keeps is a top-k, ``ops/sparse/cache.py``). Nothing here syncs with the host.
"""

from __future__ import annotations

import torch

from lolcats.ops.decode.state import DecodeState
from lolcats.ops.sparse.cache import evict_to_cache, leaving_per_step


def fold_slots(state: DecodeState, leave: torch.Tensor) -> None:
    """Move slots where ``leave`` (B, S) is True into (kv, ks) and mark them empty."""
    w = leave.to(torch.float32)[:, None, :, None]  # (B, 1, S, 1)
    fk = state.win_fk.float() * w
    state.kv += torch.einsum("bhsf,bhsd->bhfd", fk, state.win_v.float())
    state.ks += fk.sum(2)
    state.win_pos.masked_fill_(leave, -1)


def decay(state: DecodeState, log_gate: torch.Tensor) -> None:
    """(kv, ks) *= exp(log_gate), log_gate (B, Hk); in place."""
    g = torch.exp(log_gate)
    state.kv.mul_(g[..., None, None])
    state.ks.mul_(g[..., None])


def leaving_slots(state: DecodeState, pos: torch.Tensor, kind: str, window_size: int) -> torch.Tensor:
    """(B, S) bool: the filled window slots that leave when the token at ``pos`` (B,) is written (sliding: the
    slot it takes; terraced: the half it starts, at a block's first token)."""
    S = state.win_pos.shape[1]
    slot = pos % S  # (B,)
    slots = torch.arange(S, device=pos.device)[None, :]  # (1, S)
    filled = state.win_pos >= 0
    if kind == "sliding_window":
        return filled & (slots == slot[:, None])
    half = (slots // window_size) == (slot[:, None] // window_size)
    return filled & half & (pos % window_size == 0)[:, None]


def evict_sparse(state: DecodeState, pos: torch.Tensor, valid: torch.Tensor | None, kind: str, window_size: int,
                 log_gate: torch.Tensor | None = None, sparse_score: str = "self_recall", evict: bool = True,
                 sparse_sink: int = 0) -> None:
    """The first part of a decode step with a sparse cache, in place: the gate's decay of (kv, ks) (rows where
    ``valid``), then the slots leaving the window through the cache (they end up empty; skipped with ``evict``
    False: the caller knows none leaves). A decode kernel then writes the token and attends with nothing left
    to fold or decay."""
    valid = torch.ones_like(pos, dtype=torch.bool) if valid is None else valid
    if log_gate is not None:
        decay(state, torch.where(valid[:, None], log_gate.float(), 0.0))
    if evict:
        leave = leaving_slots(state, pos, kind, window_size) & valid[:, None]
        evict_to_cache(state, leave, sparse_score, leaving_per_step(kind, window_size), sparse_sink)
