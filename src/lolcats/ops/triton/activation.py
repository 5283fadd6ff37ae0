"""The SiLU-gated product of a gated MLP in one Triton launch (inference only).

gate_up (..., 2I) holds the gate and up projections' outputs side by side (one GEMM over their weights'
rows, ``FusedMLP`` in ``attention/fusion.py``); one program per (row, block of I columns) writes

    y = silu(g).to(dtype) * u        (..., I) in gate_up's dtype, g = gate_up[..., :I], u = gate_up[..., I:]

in float32 with HF's roundings (``act_fn(gate_proj(x)) * up_proj(x)``: the SiLU's output in the dtype, then the
product). Reference: ``ops/norm/naive.py::silu_mul_reference``; PyTorch runs the SiLU and the product as two
kernels on two GEMMs' outputs.

Forward only: the MLP takes this path only when no gradient is wanted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lolcats.ops.triton.chunked import _empty, unit_last

MAX_COLS = 1024  # columns of I per program


@triton.jit
def _silu_mul_fwd(gu, y, sg, C, BC: tl.constexpr):
    """Row program_id(0) of gu (N, 2C) at row stride sg (unit last stride), columns program_id(1) * BC + ...:
    y (N, C) = silu(gu[:, :C]) * gu[:, C:]."""
    n = tl.program_id(0).to(tl.int64)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    m = rc < C
    g = tl.load(gu + n * sg + rc, mask=m, other=0.0).to(tl.float32)  # (BC,)
    u = tl.load(gu + n * sg + C + rc, mask=m, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(y.dtype.element_ty).to(tl.float32)  # rounded as F.silu's output
    tl.store(y + n * C + rc, (s * u).to(y.dtype.element_ty), mask=m)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu_mul_reference(gate_up)`` in one launch: gate_up (..., 2I) with a unit last stride (else copied)
    -> (..., I) in its dtype. Forward only."""
    if torch.is_grad_enabled() and gate_up.requires_grad:
        raise ValueError("silu_mul_triton has no backward; use ops.norm.naive.silu_mul_reference (the torch "
                         "backend's silu_mul) where a gradient is needed")
    return torch.ops.lolcats.silu_mul(gate_up)


def _launch(gate_up: torch.Tensor) -> torch.Tensor:
    C2 = gate_up.shape[-1]
    if C2 % 2:
        raise ValueError(f"silu_mul: the last dimension ({C2}) must be even: the gate's outputs, then the up's")
    rows = unit_last(gate_up.reshape(-1, C2))  # (N, 2C), C = I
    N, C = rows.shape[0], C2 // 2
    y = _empty((N, C), gate_up)
    if N and C:
        bc = min(MAX_COLS, triton.next_power_of_2(C))
        _silu_mul_fwd[(N, triton.cdiv(C, bc))](rows, y, rows.stride(0), C, BC=bc, num_warps=4)
    return y.view(*gate_up.shape[:-1], C)


def _fake(gate_up):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


# A custom op, opaque to torch.compile (as ``ops/triton/norm.py``'s). Defined once per process.
if not hasattr(torch.ops.lolcats, "silu_mul"):
    torch.library.custom_op("lolcats::silu_mul", _launch, mutates_args=()).register_fake(_fake)
