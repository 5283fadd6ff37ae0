"""Attention operators behind one interface, with swappable backends.

``torch`` is the reference path (``ops/*/naive.py``) and runs anywhere. Fused kernels register
themselves under other names (``triton``, ``fla``) with :func:`register_backend`; ``auto``
picks the first registered kernel that supports the inputs and falls back to ``torch``.

A backend is an object with ``linear(fq, fk, v, initial_state, output_final_state)`` and
``hybrid(q, k, v, fq, fk, window_factor, kind, window_size, scale)`` and a
``supports(tensor) -> bool``; optionally ``hedgehog(x, weight)``, a fused Hedgehog feature map
(same function as ``attention.feature_maps.hedgehog_reference``), which the module then uses.
The fast paths take the plain case only (no padding mask, keys and queries aligned at positions
0..T-1); the module sends anything else to ``torch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lolcats.ops.hybrid.naive import hybrid_attention_naive
from lolcats.ops.linear.naive import State, linear_attention_quadratic


@dataclass(frozen=True)
class Backend:
    name: str
    linear: Callable[..., tuple[torch.Tensor, State | None]]
    hybrid: Callable[..., torch.Tensor]
    supports: Callable[[torch.Tensor], bool] = lambda x: True
    hedgehog: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def _torch_hybrid(q, k, v, fq, fk, window_factor, kind, window_size, scale):
    return hybrid_attention_naive(q, k, v, fq, fk, window_factor, kind, window_size, scale)[0]


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", linear_attention_quadratic, _torch_hybrid),
}
AUTO_ORDER: list[str] = []  # kernels tried by "auto", in order


def register_backend(backend: Backend, auto: bool = True) -> None:
    BACKENDS[backend.name] = backend
    if auto and backend.name not in AUTO_ORDER:
        AUTO_ORDER.append(backend.name)


def _load_optional_backends() -> None:
    """Import kernel modules that register themselves; missing dependencies are skipped."""
    import importlib

    for mod in ("lolcats.ops.triton_backend", "lolcats.ops.fla_backend"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


_loaded = False


def get_backend(name: str, like: torch.Tensor) -> Backend:
    """Resolve ``auto | torch | triton | fla`` for tensors like ``like``."""
    global _loaded
    if not _loaded:
        _load_optional_backends()
        _loaded = True
    if name == "auto":
        for cand in AUTO_ORDER:
            if BACKENDS[cand].supports(like):
                return BACKENDS[cand]
        return BACKENDS["torch"]
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available; known: {sorted(BACKENDS)}")
    return BACKENDS[name]
