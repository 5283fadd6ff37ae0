"""``linear``: causal linear attention over feature maps, no window (``attention.kind = linear``).

y_i = phi(q_i) . S_i / (phi(q_i) . z_i + eps), S_i = sum_{j<=i} phi(k_j) v_j^T, z_i = sum_{j<=i} phi(k_j)
(``ops/linear``), with an optional forget gate decaying (S, z) each token (``ops/gate.py``).

State: a :class:`~lolcats.ops.decode.state.DecodeState` with no window slots: (kv, ks) per KV head, float32
(the window fields are empty, S = 0). The hybrid mixer (``mixers/hybrid.py``) extends this one with the window.
"""

from __future__ import annotations

import torch

from lolcats.attention.mixers.base import Mixer
from lolcats.attention.step import Step
from lolcats.ops.decode.state import DecodeState
from lolcats.ops.state import StateSpec


class LinearMixer(Mixer):
    has_window_factor = False

    def state_spec(self, dtype: torch.dtype) -> StateSpec:
        layer, cfg = self.layer, self.cfg
        F = getattr(layer.feature_map_k, "out_dim", layer.head_dim)  # phi(k) width
        return DecodeState.layer_spec(layer.num_kv_heads, cfg.kind, cfg.window_size, layer.head_dim, layer.head_dim,
                                      F, dtype, cfg.sparse_cache)

    def state_keys(self, state: DecodeState) -> int:
        return state.win_pos.shape[1] + state.sparse_size

    def sequence(self, q, k, v, fq, fk, positions=None, key_mask=None, return_weights=False, log_gate=None):
        backend = self.backend(q)
        if key_mask is None and positions is None and not return_weights:
            return backend.linear(fq, fk, v, None, False, log_gate=log_gate)[0], None
        if key_mask is not None:  # padding keys contribute nothing
            fk = fk * key_mask[:, None, :, None].to(fk.dtype)
        y, _ = backend.linear_general(fq, fk, v, log_gate=log_gate)
        if not return_weights:
            return y, None
        a = backend.linear_weights(fq, fk, log_gate)  # (B, H, T, T)
        return y, a / (a.sum(-1, keepdim=True) + 1e-12)

    def prefill_piece(self, state: DecodeState, q, k, v, fq, fk, pos, valid, log_gate=None) -> torch.Tensor:
        y, _ = self.backend(q).linear_general(fq, fk * valid[:, None, :, None].to(fk.dtype), v, (state.kv, state.ks),
                                              log_gate=log_gate)
        self.absorb(state, k, v, fk, pos, valid, log_gate)
        return y

    def absorb(self, state: DecodeState, k, v, fk, pos, valid, log_gate=None) -> None:
        self.backend(k).absorb(state, k, v, fk, pos, valid, self.cfg.kind, self.cfg.window_size, log_gate)

    def decode_op(self, state: DecodeState, step: Step):
        """The backend's decode step on ``state``."""
        return self.backend(state.kv).decode

    def decode(self, state: DecodeState, q, k, v, fq, fk, step: Step, log_gate=None) -> torch.Tensor:
        cfg = self.cfg
        valid = None if step.valid is None else step.valid[:, 0]
        lg = None if log_gate is None else log_gate[:, :, 0]
        y = self.decode_op(state, step)(q[:, :, 0], k[:, :, 0], v[:, :, 0], fq[:, :, 0], fk[:, :, 0], state,
                                        step.pos[:, 0], self.window_factor(), cfg.kind, cfg.window_size, self.scaling,
                                        valid, log_gate=lg)
        return y[:, :, None]  # (B, H, 1, Dv)
