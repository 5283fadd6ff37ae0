"""The Hedgehog feature map as one Triton op (forward and backward), beside its reference.

phi(x) = [softmax(x W_h), softmax(-x W_h)].clamp(min=eps) per head h, x (B, H, T, D),
W (H, D, F) -> (B, H, T, 2F). Reference: ``ops/feature_map/naive.py::hedgehog_reference`` (what
``HedgehogFeatureMap`` computes). One program per (BM of the B x T token rows,
head) computes z = x W_h in registers and writes both softmaxes: the PyTorch path runs ~8 kernels
(casts, batched matmul, two softmaxes, negation, concatenation, clamp) and as many backward.
The backward recomputes z, and adds each program's x^T dz into dW with atomics. Under autocast
z is multiplied in the autocast dtype, as the reference's einsum is.

The ``triton`` attention backend carries it (``Backend.hedgehog``), so ``LolcatsAttention``
uses it wherever it uses the Triton attention kernels (docs/PERFORMANCE.md: the measurement).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lolcats.ops.common import FEATURE_EPS
from lolcats.ops.triton.chunked import tile_dot, dot_dtype, pad_dim

BM = 64  # tokens per program


@triton.jit
def _tile(x, w, T, N, H, D: tl.constexpr, F: tl.constexpr, DP: tl.constexpr, FP: tl.constexpr,
          BLOCK: tl.constexpr, DT: tl.constexpr):
    """This program's rows: BLOCK of the N = B x T (sequence, token) rows of head h, so one W_h load
    serves a block at any T (decoding: T = 1). Returns (h, row offsets, row mask, d and f ranges,
    x (BM, DP), W_h (DP, FP), softmax(z) and softmax(-z) (BM, FP) float32), z = x W_h."""
    h = tl.program_id(1)
    rm = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mm = rm < N
    row = ((rm // T) * H + h) * T + rm % T  # (BM,) row of x (B, H, T, D) viewed as (B*H*T, D)
    rd, rf = tl.arange(0, DP), tl.arange(0, FP)
    md, mf = rd < D, rf < F
    xt = tl.load(x + row[:, None] * D + rd[None, :], mask=mm[:, None] & md[None, :], other=0.0)
    wt = tl.load(w + (h * D + rd[:, None]) * F + rf[None, :], mask=md[:, None] & mf[None, :], other=0.0)
    s1, s2 = softmax_pair(tile_dot(xt, wt, DT), mf)
    return h, row, mm, rd, rf, xt, wt, s1, s2


@triton.jit
def softmax_pair(z, mf):
    """z (BM, FP) float32, mf (FP,) the valid features -> softmax(z), softmax(-z) over the valid ones."""
    zp = tl.where(mf[None, :], z, float("-inf"))
    a = tl.exp(zp - tl.max(zp, 1)[:, None])
    zn = tl.where(mf[None, :], -z, float("-inf"))
    b = tl.exp(zn - tl.max(zn, 1)[:, None])
    return a / tl.sum(a, 1)[:, None], b / tl.sum(b, 1)[:, None]


@triton.jit
def _hh_fwd(x, w, out, T, N, H, eps, D: tl.constexpr, F: tl.constexpr, DP: tl.constexpr, FP: tl.constexpr,
            BLOCK: tl.constexpr, DT: tl.constexpr):
    h, row, mm, rd, rf, _, _, s1, s2 = _tile(x, w, T, N, H, D, F, DP, FP, BLOCK, DT)
    m = mm[:, None] & (rf < F)[None, :]
    base = out + row[:, None] * (2 * F) + rf[None, :]
    tl.store(base, tl.maximum(s1, eps).to(out.dtype.element_ty), mask=m)
    tl.store(base + F, tl.maximum(s2, eps).to(out.dtype.element_ty), mask=m)


@triton.jit
def _hh_bwd(x, w, g, dx, dw, T, N, H, eps, D: tl.constexpr, F: tl.constexpr, DP: tl.constexpr, FP: tl.constexpr,
            BLOCK: tl.constexpr, DT: tl.constexpr, WANT_DX: tl.constexpr):
    h, row, mm, rd, rf, xt, wt, s1, s2 = _tile(x, w, T, N, H, D, F, DP, FP, BLOCK, DT)
    md, mf = rd < D, rf < F
    m = mm[:, None] & mf[None, :]
    base = g + row[:, None] * (2 * F) + rf[None, :]
    g1 = tl.where(s1 >= eps, tl.load(base, mask=m, other=0.0).to(tl.float32), 0.0)  # clamp passes grad where s >= eps
    g2 = tl.where(s2 >= eps, tl.load(base + F, mask=m, other=0.0).to(tl.float32), 0.0)
    dz = s1 * (g1 - tl.sum(g1 * s1, 1)[:, None]) - s2 * (g2 - tl.sum(g2 * s2, 1)[:, None])  # (BM, FP)
    dz = tl.where(m, dz, 0.0)
    if WANT_DX:  # attention transfer detaches q and k: only dW is needed there
        dxt = tile_dot(dz, tl.trans(wt), DT)  # (BM, DP)
        tl.store(dx + row[:, None] * D + rd[None, :], dxt.to(dx.dtype.element_ty),
                 mask=mm[:, None] & md[None, :])
    dwt = tile_dot(tl.trans(xt), dz, DT)  # (DP, FP)
    tl.atomic_add(dw + (h * D + rd[:, None]) * F + rf[None, :], dwt, mask=md[:, None] & mf[None, :])


def autocast_dot_dtype(*tensors: torch.Tensor):
    """The products' dtype: ``dot_dtype`` of the inputs, and of autocast's dtype where it is on."""
    dev = tensors[0].device.type
    amp = torch.empty(0, dtype=torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else None
    return dot_dtype(*tensors, amp)


class HedgehogTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float, out_dtype):
        B, H, T, D = x.shape
        F = weight.shape[-1]
        x, weight = x.contiguous(), weight.contiguous()
        out = torch.empty((B, H, T, 2 * F), dtype=out_dtype, device=x.device)
        dims = dict(D=D, F=F, DP=pad_dim(D), FP=pad_dim(F), BLOCK=BM, DT=autocast_dot_dtype(x, weight))
        _hh_fwd[(triton.cdiv(B * T, BM), H)](x, weight, out, T, B * T, H, eps, **dims, num_warps=4)
        ctx.save_for_backward(x, weight)
        ctx.cfg = (eps, dims)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        eps, dims = ctx.cfg
        B, H, T, _ = x.shape
        want_dx = ctx.needs_input_grad[0]
        dx = torch.empty_like(x) if want_dx else x  # x: an unused pointer
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
        _hh_bwd[(triton.cdiv(B * T, BM), H)](x, weight, g.contiguous(), dx, dw, T, B * T, H, eps, **dims,
                                             WANT_DX=want_dx, num_warps=4)
        return (dx if want_dx else None), dw.to(weight.dtype), None, None


def hedgehog_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = FEATURE_EPS,
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Same function as ``hedgehog_reference``: x (B, H, T, D), weight (H, D, F) -> (B, H, T, 2F)."""
    return HedgehogTriton.apply(x, weight, eps, out_dtype)
