"""Hybrid window + linear attention (LoLCATs, Eq. 7): the PyTorch reference.

Each query i splits the causal keys into a *window* W(i), attended with softmax, and the
rest L(i), attended with linear attention over feature maps; both share one normaliser:

    y_i = ( g_h sum_{j in W(i)} exp(s_ij - m_i) v_j + sum_{j in L(i)} (fq_i . fk_j) v_j + fq_i . S0 )
          / ( g_h sum_{j in W(i)} exp(s_ij - m_i)     + sum_{j in L(i)} (fq_i . fk_j)     + fq_i . z0 )

with s_ij = q_i . k_j * scale, m_i = max_{j in W(i)} s_ij (the paper's stabiliser: it is *not*
applied to the linear terms, so it is part of the function, not only of the numerics),
g_h = sigmoid(window factor) in (0, 1) per query head, and (S0, z0) an optional state of
keys earlier than every key passed in.

Window shapes, by token positions p (so left padding does not move them):
  * ``sliding_window``:  j in W(i) iff 0 <= p_i - p_j < w;  j in L(i) iff p_i - p_j >= w
  * ``terraced_window``: blocks of w tokens, b = p // w; j in W(i) iff p_j <= p_i and
    b_i - b_j <= 1 (own block and the previous one); j in L(i) iff b_i - b_j >= 2.
The window always holds the query itself, so the normaliser is at least g_h > 0.
``attention.linear_scale`` (lambda) is applied by the layer, not here: it passes lambda fq, so every linear
term above (and the state's) is weighted lambda against the softmax terms.

With a log forget gate ``log_gate`` (B, Hk, Tq) on the queries' tokens (``ops/gate.py``), each
linear term decays by the gates of the tokens since the key left the window:
(fq_i . fk_j) exp(Lam(p_i) - Lam(a(j))), a(j) = the position where key j left the window; the
initial state by exp(Lam(p_i)). Keys before the queries (a decode state's window slots) have no
gates of their own: they have not left the window yet.

Sparse cache (LoLA, ``ops/sparse/naive.py``): ``fold_pos`` (B, Hk, Tk) gives, per KV head, the
position from which key j counts in the linear part. A key past the window (j in L(i) above) with
p_i < fold_pos_j is still in the sparse cache: it joins the softmax terms W(i) instead (window
factor, and the max m_i taken over the window and the cache together). Without ``fold_pos`` a key
is linear as soon as it leaves the window. ``key_mask`` may then be per KV head, (B, Hk, Tk).
"""

from __future__ import annotations

from typing import Literal

import torch

from lolcats.ops.gate import arrival_positions, cumulative_log_gate
from lolcats.ops.common import State, expand_kv_heads

WindowKind = Literal["sliding_window", "terraced_window"]


def window_masks(
    q_pos: torch.Tensor,  # (B, Tq) int
    k_pos: torch.Tensor,  # (B, Tk) int
    kind: WindowKind,
    window_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (B, 1, Tq, Tk): keys in the softmax window, keys in the linear part."""
    qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]
    causal = kp <= qp
    if kind == "sliding_window":
        d = qp - kp
        return causal & (d < window_size), d >= window_size
    if kind == "terraced_window":
        db = qp // window_size - kp // window_size
        return causal & (db <= 1), db >= 2
    raise ValueError(f"unknown window kind {kind!r}; known: sliding_window, terraced_window")


def default_positions(B: int, Tq: int, Tk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions when queries are the last Tq of Tk keys: (B, Tq), (B, Tk)."""
    k_pos = torch.arange(Tk, device=device).expand(B, Tk)
    return k_pos[:, Tk - Tq :], k_pos


def hybrid_attention_naive(
    q: torch.Tensor,  # (B, H, Tq, D)
    k: torch.Tensor,  # (B, Hk, Tk, D)
    v: torch.Tensor,  # (B, Hk, Tk, Dv)
    fq: torch.Tensor,  # (B, H, Tq, F)
    fk: torch.Tensor,  # (B, Hk, Tk, F)
    window_factor: torch.Tensor,  # (H,) in (0, 1)
    kind: WindowKind = "sliding_window",
    window_size: int = 64,
    scale: float | None = None,
    q_pos: torch.Tensor | None = None,  # (B, Tq)
    k_pos: torch.Tensor | None = None,  # (B, Tk)
    key_mask: torch.Tensor | None = None,  # (B, Tk) bool, False = padding
    initial_state: State | None = None,
    return_weights: bool = False,
    log_gate: torch.Tensor | None = None,  # (B, Hk, Tq), 0 at padding
    fold_pos: torch.Tensor | None = None,  # (B, Hk, Tk) int64: sparse cache, see the module docstring
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns y (B, H, Tq, Dv) in v's dtype and, if asked, the weights (B, H, Tq, Tk)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    if q_pos is None or k_pos is None:
        q_pos, k_pos = default_positions(B, Tq, Tk, q.device)
    in_win, in_lin = window_masks(q_pos, k_pos, kind, window_size)
    if key_mask is not None:
        km = key_mask[:, None, None, :] if key_mask.dim() == 2 else expand_kv_heads(key_mask, H)[:, :, None, :]
        in_win = in_win & km
        in_lin = in_lin & km
    if fold_pos is not None:  # past the window but not yet folded: in the sparse cache, a softmax term
        cached = in_lin & (q_pos[:, None, :, None] < expand_kv_heads(fold_pos, H)[:, :, None, :])
        in_win, in_lin = in_win | cached, in_lin & ~cached
    kf, vf, fkf = (expand_kv_heads(t.float(), H) for t in (k, v, fk))
    qf, fqf = q.float(), fq.float()

    s = (qf @ kf.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    s = s.masked_fill(~in_win, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with no key (padding)
    a_win = window_factor.float().view(1, H, 1, 1) * torch.exp(s - m)
    a_lin = fqf @ fkf.transpose(-1, -2)
    if log_gate is not None:
        lam_q = cumulative_log_gate(log_gate, q_pos, q_pos)  # (B, Hk, Tq)
        lam_a = cumulative_log_gate(log_gate, q_pos, arrival_positions(k_pos, kind, window_size))  # (B, Hk, Tk)
        lam_q, lam_a = expand_kv_heads(lam_q, H), expand_kv_heads(lam_a, H)
        a_lin = a_lin * torch.exp(torch.where(in_lin, lam_q[..., :, None] - lam_a[..., None, :], float("-inf")))
    a_lin = a_lin.masked_fill(~in_lin, 0.0)
    a = a_win + a_lin
    num, den = a @ vf, a.sum(-1)
    if initial_state is not None:
        kv0, ks0 = (expand_kv_heads(t.float(), H) for t in initial_state)
        num0, den0 = fqf @ kv0, torch.einsum("bhtf,bhf->bht", fqf, ks0)
        if log_gate is not None:
            num0, den0 = num0 * torch.exp(lam_q)[..., None], den0 * torch.exp(lam_q)
        num, den = num + num0, den + den0
    safe = den > 0
    y = torch.where(safe[..., None], num / torch.where(safe, den, 1.0)[..., None], 0.0)
    w = a / torch.where(safe, den, 1.0)[..., None] if return_weights else None
    return y.to(v.dtype), w
