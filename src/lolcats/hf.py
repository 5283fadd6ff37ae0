"""Linearized models as ordinary transformers models.

``import lolcats.hf`` registers, for each supported architecture, the config type ``lolcats_<arch>``
and its causal-LM class (:mod:`lolcats.models.linearized`) with the Auto classes, so an exported
directory loads with ``AutoModelForCausalLM.from_pretrained(dir)``. Without lolcats installed it
loads with ``from_pretrained(dir, trust_remote_code=True)``: :func:`export_model` writes lolcats'
own modeling code into the directory (:mod:`lolcats.bundle`) and names it in ``auto_map``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lolcats.models.linearized import BASES, class_names, make_classes

REGISTERED: dict[str, tuple[type, type]] = {}
ENTRY = "modeling_lolcats"  # the remote-code module of an export (modeling_lolcats.py)


def register_all() -> None:
    for arch in BASES:
        if arch in REGISTERED:
            continue
        cfg_cls, model_cls = make_classes(arch, __name__)
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
        REGISTERED[arch] = (cfg_cls, model_cls)
        globals().update({cfg_cls.__name__: cfg_cls, model_cls.__name__: model_cls})


def export_model(model, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Save a converted (LoRA already merged) model so that from_pretrained loads it back.

    Weights go out as safetensors in ``dtype`` (default: as loaded), dequantized when the base came
    from a GGUF; the directory holds the modeling code (``trust_remote_code=True`` loads it without
    lolcats) and the tokenizer. It is written beside ``out_dir`` and moved into place when complete
    (replacing an earlier export there), so a failed write leaves nothing half-written.
    """
    from lolcats.bundle import write_bundle
    from lolcats.checkpoint import atomic_dir

    register_all()
    out_dir = check_export_dir(out_dir)
    arch = model.config.model_type.removeprefix("lolcats_")
    if arch not in BASES:
        raise ValueError(f"cannot export model type {model.config.model_type!r}; supported: {sorted(BASES)}")
    if not getattr(model.config, "lolcats_attention", None):
        raise ValueError("export_model needs a converted model (convert_model or load_linearized)")
    _drop_dequantized_quantizer(model)
    if dtype is not None:
        model.to(dtype)
    model.config = _export_config(model.config, arch)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        model.config.architectures = [class_names(arch)[1]]  # save_pretrained wrote the instance's class, the base's
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_bundle(tmp, (make_classes.__module__,), ENTRY, _entry_source(arch))
    return out_dir


def check_export_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a path an export may be written to: new, empty, or an earlier export (which it replaces)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"export: {out_dir} is a file; give a directory to write the model into")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / f"{ENTRY}.py").is_file():
        raise ValueError(f"export: {out_dir} is a directory that holds other files (not an earlier export); "
                         "give a new or empty directory")
    return out_dir


def _export_config(config, arch: str):
    cfg_cls, _ = REGISTERED[arch]
    d = config.to_dict()
    for k in ("model_type", "quantization_config", "architectures", "transformers_version", "auto_map"):
        d.pop(k, None)
    d["lolcats_attention"] = {**d["lolcats_attention"], "backend": "auto"}  # Triton on CUDA, else PyTorch
    out = cfg_cls(**d)
    config_name, model_name = class_names(arch)
    out.auto_map = {"AutoConfig": f"{ENTRY}.{config_name}", "AutoModelForCausalLM": f"{ENTRY}.{model_name}"}
    return out


def _entry_source(arch: str) -> str:
    from lolcats.bundle import flat_name

    config_name, model_name = class_names(arch)
    return (f"from .{flat_name(make_classes.__module__)} import make_classes\n\n"
            f"{config_name}, {model_name} = make_classes({arch!r}, __name__)\n")


def _drop_dequantized_quantizer(model) -> None:
    """A GGUF base loads with dense weights but stays marked quantized, which save_pretrained refuses."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(quantizer.quantization_config, "quant_method", None)
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if str(getattr(method, "value", method)).lower() != "gguf" or packed:
        raise ValueError(f"cannot export a model whose weights are quantized ({method}, e.g. {packed[:1]}): "
                         "load the base model unquantized")
    quantizer.remove_quantization_config(model)


register_all()
