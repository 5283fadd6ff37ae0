"""LoRA adapters (peft) on a converted model: adding them, their checkpoint names, and merging a
checkpoint's adapters straight into the weights (loading for use: no peft modules built).

A stage-2 checkpoint keys each LoRA tensor by peft's state-dict name (the parameter name without
the adapter name ``.default``), as ``peft.get_peft_model_state_dict`` writes it.
"""

from __future__ import annotations

import math

import torch

from lolcats.attention.params import set_attention_trainable
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


PEFT_PREFIX = "base_model.model."  # what get_peft_model puts before a module's name


def lora_target_modules(model, targets) -> dict[str, torch.nn.Linear]:
    """{module name: linear} that ``add_lora`` wraps: peft matches a target by the name's last part."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets}


def merge_shapes(model, cfg: FinetuneConfig) -> dict[str, tuple[int, int]]:
    """The checkpoint names and shapes of the adapters of ``model`` (unwrapped), as a stage-2 checkpoint holds them."""
    out = {}
    for name, lin in lora_target_modules(model, cfg.lora_targets).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (cfg.lora_r, lin.in_features)  # A: (r, in)
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (lin.out_features, cfg.lora_r)  # B: (out, r)
    return out


@torch.no_grad()
def merge_lora(model, tensors: dict[str, torch.Tensor], cfg: FinetuneConfig) -> None:
    """W += (B @ A) * alpha / r for every adapter in ``tensors`` (names checked by the caller against
    ``merge_shapes``): the weights peft's ``merge_and_unload`` gives, its operations in its order (peft
    keeps the adapters of a bf16 / fp16 model in float32, so the product is float32 here too)."""
    scale = cfg.lora_alpha / cfg.lora_r
    for name, lin in lora_target_modules(model, cfg.lora_targets).items():
        w = lin.weight
        a, b = (tensors[f"{PEFT_PREFIX}{name}.lora_{x}.weight"].to(w.device, torch.float32) for x in "AB")
        w.add_((b @ a) * scale)  # (out, r) @ (r, in), added in float32, rounded to w's dtype
