"""Conversion: swap LolcatsAttention into a stock HF causal LM, and switch modes.

    model = load_base_model(cfg.model)
    convert_model(model, cfg.attention)            # every layer now a LolcatsAttention
    set_attention_mode(model, "distill")
    with collect_distill_outputs(model) as outs:   # list[DistillOutput], one per layer
        model.model(input_ids)
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from typing import Iterator

import torch.nn as nn

from lolcats.attention.module import MODES, DistillOutput, LolcatsAttention, Mode
from lolcats.config import AttentionConfig

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


def check_architecture(config) -> None:
    mt = getattr(config, "model_type", None)
    base = mt[len("lolcats_"):] if mt and mt.startswith("lolcats_") else mt
    if base not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"model type {mt!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):
        raise ValueError(f"{type(model).__name__} has no decoder layers at .model.layers")
    return inner.layers


def convert_model(model: nn.Module, cfg: AttentionConfig) -> nn.Module:
    """Swap attention in place (in the layers ``cfg.layers``, all when None); freeze the base."""
    check_architecture(model.config)
    layers = decoder_layers(model)
    wanted = range(len(layers)) if cfg.layers is None else cfg.layers
    for i in wanted:
        if not 0 <= i < len(layers):
            raise ValueError(f"attention.layers: layer {i} does not exist (the model has {len(layers)})")
    for p in model.parameters():
        p.requires_grad_(False)
    for i in wanted:
        attn = layers[i].self_attn
        if not isinstance(attn, LolcatsAttention):
            layers[i].self_attn = LolcatsAttention(attn, model.config, cfg, i)
    model.config.lolcats_attention = asdict(cfg)
    return model


def lolcats_modules(model: nn.Module) -> Iterator[LolcatsAttention]:
    for m in model.modules():
        if isinstance(m, LolcatsAttention):
            yield m


def set_attention_mode(model: nn.Module, mode: Mode) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; known: {', '.join(MODES)}")
    for m in lolcats_modules(model):
        m.mode = mode


def attention_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The stage-1 parameters: feature maps and window factors, by state-dict name."""
    return {n: p for n, p in model.named_parameters()
            if ".feature_map_" in n or n.endswith("window_factors")}


def set_attention_trainable(model: nn.Module, trainable: bool, train_window_factor: bool = True) -> None:
    for n, p in attention_parameters(model).items():
        p.requires_grad_(trainable and (train_window_factor or not n.endswith("window_factors")))


@contextlib.contextmanager
def collect_distill_outputs(model: nn.Module, xent: bool = False) -> Iterator[list[DistillOutput]]:
    outs: list[DistillOutput] = []
    mods = list(lolcats_modules(model))
    for m in mods:
        m.collector, m.collect_xent = outs, xent
    try:
        yield outs
    finally:
        for m in mods:
            m.collector, m.collect_xent = None, False
