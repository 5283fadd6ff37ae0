"""RoPE and the Hedgehog feature map of the queries and keys in one Triton launch (inference only).

For x in (q, k), before RoPE, with cos, sin (B, T, D) from the model's ``rotary_emb``:

    x_rot = x * cos + rotate_half(x) * sin           (B, Hx, T, D), rounded to x's dtype
    phi   = [softmax(x_rot W_h), softmax(-x_rot W_h)].clamp(min=eps)   (B, Hx, T, 2F) float32

or, with ``feature_rope=False`` (``attention.feature_rope`` off), phi of x itself: the maps read the queries and
keys before RoPE while x_rot still goes to the softmax terms. phi(q) is stored times ``q_scale`` (the layer's
``attention.linear_scale``: what ``LolcatsAttention.scale_linear`` multiplies in otherwise, one launch less a layer).

Reference: ``ops/feature_map/naive.py::rope_hedgehog_reference`` (``ops/rope.py`` then
``hedgehog_reference``), applied to q with W_q and to k with W_k. The unfused path runs RoPE as
about six elementwise kernels per tensor and the map as one more each (``ops/triton/feature_map.py``);
here one program per (block of the B x T token rows, head of q or of k) loads x and its rotate_half
partner, rotates in float32, stores x_rot, and multiplies the rounded x_rot (or x) by W_h in registers, as
the Hedgehog kernel does (same product dtype, same softmax pair). x may be strided (a slice of the
fused QKV projection's output): the kernel reads its strides, so no copy is made.

Forward only: the layer takes this path only when no gradient is needed (``LolcatsAttention``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lolcats.ops.common import FEATURE_EPS
from lolcats.ops.triton.chunked import _empty, pad_dim, tile_dot, unit_last
from lolcats.ops.triton.feature_map import autocast_dot_dtype, softmax_pair


@triton.jit
def _rope_hh_head(x, sb, sh, st, cos, sin, cb, ct, w, xo, phi, h, T, N, HX, eps, scale, D: tl.constexpr,
                  F: tl.constexpr, DP: tl.constexpr, FP: tl.constexpr, BLOCK: tl.constexpr, DT: tl.constexpr,
                  FROPE: tl.constexpr):
    """Head h of x (B, HX, T, D) at strides (sb, sh, st, 1), for this program's BLOCK of the N = B x T rows:
    x_rot into xo (B, HX, T, D) and phi(x_rot) (phi(x) unless FROPE) times ``scale`` into phi (B, HX, T, 2F), both
    contiguous."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mm = rm < N
    b, t = rm // T, rm % T  # (BM,)
    rd, rf = tl.arange(0, DP), tl.arange(0, FP)
    md, mf = rd < D, rf < F
    m2 = mm[:, None] & md[None, :]
    first = rd < D // 2
    partner = tl.where(first, rd + D // 2, rd - D // 2)  # rotate_half(x)[d] = -x[d + D/2] or x[d - D/2]
    xb = x + (b * sb + h * sh + t * st)[:, None]
    xt = tl.load(xb + rd[None, :], mask=m2, other=0.0).to(tl.float32)  # (BM, DP)
    xp = tl.load(xb + partner[None, :], mask=m2, other=0.0).to(tl.float32)
    xp = tl.where(first[None, :], -xp, xp)
    cs = (b * cb + t * ct)[:, None] + rd[None, :]
    c = tl.load(cos + cs, mask=m2, other=0.0).to(tl.float32)
    s = tl.load(sin + cs, mask=m2, other=0.0).to(tl.float32)
    xr = (xt * c + xp * s).to(xo.dtype.element_ty)  # (BM, DP), rounded as the unfused RoPE's output
    row = (b * HX + h) * T + t  # (BM,) row of the (B, HX, T) outputs
    tl.store(xo + row[:, None] * D + rd[None, :], xr, mask=m2)
    wt = tl.load(w + (h * D + rd[:, None]) * F + rf[None, :], mask=md[:, None] & mf[None, :], other=0.0)
    xf = xr if FROPE else xt.to(xo.dtype.element_ty)  # what the map reads: x_rot, or x as given
    s1, s2 = softmax_pair(tile_dot(xf, wt, DT), mf)  # (BM, FP)
    m = mm[:, None] & mf[None, :]
    base = phi + row[:, None] * (2 * F) + rf[None, :]
    tl.store(base, (tl.maximum(s1, eps) * scale).to(phi.dtype.element_ty), mask=m)
    tl.store(base + F, (tl.maximum(s2, eps) * scale).to(phi.dtype.element_ty), mask=m)


@triton.jit
def _rope_hh_fwd(q, k, cos, sin, wq, wk, qo, ko, fq, fk, T, N, H, Hk, q_sb, q_sh, q_st, k_sb, k_sh, k_st, cb, ct,
                 eps, q_scale, D: tl.constexpr, F: tl.constexpr, DP: tl.constexpr, FP: tl.constexpr,
                 BLOCK: tl.constexpr, DT: tl.constexpr, FROPE: tl.constexpr):
    """Grid (row blocks, H + Hk): heads 0..H-1 are q's, the rest k's."""
    h = tl.program_id(1)
    if h < H:
        _rope_hh_head(q, q_sb, q_sh, q_st, cos, sin, cb, ct, wq, qo, fq, h, T, N, H, eps, q_scale, D, F, DP, FP,
                      BLOCK, DT, FROPE)
    else:
        _rope_hh_head(k, k_sb, k_sh, k_st, cos, sin, cb, ct, wk, ko, fk, h - H, T, N, Hk, eps, 1.0, D, F, DP, FP,
                      BLOCK, DT, FROPE)


def _batch_strides(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """cos, sin (B|1, T, D) with one layout and unit last stride, and their (batch, time) strides
    (batch 0 when shared by every row)."""
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, (cos.stride(0) if cos.shape[0] > 1 else 0), cos.stride(1)


def rope_hedgehog_triton(
    q: torch.Tensor,  # (B, H, T, D) before RoPE, any strides with a unit last one
    k: torch.Tensor,  # (B, Hk, T, D) likewise
    cos: torch.Tensor,  # (B | 1, T, D)
    sin: torch.Tensor,  # (B | 1, T, D)
    wq: torch.Tensor,  # (H, D, F)
    wk: torch.Tensor,  # (Hk, D, F)
    eps: float = FEATURE_EPS,
    feature_rope: bool = True,  # False: the maps read q, k before RoPE
    q_scale: float = 1.0,  # phi(q) is returned times this (the layer's linear_scale)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rope_hedgehog_reference(q, cos, sin, wq, eps, feature_rope)`` and the same of k in one launch:
    q_rot (B, H, T, D), k_rot (B, Hk, T, D) in their dtypes, phi(q_rot) (B, H, T, 2F) times ``q_scale``,
    phi(k_rot) (B, Hk, T, 2F) float32 (phi(q), phi(k) with ``feature_rope`` False). Forward only."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, wq, wk)):
        raise ValueError("rope_hedgehog_triton has no backward; use ops.rope.apply_rope and the feature map "
                         "where a gradient is needed")
    return torch.ops.lolcats.rope_hedgehog(q, k, cos, sin, wq, wk, eps, feature_rope, q_scale)


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, wq: torch.Tensor,
            wk: torch.Tensor, eps: float, feature_rope: bool,
            q_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    (B, H, T, D), Hk, F = q.shape, k.shape[1], wq.shape[-1]
    q, k, wq, wk = unit_last(q), unit_last(k), wq.contiguous(), wk.contiguous()
    cos, sin, cb, ct = _batch_strides(cos, sin)
    qo, ko = _empty((B, H, T, D), q), _empty((B, Hk, T, D), k)
    fq, fk = _empty((B, H, T, 2 * F), q, torch.float32), _empty((B, Hk, T, 2 * F), k, torch.float32)
    N = B * T
    block = min(64, max(16, triton.next_power_of_2(N)))  # decoding (N = B) needs no 64-row tile
    dims = dict(D=D, F=F, DP=pad_dim(D), FP=pad_dim(F), BLOCK=block, DT=autocast_dot_dtype(q, k, wq, wk),
                FROPE=feature_rope)
    _rope_hh_fwd[(triton.cdiv(N, block), H + Hk)](
        q, k, cos, sin, wq, wk, qo, ko, fq, fk, T, N, H, Hk, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), cb, ct, eps, float(q_scale), **dims, num_warps=4)
    return qo, ko, fq, fk


def _fake(q, k, cos, sin, wq, wk, eps, feature_rope, q_scale):
    (B, H, T, D), Hk, F = q.shape, k.shape[1], wq.shape[-1]
    return (q.new_empty(B, H, T, D), k.new_empty(B, Hk, T, D), q.new_empty(B, H, T, 2 * F, dtype=torch.float32),
            k.new_empty(B, Hk, T, 2 * F, dtype=torch.float32))


# A custom op, opaque to torch.compile: dynamo records one call (FastGenerator(compile=...)), on the GPU as in
# the interpreter, whose kernels it cannot trace. Defined once per process (the tests reload this module).
if not hasattr(torch.ops.lolcats, "rope_hedgehog"):
    torch.library.custom_op("lolcats::rope_hedgehog", _launch, mutates_args=()).register_fake(_fake)
