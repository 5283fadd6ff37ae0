"""The Hedgehog feature map: the PyTorch reference of the fused kernel ``ops/triton/feature_map.py``.

phi(x) = [softmax(x W_h), softmax(-x W_h)] over the feature axis, clamped at ``FEATURE_EPS``,
per head h: x (B, H, T, D), W (H, D, F) -> (B, H, T, 2F).
"""

from __future__ import annotations

import torch

FEATURE_EPS = 1e-12


def project_heads(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) @ weight (H, D, F) per head -> (B, H, T, F), in the weight's dtype (float32)."""
    return torch.einsum("bhtd,hdf->bhtf", x.to(weight.dtype), weight)


def hedgehog_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = FEATURE_EPS) -> torch.Tensor:
    """x (B, H, T, D), weight (H, D, F) -> (B, H, T, 2F): [softmax(x W_h), softmax(-x W_h)], clamped.

    Computed in the weight's dtype (float32; bf16 products under autocast)."""
    z = project_heads(x, weight)
    return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1).clamp(min=eps)
