"""Conversion: swap LolcatsAttention into a stock HF causal LM; keep chosen layers as softmax attention.

    model = load_base_model(cfg.model)
    convert_model(model, cfg.attention)            # every layer now a LolcatsAttention (some maybe kept softmax)
    keep_softmax(model, [3, 7])                    # after stage 1: these layers back to softmax attention

The rest of what a converted model is used with lives beside this module, one job each:
``attention/layers.py`` (finding the decoder stack and its LolcatsAttention layers), ``attention/modes.py``
(attention modes, collecting distillation outputs), ``attention/params.py`` (the stage-1 parameters),
``attention/use.py`` (use-time settings on a trained model), ``attention/fusion.py`` (the decoder layer's norms
and MLP fused for inference) and ``attention/generate.py`` (the cache for a model, plain ``generate()``, the
decode-time eviction schedule).
"""

from __future__ import annotations

from dataclasses import asdict

import torch.nn as nn

from lolcats.attention.layers import decoder_layers, lolcats_modules, softmax_layers
from lolcats.attention.module import LolcatsAttention
from lolcats.config import AttentionConfig

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


def check_architecture(config) -> None:
    mt = getattr(config, "model_type", None)
    base = mt[len("lolcats_"):] if mt and mt.startswith("lolcats_") else mt
    if base not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"model type {mt!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def check_layer_indices(wanted, num_layers: int) -> None:
    """attention.layers names layers the model has."""
    for i in wanted:
        if not 0 <= i < num_layers:
            raise ValueError(f"attention.layers: layer {i} does not exist (the model has {num_layers}: "
                             f"0..{num_layers - 1})")


def convert_model(model: nn.Module, cfg: AttentionConfig) -> nn.Module:
    """Swap attention in place: every layer becomes a LolcatsAttention, converted in the layers
    ``cfg.converted_layers`` names and kept as softmax attention in the others; freeze the base.
    (``cfg.softmax_count`` is only checked here: its layers are picked after stage 1, :func:`keep_softmax`.)"""
    check_architecture(model.config)
    layers = decoder_layers(model)
    converted = set(cfg.converted_layers(len(layers)))
    for p in model.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if not isinstance(attn, LolcatsAttention) or attn.converted != (i in converted):
            layer.self_attn = LolcatsAttention(attn, model.config, cfg, i, converted=i in converted)
    _record_layers(model, cfg)
    return model


def keep_softmax(model: nn.Module, indices: list[int]) -> nn.Module:
    """Turn converted layers ``indices`` back into softmax attention (their feature maps are dropped);
    before LoRA is added. The model's ``config.lolcats_attention`` records the result (export)."""
    layers = decoder_layers(model)
    for i in indices:
        if not 0 <= i < len(layers) or not isinstance(layers[i].self_attn, LolcatsAttention):
            raise ValueError(f"keep_softmax: layer {i} is not a LolcatsAttention layer of this model")
        attn = layers[i].self_attn
        if attn.converted:
            layers[i].self_attn = LolcatsAttention(attn, model.config, attn.cfg, i, converted=False)
    _record_layers(model, next(iter(lolcats_modules(model))).cfg)
    return model


def _record_layers(model: nn.Module, cfg: AttentionConfig) -> None:
    """``config.lolcats_attention``: ``cfg`` with the layer split as it is (what an export rebuilds)."""
    kept = softmax_layers(model)
    model.config.lolcats_attention = {**asdict(cfg), "layers": None, "softmax_layers": kept or None,
                                      "softmax_count": 0}
