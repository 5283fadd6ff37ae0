"""LoRA adapters (peft) on a converted model: adding them, and their checkpoint names.

A stage-2 checkpoint keys each LoRA tensor by peft's state-dict name (the parameter name without
the adapter name ``.default``), as ``peft.get_peft_model_state_dict`` writes it.
"""

from __future__ import annotations

import math

import torch

from lolcats.attention.convert import set_attention_trainable
from lolcats.config import FinetuneConfig

ADAPTER = "default"


def add_lora(model, cfg: FinetuneConfig, seed: int = 0):
    """Wrap ``model`` with peft LoRA adapters on ``cfg.lora_targets`` (feature maps frozen).

    The adapters start as peft's (A ~ kaiming-uniform, B = 0), drawn from a generator seeded
    with ``seed`` on the CPU: the same values on every device, in every process, and on a model
    built on the meta device (whose adapters would otherwise be meta too).
    """
    from peft import LoraConfig, get_peft_model

    set_attention_trainable(model, False)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    init_lora(model, seed)
    return model


@torch.no_grad()
def init_lora(model, seed: int) -> None:
    """A ~ kaiming-uniform(a=sqrt 5) (peft's default), B = 0, in module order from one seeded CPU generator."""
    from peft.tuners.lora import LoraLayer

    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if not isinstance(mod, LoraLayer) or ADAPTER not in mod.lora_A:
            continue
        a, b = mod.lora_A[ADAPTER], mod.lora_B[ADAPTER]
        for lin in (a, b):
            if lin.weight.is_meta:
                lin.to_empty(device="cpu")
        w = torch.empty(a.weight.shape)
        torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen)
        a.weight.copy_(w)
        b.weight.zero_()


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters by parameter name."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}


def lora_checkpoint_names(model) -> dict[str, str]:
    """{checkpoint name: parameter name} of every LoRA parameter (peft's names drop ``.default``)."""
    return {n.replace(f".{ADAPTER}.", "."): n for n, _ in model.named_parameters() if "lora_" in n}
