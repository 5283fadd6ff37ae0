"""RMSNorm in one Triton launch (inference only).

x (..., d) is read as N = prod(...) rows of d; one program per block of rows loads them once and writes

    y = weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)        (N, d) in torch.result_type(weight, x)

with the mean in float32 and the same two roundings as HF's ``LlamaRMSNorm`` (the normalised value to x's dtype,
the product to the result's). Reference: ``ops/norm/naive.py::rms_norm_reference``. The PyTorch path runs about
eight elementwise kernels per norm (cast, square, mean, add, rsqrt, multiply, cast, multiply by the weight),
which a batch-1 decoding step, bound by launches, pays twice per decoder layer and once more before the LM head.

``add_rms_norm_triton`` adds a residual first (``y = rms_norm(residual + x)``, the sum stored too: the next
residual), the decoder layer's ``hidden = residual + hidden; post_attention_layernorm(hidden)`` in one launch
instead of two (``add_rms_norm_reference``).

Forward only: ``FusedRMSNorm`` (``attention/fusion.py``) takes this path only when no gradient is wanted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lolcats.ops.triton.chunked import _empty, unit_last

ROW_TILE = 4096  # elements per program: rows per block = ROW_TILE // next_pow2(d), at least 1


@triton.jit
def _rms_norm_fwd(x, w, y, res, s, N, sx, sr, eps, D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
                  ADD: tl.constexpr):
    """This program's BLOCK of the N rows of x (N, D) at row stride sx (unit last stride) into y (N, D). ADD: the
    rows of res (row stride sr) are added first, the sum stored to s (N, D) in s's dtype and normalised."""
    rm = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rd = tl.arange(0, DP)
    md = rd < D
    m = (rm < N)[:, None] & md[None, :]
    xt = tl.load(x + rm[:, None] * sx + rd[None, :], mask=m, other=0.0).to(tl.float32)  # (BLOCK, DP)
    dt = x.dtype.element_ty
    if ADD:  # residual + x, rounded to its dtype as torch's add: the norm reads the rounded sum
        rt = tl.load(res + rm[:, None] * sr + rd[None, :], mask=m, other=0.0).to(tl.float32)
        dt = s.dtype.element_ty
        st = (rt + xt).to(dt)
        tl.store(s + rm[:, None] * D + rd[None, :], st, mask=m)
        xt = st.to(tl.float32)
    r = tl.rsqrt(tl.sum(xt * xt, 1) / D + eps)  # (BLOCK,)
    h = (xt * r[:, None]).to(dt).to(tl.float32)  # rounded as HF's h.to(input_dtype)
    wt = tl.load(w + rd, mask=md, other=0.0).to(tl.float32)  # (DP,)
    tl.store(y + rm[:, None] * D + rd[None, :], (wt[None, :] * h).to(y.dtype.element_ty), mask=m)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm_reference(x, weight, eps)`` in one launch: x (..., d) with a unit last stride (else copied),
    weight (d,) -> (..., d) in torch.result_type(weight, x). Forward only."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        raise ValueError("rms_norm_triton has no backward; use ops.norm.naive.rms_norm_reference (the torch "
                         "backend's rms_norm) where a gradient is needed")
    return torch.ops.lolcats.rms_norm(x, weight, eps)


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rms_norm_reference``: (rms_norm(residual + x), residual + x) in one launch; x and residual (..., d) of
    one shape. Forward only."""
    if torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad or weight.requires_grad):
        raise ValueError("add_rms_norm_triton has no backward; use ops.norm.naive.add_rms_norm_reference (the "
                         "torch backend's add_rms_norm) where a gradient is needed")
    if residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} and x {tuple(x.shape)} differ")
    return torch.ops.lolcats.add_rms_norm(x, residual, weight, eps)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None):
    """y, or (y, residual + x) where a residual is given."""
    D = x.shape[-1]
    rows = unit_last(x.reshape(-1, D))  # (N, D)
    N = rows.shape[0]
    res = unit_last(residual.reshape(-1, D)) if residual is not None else rows
    s = _empty((N, D), x, torch.result_type(residual, x)) if residual is not None else rows
    y = _empty((N, D), x, torch.result_type(weight, s))
    if N:
        DP = triton.next_power_of_2(D)
        block = min(triton.next_power_of_2(N), max(1, ROW_TILE // DP))
        _rms_norm_fwd[(triton.cdiv(N, block),)](rows, weight.contiguous(), y, res, s, N, rows.stride(0), res.stride(0),
                                                eps, D=D, DP=DP, BLOCK=block, ADD=residual is not None,
                                                num_warps=max(1, min(8, block * DP // 512)))
    if residual is None:
        return y.view(x.shape)
    return y.view(x.shape), s.view(x.shape)


def _launch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, weight, eps, None)


def _fake(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.result_type(weight, x))


def _add_launch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm(x, weight, eps, residual)


def _add_fake(x, residual, weight, eps):
    s = x.new_empty(x.shape, dtype=torch.result_type(residual, x))
    return s.new_empty(x.shape, dtype=torch.result_type(weight, s)), s


# Custom ops, opaque to torch.compile: dynamo records one call, which it could not trace into the kernel in the
# interpreter. Defined once per process (the tests reload this module).
if not hasattr(torch.ops.lolcats, "rms_norm"):
    torch.library.custom_op("lolcats::rms_norm", _launch, mutates_args=()).register_fake(_fake)
if not hasattr(torch.ops.lolcats, "add_rms_norm"):
    torch.library.custom_op("lolcats::add_rms_norm", _add_launch, mutates_args=()).register_fake(_add_fake)
