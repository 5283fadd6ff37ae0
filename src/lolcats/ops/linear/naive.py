"""Causal linear attention: the PyTorch reference every kernel is checked against.

With feature maps phi_q, phi_k (already applied: ``fq = phi_q(q)``, ``fk = phi_k(k)``),

    y_i = fq_i . S_i / (fq_i . z_i + eps),   S_i = S_0 + sum_{j<=i} fk_j v_j^T,
                                             z_i = z_0 + sum_{j<=i} fk_j

``S`` (B, Hk, F, Dv) is the key-value state and ``z`` (B, Hk, F) the normaliser (running sum
of phi(k)). Queries of a GQA group share their KV head's state. Two forms are given: the
quadratic one (a masked T x T product, used for training on short sequences) and the
recurrent one (one token at a time, what decoding does). They compute the same function.
All arithmetic is in float32; outputs are cast back to ``v``'s dtype.
"""

from __future__ import annotations

import torch

EPS = 1e-12

State = tuple[torch.Tensor, torch.Tensor]  # (kv: (B, Hk, F, Dv), ksum: (B, Hk, F))


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, Hk, ...) -> (B, H, ...) by repeating each KV head for its query group."""
    groups = num_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def causal_linear_scores(fq: torch.Tensor, fk: torch.Tensor) -> torch.Tensor:
    """Unnormalised causal linear-attention weights a_ij = fq_i . fk_j (j <= i, else 0), float32.

    fq (B, H, T, F), fk (B, Hk, T, F) -> (B, H, T, T); row i divided by its sum is the attention
    distribution of query i (what attention transfer's cross-entropy term compares).
    """
    H, T = fq.shape[1], fq.shape[2]
    a = torch.einsum("bhif,bhjf->bhij", fq.float(), expand_kv_heads(fk.float(), H))
    return a.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=fq.device).tril(), 0.0)


def linear_attention_quadratic(
    fq: torch.Tensor,  # (B, H, T, F)
    fk: torch.Tensor,  # (B, Hk, T, F)
    v: torch.Tensor,  # (B, Hk, T, Dv)
    initial_state: State | None = None,
    output_final_state: bool = False,
    eps: float = EPS,
) -> tuple[torch.Tensor, State | None]:
    H = fq.shape[1]
    fqf, vf = fq.float(), expand_kv_heads(v.float(), H)
    a = causal_linear_scores(fq, fk)  # (B, H, T, T)
    num = a @ vf  # (B, H, T, Dv)
    den = a.sum(-1)  # (B, H, T)
    if initial_state is not None:
        kv0, ks0 = (expand_kv_heads(s.float(), H) for s in initial_state)
        num = num + fqf @ kv0
        den = den + torch.einsum("bhtf,bhf->bht", fqf, ks0)
    y = (num / (den[..., None] + eps)).to(v.dtype)
    return y, (final_state(fk, v, initial_state) if output_final_state else None)


def final_state(fk: torch.Tensor, v: torch.Tensor, initial_state: State | None = None) -> State:
    """State after consuming all T tokens: kv (B, Hk, F, Dv), ksum (B, Hk, F), float32."""
    kv = torch.einsum("bhtf,bhtd->bhfd", fk.float(), v.float())
    ks = fk.float().sum(2)
    if initial_state is not None:
        kv, ks = kv + initial_state[0].float(), ks + initial_state[1].float()
    return kv, ks


def linear_attention_recurrent(
    fq: torch.Tensor,  # (B, H, T, F)
    fk: torch.Tensor,  # (B, Hk, T, F)
    v: torch.Tensor,  # (B, Hk, T, Dv)
    initial_state: State | None = None,
    output_final_state: bool = False,
    eps: float = EPS,
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
        kv = kv + fk[:, :, t, :, None].float() * v[:, :, t, None, :].float()
        ks = ks + fk[:, :, t].float()
        q_t = fq[:, :, t].float()  # (B, H, F)
        num = torch.einsum("bhf,bhfd->bhd", q_t, expand_kv_heads(kv, H))
        den = torch.einsum("bhf,bhf->bh", q_t, expand_kv_heads(ks, H))
        ys.append(num / (den[..., None] + eps))
    y = torch.stack(ys, dim=2).to(v.dtype)
    return y, ((kv, ks) if output_final_state else None)
