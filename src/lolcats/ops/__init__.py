"""Attention operators behind one registry of backends: the only place that picks a kernel.

``torch`` is the reference path (``ops/*/naive.py``) and runs anywhere. Fused kernels register
themselves under other names (``triton``, ``fla``) with :func:`register_backend`; ``auto``
picks the first registered kernel whose ``supports(tensor)`` holds and falls back to ``torch``.

A :class:`Backend` carries every operator the attention layer runs:

* ``linear(fq, fk, v, initial_state, output_final_state, log_gate=None) -> (y, state | None)``
* ``hybrid(q, k, v, fq, fk, window_factor, kind, window_size, scale, log_gate=None) -> y``
* ``decode(q, k, v, fq, fk, state, pos, window_factor, kind, window_size, scale, valid, log_gate=None,
  sparse_score="self_recall", evict=True, sparse_sink=0) -> y``: one token against a constant-size
  :class:`~lolcats.ops.decode.state.DecodeState` (in place), its sparse cache too when it has one

``log_gate`` is the optional forget gate on the linear part (``ops/gate.py``): (B, Hk, T) for the
full-sequence operators, (B, Hk) for the decode step; None is the ungated function exactly.
* ``hedgehog(x, weight) -> phi(x)`` or None: a fused Hedgehog feature map (same function as
  ``ops/feature_map/naive.py::hedgehog_reference``), which the layer then uses;
* ``rope_hedgehog(q, k, cos, sin, wq, wk, eps, feature_rope, q_scale) -> (q_rot, k_rot, phi(q_rot) q_scale,
  phi(k_rot))`` or None:
  RoPE and the Hedgehog map of q and k in one forward-only op (``rope_hedgehog_reference`` on each; the maps of
  q and k before RoPE with ``feature_rope`` False), which the layer uses for inference (no gradient needed) in
  student mode;
* ``rms_norm(x, weight, eps) -> y``: HF's RMSNorm, x (..., d), weight (d,) -> (..., d) in
  torch.result_type(weight, x) (``ops/norm/naive.py::rms_norm_reference``; ``ops/triton/norm.py`` one launch);
* ``add_rms_norm(x, residual, weight, eps) -> (y, s)``: the residual add before it, s = residual + x and
  y = rms_norm(s) (``add_rms_norm_reference``; ``ops/triton/norm.py``, the same launch);
* ``silu_mul(gate_up) -> y``: a gated MLP's activation, gate_up (..., 2I) (the gate projection's outputs, then
  the up's) -> silu(gate) * up (..., I) (``silu_mul_reference``; ``ops/triton/activation.py``). These run
  the decoder layer's norms and MLP for inference (``attention/fusion.py``); the triton ones are forward only;
* ``fused``: the full-sequence operators whose memory is linear in T (no T x T scores);
* ``sparse_fused(kind, score, *tensors, window=w) -> bool``: whether ``sparse_chunk`` runs a kernel for this call
  (any chunk in one call, nothing read on the host); False where it falls back to the reference (the torch backend
  always).

The full-sequence fast paths take the plain case only (no padding mask, keys and queries aligned
at positions 0..T-1). The general forms, which only the references implement so far, are operators of
every backend too (the reference's unless a backend brings its own), so the layer reaches them here:

* ``hybrid_general(q, k, v, fq, fk, window_factor, kind, window_size, scale, q_pos, k_pos, key_mask,
  initial_state, return_weights, log_gate, fold_pos=None) -> (y, weights | None)``: positions, padding,
  window slots in front, an initial state, a sparse cache's fold positions;
* ``linear_general(fq, fk, v, initial_state, output_final_state, log_gate=None) -> (y, state | None)`` and
  ``linear_weights(fq, fk, log_gate=None) -> (B, H, T, T)``: the quadratic form and its attention weights;
* ``absorb(state, k, v, fk, pos, valid, kind, window_size, log_gate=None, fold=True)``: a chunk written into
  a decode state as the decode step would token by token (in place);
* ``sparse_chunk(state, q, k, v, fq, fk, pos, valid, window_factor, kind, window_size, scale, score, sink)
  -> (y, state after)``: a chunk through window, sparse cache and linear state (``ops/triton/sparse.py`` fuses
  it for the terraced window on CUDA, updating ``state`` in place and returning it; the reference returns a new
  state);
* ``kv_decode(q, k, v, pos, scale) -> y``: one token's softmax attention over a kept layer's contiguous key/value
  store, slot t holding position t (``ops/paged/naive.py``; ``ops/triton/paged.py`` splits the keys over programs);
* ``paged_decode(q, k_pool, v_pool, table, pos, page, length, scale) -> y``: one token's softmax attention over a
  paged key/value store (``ops/paged/naive.py``: the serving engine's ``--kv-tokens``; ``ops/triton/paged.py``
  reads the pages in place);
* ``gated_delta(q, k, v, g, beta, scale, initial_state, output_final_state) -> (o, state | None)``: the gated
  delta rule (``ops/delta/naive.py``: q (B, H, T, Dk), k (B, Hk, T, Dk) L2-normalised, v (B, Hk, T, Dv), g
  and beta (B, Hk, T), state (B, Hk, Dk, Dv) float32), fla's kernels where it imports (``ops/fla_backend.py``).

No module but this one (and the tests) imports an ``ops/*/naive.py``; the reference feature maps, which
the layer's feature-map modules compute with autograd, are re-exported here too (:data:`hedgehog_reference`,
:data:`project_heads`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from lolcats.ops.common import State
from lolcats.ops.decode.naive import absorb_chunk, decode_step_naive
from lolcats.ops.delta.naive import gated_delta_naive
from lolcats.ops.feature_map.naive import hedgehog_reference, project_heads
from lolcats.ops.hybrid.naive import hybrid_attention_naive
from lolcats.ops.linear.naive import causal_linear_scores, linear_attention_quadratic
from lolcats.ops.norm.naive import add_rms_norm_reference, rms_norm_reference, silu_mul_reference
from lolcats.ops.paged.naive import kv_decode_naive, paged_decode_naive
from lolcats.ops.sparse.naive import sparse_chunk

__all__ = ["AUTO_ORDER", "BACKENDS", "Backend", "get_backend", "hedgehog_reference", "project_heads",
           "register_backend"]
OPTIONAL_BACKENDS = ("lolcats.ops.triton_backend", "lolcats.ops.fla_backend")  # skipped if their package is missing


@dataclass(frozen=True)
class Backend:
    name: str
    linear: Callable[..., tuple[torch.Tensor, State | None]]
    hybrid: Callable[..., torch.Tensor]
    decode: Callable[..., torch.Tensor]
    supports: Callable[[torch.Tensor], bool] = lambda x: True
    hedgehog: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    rope_hedgehog: Callable[..., tuple[torch.Tensor, ...]] | None = None
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = rms_norm_reference
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = add_rms_norm_reference
    silu_mul: Callable[[torch.Tensor], torch.Tensor] = silu_mul_reference
    fused: frozenset[str] = frozenset()
    hybrid_general: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = hybrid_attention_naive
    linear_general: Callable[..., tuple[torch.Tensor, State | None]] = linear_attention_quadratic
    linear_weights: Callable[..., torch.Tensor] = causal_linear_scores
    absorb: Callable[..., None] = absorb_chunk
    sparse_chunk: Callable[..., tuple[torch.Tensor, object]] = sparse_chunk
    gated_delta: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = gated_delta_naive
    paged_decode: Callable[..., torch.Tensor] = paged_decode_naive
    kv_decode: Callable[..., torch.Tensor] = kv_decode_naive
    sparse_fused: Callable[..., bool] = lambda kind, score, *tensors, window: False

    def is_fused(self, kind: str) -> bool:
        """Whether the full-sequence operator for ``kind`` keeps memory linear in T."""
        return ("linear" if kind == "linear" else "hybrid") in self.fused


def _torch_linear(fq, fk, v, initial_state=None, output_final_state=False, log_gate=None):
    return linear_attention_quadratic(fq, fk, v, initial_state, output_final_state, log_gate=log_gate)


def _torch_hybrid(q, k, v, fq, fk, window_factor, kind, window_size, scale, log_gate=None):
    return hybrid_attention_naive(q, k, v, fq, fk, window_factor, kind, window_size, scale, log_gate=log_gate)[0]


BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", _torch_linear, _torch_hybrid, decode_step_naive),
}
AUTO_ORDER: list[str] = []  # kernels tried by "auto", in order
_loaded = False


def register_backend(backend: Backend, auto: bool = True) -> None:
    BACKENDS[backend.name] = backend
    if auto and backend.name not in AUTO_ORDER:
        AUTO_ORDER.append(backend.name)


def _load_optional_backends() -> None:
    """Import the kernel modules that register themselves; one whose package is missing is skipped."""
    global _loaded
    _loaded = True
    for mod in OPTIONAL_BACKENDS:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


def get_backend(name: str, like: torch.Tensor) -> Backend:
    """Resolve ``auto | torch | triton | fla`` for tensors like ``like``."""
    if not _loaded:
        _load_optional_backends()
    if name == "auto":
        return next((BACKENDS[c] for c in AUTO_ORDER if BACKENDS[c].supports(like)), BACKENDS["torch"])
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available; known: {sorted(BACKENDS)}")
    return BACKENDS[name]
