"""Finding the layers: the decoder stack under CausalLM and PEFT wrappers, and its LolcatsAttention modules.

    decoder_layers(model)                  # nn.ModuleList of decoder layers
    lolcats_attention_by_layer(model)      # {layer index: LolcatsAttention}
    softmax_layers(model)                  # indices of the layers kept as softmax attention
"""

from __future__ import annotations

from typing import Iterator

import torch.nn as nn

from lolcats.attention.module import LolcatsAttention


def causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module holding ``layers``, ``embed_tokens``, ``norm`` and ``rotary_emb``, found through
    CausalLM and PEFT wrappers: the one lookup of the decoder stack."""
    seen, inner = set(), model
    while inner is not None and not hasattr(inner, "layers") and id(inner) not in seen:
        seen.add(id(inner))
        inner = getattr(inner, "model", None) or getattr(inner, "base_model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise ValueError(f"{type(model).__name__} has no decoder layers (.model.layers)")
    return inner


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder_stack(model).layers


def lolcats_modules(model: nn.Module) -> Iterator[LolcatsAttention]:
    for m in model.modules():
        if isinstance(m, LolcatsAttention):
            yield m


def lolcats_attention_by_layer(model: nn.Module) -> dict[int, LolcatsAttention]:
    return {m.layer_idx: m for m in lolcats_modules(model)}


def softmax_layers(model: nn.Module) -> list[int]:
    """Indices of the layers kept as softmax attention."""
    return sorted(i for i, m in lolcats_attention_by_layer(model).items() if not m.converted)
