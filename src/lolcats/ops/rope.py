"""Rotary position embeddings as HF Llama / Mistral / Qwen2 apply them (the reference of the fused
RoPE + feature map kernel, ``ops/triton/rope_feature_map.py``).

x_rot = x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1] (halves of the head dim),
cos, sin (B, T, D) from the model's ``rotary_emb`` (shared by every head).
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), cos, sin (B, T, D) -> (B, H, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def apply_rope(q, k, cos, sin):
    """RoPE as in HF Llama/Mistral/Qwen2. q, k: (B, H, T, D); cos, sin: (B, T, D)."""
    return rope(q, cos, sin), rope(k, cos, sin)
