"""Linearized models as ordinary transformers models.

``import lolcats`` registers, for each supported architecture, a config type
``lolcats_<arch>`` (the base config plus a ``lolcats_attention`` dict) and a causal-LM class
that builds the base model and swaps in LolcatsAttention. An exported directory therefore
loads with ``AutoModelForCausalLM.from_pretrained(dir)`` and gives the same logits.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers import Qwen2Config, Qwen2ForCausalLM

from lolcats.attention.convert import convert_model, enable_lolcats_generation, set_attention_mode
from lolcats.config import AttentionConfig

BASES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
         "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
REGISTERED: dict[str, tuple[type, type]] = {}


def _make_classes(arch: str, config_base: type, model_base: type) -> tuple[type, type]:
    model_type = f"lolcats_{arch}"

    class Config(config_base):
        def __init__(self, lolcats_attention: dict | None = None, **kwargs):
            super().__init__(**kwargs)
            self.lolcats_attention = lolcats_attention or {}

    Config.model_type = model_type
    Config.__name__ = Config.__qualname__ = f"Lolcats{config_base.__name__}"

    class Model(model_base):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            convert_model(self, AttentionConfig(**config.lolcats_attention))
            set_attention_mode(self, "student")
            enable_lolcats_generation(self)

    Model.__name__ = Model.__qualname__ = f"Lolcats{model_base.__name__}"
    return Config, Model


def register_all() -> None:
    for arch, (cb, mb) in BASES.items():
        if arch in REGISTERED:
            continue
        cfg_cls, model_cls = _make_classes(arch, cb, mb)
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
        REGISTERED[arch] = (cfg_cls, model_cls)


def export_model(model, tokenizer, out_dir: str | Path) -> Path:
    """Save a converted (LoRA already merged) model so that from_pretrained loads it back."""
    register_all()
    out_dir = Path(out_dir)
    base = model.config.model_type.removeprefix("lolcats_")
    if base not in BASES:
        raise ValueError(f"cannot export model type {model.config.model_type!r}; supported: {sorted(BASES)}")
    cfg_cls, _ = REGISTERED[base]
    d = model.config.to_dict()
    for k in ("model_type", "quantization_config", "architectures", "transformers_version", "auto_map"):
        d.pop(k, None)
    config = cfg_cls(**d)
    config.architectures = [REGISTERED[base][1].__name__]
    model.config = config
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


register_all()
