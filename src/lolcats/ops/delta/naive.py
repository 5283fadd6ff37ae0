"""The gated delta rule (Gated DeltaNet, arXiv 2412.06464): the PyTorch reference, recurrent and chunked.

Per token t and KV head, with a log decay g_t <= 0, a write strength beta_t in [0, 1], an L2-normalised key
k_t and a value v_t, the state S (Dk, Dv) decays, then moves its recall of k_t towards v_t, then is read:

    S_t = exp(g_t) S_{t-1}
    S_t = S_t + beta_t k_t (v_t - S_t^T k_t)^T
    o_t = S_t^T q_t * scale

as flash-linear-attention's ``naive_recurrent_gated_delta_rule`` (``fla/ops/gated_delta_rule/naive.py``), whose
fused kernels (``chunk_gated_delta_rule``, ``fused_recurrent_gated_delta_rule``) compute the same function
(``ops/fla_backend.py``). A token with beta = 0 and g = 0 (padding) leaves the state unchanged.

:func:`gated_delta_recurrent` runs that loop. :func:`gated_delta_chunk` is the chunked (WY) form of fla's
``naive_chunk_gated_delta_rule``: in a chunk of C tokens with cumulative log decay G (G_i = sum of g over
the chunk up to i), the C updates compose into one: with A = strictly-lower (beta_i k_i . k_j exp(G_i - G_j)),
T = (I + A)^{-1} (a unit lower-triangular solve), u = T (beta v) and w = T (beta k exp(G)), the chunk's
corrected values are u - w S_0, its outputs (q_i exp(G_i)) S_0 + sum_{j <= i} (q_i . k_j exp(G_i - G_j))
(u - w S_0)_j, and the state after it exp(G_C) S_0 + sum_j exp(G_C - G_j) k_j (u - w S_0)_j^T.

Grouped-query attention: the state is per KV head (Hk); the H query heads of a group read their KV head's
state (H a multiple of Hk). Layout is head-first throughout:

    q (B, H, T, Dk); k (B, Hk, T, Dk); v (B, Hk, T, Dv); g, beta (B, Hk, T); state (B, Hk, Dk, Dv) float32
    -> o (B, H, T, Dv) in v's dtype, final state (B, Hk, Dk, Dv) float32 or None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lolcats.ops.common import expand_kv_heads

CHUNK = 64  # tokens per chunk of the chunked form (fla's default)
RECURRENT_BELOW = 16  # the dispatcher's recurrent form for chunks shorter than this (a decode step: T = 1)


def gated_delta_recurrent(q, k, v, g, beta, scale: float | None = None, initial_state=None,
                          output_final_state: bool = False):
    """Token by token (shapes in the module docstring)."""
    B, H, T, Dk = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]
    scale = Dk**-0.5 if scale is None else scale
    S = k.new_zeros(B, Hk, Dk, Dv, dtype=torch.float32) if initial_state is None else initial_state.float()
    qf, kf, vf, gf, bf = q.float() * scale, k.float(), v.float(), g.float(), beta.float()
    outs = []
    for t in range(T):
        kt = kf[:, :, t]  # (B, Hk, Dk)
        S = S * gf[:, :, t].exp()[..., None, None]
        delta = bf[:, :, t, None] * (vf[:, :, t] - torch.einsum("bhkv,bhk->bhv", S, kt))  # (B, Hk, Dv)
        S = S + kt[..., :, None] * delta[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, :, t], expand_kv_heads(S, H)))  # (B, H, Dv)
    o = torch.stack(outs, 2) if outs else q.new_zeros(B, H, 0, Dv, dtype=torch.float32)
    return o.to(v.dtype), (S if output_final_state else None)


def gated_delta_chunk(q, k, v, g, beta, scale: float | None = None, initial_state=None,
                      output_final_state: bool = False, chunk_size: int = CHUNK):
    """The chunked (WY) form: same function, C = ``chunk_size`` tokens per step (shapes in the module docstring)."""
    B, H, T, Dk = q.shape
    Hk, Dv, C = k.shape[1], v.shape[-1], chunk_size
    scale = Dk**-0.5 if scale is None else scale
    pad = (C - T % C) % C  # padded tokens: k = 0, beta = 0, g = 0, no effect on the state
    qf, kf, vf = (F.pad(x.float(), (0, 0, 0, pad)) for x in (q, k, v))
    gf, bf = (F.pad(x.float(), (0, pad)) for x in (g, beta))
    n = (T + pad) // C
    chunks = lambda x: x.reshape(*x.shape[:2], n, C, *x.shape[3:])  # noqa: E731  (B, h, T, .) -> (B, h, n, C, .)
    qc, kc, vc, bc = chunks(qf * scale), chunks(kf), chunks(vf), chunks(bf)
    G = chunks(gf).cumsum(-1)  # (B, Hk, n, C) cumulative log decay inside each chunk
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp(torch.where(causal, G[..., :, None] - G[..., None, :], float("-inf")))  # (B, Hk, n, C, C)
    kb = kc * bc[..., None]  # beta k
    A = (kb @ kc.transpose(-1, -2) * decay).tril(-1)
    eye = torch.eye(C, device=q.device)
    Tinv = torch.linalg.solve_triangular(A + eye, eye.expand_as(A), upper=False, unitriangular=True)
    u = Tinv @ (vc * bc[..., None])  # (B, Hk, n, C, Dv)
    w = Tinv @ (kb * G.exp()[..., None])  # (B, Hk, n, C, Dk)
    S = k.new_zeros(B, Hk, Dk, Dv, dtype=torch.float32) if initial_state is None else initial_state.float()
    qk = qc @ expand_kv_heads(kc, H).transpose(-1, -2) * expand_kv_heads(decay, H)  # (B, H, n, C, C)
    outs = []
    for i in range(n):
        v_new = u[:, :, i] - w[:, :, i] @ S  # (B, Hk, C, Dv)
        o_inter = (qc[:, :, i] * expand_kv_heads(G[:, :, i], H).exp()[..., None]) @ expand_kv_heads(S, H)
        outs.append(o_inter + qk[:, :, i] @ expand_kv_heads(v_new, H))  # (B, H, C, Dv)
        last = G[:, :, i, -1]  # (B, Hk)
        S = S * last.exp()[..., None, None] + (kc[:, :, i] * (last[..., None] - G[:, :, i]).exp()[..., None]
                                               ).transpose(-1, -2) @ v_new
    o = torch.cat(outs, 2)[:, :, :T] if outs else q.new_zeros(B, H, 0, Dv, dtype=torch.float32)
    return o.to(v.dtype), (S if output_final_state else None)


def gated_delta_naive(q, k, v, g, beta, scale: float | None = None, initial_state=None,
                      output_final_state: bool = False):
    """The reference a backend runs: the recurrent form for a few tokens (a decode step), else the chunked one."""
    op = gated_delta_recurrent if q.shape[2] < RECURRENT_BELOW else gated_delta_chunk
    return op(q, k, v, g, beta, scale, initial_state, output_final_state)
