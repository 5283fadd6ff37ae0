"""What the references and the kernels share: epsilons, the linear state's type, GQA head expansion.

Kept out of the references (``ops/*/naive.py``) so that a kernel, or a layer, never imports one.
"""

from __future__ import annotations

import torch

EPS = 1e-12  # linear attention's normaliser: y = num / (den + EPS)
FEATURE_EPS = 1e-12  # the Hedgehog feature map's clamp

State = tuple[torch.Tensor, torch.Tensor]  # (kv: (B, Hk, F, Dv), ksum: (B, Hk, F))


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, Hk, ...) -> (B, H, ...) by repeating each KV head for its query group."""
    groups = num_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)
