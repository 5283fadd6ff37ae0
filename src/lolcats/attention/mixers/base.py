"""The student mixer: one variant's attention math over the per-sequence state it declares.

A mixer (one variant per file in ``attention/mixers``, registered by name in ``attention/mixers/__init__.py``)
implements, for the layer that owns it (``LolcatsAttention``: projections, feature maps, modes, window factor):

* :meth:`Mixer.state_spec`: its per-sequence state, declared (``ops/state.py``): the cache and the serving
  slots allocate from it;
* :meth:`Mixer.sequence`: a whole sequence without a state (training, a plain forward);
* :meth:`Mixer.prefill`: a chunk (T > 1) continuing a state, written into it;
* :meth:`Mixer.decode`: one token (T == 1) continuing a state, written into it;
* :meth:`Mixer.modules` (optional): learned modules it adds to its layer beside the feature maps (gated_delta's
  write strength and decay), trained in attention transfer.

A cached call gets a :class:`~lolcats.attention.step.Step`, what the caller knows about its tokens
(``attention/step.py``); the mixer never reads the cache. Every operator a mixer runs comes from the ops registry
(``lolcats.ops.get_backend``), references included.

:meth:`Mixer.prefill` is shared: a fresh state whose chunk starts at position 0 unpadded (checked, or promised
by the writer: ``Step.aligned``) takes the full-sequence path (a fused kernel on GPU) and then absorbs the
chunk (:meth:`Mixer.absorb`); anything else runs :meth:`Mixer.prefill_piece` in pieces of bounded memory
(``PREFILL_BUDGET``), each attending over the state and writing it.

Shapes: q (B, H, T, D); k, v (B, Hk, T, D); fq (B, H, T, F); fk (B, Hk, T, F); log_gate (B, Hk, T) or None;
outputs (B, H, T, Dv).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from lolcats.attention.step import Step
from lolcats.ops import Backend, get_backend
from lolcats.ops.state import LayerState, StateSpec

PREFILL_BUDGET = 2**26  # elements of one (B, H, Tq, Tk) score tensor in a reference prefill piece


def piece_length(B: int, H: int, state_keys: int) -> int:
    """Queries per reference prefill piece whose (B, H, Tq, state_keys + Tq) scores fit PREFILL_BUDGET."""
    return max(16, int((PREFILL_BUDGET / (B * H)) ** 0.5) - state_keys)


class Mixer:
    """One student variant. Reads from its layer: ``cfg``, ``scaling``, ``num_kv_heads``, ``head_dim``,
    ``feature_map_k`` (its ``out_dim``) and ``window_factor()`` (where ``has_window_factor``)."""

    has_window_factor: ClassVar[bool] = True  # whether the layer learns a per-head window factor for it

    @classmethod
    def modules(cls, layer) -> dict[str, torch.nn.Module]:
        """Learned modules the variant adds to its layer, by attribute name (made with the feature maps; named
        ``feature_map_*`` so that attention transfer trains them and stage-1 checkpoints carry them)."""
        return {}

    def __init__(self, layer):
        self.layer = layer
        self.cfg = layer.cfg

    # ------------------------------------------------------------ what a variant implements

    def state_spec(self, dtype: torch.dtype) -> StateSpec:
        """The per-sequence state, declared; window / key tensors in ``dtype``."""
        raise NotImplementedError

    def sequence(self, q, k, v, fq, fk, positions=None, key_mask=None, return_weights=False, log_gate=None):
        """A whole sequence, no state: (y (B, H, T, Dv), attention weights (B, H, T, T) or None).

        positions (B, T) or None (0..T-1); key_mask (B, T) bool or None (all valid); log_gate 0 at padding."""
        raise NotImplementedError

    def decode(self, state: LayerState, q, k, v, fq, fk, step: Step, log_gate=None) -> torch.Tensor:
        """One token (T == 1) continuing ``state``, written into it."""
        raise NotImplementedError

    def prefill_piece(self, state: LayerState, q, k, v, fq, fk, pos, valid, log_gate=None) -> torch.Tensor:
        """A piece of a chunk attending over ``state`` (the tokens before it), then written into it."""
        raise NotImplementedError

    def absorb(self, state: LayerState, k, v, fk, pos, valid, log_gate=None) -> None:
        """Write a chunk into ``state`` as the decode step would token by token (in place)."""
        raise NotImplementedError

    # ------------------------------------------------------------ shared

    @property
    def scaling(self) -> float:
        return self.layer.scaling

    def window_factor(self) -> torch.Tensor | None:
        """(H,) in (0, 1), or None for a variant without one."""
        return self.layer.window_factor() if self.has_window_factor else None

    def backend(self, like: torch.Tensor) -> Backend:
        return get_backend(self.cfg.backend, like)

    def fused(self, like: torch.Tensor) -> bool:
        """Whether the full-sequence operator keeps memory linear in T (any chunk fits one call)."""
        return self.backend(like).is_fused(self.cfg.kind)

    def prefill_capturable(self, like: torch.Tensor) -> bool:
        """Whether a prefill on tensors like ``like`` can be captured in a CUDA graph (no host read)."""
        return True

    def state_keys(self, state: LayerState) -> int:
        """Keys of ``state`` a prefill piece attends to besides its own (sizes the pieces)."""
        return 0

    def empty_state(self, batch_size: int, dtype: torch.dtype, device) -> LayerState:
        return self.state_spec(dtype).allocate(batch_size, device)

    def piece_len(self, state: LayerState, B: int, H: int) -> int:
        """Queries per prefill piece: its scores over the state's keys and itself fit PREFILL_BUDGET."""
        return piece_length(B, H, self.state_keys(state))

    def prefill(self, state: LayerState, q, k, v, fq, fk, step: Step, log_gate=None) -> torch.Tensor:
        """A chunk (T > 1) continuing ``state``, written into it; log_gate 0 at padding."""
        B, H, T, _ = q.shape
        piece = self.piece_len(state, B, H)
        valid = step.valid_or_ones()
        if self.takes_full_path(step, q, piece):  # fresh and unpadded (or padded at the end only, which no valid
            # query sees): the full-sequence path (a fused kernel on GPU), then absorb the valid tokens
            y, _ = self.sequence(q, k, v, fq, fk, log_gate=log_gate)
            self.absorb(state, k, v, fk, step.pos, valid, log_gate)
            return y
        ys = []
        for s in range(0, T, piece):
            sl = slice(s, min(T, s + piece))
            lg = None if log_gate is None else log_gate[:, :, sl]
            ys.append(self.prefill_piece(state, q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl], fk[:, :, sl],
                                         step.pos[:, sl], valid[:, sl], lg))
        return torch.cat(ys, 2)

    def takes_full_path(self, step: Step, q: torch.Tensor, piece: int) -> bool:
        """A fresh state, a chunk one call can take, at positions 0..T-1 with no padding but at the end (the
        writer's promise ``step.aligned``, else checked on the host)."""
        T = q.shape[2]
        fits = step.fresh and (self.fused(q) or T <= piece)
        if step.aligned or not fits:
            return fits
        return ((step.valid is None or bool(step.valid.all()))
                and bool((step.pos == torch.arange(T, device=step.pos.device)).all()))
