"""Start-up checks of a run's settings against its model's architecture.

They need only the model's transformers config (``loading.model_config``, which loading the
weights reuses), so a layer index the model lacks or a LoRA target no module has stops the run
before data is tokenised or weights load, not after stage 1 has trained.
"""

from __future__ import annotations

import copy

import torch

from lolcats.attention.convert import check_layer_indices
from lolcats.config import Config, ConfigError

LORA_LAYER_TYPES = (torch.nn.Linear, torch.nn.Embedding)  # the module kinds LoRA adapts here


def lora_module_names(config) -> list[str]:
    """Names of the modules LoRA can adapt in ``config``'s architecture (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(config))  # from_config sets fields on it
    return [n for n, m in skeleton.named_modules() if isinstance(m, LORA_LAYER_TYPES)]


def check_lora_targets(targets: list[str], names: list[str]) -> None:
    """Every target matches a module as peft matches them: the name itself or its last dotted parts."""
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            known = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ConfigError(f"finetune.lora_targets: {t!r} matches no module of the model; "
                              f"its linear and embedding modules: {', '.join(known)}")


def check_model_settings(cfg: Config, config) -> None:
    """attention.layers and finetune.lora_targets against the architecture in ``config``."""
    if cfg.attention.layers is not None:
        check_layer_indices(cfg.attention.layers, config.num_hidden_layers)
    check_lora_targets(cfg.finetune.lora_targets, lora_module_names(config))
