"""Feature maps phi for linear attention, applied per head after RoPE.

* ``hedgehog``: phi(x) = [softmax(x W_h), softmax(-x W_h)] over the feature axis, W_h:
  head_dim -> feature_dim per head, so phi has 2 * feature_dim features (Zhang et al., 2024);
  the math is ``ops/feature_map/naive.py`` (beside its fused kernel).
* ``t2r``: phi(x) = relu(x W_h + b_h) (Kasai et al., 2021); feature_dim features.
* ``elu`` / ``relu``: fixed maps elu(x) + 1 and relu(x), no parameters; head_dim features.

New maps register with :func:`register_feature_map`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lolcats.ops import hedgehog_reference, project_heads

class LearnedFeatureMap(nn.Module):
    """Per-head linear projection (H, D, F), used by ``hedgehog`` and ``t2r``."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, init: str, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, feature_dim)) if bias else None
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "identity":
                for h in range(self.weight.shape[0]):
                    nn.init.eye_(self.weight[h])
            elif self.init == "zero":
                self.weight.zero_()
            elif self.init == "random":
                nn.init.normal_(self.weight, std=1 / math.sqrt(self.weight.shape[1]))
            else:
                raise ValueError(f"unknown feature map init {self.init!r}; known: identity, zero, random")
            if self.bias is not None:
                self.bias.zero_()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        y = project_heads(x, self.weight)
        return y if self.bias is None else y + self.bias


class HedgehogFeatureMap(LearnedFeatureMap):
    def __init__(self, num_heads: int, head_dim: int, feature_dim: int = 64, init: str = "identity"):
        super().__init__(num_heads, head_dim, feature_dim, init, bias=False)
        self.out_dim = 2 * feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hedgehog_reference(x, self.weight)


class T2RFeatureMap(LearnedFeatureMap):
    def __init__(self, num_heads: int, head_dim: int, feature_dim: int = 64, init: str = "identity"):
        super().__init__(num_heads, head_dim, feature_dim, init, bias=True)
        self.out_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.project(x))


class FixedFeatureMap(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], head_dim: int):
        super().__init__()
        self.fn, self.out_dim = fn, head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x.float())


FeatureMapFactory = Callable[[int, int, int, str], nn.Module]  # (heads, head_dim, feature_dim, init)

FEATURE_MAPS: dict[str, FeatureMapFactory] = {
    "hedgehog": lambda h, d, f, init: HedgehogFeatureMap(h, d, f, init),
    "t2r": lambda h, d, f, init: T2RFeatureMap(h, d, f, init),
    "elu": lambda h, d, f, init: FixedFeatureMap(lambda x: F.elu(x) + 1, d),
    "relu": lambda h, d, f, init: FixedFeatureMap(F.relu, d),
}


def register_feature_map(name: str, factory: FeatureMapFactory) -> None:
    FEATURE_MAPS[name] = factory


def build_feature_map(name: str, num_heads: int, head_dim: int, feature_dim: int, init: str) -> nn.Module:
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map {name!r}; known: {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[name](num_heads, head_dim, feature_dim, init)
