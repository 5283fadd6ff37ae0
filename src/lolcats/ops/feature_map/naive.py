"""The Hedgehog feature map: the PyTorch reference of the fused kernel ``ops/triton/feature_map.py``.

phi(x) = [softmax(x W_h), softmax(-x W_h)] over the feature axis, clamped at ``FEATURE_EPS``,
per head h: x (B, H, T, D), W (H, D, F) -> (B, H, T, 2F). ``rope_hedgehog_reference``: RoPE
(``ops/rope.py``) then the map, what ``ops/triton/rope_feature_map.py`` fuses for inference.
"""

from __future__ import annotations

import torch

from lolcats.ops.common import FEATURE_EPS
from lolcats.ops.rope import rope


def project_heads(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) @ weight (H, D, F) per head -> (B, H, T, F), in the weight's dtype (float32)."""
    return torch.einsum("bhtd,hdf->bhtf", x.to(weight.dtype), weight)


def hedgehog_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = FEATURE_EPS) -> torch.Tensor:
    """x (B, H, T, D), weight (H, D, F) -> (B, H, T, 2F): [softmax(x W_h), softmax(-x W_h)], clamped.

    Computed in the weight's dtype (float32; bf16 products under autocast)."""
    z = project_heads(x, weight)
    return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1).clamp(min=eps)


def rope_hedgehog_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weight: torch.Tensor,
                            eps: float = FEATURE_EPS, feature_rope: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE then Hedgehog, the reference of ``ops/triton/rope_feature_map.py``: x (B, H, T, D) before RoPE,
    cos, sin (B, T, D), weight (H, D, F) -> x_rot (B, H, T, D) in x's dtype, phi(x_rot) (B, H, T, 2F); with
    ``feature_rope`` False the map reads x itself (``attention.feature_rope`` off): phi(x)."""
    x_rot = rope(x, cos, sin)
    return x_rot, hedgehog_reference(x_rot if feature_rope else x, weight, eps)
