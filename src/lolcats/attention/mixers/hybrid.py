"""``sliding_window`` / ``terraced_window``: softmax over a window plus linear attention over the rest (LoLCATs).

Each query attends to the keys of its window with softmax (weighted by the per-head window factor) and to
the earlier keys through phi(q) and the linear state, one normaliser for both (``ops/hybrid``). With
``attention.sparse_cache`` > 0 (LoLA, ``ops/sparse``) keys leaving the window go through a per-KV-head
sparse cache first and its pairs join the softmax terms.

State: a :class:`~lolcats.ops.decode.state.DecodeState`: the window's S slots (keys, values, phi(k),
positions; S = w sliding, 2w terraced), the linear state (kv, ks), and the sparse cache's G slots.

Paths: a whole sequence is the backend's fused op in the plain case, else the general reference (positions,
padding); a prefill piece puts the window slots in front of its keys with their positions, the linear state
as the initial state; the decode step is the backend's. With a sparse cache every prefill or whole sequence
runs the backend's ``sparse_chunk``: the fused kernel for the whole chunk where the backend has one for the call
(``sparse_fused``: GPU, terraced window, the default kind), else the chunk reference in pieces; the decode step then
is the backend's with the eviction through the cache (skipped where the writer promises no slot leaves,
``Step.may_evict``).
"""

from __future__ import annotations

import functools

import torch

from lolcats.attention.mixers.linear import LinearMixer
from lolcats.attention.step import Step
from lolcats.ops.decode.state import DecodeState
from lolcats.runtime import capturing


class HybridMixer(LinearMixer):
    has_window_factor = True

    def sequence(self, q, k, v, fq, fk, positions=None, key_mask=None, return_weights=False, log_gate=None):
        cfg, backend = self.cfg, self.backend(q)
        if cfg.sparse_cache:
            return self._sparse_sequence(q, k, v, fq, fk, positions, key_mask, return_weights), None
        if key_mask is None and positions is None and not return_weights:
            return backend.hybrid(q, k, v, fq, fk, self.window_factor(), cfg.kind, cfg.window_size, self.scaling,
                                  log_gate=log_gate), None
        return backend.hybrid_general(q, k, v, fq, fk, self.window_factor(), cfg.kind, cfg.window_size, self.scaling,
                                      positions, positions, key_mask, None, return_weights, log_gate)

    def prefill(self, state: DecodeState, q, k, v, fq, fk, step: Step, log_gate=None) -> torch.Tensor:
        if not state.sparse_size:
            return super().prefill(state, q, k, v, fq, fk, step, log_gate)
        y, after = self._sparse_pieces(state, q, k, v, fq, fk, step.pos, step.valid_or_ones())
        if after is not state:  # the reference returns a new state; the kernel updates this one in place
            for name, t in after.tensors().items():
                getattr(state, name).copy_(t)
        return y

    def prefill_piece(self, state: DecodeState, q, k, v, fq, fk, pos, valid, log_gate=None) -> torch.Tensor:
        """Window slots in front of the piece's keys, with their positions (empty slots masked); the folded
        part as the initial state."""
        cfg, st = self.cfg, state
        cat = lambda a, b: torch.cat([a.float(), b.float()], 2)  # noqa: E731
        y, _ = self.backend(q).hybrid_general(q, cat(st.win_k, k), cat(st.win_v, v), fq, cat(st.win_fk, fk),
                                              self.window_factor(), cfg.kind, cfg.window_size, self.scaling,
                                              pos, torch.cat([st.win_pos, pos], 1),
                                              torch.cat([st.win_pos >= 0, valid], 1), (st.kv, st.ks),
                                              log_gate=log_gate)
        self.absorb(st, k, v, fk, pos, valid, log_gate)
        return y.to(v.dtype)

    def decode_op(self, state: DecodeState, step: Step):
        """The backend's decode step; with a sparse cache, told its score and whether a window slot may leave."""
        op = super().decode_op(state, step)
        if not state.sparse_size:
            return op
        return functools.partial(op, sparse_score=self.cfg.sparse_score, sparse_sink=self.cfg.sparse_sink,
                                 evict=step.may_evict)

    # ------------------------------------------------------------ the sparse cache

    def prefill_capturable(self, like: torch.Tensor) -> bool:
        """Whether a prefill can be captured in a CUDA graph: with a sparse cache only through a fused kernel
        (the chunk reference's loop over eviction steps reads their count on the host)."""
        cfg = self.cfg
        return not cfg.sparse_cache or self.backend(like).sparse_fused(cfg.kind, cfg.sparse_score,
                                                                       window=cfg.window_size)

    def _sparse_pieces(self, st: DecodeState, q, k, v, fq, fk, pos, valid) -> tuple[torch.Tensor, DecodeState]:
        """The backend's sparse-cache chunk op over the sequence (one piece where it is fused, else pieces of the
        reference): outputs and the state after it."""
        cfg, T, wf = self.cfg, q.shape[2], self.window_factor()
        backend = self.backend(q)
        op = backend.sparse_chunk
        # else the reference, in pieces
        fused = backend.sparse_fused(cfg.kind, cfg.sparse_score, q, k, v, fq, fk, wf, window=cfg.window_size)
        piece = T if fused else self.piece_len(st, q.shape[0], q.shape[1])
        ys = []
        for s in range(0, T, piece):
            sl = slice(s, min(T, s + piece))
            y, st = op(st, q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl], fk[:, :, sl], pos[:, sl], valid[:, sl],
                       wf, cfg.kind, cfg.window_size, self.scaling, cfg.sparse_score, cfg.sparse_sink)
            ys.append(y)
        return torch.cat(ys, 2), st

    def _sparse_sequence(self, q, k, v, fq, fk, positions, key_mask, return_weights) -> torch.Tensor:
        """A whole sequence (no cache) with the sparse cache: the chunk reference from an empty state."""
        if return_weights:
            raise ValueError("attention.sparse_cache: attention weights (distill.xent_factor > 0) are not "
                             "available with a sparse cache")
        if capturing(q.device) and not self.prefill_capturable(q):  # the reference's loop reads the host
            raise ValueError("attention.sparse_cache: a forward with the sparse cache cannot be captured in a CUDA "
                             "graph; set distill.cuda_graph / finetune.cuda_graph false")
        B, _, T, _ = q.shape
        pos = torch.arange(T, device=q.device).expand(B, T) if positions is None else positions
        valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
        return self._sparse_pieces(self.empty_state(B, k.dtype, k.device), q, k, v, fq, fk, pos, valid)[0]
