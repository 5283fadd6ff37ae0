"""The decode state of the window kinds and of linear attention: what one sequence keeps per layer.

Per layer (``ops/decode/naive.py`` has the step's derivation), S window slots (S = w for
``sliding_window``, 2w for ``terraced_window``, 0 for ``linear``: :func:`~lolcats.ops.kinds.window_slots`),
the linear-attention state, and G slots of a sparse cache per KV head (``ops/sparse``; G = 0: off):

    win_k (B, Hk, S, D), win_v (B, Hk, S, Dv), win_fk (B, Hk, S, F)   keys, values, phi(k)
    win_pos (B, S) int64    position of the token in each slot, -1 where empty
    kv (B, Hk, F, Dv), ks (B, Hk, F)    float32: sum of phi(k_j) v_j^T and of phi(k_j)
    sparse_k (B, Hk, G, D), sparse_v (B, Hk, G, Dv), sparse_fk (B, Hk, G, F), sparse_pos (B, Hk, G) int64
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lolcats.ops.kinds import window_slots
from lolcats.ops.state import LayerState, StateSpec, state_field

EMPTY_POS = -1  # a position slot that holds no token


@dataclass
class DecodeState(LayerState):
    win_k: torch.Tensor  # (B, Hk, S, D)
    win_v: torch.Tensor  # (B, Hk, S, Dv)
    win_fk: torch.Tensor  # (B, Hk, S, F)
    win_pos: torch.Tensor = state_field(EMPTY_POS)  # (B, S) int64, -1 = empty
    kv: torch.Tensor  # (B, Hk, F, Dv) float32
    ks: torch.Tensor  # (B, Hk, F) float32
    sparse_k: torch.Tensor  # (B, Hk, G, D): the sparse cache (G = 0: off)
    sparse_v: torch.Tensor  # (B, Hk, G, Dv)
    sparse_fk: torch.Tensor  # (B, Hk, G, F)
    sparse_pos: torch.Tensor = state_field(EMPTY_POS)  # (B, Hk, G) int64, -1 = empty

    @classmethod
    def spec(cls, Hk, S, D, Dv, F, dtype, sparse: int = 0) -> StateSpec:
        """The declaration: window and sparse-cache tensors in ``dtype``, the linear state in float32."""
        G, long, f32 = sparse, torch.long, torch.float32
        return cls.declare(win_k=((Hk, S, D), dtype), win_v=((Hk, S, Dv), dtype), win_fk=((Hk, S, F), dtype),
                           win_pos=((S,), long), kv=((Hk, F, Dv), f32), ks=((Hk, F), f32),
                           sparse_k=((Hk, G, D), dtype), sparse_v=((Hk, G, Dv), dtype), sparse_fk=((Hk, G, F), dtype),
                           sparse_pos=((Hk, G), long))

    @classmethod
    def layer_spec(cls, Hk, kind, window_size, D, Dv, F, dtype, sparse: int = 0) -> StateSpec:
        """The declaration for a layer of ``kind`` (window slots from :func:`window_slots`)."""
        return cls.spec(Hk, window_slots(kind, window_size), D, Dv, F, dtype, sparse)

    @classmethod
    def empty(cls, B, Hk, S, D, Dv, F, dtype, device, sparse: int = 0) -> DecodeState:
        return cls.spec(Hk, S, D, Dv, F, dtype, sparse).allocate(B, device)

    @classmethod
    def for_layer(cls, B, Hk, kind, window_size, D, Dv, F, dtype, device, sparse: int = 0) -> DecodeState:
        """An empty state for a layer of ``kind``."""
        return cls.layer_spec(Hk, kind, window_size, D, Dv, F, dtype, sparse).allocate(B, device)

    @property
    def batch_size(self) -> int:
        return self.win_pos.shape[0]

    @property
    def sparse_size(self) -> int:
        """Slots of the sparse cache per KV head (0: none)."""
        return self.sparse_pos.shape[-1]
