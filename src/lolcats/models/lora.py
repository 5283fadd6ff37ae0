"""LoRA adapters (peft) on a converted model: adding them, and their checkpoint names.

A stage-2 checkpoint keys each LoRA tensor by peft's state-dict name (the parameter name without
the adapter name ``.default``), as ``peft.get_peft_model_state_dict`` writes it.
"""

from __future__ import annotations

import torch

from lolcats.attention.convert import set_attention_trainable
from lolcats.config import FinetuneConfig

ADAPTER = "default"


def add_lora(model, cfg: FinetuneConfig):
    """Wrap ``model`` with peft LoRA adapters on ``cfg.lora_targets`` (feature maps frozen)."""
    from peft import LoraConfig, get_peft_model

    set_attention_trainable(model, False)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters by parameter name."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}


def lora_checkpoint_names(model) -> dict[str, str]:
    """{checkpoint name: parameter name} of every LoRA parameter (peft's names drop ``.default``)."""
    return {n.replace(f".{ADAPTER}.", "."): n for n, _ in model.named_parameters() if "lora_" in n}
