"""Causal linear attention: the PyTorch reference every kernel is checked against.

With feature maps phi_q, phi_k (already applied: ``fq = phi_q(q)``, ``fk = phi_k(k)``),

    y_i = fq_i . S_i / (fq_i . z_i + eps),   S_i = S_0 + sum_{j<=i} fk_j v_j^T,
                                             z_i = z_0 + sum_{j<=i} fk_j

``S`` (B, Hk, F, Dv) is the key-value state and ``z`` (B, Hk, F) the normaliser (running sum
of phi(k)). Queries of a GQA group share their KV head's state. Two forms are given: the
quadratic one (a masked T x T product, used for training on short sequences) and the
recurrent one (one token at a time, what decoding does). They compute the same function.
All arithmetic is in float32; outputs are cast back to ``v``'s dtype.

With a log forget gate ``log_gate`` (B, Hk, T) (``ops/gate.py``; keys arrive in the linear part at
their own position) the state decays before each token is added: S_i = g_i S_{i-1} + fk_i v_i^T,
so key j has weight exp(G_i - G_j) for query i, the initial state exp(G_i), G = cumsum(log_gate).
"""

from __future__ import annotations

import torch

from lolcats.ops.common import EPS, State, expand_kv_heads


def causal_linear_scores(fq: torch.Tensor, fk: torch.Tensor, log_gate: torch.Tensor | None = None) -> torch.Tensor:
    """Unnormalised causal linear-attention weights a_ij = fq_i . fk_j (j <= i, else 0), float32.

    fq (B, H, T, F), fk (B, Hk, T, F) -> (B, H, T, T); row i divided by its sum is the attention
    distribution of query i (what attention transfer's cross-entropy term compares). With
    ``log_gate`` (B, Hk, T) the weights decay: a_ij * exp(G_i - G_j).
    """
    H, T = fq.shape[1], fq.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=fq.device).tril()
    a = torch.einsum("bhif,bhjf->bhij", fq.float(), expand_kv_heads(fk.float(), H))
    if log_gate is not None:
        G = expand_kv_heads(log_gate.float().cumsum(-1), H)  # (B, H, T)
        a = a * torch.exp(torch.where(causal, G[..., :, None] - G[..., None, :], float("-inf")))
    return a.masked_fill(~causal, 0.0)


def linear_attention_quadratic(
    fq: torch.Tensor,  # (B, H, T, F)
    fk: torch.Tensor,  # (B, Hk, T, F)
    v: torch.Tensor,  # (B, Hk, T, Dv)
    initial_state: State | None = None,
    output_final_state: bool = False,
    eps: float = EPS,
    log_gate: torch.Tensor | None = None,  # (B, Hk, T)
) -> tuple[torch.Tensor, State | None]:
    H = fq.shape[1]
    fqf, vf = fq.float(), expand_kv_heads(v.float(), H)
    a = causal_linear_scores(fq, fk, log_gate)  # (B, H, T, T)
    num = a @ vf  # (B, H, T, Dv)
    den = a.sum(-1)  # (B, H, T)
    if initial_state is not None:
        kv0, ks0 = (expand_kv_heads(s.float(), H) for s in initial_state)
        num0, den0 = fqf @ kv0, torch.einsum("bhtf,bhf->bht", fqf, ks0)
        if log_gate is not None:  # the initial state decays with every token
            g0 = torch.exp(expand_kv_heads(log_gate.float().cumsum(-1), H))  # (B, H, T)
            num0, den0 = num0 * g0[..., None], den0 * g0
        num, den = num + num0, den + den0
    y = (num / (den[..., None] + eps)).to(v.dtype)
    return y, (final_state(fk, v, initial_state, log_gate) if output_final_state else None)


def final_state(fk: torch.Tensor, v: torch.Tensor, initial_state: State | None = None,
                log_gate: torch.Tensor | None = None) -> State:
    """State after consuming all T tokens: kv (B, Hk, F, Dv), ksum (B, Hk, F), float32."""
    fkf = fk.float()
    decay0 = None
    if log_gate is not None:  # key j decays with the tokens after it, the initial state with all
        G = log_gate.float().cumsum(-1)  # (B, Hk, T)
        fkf = fkf * torch.exp(G[..., -1:] - G)[..., None]
        decay0 = torch.exp(G[..., -1])  # (B, Hk)
    kv = torch.einsum("bhtf,bhtd->bhfd", fkf, v.float())
    ks = fkf.sum(2)
    if initial_state is not None:
        kv0, ks0 = initial_state[0].float(), initial_state[1].float()
        if decay0 is not None:
            kv0, ks0 = kv0 * decay0[..., None, None], ks0 * decay0[..., None]
        kv, ks = kv + kv0, ks + ks0
    return kv, ks


def linear_attention_recurrent(
    fq: torch.Tensor,  # (B, H, T, F)
    fk: torch.Tensor,  # (B, Hk, T, F)
    v: torch.Tensor,  # (B, Hk, T, Dv)
    initial_state: State | None = None,
    output_final_state: bool = False,
    eps: float = EPS,
    log_gate: torch.Tensor | None = None,  # (B, Hk, T)
) -> tuple[torch.Tensor, State | None]:
    B, Hk, T, F = fk.shape
    H = fq.shape[1]
    if initial_state is None:
        kv = fk.new_zeros(B, Hk, F, v.shape[-1], dtype=torch.float32)
        ks = fk.new_zeros(B, Hk, F, dtype=torch.float32)
    else:
        kv, ks = (s.float().clone() for s in initial_state)
    ys = []
    for t in range(T):
        if log_gate is not None:  # decay, then add the token
            g = torch.exp(log_gate[:, :, t].float())  # (B, Hk)
            kv, ks = kv * g[..., None, None], ks * g[..., None]
        kv = kv + fk[:, :, t, :, None].float() * v[:, :, t, None, :].float()
        ks = ks + fk[:, :, t].float()
        q_t = fq[:, :, t].float()  # (B, H, F)
        num = torch.einsum("bhf,bhfd->bhd", q_t, expand_kv_heads(kv, H))
        den = torch.einsum("bhf,bhf->bh", q_t, expand_kv_heads(ks, H))
        ys.append(num / (den[..., None] + eps))
    y = torch.stack(ys, dim=2).to(v.dtype)
    return y, ((kv, ks) if output_final_state else None)
