"""The stage-1 parameters of a converted model (feature maps, window factors): their names and trainability."""

from __future__ import annotations

import torch.nn as nn


def attention_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The stage-1 parameters: feature maps and window factors, by state-dict name."""
    return {n: p for n, p in model.named_parameters()
            if ".feature_map_" in n or n.endswith("window_factors")}


def stage1_checkpoint_names(model: nn.Module, train_window_factor: bool = True) -> dict[str, str]:
    """{checkpoint name: parameter name} of a stage-1 checkpoint: what attention transfer trains
    (feature maps, and the window factors unless they stay at their initial value)."""
    return {n: n for n in attention_parameters(model) if train_window_factor or not n.endswith("window_factors")}


def set_attention_trainable(model: nn.Module, trainable: bool, train_window_factor: bool = True) -> None:
    for n, p in attention_parameters(model).items():
        p.requires_grad_(trainable and (train_window_factor or not n.endswith("window_factors")))
