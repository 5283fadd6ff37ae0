"""Decoding a converted model: its cache, plain HF ``generate()``, and the decode-time eviction schedule.

    cache = make_cache(model, batch_size=4, max_length=1024)   # a LolcatsCache (states allocated now)
    enable_lolcats_generation(model)                           # plain model.generate(...) uses a LolcatsCache
    cache_kwarg_name(model)                                    # "cache" or "past_key_values"
"""

from __future__ import annotations

import inspect
import types

import torch
import torch.nn as nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from lolcats.attention.cache import KVPool, LolcatsCache, LolcatsLayer, SoftmaxLayer
from lolcats.attention.layers import causal_lm, decoder_layers, lolcats_attention_by_layer, lolcats_modules
from lolcats.ops.state import allocate_stacked


def make_cache(model: nn.Module, batch_size: int | None = None, dtype: torch.dtype | None = None,
               device=None, max_length: int | None = None, softmax: bool = False,
               stacked: bool = False, kv_pool: KVPool | None = None,
               kv_table: torch.Tensor | None = None) -> LolcatsCache:
    """A LolcatsCache for ``model``; states are allocated now if ``batch_size`` is given, else lazily.

    Layers kept as softmax attention get a :class:`SoftmaxLayer`: its key/value store preallocated with
    ``batch_size`` and ``max_length`` (positions per row), else allocated at the first call when the layer's
    store is bounded (``attention.use.set_softmax_window``); an unbounded one otherwise keeps HF's dynamic layer.
    ``softmax``: every layer gets a preallocated store (teacher mode: the converted layers attend by softmax too).
    ``stacked`` (with ``batch_size``): layers declaring equal states share one tensor per field (``cache.stacks``,
    ``ops/state.py``'s :class:`StateStack`), so that rows of every layer move in a few copies; the layers' states
    are views of it and must not be replaced. ``kv_pool`` (:func:`make_kv_pool`) and ``kv_table`` (batch_size, M):
    full stores are pages of that pool, the rows' pages named by the table (the serving engine's paging)."""
    inner = causal_lm(model)
    config = inner.config.get_text_config(decoder=True)
    mods = lolcats_attention_by_layer(inner)
    if not mods:
        raise ValueError("make_cache: the model has no LolcatsAttention layers (run convert_model first)")
    dynamic = DynamicCache(config=config).layers
    layers, specs = [], []  # specs: (layer, its state's spec, device) of the states allocated now
    for i in range(config.num_hidden_layers):
        m = mods.get(i)
        w = None if m is None else m.q_proj.weight
        dt = _state_dtype(w, dtype)
        kept = m is not None and _kept(m, softmax)
        if kept and kv_pool is not None and not m.kv_window:
            layers.append(SoftmaxLayer(kv_pool.state(i, kv_table, max_length)))
        elif kept and batch_size is not None and max_length is not None:
            layers.append(m.softmax_slot())
            specs.append((layers[-1], m.kv_state_spec(max_length, dt), device or w.device))
        elif kept and m.kv_window:
            layers.append(m.softmax_slot())
        elif m is None or not m.converted:
            layers.append(dynamic[i] if i < len(dynamic) else DynamicLayer())
        else:
            layers.append(LolcatsLayer())
            if batch_size is not None:
                specs.append((layers[-1], m.state_spec(dt), device or w.device))
    cache = LolcatsCache(layers)
    if stacked and specs:
        states, cache.stacks = allocate_stacked([s for _, s, _ in specs], batch_size, [d for _, _, d in specs])
    else:
        states = [spec.allocate(batch_size, d) for _, spec, d in specs]
    for (layer, _, _), state in zip(specs, states):
        layer.state, layer.is_initialized = state, True
    return cache


def make_kv_pool(model: nn.Module, positions: int, page: int, softmax: bool = False, dtype: torch.dtype | None = None,
                 device=None) -> KVPool | None:
    """A :class:`KVPool` of ``positions`` positions (rounded up to pages of ``page``, plus the scratch page) for the
    layers :func:`make_cache` gives a full key/value store (kept as softmax attention, unbounded; every layer with
    ``softmax``); None where there are none."""
    layers = {}
    for i, m in lolcats_attention_by_layer(causal_lm(model)).items():
        if _kept(m, softmax) and not m.kv_window:
            w = m.q_proj.weight
            dt, dev = _state_dtype(w, dtype), torch.device(device or w.device)
            layers[i] = (m.num_kv_heads, m.head_dim, m.head_dim, dt, dev)
    return KVPool(layers, -(-positions // page) + 1, page) if layers else None


def _kept(m, softmax: bool) -> bool:
    """Whether layer module ``m`` attends by softmax over a key/value store (kept, or every layer with ``softmax``)."""
    return softmax or not m.converted


def _state_dtype(weight: torch.Tensor | None, dtype: torch.dtype | None) -> torch.dtype:
    """A layer's state dtype: ``dtype``, else its weights' (float32 for quantised or missing weights)."""
    return dtype or (weight.dtype if weight is not None and weight.is_floating_point() else torch.float32)


def cache_kwarg_name(model: nn.Module) -> str:
    """The keyword HF's forward and generate use for the cache: ``cache`` (>= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(causal_lm(model).forward).parameters else "past_key_values"


def layer_cache_kwarg(model: nn.Module) -> str:
    """The keyword a decoder layer's forward takes the cache by: ``cache`` or ``past_key_values``."""
    params = inspect.signature(decoder_layers(model)[0].forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _uses_student(model: nn.Module) -> bool:
    """Whether a converted layer runs in student mode (else HF's own cache serves: every layer softmax)."""
    return any(m.mode == "student" and m.converted for m in lolcats_modules(model))


def enable_lolcats_generation(model: nn.Module) -> nn.Module:
    """Make plain ``model.generate(...)`` use a LolcatsCache while the model is in student mode.

    Wraps the instance's ``_prepare_cache_for_generation`` (present in transformers 5.17 and 5.24):
    when no cache was passed, ``use_cache`` is on and no ``cache_implementation`` was asked for, it
    puts a fresh LolcatsCache into the generate kwargs; HF then treats it as a user cache.
    """
    inner = causal_lm(model)
    if getattr(inner, "_lolcats_generation", False):
        return model
    original = inner._prepare_cache_for_generation
    key = cache_kwarg_name(inner)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if (model_kwargs.get(key) is None and generation_config.use_cache is not False
                and generation_config.cache_implementation is None and _uses_student(self)):
            model_kwargs[key] = make_cache(self)
        return original(generation_config, model_kwargs, *args, **kwargs)

    inner._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, inner)
    inner._lolcats_generation = True
    return model


def eviction_block(model: nn.Module) -> int:
    """w when the converted layers keep a sparse cache on terraced windows, whose slots leave only when the token
    written sits at a position p with p % w == 0 (``ops.decode.evict.leaving_slots``): a caller that knows the
    positions may then skip the eviction at the other steps (:func:`may_evict`). 0 otherwise."""
    sparse = [m.cfg for m in lolcats_modules(model) if m.converted and m.cfg.sparse_cache]
    return sparse[0].window_size if sparse and sparse[0].kind == "terraced_window" else 0


def prefill_capturable(model: nn.Module, like: torch.Tensor) -> bool:
    """Whether every converted layer's prefill on tensors like ``like`` can be captured in a CUDA graph (a sparse
    cache's only through its fused kernel: ``Mixer.prefill_capturable``)."""
    return all(m.mixer.prefill_capturable(like) for m in lolcats_modules(model) if m.converted)


def may_evict(positions, block: int) -> bool:
    """Whether a window slot may leave at a decode step feeding tokens at ``positions`` (``block`` from
    :func:`eviction_block`; 0: always)."""
    return not block or any(p % block == 0 for p in positions)
