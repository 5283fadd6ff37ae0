"""The decoder layer's RMSNorm and SiLU-gated product as HF computes them: the references of
``ops/triton/norm.py`` and ``ops/triton/activation.py``.

RMSNorm (``LlamaRMSNorm``, ``MistralRMSNorm``, ``Qwen2RMSNorm``), x (..., d), weight (d,):

    h = x / sqrt(mean(x^2) + eps)      in float32, then rounded to x's dtype
    y = weight * h                     in torch.result_type(weight, x)

With the residual add first (``add_rms_norm``): s = residual + x in their result dtype, then the norm of s;
both are returned (s is the next residual).

The gated MLP's activation (``LlamaMLP``: ``act_fn(gate_proj(x)) * up_proj(x)``, act SiLU) on the gate and up
projections' outputs side by side, gate_up (..., 2I) -> (..., I): silu(g) rounded to the dtype, then times u.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., d), weight (d,) -> (..., d) in torch.result_type(weight, x): HF's RMSNorm, operation for operation."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder layer's residual add, then its RMSNorm: (rms_norm(residual + x), residual + x), as HF computes
    ``hidden = residual + hidden; post_attention_layernorm(hidden)``."""
    s = residual + x
    return rms_norm_reference(s, weight, eps), s


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2I), the gate's outputs then the up projection's -> silu(gate) * up (..., I)."""
    g, u = gate_up.chunk(2, -1)
    return F.silu(g) * u
