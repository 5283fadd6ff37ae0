"""LolcatsCache: a Hugging Face ``Cache`` whose size per layer does not grow with the text.

It only stores. Each converted layer's slot (:class:`LolcatsLayer`) holds the state its mixer declares
(``attention/mixers``; for the built-in kinds a :class:`~lolcats.ops.decode.state.DecodeState`: a ring
buffer of the last window's keys, values and phi(k), plus the linear-attention sums kv, ks), allocated from
that declaration (``LolcatsAttention.state_spec``, ``ops/state.py``) and reset to its declared empty values,
and ``seen``, the mask columns consumed so far (pads included). The attention layer reads and writes its
slot itself (``LolcatsAttention.forward`` -> ``attend_cached``): prefill, chunked prefill and the decode step
are its mixer's math.

Layers kept as softmax attention (``AttentionConfig.layers`` / ``softmax_layers``) keep HF's
dynamic layer for ``generate()`` (their memory grows as usual), or, for :class:`FastGenerator`,
a :class:`SoftmaxLayer`: keys and values in buffers preallocated for a maximum length, one slot
per position of each row (bounded memory, static addresses for a CUDA graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from lolcats.ops.state import LayerState, StateSpec


@dataclass
class KVState(LayerState):
    """A kept softmax layer's keys and values by position: slot p holds the token at position p of its
    row; the last slot is scratch (where padding and positions past the end are written)."""

    k: torch.Tensor  # (B, Hk, L + 1, D)
    v: torch.Tensor  # (B, Hk, L + 1, Dv)

    @classmethod
    def spec(cls, Hk, max_length, D, Dv, dtype) -> StateSpec:
        return cls.declare(k=((Hk, max_length + 1, D), dtype), v=((Hk, max_length + 1, Dv), dtype))

    @classmethod
    def empty(cls, B, Hk, max_length, D, Dv, dtype, device) -> KVState:
        return cls.spec(Hk, max_length, D, Dv, dtype).allocate(B, device)

    @property
    def max_length(self) -> int:
        return self.k.shape[2] - 1


class LolcatsLayer(CacheLayerMixin):
    """One converted layer's constant-size state. ``seen``: mask columns consumed (pads included).

    ``aligned_chunks``: the writer promises that every chunk's tokens sit at positions ``seen``, ``seen``
    + 1, ... of every row, and that its padding (mask 0) comes only at the end of the chunk. A fresh
    state then takes the full-sequence path without checking that on the host (a device sync), so a
    CUDA graph can capture the prefill (the serving engines' staging row, right-padded to a length bucket).

    ``evicts``: False is the writer's promise that no window slot leaves at the next decode step (terraced:
    no row's token starts a block); a decode step with a sparse cache then skips its eviction work
    (FastGenerator, which knows every row's position, captures a step for each case).

    The layer hands ``seen``, ``aligned_chunks`` and ``evicts`` to its mixer as a
    :class:`~lolcats.attention.mixers.Step`: the mixer never reads the cache.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = True  # masks for these layers span only the new tokens (see get_mask_sizes)
    supports_early_init = False

    def __init__(self, state: LayerState | None = None):
        super().__init__()
        self.state = state
        self.seen = 0
        self.aligned_chunks = False
        self.evicts = True
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
            self.state.reset()  # every tensor to its declared empty value
        self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("a LolcatsCache cannot be cropped (its state has no per-token history)")

    def _map_batch(self, fn) -> None:
        if self.state is not None:
            self.state = self.state.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])


class SoftmaxLayer(LolcatsLayer):
    """A kept softmax layer's slot with preallocated keys and values (``state``: a :class:`KVState`);
    the layer writes it itself (``LolcatsAttention.attend_softmax_cached``)."""


class LolcatsCache(Cache):
    """Constant-size cache for converted models; softmax layers (if any) keep dynamic layers."""

    def __init__(self, layers: list):
        super().__init__(layers=layers)

    def slot(self, layer_idx: int) -> LolcatsLayer:
        """The stored state of converted layer ``layer_idx``."""
        layer = self.layers[layer_idx]
        if not isinstance(layer, LolcatsLayer):
            raise RuntimeError(f"layer {layer_idx} is converted but its cache slot is {type(layer).__name__}")
        return layer

    def states(self) -> dict[int, LayerState]:
        return {i: l.state for i, l in enumerate(self.layers) if isinstance(l, LolcatsLayer) and l.state is not None}

    def state_nbytes(self) -> int:
        """Bytes held by all layers (constant in the generated length for converted layers, bounded by the
        preallocated length for SoftmaxLayers, growing for dynamic ones)."""
        total = sum(s.nbytes() for s in self.states().values())
        for l in self.layers:
            if not isinstance(l, LolcatsLayer) and getattr(l, "keys", None) is not None:
                total += l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
        return total
