"""Conversion: swap LolcatsAttention into a stock HF causal LM, switch modes, give it a cache.

    model = load_base_model(cfg.model)
    convert_model(model, cfg.attention)            # every layer now a LolcatsAttention (some maybe kept softmax)
    set_attention_mode(model, "distill")
    with collect_distill_outputs(model) as outs:   # list[DistillOutput], one per layer
        model.model(input_ids)
    set_attention_mode(model, "student")
    enable_lolcats_generation(model)               # plain model.generate(...) uses a LolcatsCache
    keep_softmax(model, [3, 7])                    # after stage 1: these layers back to softmax attention
    set_inference_fusion(model)                    # inference: one q/k/v GEMM, RoPE + Hedgehog in one op
"""

from __future__ import annotations

import contextlib
import inspect
import types
from dataclasses import asdict, replace
from typing import Iterator

import torch
import torch.nn as nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from lolcats.attention.cache import LolcatsCache, LolcatsLayer, SoftmaxLayer
from lolcats.attention.module import MODES, DistillOutput, LolcatsAttention, Mode
from lolcats.config import AttentionConfig, check_eval_settings

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


def check_architecture(config) -> None:
    mt = getattr(config, "model_type", None)
    base = mt[len("lolcats_"):] if mt and mt.startswith("lolcats_") else mt
    if base not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"model type {mt!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def check_layer_indices(wanted, num_layers: int) -> None:
    """attention.layers names layers the model has."""
    for i in wanted:
        if not 0 <= i < num_layers:
            raise ValueError(f"attention.layers: layer {i} does not exist (the model has {num_layers}: "
                             f"0..{num_layers - 1})")


def causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module holding ``layers``, ``embed_tokens``, ``norm`` and ``rotary_emb``, found through
    CausalLM and PEFT wrappers: the one lookup of the decoder stack."""
    seen, inner = set(), model
    while inner is not None and not hasattr(inner, "layers") and id(inner) not in seen:
        seen.add(id(inner))
        inner = getattr(inner, "model", None) or getattr(inner, "base_model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise ValueError(f"{type(model).__name__} has no decoder layers (.model.layers)")
    return inner


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder_stack(model).layers


def convert_model(model: nn.Module, cfg: AttentionConfig) -> nn.Module:
    """Swap attention in place: every layer becomes a LolcatsAttention, converted in the layers
    ``cfg.converted_layers`` names and kept as softmax attention in the others; freeze the base.
    (``cfg.softmax_count`` is only checked here: its layers are picked after stage 1, :func:`keep_softmax`.)"""
    check_architecture(model.config)
    layers = decoder_layers(model)
    converted = set(cfg.converted_layers(len(layers)))
    for p in model.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if not isinstance(attn, LolcatsAttention) or attn.converted != (i in converted):
            layer.self_attn = LolcatsAttention(attn, model.config, cfg, i, converted=i in converted)
    _record_layers(model, cfg)
    return model


def keep_softmax(model: nn.Module, indices: list[int]) -> nn.Module:
    """Turn converted layers ``indices`` back into softmax attention (their feature maps are dropped);
    before LoRA is added. The model's ``config.lolcats_attention`` records the result (export)."""
    layers = decoder_layers(model)
    for i in indices:
        if not 0 <= i < len(layers) or not isinstance(layers[i].self_attn, LolcatsAttention):
            raise ValueError(f"keep_softmax: layer {i} is not a LolcatsAttention layer of this model")
        attn = layers[i].self_attn
        if attn.converted:
            layers[i].self_attn = LolcatsAttention(attn, model.config, attn.cfg, i, converted=False)
    _record_layers(model, next(iter(lolcats_modules(model))).cfg)
    return model


def softmax_layers(model: nn.Module) -> list[int]:
    """Indices of the layers kept as softmax attention."""
    return sorted(i for i, m in lolcats_attention_by_layer(model).items() if not m.converted)


def _record_layers(model: nn.Module, cfg: AttentionConfig) -> None:
    """``config.lolcats_attention``: ``cfg`` with the layer split as it is (what an export rebuilds)."""
    kept = softmax_layers(model)
    model.config.lolcats_attention = {**asdict(cfg), "layers": None, "softmax_layers": kept or None,
                                      "softmax_count": 0}


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


def lolcats_modules(model: nn.Module) -> Iterator[LolcatsAttention]:
    for m in model.modules():
        if isinstance(m, LolcatsAttention):
            yield m


def lolcats_attention_by_layer(model: nn.Module) -> dict[int, LolcatsAttention]:
    return {m.layer_idx: m for m in lolcats_modules(model)}


def eviction_block(model: nn.Module) -> int:
    """w when the converted layers keep a sparse cache on terraced windows, whose slots leave only when the token
    written sits at a position p with p % w == 0 (``ops.decode.evict.leaving_slots``): a caller that knows the
    positions may then skip the eviction at the other steps (:func:`may_evict`). 0 otherwise."""
    sparse = [m.cfg for m in lolcats_modules(model) if m.converted and m.cfg.sparse_cache]
    return sparse[0].window_size if sparse and sparse[0].kind == "terraced_window" else 0


def may_evict(positions, block: int) -> bool:
    """Whether a window slot may leave at a decode step feeding tokens at ``positions`` (``block`` from
    :func:`eviction_block`; 0: always)."""
    return not block or any(p % block == 0 for p in positions)


def set_inference_fusion(model: nn.Module, on: bool = True) -> int:
    """Both inference fusions of every LolcatsAttention on or off (an A/B switch): one q/k/v GEMM
    (:meth:`LolcatsAttention.fuse_qkv`, skipped where the projections are not plain nn.Linear, e.g.
    PEFT-wrapped; ``unfuse_qkv``) and RoPE + Hedgehog as the backend's one op (``fuse_rope_features``).
    Returns the number of layers with one q/k/v GEMM."""
    fused = 0
    for m in lolcats_modules(model):
        if on:
            fused += m.fuse_qkv()
        else:
            m.unfuse_qkv()
        m.fuse_rope_features = on
    return fused


def set_attention_mode(model: nn.Module, mode: Mode) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; known: {', '.join(MODES)}")
    for m in lolcats_modules(model):
        m.mode = mode


@contextlib.contextmanager
def attention_mode(model: nn.Module, mode: Mode) -> Iterator[None]:
    """``set_attention_mode`` for the duration of a ``with`` block; each layer's mode restored after."""
    before = [(m, m.mode) for m in lolcats_modules(model)]
    set_attention_mode(model, mode)
    try:
        yield
    finally:
        for m, was in before:
            m.mode = was


def attention_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The stage-1 parameters: feature maps and window factors, by state-dict name."""
    return {n: p for n, p in model.named_parameters()
            if ".feature_map_" in n or n.endswith("window_factors")}


def stage1_checkpoint_names(model: nn.Module, train_window_factor: bool = True) -> dict[str, str]:
    """{checkpoint name: parameter name} of a stage-1 checkpoint: what attention transfer trains
    (feature maps, and the window factors unless they stay at their initial value)."""
    return {n: n for n in attention_parameters(model) if train_window_factor or not n.endswith("window_factors")}


def set_attention_trainable(model: nn.Module, trainable: bool, train_window_factor: bool = True) -> None:
    for n, p in attention_parameters(model).items():
        p.requires_grad_(trainable and (train_window_factor or not n.endswith("window_factors")))


@contextlib.contextmanager
def collect_distill_outputs(model: nn.Module, xent: bool = False) -> Iterator[list[DistillOutput]]:
    outs: list[DistillOutput] = []
    mods = list(lolcats_modules(model))
    for m in mods:
        m.collector, m.collect_xent = outs, xent
    try:
        yield outs
    finally:
        for m in mods:
            m.collector, m.collect_xent = None, False


# ---------------------------------------------------------------- the cache and generate()


def make_cache(model: nn.Module, batch_size: int | None = None, dtype: torch.dtype | None = None,
               device=None, max_length: int | None = None) -> LolcatsCache:
    """A LolcatsCache for ``model``; states are allocated now if ``batch_size`` is given, else lazily.

    Layers kept as softmax attention get HF's dynamic layer, or, with ``batch_size`` and ``max_length``
    (positions per row), a :class:`SoftmaxLayer` with preallocated key/value buffers."""
    inner = causal_lm(model)
    config = inner.config.get_text_config(decoder=True)
    mods = lolcats_attention_by_layer(inner)
    if not mods:
        raise ValueError("make_cache: the model has no LolcatsAttention layers (run convert_model first)")
    dynamic = DynamicCache(config=config).layers
    layers = []
    for i in range(config.num_hidden_layers):
        m = mods.get(i)
        w = None if m is None else m.q_proj.weight
        dt = dtype or (w.dtype if w is not None and w.is_floating_point() else torch.float32)
        if m is not None and not m.converted and batch_size is not None and max_length is not None:
            layers.append(SoftmaxLayer(m.empty_kv_state(batch_size, max_length, dt, device or w.device)))
        elif m is None or not m.converted:
            layers.append(dynamic[i] if i < len(dynamic) else DynamicLayer())
        else:
            state = None if batch_size is None else m.empty_state(batch_size, dt, device or w.device)
            layers.append(LolcatsLayer(state))
    return LolcatsCache(layers)


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
