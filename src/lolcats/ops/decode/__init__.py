"""Decode step with a constant-size state: reference (``naive``) and a fused Triton kernel."""

from __future__ import annotations

import os

import torch

from lolcats.ops.decode.naive import DecodeState, decode_step_naive, window_slots

DECODE_BACKENDS = ("auto", "torch", "triton")


def _triton_step():
    try:
        from lolcats.ops.triton.decode import decode_step_triton
    except ImportError:
        return None
    return decode_step_triton


def decode_step(
    q: torch.Tensor,  # (B, H, D)
    k: torch.Tensor,  # (B, Hk, D)
    v: torch.Tensor,  # (B, Hk, Dv)
    fq: torch.Tensor,  # (B, H, F)
    fk: torch.Tensor,  # (B, Hk, F)
    state: DecodeState,  # updated in place
    pos: torch.Tensor,  # (B,) int64
    window_factor: torch.Tensor | None,  # (H,); None for linear
    kind: str,
    window_size: int,
    scale: float,
    valid: torch.Tensor | None = None,  # (B,) bool
    backend: str = "auto",
) -> torch.Tensor:  # (B, H, Dv)
    """One decoding step; ``auto`` uses the Triton kernel on CUDA when triton is installed."""
    backend = "auto" if backend == "fla" else backend  # fla has no decode kernel: same as auto
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"unknown decode backend {backend!r}; known: {list(DECODE_BACKENDS)}")
    on_device = q.is_cuda or os.environ.get("LOLCATS_TRITON_ON_CPU") == "1"
    fn = _triton_step() if backend == "triton" or (backend == "auto" and on_device) else None
    if backend == "triton" and fn is None:
        raise ImportError("decode backend 'triton' needs the triton package")
    fn = fn or decode_step_naive
    return fn(q, k, v, fq, fk, state, pos, window_factor, kind, window_size, scale, valid)


__all__ = ["DecodeState", "decode_step", "decode_step_naive", "window_slots"]
