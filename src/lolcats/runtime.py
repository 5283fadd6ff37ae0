"""Small runtime helpers every layer uses: devices, dtypes, autocast, CUDA-graph capture.

This module sits at the bottom of the package (it imports only torch), so the attention
module, the trainer, evaluation and model loading can all use it without importing upward.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): CUDA when available, else CPU; anything else as torch reads it. A CUDA device
    that is not there is a ValueError naming the ones that are."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        there = f"GPUs cuda:0 to cuda:{count - 1}" if count else "no CUDA GPU"
        raise ValueError(f"device {name}: this machine has {there}; use one of those, cpu or auto")
    return device


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 elsewhere; else one of :data:`DTYPES`."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device`` (reading a tensor's value would break it)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast for ``precision`` bf16, or auto on CUDA; a no-op context otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:  # no cast cache while a CUDA graph is being captured (it would outlive the capture)
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=not capturing(device))
    return contextlib.nullcontext()
