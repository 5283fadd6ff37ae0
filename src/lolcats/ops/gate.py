"""A data-dependent forget gate on the linear part of hybrid (and linear) attention.

The gate (Liger, arXiv 2503.01496) is parameter-free: it reuses the key projection. Per token t
and KV head h a log gate lambda_t <= 0, g_t = exp(lambda_t) in (0, 1), multiplies the linear
state, shared by the query heads of the group as the state is:

* ``none``: no gate (g = 1), the ungated function exactly;
* ``pooled_keys``: lambda_t = logsigmoid(mean_d k_t[h, d]) / 16, where k_t is the key projection
  of token t before RoPE. Liger's code (``LigerGatedLinearAttention``) computes
  ``g = AdaptiveAvgPool1d(Hk * D)(k_proj(x))`` (the identity at Llama shapes: one gate per key
  feature), ``logsigmoid(g) / gate_logit_normalizer`` with normaliser 16, and runs GLA with
  per-feature decay because its feature map is a softmax over the key's own D coordinates. Our
  phi (Hedgehog: softmax of a learned projection, 2 x feature_dim wide) has no coordinate
  matching a key dimension, so the key is pooled to one value per head instead
  (``AdaptiveAvgPool1d(Hk)`` over the Hk * D projection = the mean of each head's D coordinates):
  a per-head scalar gate, the simple-GLA / Mamba-2 form, with Liger's logsigmoid and normaliser.

Where the gate acts (the hybrid's linear part). A key j *arrives* in the linear part at the
position a(j) where it leaves the softmax window (``arrival_positions``):

    linear: a(j) = p_j;   sliding_window: a(j) = p_j + w;   terraced_window: a(j) = (p_j // w + 2) w

so that j is in the linear part L(i) of query i iff a(j) <= p_i (the masks of ``ops/hybrid/naive.py``).
Decoding (``ops/decode/naive.py``) at each real token p first decays, then folds what leaves:

    S_p = g_p S_{p-1} + sum_{j: a(j) = p} phi(k_j) v_j^T,     z_p = g_p z_{p-1} + sum_{j: a(j) = p} phi(k_j)

and the query at p reads (S_p, z_p) beside its window with one shared normaliser, as ungated.
Unrolling the recursion, key j's linear weight for query i is

    fq_i . fk_j * prod_{t: a(j) < p_t <= p_i} g_t = fq_i . fk_j * exp(Lam(p_i) - Lam(a(j))),
    Lam(p) = sum over real tokens t with p_t <= p of lambda_t     (``cumulative_log_gate``)

and an initial state (S0, z0) (keys folded before the first token passed) has weight
exp(Lam(p_i)). That is the full-sequence form (``ops/{linear,hybrid}/naive.py``, the chunked
kernel): the same function as the step-by-step one by construction. Padding tokens carry
lambda = 0 (they are not steps). The decay counts the steps a key has spent in the linear part,
not the steps since the key: inside the window a key is attended exactly and is not decayed.
(GLA's weight prod_{p_j < t <= p_i} g_t would also multiply each key by the w gates of its window
steps when it is folded; that needs each slot's cumulative gate in the decode state, and at
Liger's gate scale it shrinks every key by about 0.958^64 ~ 0.06 before the linear part ever
reads it.)
"""

from __future__ import annotations

import typing

import torch
import torch.nn.functional as F

from lolcats.config import AttentionConfig
from lolcats.ops.kinds import kind_id

GATES: tuple[str, ...] = typing.get_args(typing.get_type_hints(AttentionConfig)["gate"])  # the config's names
GATE_LOGIT_NORMALIZER = 16.0  # Liger's gate_logit_normalizer: lambda = logsigmoid(x) / 16


def forget_log_gate(k: torch.Tensor, gate: str) -> torch.Tensor | None:
    """Log forget gate (B, Hk, T) float32, <= 0, from keys k (B, Hk, T, D) before RoPE; None for ``none``."""
    if gate == "none":
        return None
    if gate == "pooled_keys":
        return F.logsigmoid(k.float().mean(-1)) / GATE_LOGIT_NORMALIZER
    raise ValueError(f"unknown attention gate {gate!r}; known: {', '.join(GATES)}")


def arrival_positions(pos: torch.Tensor, kind: str | int, window: int) -> torch.Tensor:
    """Position at which a key at ``pos`` enters the linear part (leaves the window); same shape."""
    kid = kind if isinstance(kind, int) else kind_id(kind)
    if kid == 0:
        return pos
    if kid == 1:
        return pos + window
    return (torch.div(pos, window, rounding_mode="floor") + 2) * window


def cumulative_log_gate(log_gate: torch.Tensor, pos: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Lam(at) = sum of log_gate[t] over tokens t with pos[t] <= at: (B, Hk, T), (B, T), (B, N) -> (B, Hk, N).

    Tokens are sorted by position first, so any order (pads included, which carry 0) is fine.
    """
    order = pos.argsort(dim=-1, stable=True)  # (B, T)
    sorted_pos = pos.gather(-1, order).contiguous()
    cs = log_gate.float().gather(-1, order[:, None].expand_as(log_gate)).cumsum(-1)  # (B, Hk, T)
    n = torch.searchsorted(sorted_pos, at.to(sorted_pos.dtype).contiguous(), right=True)  # (B, N) tokens at or before
    return F.pad(cs, (1, 0)).gather(-1, n[:, None].expand(-1, log_gate.shape[1], -1))


def masked_log_gate(log_gate: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor | None:
    """log_gate (B, Hk, T) with padding tokens (valid (B, T) False) set to 0: pads are not steps."""
    if log_gate is None or valid is None:
        return log_gate
    return log_gate * valid[:, None, :].to(log_gate.dtype)
