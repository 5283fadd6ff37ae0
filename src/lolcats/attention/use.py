"""Use-time settings on a converted (e.g. trained) model: they need no training.

    set_sparse_cache(model, 64)                    # LoLA's sparse cache in every converted layer
    set_linear_scale(model, 0.5)                   # weight of the linear terms in the hybrid sum
    set_inference_fusion(model)                    # inference: one q/k/v GEMM, RoPE + Hedgehog in one op,
                                                   # each RMSNorm one op, the MLP's gate/up one GEMM + one op
    set_softmax_window(model, 512, 64)             # kept softmax layers cache the last 512 + the first 64 keys
"""

from __future__ import annotations

from dataclasses import replace

import torch.nn as nn

from lolcats.attention.fusion import fuse_decoder
from lolcats.attention.layers import causal_lm, lolcats_modules
from lolcats.config import check_eval_settings


def set_sparse_cache(model: nn.Module, size: int, score: str | None = None, sink: int | None = None) -> None:
    """Turn LoLA's sparse cache on (``size`` pairs per KV head) or off (0) in every converted layer,
    e.g. on a trained checkpoint (it needs no training); ``score`` / ``sink`` None keep the layers' own.
    Checked like ``attention.sparse_cache``; caches made before keep their old size."""
    mods = list(lolcats_modules(model))
    if not mods:
        raise ValueError("set_sparse_cache: the model has no LolcatsAttention layers (a linearized model is needed)")
    for m in mods:
        m.cfg = m.cfg.with_sparse_cache(size, score, sink)
        check_eval_settings(m.cfg)
    _record_settings(model, sparse_cache=size, sparse_score=mods[0].cfg.sparse_score,
                     sparse_sink=mods[0].cfg.sparse_sink)


def set_linear_scale(model: nn.Module, scale: float) -> None:
    """Weight the linear terms of every converted layer's hybrid sum by ``scale`` against the softmax ones
    (``attention.linear_scale``; 1 = the LoLCATs formula), e.g. on a trained checkpoint. Checked like the config."""
    mods = [m for m in lolcats_modules(model) if m.converted]
    if not mods:
        raise ValueError("set_linear_scale: the model has no converted LolcatsAttention layers (a linearized model "
                         "is needed)")
    for m in mods:
        m.cfg = replace(m.cfg, linear_scale=scale)
        check_eval_settings(m.cfg)
    _record_settings(model, linear_scale=scale)


def _record_settings(model: nn.Module, **fields) -> None:
    """Load-time attention settings into ``config.lolcats_attention`` (where the model records one: what an
    export and an evaluation's JSON read back)."""
    config = causal_lm(model).config
    if isinstance(getattr(config, "lolcats_attention", None), dict):
        config.lolcats_attention = {**config.lolcats_attention, **fields}


def set_inference_fusion(model: nn.Module, on: bool = True) -> int:
    """Every inference fusion on or off (an A/B switch). Of every LolcatsAttention: one q/k/v GEMM
    (:meth:`LolcatsAttention.fuse_qkv`, skipped where the projections are not plain nn.Linear, e.g.
    PEFT-wrapped; ``unfuse_qkv``) and RoPE + Hedgehog as the backend's one op (``fuse_rope_features``). Of every
    decoder layer (``attention/fusion.py``, the converted layers' backend): both RMSNorms and the final norm as the
    backend's ``rms_norm`` op (the attention's residual add in the post-attention norm's launch), and a SiLU MLP
    with one gate/up GEMM and the backend's ``silu_mul`` (module swaps, undone with ``on`` False; same state_dict).
    Returns the number of layers with one q/k/v GEMM."""
    mods = list(lolcats_modules(model))
    fused = 0
    for m in mods:
        if on:
            fused += m.fuse_qkv()
        else:
            m.unfuse_qkv()
        m.fuse_rope_features = on
    fuse_decoder(model, on, next((m.cfg.backend for m in mods if m.converted), "auto"))
    return fused


def set_softmax_window(model: nn.Module, window: int, sink: int = 0) -> None:
    """Bound the key/value store of every layer kept as softmax attention to the last ``window`` positions and the
    first ``sink`` (0: every position, the default); caches made after use it (``attention/cache.py``)."""
    if window < 0 or sink < 0 or (sink and not window):
        raise ValueError(f"softmax window {window} / sink {sink}: both must be >= 0, and a sink needs a window")
    for m in lolcats_modules(model):
        if not m.converted:
            m.kv_window, m.kv_sink = window, sink if window else 0
