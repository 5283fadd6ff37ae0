"""The transformers classes of a linearized model: a base config and causal LM with LolcatsAttention.

For each supported architecture, a config type ``lolcats_<arch>`` (the base config plus a
``lolcats_attention`` dict, the :class:`~lolcats.config.AttentionConfig` fields) and a causal-LM
class that builds the base model, swaps in LolcatsAttention (student mode) and generates with a
LolcatsCache. ``lolcats.hf`` registers them with the Auto classes; an exported directory carries
this module (and what it imports) as remote code, where ``make_classes`` builds them again.
"""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers import Qwen2Config, Qwen2ForCausalLM

from lolcats.attention.convert import convert_model
from lolcats.attention.generate import enable_lolcats_generation
from lolcats.attention.modes import set_attention_mode
from lolcats.config import AttentionConfig

BASES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
         "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def class_names(arch: str) -> tuple[str, str]:
    """(config class name, causal-LM class name) for ``arch``: LolcatsLlamaConfig, LolcatsLlamaForCausalLM."""
    config_base, model_base = _bases(arch)
    return f"Lolcats{config_base.__name__}", f"Lolcats{model_base.__name__}"


def make_classes(arch: str, module: str = __name__) -> tuple[type, type]:
    """(config class, causal-LM class) of a linearized ``arch``, defined as if in ``module``."""
    config_base, model_base = _bases(arch)
    config_name, model_name = class_names(arch)

    class Config(config_base):
        model_type = f"lolcats_{arch}"

        def __init__(self, lolcats_attention: dict | None = None, **kwargs):
            super().__init__(**kwargs)
            self.lolcats_attention = lolcats_attention or {}

    class Model(model_base):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            convert_model(self, AttentionConfig(**config.lolcats_attention))
            set_attention_mode(self, "student")
            enable_lolcats_generation(self)

    for cls, name in ((Config, config_name), (Model, model_name)):
        cls.__name__ = cls.__qualname__ = name
        cls.__module__ = module
    return Config, Model


def _bases(arch: str) -> tuple[type, type]:
    if arch not in BASES:
        raise ValueError(f"no linearized model class for architecture {arch!r}; supported: {sorted(BASES)}")
    return BASES[arch]
