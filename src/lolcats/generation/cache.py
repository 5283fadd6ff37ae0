"""LolcatsCache: a Hugging Face ``Cache`` whose size per layer does not grow with the text.

Each converted layer keeps one :class:`~lolcats.ops.decode.naive.DecodeState` (a ring buffer of
the last window's keys/values/phi(k) plus the linear-attention sums kv, ks). The attention module
(student mode) hands its projected inputs to :meth:`LolcatsCache.lolcats_attend`, which

* for one new token (T == 1) runs the decode step (``lolcats.ops.decode.decode_step`` when a fused
  dispatcher exists, else ``decode_step_naive``);
* for a chunk (T > 1, prefill, possibly on a warm cache) computes the outputs with the full-sequence
  reference semantics (``hybrid_attention_naive``: the window slots are passed in front of the new
  keys with their positions, the folded part as ``initial_state``), then *absorbs* the chunk: a
  token stays in the window iff it is in the window of the row's last position P (the softmax
  window of a query at P), otherwise it is folded into (kv, ks). That is the state decode_step
  would reach token by token, because positions of a row are consecutive.

Padding keys (mask 0) are never written; positions come from ``position_ids`` (HF ``generate``
derives them from the attention mask, so a left-padded row keeps its own windows).

Layers left as softmax attention (``AttentionConfig.layers`` a subset) keep HF's dynamic layer,
so a partly converted model still generates (their memory grows as usual).
"""

from __future__ import annotations

import functools
import types
from typing import Callable

import torch
import torch.nn as nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer

from lolcats.ops import BACKENDS, get_backend
from lolcats.ops.decode.naive import DecodeState, decode_step_naive, window_slots
from lolcats.ops.hybrid.naive import hybrid_attention_naive, window_masks
from lolcats.ops.linear.naive import linear_attention_quadratic

PREFILL_BUDGET = 2**26  # elements of one (B, H, Tq, Tk) score tensor in a prefill chunk


@functools.lru_cache(maxsize=None)
def resolve_decode_step() -> Callable[..., torch.Tensor]:
    """The fused decode dispatcher ``lolcats.ops.decode.decode_step`` if present, else the reference.

    Both take ``(q, k, v, fq, fk, state, pos, window_factor, kind, window_size, scale, valid)``;
    the dispatcher also ``backend=``.
    """
    try:
        from lolcats.ops.decode import decode_step  # type: ignore[attr-defined]
    except ImportError:
        return lambda *a, backend=None: decode_step_naive(*a)
    return decode_step


# ---------------------------------------------------------------- mask helpers


def chunk_key_mask(attention_mask, B: int, T: int) -> torch.Tensor | None:
    """Valid keys (B, T) of the current chunk, from HF's 2D or 4D mask; None if there is none.

    A 4D mask (B|1, 1, Tq, Tk) ends with the chunk's T keys; key j of the chunk is valid iff the
    chunk's query j may see it (its own diagonal), which holds whatever window the base config adds.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"LolcatsCache needs a tensor attention mask (sdpa/eager), got {type(attention_mask).__name__}")
    if attention_mask.dim() == 2:
        return attention_mask[:, -T:].bool().expand(B, T)
    m = attention_mask[:, 0, -T:, -T:]  # (B|1, T, T)
    d = torch.diagonal(m, dim1=-2, dim2=-1)  # (B|1, T)
    return (d if d.dtype == torch.bool else d == 0).expand(B, T)


def chunk_positions(position_ids, B: int, T: int, seen: int, device) -> torch.Tensor:
    """(B, T) int64 positions of the chunk's tokens; default seen, seen+1, ..."""
    if position_ids is None:
        return torch.arange(seen, seen + T, device=device).expand(B, T)
    return position_ids[..., -T:].to(device=device, dtype=torch.long).expand(B, T)


# ---------------------------------------------------------------- the per-layer state


def empty_state_for(module: nn.Module, batch_size: int, dtype, device) -> DecodeState:
    """A DecodeState sized for ``module`` (a LolcatsAttention)."""
    cfg = module.cfg
    S = window_slots(cfg.kind, cfg.window_size)
    F = module.feature_map_k.out_dim if hasattr(module.feature_map_k, "out_dim") else module.head_dim
    D = module.head_dim
    return DecodeState.empty(batch_size, module.num_kv_heads, S, D, D, F, dtype, device)


def absorb_chunk(state: DecodeState, k, v, fk, pos, valid, kind: str, window_size: int) -> None:
    """Write a chunk into ``state`` as decode_step would token by token (in place).

    k (B, Hk, T, D), v (B, Hk, T, Dv), fk (B, Hk, T, F), pos (B, T) int64, valid (B, T) bool.
    """
    fk_r = fk.to(state.win_fk.dtype)  # the window stores phi(k) in the state dtype; fold what it would fold
    v_r = v.to(state.win_v.dtype)
    if kind == "linear":
        w = valid.to(torch.float32)[:, None, :, None]
        state.kv += torch.einsum("bhtf,bhtd->bhfd", fk_r.float() * w, v_r.float())
        state.ks += (fk_r.float() * w).sum(2)
        return
    S = state.win_pos.shape[1]
    old_pos, old_filled = state.win_pos, state.win_pos >= 0
    last = torch.maximum(old_pos.amax(-1), torch.where(valid, pos, -1).amax(-1))  # (B,) last position, -1 = none
    stay_old = window_masks(last[:, None], old_pos, kind, window_size)[0][:, 0, 0] & old_filled  # (B, S)
    stay_new = window_masks(last[:, None], pos, kind, window_size)[0][:, 0, 0] & valid  # (B, T)
    fold_old = (old_filled & ~stay_old).to(torch.float32)[:, None, :, None]
    fold_new = (valid & ~stay_new).to(torch.float32)[:, None, :, None]
    state.kv += torch.einsum("bhsf,bhsd->bhfd", state.win_fk.float() * fold_old, state.win_v.float())
    state.kv += torch.einsum("bhtf,bhtd->bhfd", fk_r.float() * fold_new, v_r.float())
    state.ks += (state.win_fk.float() * fold_old).sum(2) + (fk_r.float() * fold_new).sum(2)
    state.win_pos.masked_fill_(old_filled & ~stay_old, -1)
    slot = torch.where(stay_new, pos % S, S)  # (B, T); S = a scratch slot dropped below
    for buf, x in ((state.win_k, k), (state.win_v, v_r), (state.win_fk, fk_r)):
        ext = torch.cat([buf, buf.new_zeros(*buf.shape[:2], 1, buf.shape[3])], 2)  # (B, Hk, S+1, X)
        ext.scatter_(2, slot[:, None, :, None].expand(*x.shape[:3], buf.shape[3]), x.to(buf.dtype))
        buf.copy_(ext[:, :, :S])
    ext = torch.cat([state.win_pos, state.win_pos.new_full((state.win_pos.shape[0], 1), -1)], 1)
    ext.scatter_(1, slot, pos)
    state.win_pos.copy_(ext[:, :S])


def _fused_full_sequence(module: nn.Module, like: torch.Tensor) -> bool:
    """Whether ``module.student_attention``'s plain path runs a fused kernel (memory linear in T)."""
    op = "linear" if module.cfg.kind == "linear" else "hybrid"
    return getattr(get_backend(module.cfg.backend, like), op) is not getattr(BACKENDS["torch"], op)


class LolcatsLayer(CacheLayerMixin):
    """One converted layer's constant-size state. ``seen``: mask columns consumed (pads included)."""

    is_compileable = False
    is_croppable = False
    is_sliding = True  # masks for these layers span only the new tokens (see get_mask_sizes)
    supports_early_init = False

    def __init__(self, state: DecodeState | None = None):
        super().__init__()
        self.state = state
        self.seen = 0
        self.is_initialized = state is not None

    # -- HF Cache layer interface
    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a LolcatsCache layer holds no key/value history: softmax attention cannot use it "
                           "(set the model to student mode, or use a DynamicCache for the teacher)")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, self.seen  # (kv_length, kv_offset): the chunk's own keys only

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def offload(self):
        pass

    def prefetch(self):
        pass

    def reset(self) -> None:
        if self.state is not None:
            for name, t in vars(self.state).items():
                t.fill_(-1) if name == "win_pos" else t.zero_()
        self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("a LolcatsCache cannot be cropped (its state has no per-token history)")

    def _map_batch(self, fn) -> None:
        if self.state is not None:
            self.state = DecodeState(**{n: fn(t) for n, t in vars(self.state).items()})

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    # -- attention
    def attend(self, module, q, k, v, fq, fk, attention_mask=None, position_ids=None) -> torch.Tensor:
        """q (B, H, T, D), k/v (B, Hk, T, D), fq (B, H, T, F), fk (B, Hk, T, F) -> (B, H, T, D)."""
        B, _, T, _ = q.shape
        if self.state is None:
            self.state = empty_state_for(module, B, k.dtype, k.device)
            self.is_initialized = True
        if self.state.win_pos.shape[0] != B:
            raise ValueError(f"LolcatsCache was made for batch {self.state.win_pos.shape[0]}, got {B}")
        key_mask = chunk_key_mask(attention_mask, B, T)
        pos = chunk_positions(position_ids, B, T, self.seen, q.device)
        y = self._decode(module, q, k, v, fq, fk, pos, key_mask) if T == 1 else \
            self._prefill(module, q, k, v, fq, fk, pos, key_mask)
        self.seen += T
        return y

    def _decode(self, module, q, k, v, fq, fk, pos, key_mask):
        cfg = module.cfg
        wf = None if cfg.kind == "linear" else module.window_factor()
        valid = None if key_mask is None else key_mask[:, 0]
        y = resolve_decode_step()(q[:, :, 0], k[:, :, 0], v[:, :, 0], fq[:, :, 0], fk[:, :, 0], self.state,
                                  pos[:, 0], wf, cfg.kind, cfg.window_size, module.scaling, valid,
                                  backend=cfg.backend)
        return y[:, :, None]  # (B, H, 1, Dv)

    def _prefill(self, module, q, k, v, fq, fk, pos, key_mask):
        B, H, T, _ = q.shape
        S = self.state.win_pos.shape[1]
        chunk = max(16, int((PREFILL_BUDGET / (B * H)) ** 0.5) - S)
        fused = _fused_full_sequence(module, q)  # no (T, T) score tensor: any T fits
        plain = (self.seen == 0 and (fused or T <= chunk) and (key_mask is None or bool(key_mask.all()))
                 and bool((pos == torch.arange(T, device=pos.device)).all()))
        if plain:  # fresh, unpadded: the module's full-sequence path (a fused kernel on GPU), then absorb
            y, _ = module.student_attention(q, k, v, fq, fk)
            valid = torch.ones(B, T, dtype=torch.bool, device=q.device)
            absorb_chunk(self.state, k, v, fk, pos, valid, module.cfg.kind, module.cfg.window_size)
            return y
        valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
        ys = []
        for s in range(0, T, chunk):
            sl = slice(s, min(T, s + chunk))
            ys.append(self._prefill_chunk(module, q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl],
                                          fk[:, :, sl], pos[:, sl], valid[:, sl]))
        return torch.cat(ys, 2)

    def _prefill_chunk(self, module, q, k, v, fq, fk, pos, valid):
        st, cfg = self.state, module.cfg
        init = (st.kv, st.ks)
        if cfg.kind == "linear":
            y, _ = linear_attention_quadratic(fq, fk * valid[:, None, :, None].to(fk.dtype), v, init)
        else:  # window slots in front of the chunk's keys, with their positions; empty slots masked
            cat = lambda a, b: torch.cat([a.float(), b.float()], 2)  # noqa: E731
            y, _ = hybrid_attention_naive(q, cat(st.win_k, k), cat(st.win_v, v), fq, cat(st.win_fk, fk),
                                          module.window_factor(), cfg.kind, cfg.window_size, module.scaling,
                                          pos, torch.cat([st.win_pos, pos], 1),
                                          torch.cat([st.win_pos >= 0, valid], 1), init)
            y = y.to(v.dtype)
        absorb_chunk(st, k, v, fk, pos, valid, cfg.kind, cfg.window_size)
        return y


# ---------------------------------------------------------------- the cache


class LolcatsCache(Cache):
    """Constant-size cache for converted models; softmax layers (if any) keep dynamic layers."""

    def __init__(self, layers: list):
        super().__init__(layers=layers)

    def lolcats_attend(self, module, q, k, v, fq, fk, attention_mask=None, position_ids=None) -> torch.Tensor:
        """Called by LolcatsAttention in student mode; shapes as in :meth:`LolcatsLayer.attend`."""
        layer = self.layers[module.layer_idx]
        if not isinstance(layer, LolcatsLayer):
            raise RuntimeError(f"layer {module.layer_idx} is converted but its cache slot is {type(layer).__name__}")
        return layer.attend(module, q, k, v, fq, fk, attention_mask, position_ids)

    def states(self) -> dict[int, DecodeState]:
        return {i: l.state for i, l in enumerate(self.layers) if isinstance(l, LolcatsLayer) and l.state is not None}

    def state_nbytes(self) -> int:
        """Bytes held by all layers (constant in the generated length for converted layers)."""
        total = sum(s.nbytes() for s in self.states().values())
        for l in self.layers:
            if not isinstance(l, LolcatsLayer) and getattr(l, "keys", None) is not None:
                total += l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
        return total


def _inner_model(model: nn.Module) -> nn.Module:
    """The HF causal LM under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lolcats_attention_by_layer(model: nn.Module) -> dict[int, nn.Module]:
    from lolcats.attention.module import LolcatsAttention

    return {m.layer_idx: m for m in model.modules() if isinstance(m, LolcatsAttention)}


def make_cache(model: nn.Module, batch_size: int | None = None, dtype: torch.dtype | None = None,
               device=None) -> LolcatsCache:
    """A LolcatsCache for ``model``; states are allocated now if ``batch_size`` is given, else lazily."""
    inner = _inner_model(model)
    config = inner.config.get_text_config(decoder=True)
    mods = lolcats_attention_by_layer(inner)
    if not mods:
        raise ValueError("make_cache: the model has no LolcatsAttention layers (run convert_model first)")
    dynamic = DynamicCache(config=config).layers
    layers = []
    for i in range(config.num_hidden_layers):
        if i not in mods:
            layers.append(dynamic[i] if i < len(dynamic) else DynamicLayer())
            continue
        m = mods[i]
        state = None
        if batch_size is not None:
            w = m.q_proj.weight
            state = empty_state_for(m, batch_size, dtype or (w.dtype if w.is_floating_point() else torch.float32),
                                    device or w.device)
        layers.append(LolcatsLayer(state))
    return LolcatsCache(layers)


# ---------------------------------------------------------------- generate() integration


def cache_kwarg_name(model: nn.Module) -> str:
    """The keyword HF's forward and generate use for the cache: ``cache`` (>= 5.2x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(_inner_model(model).forward).parameters else "past_key_values"


def _uses_student(model: nn.Module) -> bool:
    return any(m.mode == "student" for m in lolcats_attention_by_layer(model).values())


def enable_lolcats_generation(model: nn.Module) -> nn.Module:
    """Make plain ``model.generate(...)`` use a LolcatsCache while the model is in student mode.

    Wraps the instance's ``_prepare_cache_for_generation`` (present in transformers 5.17 and 5.24):
    when no cache was passed, ``use_cache`` is on and no ``cache_implementation`` was asked for, it
    puts a fresh LolcatsCache into the generate kwargs; HF then treats it as a user cache.
    """
    inner = _inner_model(model)
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
