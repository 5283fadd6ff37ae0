"""LolcatsAttention: the one attention module, swapped into a stock HF decoder layer.

It keeps the pretrained q/k/v/o projections (same parameter names, so LoRA and
``from_pretrained`` see the usual keys) and RoPE, and adds feature maps phi_q (one per query
head) and phi_k (one per KV head, as the base model shares keys across a GQA group) applied
after RoPE (before it with ``attention.feature_rope`` off), plus a learnable per-head window factor for the
hybrid kinds and the modules its mixer adds (``Mixer.modules``: ``gated_delta``'s write strength and decay,
``feature_map_delta``).

Modes (``module.mode``):
  * ``teacher``: softmax attention through PyTorch SDPA, i.e. the original layer;
  * ``student``: linear or hybrid window attention;
  * ``distill``: both; the layer returns the teacher's output (so layers learn independently)
    and hands a :class:`DistillOutput` to ``module.collector`` for the loss.

The student's attention math is its *mixer* (``attention/mixers``: one variant per file, picked by
``attention.kind``, :attr:`LolcatsAttention.mixer`): it declares the per-sequence state
(:meth:`LolcatsAttention.state_spec`, what the cache allocates) and implements a whole sequence, a chunked
prefill and a decode step against it, every operator from the ops registry. With a
:class:`~lolcats.attention.cache.LolcatsCache` (student mode) the layer reads its own slot of the cache and
hands the mixer the slot's state and a :class:`~lolcats.attention.step.Step` (positions, valid keys, fresh,
the writer's promises) (:meth:`LolcatsAttention.attend_cached`): one new token (T == 1) is the decode step, a
chunk (T > 1) the prefill. A writer that runs the model itself declares each call in a
:class:`~lolcats.attention.step.StepMeta` passed with the forward (``lolcats_step=``: where it starts, the cache
rows it runs on, whether a window slot may leave); a plain call (HF ``generate()``) declares nothing.

A layer kept as softmax attention (``converted=False``: ``AttentionConfig.softmax_layers``, or
picked by ``softmax_count``) is the teacher path in every mode; with a cache it appends to an HF
dynamic slot, or writes a :class:`~lolcats.attention.cache.SoftmaxLayer`'s key/value store, full or bounded
to a window plus sink positions (:meth:`LolcatsAttention.attend_softmax_cached`; FastGenerator, the serving
engines, ``generate()`` when bounded), as every layer does in teacher mode in the serving KV engine.

Padding keys (mask 0) are never written; positions come from ``position_ids`` (HF ``generate``
derives them from the attention mask, so a left-padded row keeps its own windows).

With ``cfg.gate`` (``ops/gate.py``) the layer computes a log forget gate (B, Hk, T) from its keys
before RoPE, zero at padding, and passes it to every path (full sequence, prefill pieces, the
chunk absorbed into the state, the decode step): the linear state decays by it.

Two fusions for inference (a decode step at batch 1 is bound by kernel launches; FastGenerator and the
serving engines turn them on, ``use.set_inference_fusion``):

* :meth:`LolcatsAttention.fuse_qkv` makes the q/k/v weights (and biases) views of one tensor, and
  :meth:`~LolcatsAttention.qkv` runs one GEMM and splits it (B, T, (H + 2 Hk) D); a projection replaced
  later (e.g. wrapped by PEFT) turns it off, and so does a wanted gradient for the weights;
* in student mode with Hedgehog maps, RoPE and both feature maps run as the backend's one op
  (``Backend.rope_hedgehog``, the triton backend's ``ops/triton/rope_feature_map.py``) when no gradient
  is wanted (:meth:`~LolcatsAttention.project_features`); otherwise ``ops/rope.py`` then :meth:`features`.

The same switch fuses the decoder layer's norms and MLP around this module (``attention/fusion.py``).

Shapes: hidden (B, T, d_model); q (B, H, T, D); k, v (B, Hk, T, D); phi(q) (B, H, T, F).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lolcats.attention.cache import KVState, LolcatsCache, LolcatsLayer, PagedKVState, SoftmaxLayer, kv_slots
from lolcats.attention.feature_maps import HedgehogFeatureMap, build_feature_map
from lolcats.attention.mixers import Mixer, get_mixer
from lolcats.attention.qkv import FusedRows, fused_again, still_fused
from lolcats.attention.step import STEP_KWARG, StepMeta, step_of
from lolcats.config import AttentionConfig
from lolcats.ops import get_backend
from lolcats.ops.common import expand_kv_heads
from lolcats.ops.gate import forget_log_gate, masked_log_gate
from lolcats.ops.rope import apply_rope
from lolcats.ops.state import LayerState, StateSpec
from lolcats.runtime import capturing

Mode = Literal["teacher", "student", "distill"]
MODES = ("teacher", "student", "distill")


@dataclass
class DistillOutput:
    """What one layer hands the attention-transfer loss."""

    layer_idx: int
    mse: torch.Tensor  # scalar, mean over (B, H, T, D)
    xent: torch.Tensor | None  # scalar, mean over (B, H, T) queries; None unless asked for
    numel: int  # elements the MSE averaged over


def key_mask_from_attention_mask(mask: torch.Tensor | None, k_len: int) -> torch.Tensor | None:
    """Valid keys (B, Tk) from HF's 4D mask (B, 1, Tq, Tk) or 2D mask (B, Tk); None if all valid."""
    if mask is None:
        return None
    if mask.dim() == 2:
        km = mask.bool()
    else:
        last = mask[:, 0, -1, :k_len]  # the last query sees every non-padding key
        km = last if last.dtype == torch.bool else last == 0
    return km


class LolcatsAttention(nn.Module):
    """``converted=False``: a layer kept as softmax attention. It has no feature maps, always computes
    the teacher path (whatever its ``mode``), and with a cache uses a KV slot (dynamic, or a
    :class:`~lolcats.attention.cache.SoftmaxLayer` with preallocated buffers)."""

    def __init__(self, base: nn.Module, model_config, cfg: AttentionConfig, layer_idx: int, converted: bool = True):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.converted = converted
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.q_proj, base.k_proj, base.v_proj, base.o_proj
        self.num_heads = model_config.num_attention_heads
        self.num_kv_heads = getattr(model_config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(base, "head_dim", None) or model_config.hidden_size // self.num_heads
        self.scaling = getattr(base, "scaling", self.head_dim**-0.5)
        self.config = getattr(base, "config", model_config)
        self.is_causal = True
        self.mode: Mode = "student"
        self.collector: list[DistillOutput] | None = None
        self.collect_xent = False
        # teacher mode without a cache: called as probe(layer_idx, q, k) with q, k after RoPE (retrieval scores)
        self.probe = None
        self.fused_qkv: FusedRows | None = None  # fuse_qkv(): one q/k/v GEMM
        self.fuse_rope_features = True  # RoPE + Hedgehog in the backend's one op, where it has one (inference)
        # a kept layer's cached keys: the last kv_window positions and the first kv_sink (0: all; set_softmax_window)
        self.kv_window, self.kv_sink = 0, 0
        self._mixer: Mixer | None = None  # made for self.cfg by the ``mixer`` property
        self._window_factor_kept: tuple | None = None  # window_factor() without autograd: (parameter key, value)
        if not converted:
            return
        dev = self.q_proj.weight.device
        if dev.type == "meta":  # made where the default device is (real for the sharded loader, which keeps them)
            dev = None
        self.feature_map_q = build_feature_map(cfg.feature_map, self.num_heads, self.head_dim, cfg.feature_dim,
                                               cfg.feature_init).to(dev)
        self.feature_map_k = build_feature_map(cfg.feature_map, self.num_kv_heads, self.head_dim, cfg.feature_dim,
                                               cfg.feature_init).to(dev)
        if get_mixer(cfg.kind).has_window_factor:
            logit = math.log(cfg.init_window_factor / (1 - cfg.init_window_factor))
            self.window_factors = nn.Parameter(torch.full((self.num_heads,), logit, device=dev))
        else:
            self.register_parameter("window_factors", None)
        for name, mod in get_mixer(cfg.kind).modules(self).items():  # the variant's own (gated_delta: beta, decay)
            self.add_module(name, mod.to(dev))

    @property
    def mixer(self) -> Mixer:
        """The student variant's math (``attention/mixers``, by ``cfg.kind``), made again when ``cfg`` is replaced
        (``set_sparse_cache``, ``set_linear_scale``)."""
        if self._mixer is None or self._mixer.cfg is not self.cfg:
            self._mixer = get_mixer(self.cfg.kind)(self)
        return self._mixer

    # ------------------------------------------------------------ pieces

    def fuse_qkv(self) -> bool:
        """Make q_proj, k_proj and v_proj's weights (and biases) views of one tensor ((H + 2 Hk) D, d_model),
        so that :meth:`qkv` runs one GEMM: same state_dict keys and values, no extra memory. For inference:
        while a gradient is wanted for them the three GEMMs run. Skipped (False) unless all three are plain
        nn.Linear (:func:`fusable`); replacing one later (e.g. PEFT wrapping it) turns the fused path off."""
        self.fused_qkv = fused_again(self.fused_qkv, (self.q_proj, self.k_proj, self.v_proj))
        return self.fused_qkv is not None

    def unfuse_qkv(self) -> None:
        """Back to three GEMMs (the Parameters stay views of one tensor: nothing is copied or freed)."""
        self.fused_qkv = None

    def _current_fused_qkv(self) -> FusedRows | None:
        f = self.fused_qkv = still_fused(self.fused_qkv, (self.q_proj, self.k_proj, self.v_proj))
        if f is None:
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in f.params):
            return None  # the fused tensor is not a Parameter: no gradient would reach the views
        return f

    def qkv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden (B, T, d) -> q (B, H, T, D), k, v (B, Hk, T, D) before RoPE; one GEMM after fuse_qkv()."""
        B, T, _ = hidden.shape
        heads = lambda x: x.view(B, T, -1, self.head_dim).transpose(1, 2)  # noqa: E731
        f = self._current_fused_qkv()
        if f is None:
            return heads(self.q_proj(hidden)), heads(self.k_proj(hidden)), heads(self.v_proj(hidden))
        q, k, v = F.linear(hidden, f.weight, f.bias).split(f.sizes, -1)  # (B, T, (H + 2 Hk) D) in three
        return heads(q), heads(k), heads(v)

    def project(self, hidden: torch.Tensor, position_embeddings, featured: bool = False):
        """hidden (B, T, d) -> q (B, H, T, D), k, v (B, Hk, T, D), RoPE applied, and the log forget gate
        (B, Hk, T) of the keys before RoPE (None without a gate); with ``featured`` also the (q, k) the feature
        maps read (these, or before RoPE with ``feature_rope`` off)."""
        q0, k0, v = self.qkv(hidden)
        log_gate = forget_log_gate(k0, self.cfg.gate)
        q, k = apply_rope(q0, k0, *position_embeddings)
        if not featured:
            return q, k, v, log_gate
        return q, k, v, log_gate, self.feature_inputs(q0, k0, q, k)

    def feature_inputs(self, q0: torch.Tensor, k0: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """The (q, k) the feature maps read: after RoPE (q, k), or before it (q0, k0) with ``feature_rope`` off."""
        return (q, k) if self.cfg.feature_rope else (q0, k0)

    def project_features(self, hidden: torch.Tensor, position_embeddings):
        """Student mode's :meth:`project` and :meth:`features`: q, k, v, phi(q) (B, H, T, F), phi(k)
        (B, Hk, T, F), log gate. RoPE and Hedgehog are one op where the backend has it (:meth:`rope_features_op`)."""
        q, k, v = self.qkv(hidden)
        log_gate = forget_log_gate(k, self.cfg.gate)  # from the keys before RoPE
        cos, sin = position_embeddings
        op = self.rope_features_op(q, k)
        if op is not None:
            q, k, fq, fk = op(q, k, cos, sin, self.feature_map_q.weight, self.feature_map_k.weight,
                              feature_rope=self.cfg.feature_rope, q_scale=self.cfg.linear_scale)  # scale_linear's
            return q, k, v, fq, fk, log_gate
        qr, kr = apply_rope(q, k, cos, sin)
        return (qr, kr, v, *self.features(*self.feature_inputs(q, k, qr, kr)), log_gate)

    def rope_features_op(self, q: torch.Tensor, k: torch.Tensor):
        """The backend's ``rope_hedgehog`` if this layer may use it on q, k: Hedgehog maps,
        ``fuse_rope_features`` on, and no gradient wanted (the op has no backward); else None."""
        if not (self.fuse_rope_features and isinstance(self.feature_map_q, HedgehogFeatureMap)):
            return None
        op = get_backend(self.cfg.backend, q).rope_hedgehog
        wq, wk = self.feature_map_q.weight, self.feature_map_k.weight
        if op is None or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, wq, wk))):
            return None
        return op

    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """phi(q) (B, H, T, F) times ``linear_scale``, phi(k) (B, Hk, T, F); Hedgehog through the backend's fused
        op if it has one."""
        fused = get_backend(self.cfg.backend, q).hedgehog
        if fused is not None and isinstance(self.feature_map_q, HedgehogFeatureMap):
            fq, fk = fused(q, self.feature_map_q.weight), fused(k, self.feature_map_k.weight)
        else:
            fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        return self.scale_linear(fq), fk

    def scale_linear(self, fq: torch.Tensor) -> torch.Tensor:
        """phi(q) times ``attention.linear_scale``: every linear term of the hybrid sum (numerator, normaliser,
        state) scales with it against the softmax terms; phi(k), the state and the sparse cache's scores do not.
        (The backend's fused RoPE + feature-map op multiplies it in as it stores phi(q): ``project_features``.)"""
        s = self.cfg.linear_scale
        return fq if s == 1 else fq * s

    def window_factor(self) -> torch.Tensor:
        """(H,) in (0, 1). Without a gradient to record (inference) the value is kept between calls and
        recomputed, in the same tensor, when the parameter changes (its data or version): a decode step then
        launches no sigmoid per layer. A CUDA graph captured before a change replays the kept value until the
        next eager call recomputes it."""
        p = self.window_factors
        if (torch.is_grad_enabled() and p.requires_grad) or torch.compiler.is_compiling() or p.is_inference():
            return torch.sigmoid(p)
        key = (p.data_ptr(), p._version, p.dtype, p.device)
        kept = self._window_factor_kept
        if kept is not None and kept[0] == key:
            return kept[1]
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor: usable (and updatable) outside
            value = torch.sigmoid(p.detach())
            if kept is not None and kept[1].shape == value.shape and kept[1].dtype == value.dtype \
                    and kept[1].device == value.device:
                value = kept[1].copy_(value)  # in place: graphs captured with it read the new value
        self._window_factor_kept = (key, value)
        return value

    def softmax_attention(self, q, k, v, attention_mask=None) -> torch.Tensor:
        """Teacher path. q (B, H, Tq, D), k/v (B, Hk, Tk, D) -> (B, H, Tq, D)."""
        Tq, Tk = q.shape[2], k.shape[2]
        mask = attention_mask
        if mask is not None and mask.dim() == 4:
            mask = mask[..., :Tk]
            if mask.dtype != torch.bool:
                mask = mask.to(q.dtype)
        if Tq == 1 and mask is not None and mask.shape[1] == 1 and self.num_kv_heads != self.num_heads:
            # one query per head over a masked cache: a group's query heads as query rows of its KV head
            # (the same products, and no grouped-query path that SDPA may serve by copying K and V)
            B, H, _, D = q.shape
            y = F.scaled_dot_product_attention(q.reshape(B, self.num_kv_heads, H // self.num_kv_heads, D), k, v,
                                               attn_mask=mask, scale=self.scaling)  # (B, Hk, G, D)
            return y.reshape(B, H, 1, -1)
        is_causal = mask is None and Tq == Tk and Tq > 1
        if mask is None and Tq != Tk and Tq > 1:  # queries are the last Tq of Tk keys
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scaling,
                                              enable_gqa=self.num_kv_heads != self.num_heads)

    def student_attention(self, q, k, v, fq, fk, positions=None, key_mask=None, return_weights=False,
                          log_gate=None):
        """Linear or hybrid attention over a whole sequence (no cache), the mixer's: (B, H, T, D) and the
        attention weights (B, H, T, T) or None.

        ``log_gate`` (B, Hk, T): the forget gate, 0 at padding (``masked_log_gate``)."""
        return self.mixer.sequence(q, k, v, fq, fk, positions, key_mask, return_weights, log_gate)

    # ------------------------------------------------------------ forward

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if (attention_mask is not None and attention_mask.dim() == 4 and self.mode != "teacher"
                and capturing(hidden_states.device)):
            # transformers materialises the causal mask while a CUDA graph is captured (masking_utils'
            # is_tracing), and reading it would sync the host. Captured steps are train.cuda_graph's
            # packed micro-batches and the decode runner's steps (no mask): there is no padding to keep.
            # Softmax never reads the mask on the host, and the serving KV engine's graphs need theirs;
            # a 2D mask is a caller's own (the serving engines' right-padded prefill), kept.
            attention_mask = None
        B, T = hidden_states.shape[:2]
        mode = self.mode if self.converted else "teacher"
        if mode == "student":
            q, k, v, fq, fk, log_gate = self.project_features(hidden_states, position_embeddings)
        else:
            q, k, v, log_gate, featured = self.project(hidden_states, position_embeddings, featured=True)
        slot = cache.layers[self.layer_idx] if isinstance(cache, LolcatsCache) else None
        meta = kwargs.get(STEP_KWARG)  # the writer's StepMeta (attention/step.py); None: a plain call
        if mode == "teacher" and isinstance(slot, SoftmaxLayer):
            y = self.attend_softmax_cached(slot, q, k, v, attention_mask, position_ids, meta)
        elif mode == "teacher":
            if cache is not None:  # a converted layer's LolcatsLayer refuses update() with a clear error
                k, v = cache.update(k, v, self.layer_idx)
            elif self.probe is not None:
                self.probe(self.layer_idx, q, k)
            y = self.softmax_attention(q, k, v, attention_mask)
        elif mode == "distill":
            y = self._distill(q, k, v, attention_mask, log_gate, featured)
        elif isinstance(cache, LolcatsCache):
            y = self.attend_cached(cache.slot(self.layer_idx), q, k, v, fq, fk, attention_mask, position_ids,
                                   log_gate, meta)
        else:
            key_mask = key_mask_from_attention_mask(attention_mask, T)
            if key_mask is not None and bool(key_mask.all()):
                key_mask = None
            positions = None
            if key_mask is not None and position_ids is not None:
                positions = position_ids.expand(B, T)
            y, _ = self.student_attention(q, k, v, fq, fk, positions, key_mask,
                                          log_gate=masked_log_gate(log_gate, key_mask))
        y = y.transpose(1, 2).reshape(B, T, -1).to(hidden_states.dtype)  # (B, T, H*D)
        return self.o_proj(y), None

    # ------------------------------------------------------------ with a constant-size state

    def state_spec(self, dtype) -> StateSpec:
        """This layer's per-sequence state, declared by its mixer (window and key tensors in ``dtype``)."""
        return self.mixer.state_spec(dtype)

    def empty_state(self, batch_size: int, dtype, device) -> LayerState:
        """An empty state for ``batch_size`` sequences, allocated from :meth:`state_spec`."""
        return self.mixer.empty_state(batch_size, dtype, device)

    def attend_cached(self, slot: LolcatsLayer, q, k, v, fq, fk, attention_mask=None, position_ids=None,
                      log_gate=None, meta: StepMeta | None = None):
        """Attention of a chunk (or one token) that continues ``slot``'s state, updating it in place: the
        mixer's decode step (T == 1) or prefill (T > 1), told what the call knows (:func:`step_of`): its
        positions, valid tokens and the writer's declaration ``meta`` (None: a plain call, :meth:`slot_state`).

        q (B, H, T, D), k/v (B, Hk, T, D), fq (B, H, T, F), fk (B, Hk, T, F), log_gate (B, Hk, T)
        or None -> (B, H, T, D).
        """
        B, _, T, _ = q.shape
        state, declared = self.slot_state(slot, meta, B, lambda: self.empty_state(B, k.dtype, k.device))
        step = step_of(declared, attention_mask, position_ids, B, T, q.device)
        if T == 1:
            y = self.mixer.decode(state, q, k, v, fq, fk, step, log_gate)
        else:
            y = self.mixer.prefill(state, q, k, v, fq, fk, step, masked_log_gate(log_gate, step.valid))
        if meta is None:
            slot.seen += T
        return y

    @staticmethod
    def slot_state(slot: LolcatsLayer, meta: StepMeta | None, B: int, make) -> tuple[LayerState, StepMeta]:
        """The state a cached call of batch ``B`` runs on (the rows and positions ``meta`` declares; ``make()``
        allocates a slot's state at its first call) and the call's declaration: ``meta``, or for a plain call
        one that starts where the cache counted (``slot.seen``, which the plain call then advances)."""
        if slot.state is None:
            slot.state = make()
            slot.is_initialized = True
        declared = StepMeta(start=slot.seen) if meta is None else meta
        state = slot.view(declared.row_slice, declared.length)
        if state.batch_size != B:
            raise ValueError(f"LolcatsCache: a call of batch {B} on {state.batch_size} of its rows (made for "
                             f"{slot.state.batch_size}; StepMeta.rows picks them)")
        return state, declared

    def kv_state_spec(self, max_length: int, dtype) -> StateSpec:
        """A kept layer's key/value store for rows of up to ``max_length`` positions: a slot per position, or at
        most ``kv_sink`` + ``kv_window`` slots when bounded."""
        slots = kv_slots(max_length, self.kv_window, self.kv_sink)
        return KVState.spec(self.num_kv_heads, slots, self.head_dim, self.head_dim, dtype, bounded=bool(self.kv_window))

    def empty_kv_state(self, batch_size: int, max_length: int, dtype, device) -> KVState:
        """An empty :meth:`kv_state_spec` store for ``batch_size`` rows."""
        return self.kv_state_spec(max_length, dtype).allocate(batch_size, device)

    def softmax_slot(self, batch_size: int | None = None, max_length: int | None = None, dtype=None,
                     device=None) -> SoftmaxLayer:
        """A kept layer's cache slot, its store allocated now for ``batch_size`` rows of ``max_length`` positions
        (or, bounded with no length given, at the first call)."""
        state = None if batch_size is None else self.empty_kv_state(batch_size, max_length, dtype, device)
        return SoftmaxLayer(state, self.kv_window, self.kv_sink)

    def attend_softmax_cached(self, slot: SoftmaxLayer, q, k, v, attention_mask=None, position_ids=None,
                              meta: StepMeta | None = None):
        """Softmax attention of a chunk (or one token) over ``slot``'s store and the chunk's own keys.

        Each valid token goes to the slot of its position (``SoftmaxLayer.write``); a query at position p attends
        the stored positions it sees (all of [0, p], or the sinks and the window; ``SoftmaxLayer.visible``). A
        row's positions are consecutive from its first token, so all it sees is written. A chunk that could
        overwrite its own keys (wrapping a bounded store's ring) attends the store as it was plus the chunk's
        keys, and is written after. A decode step reads a paged store (the backend's ``paged_decode``) or a full one
        (``kv_decode``) in place, split over its keys; other calls run SDPA over the store. ``meta``: the writer's
        declaration, as in :meth:`attend_cached`. q (B, H, T, D), k/v (B, Hk, T, D) -> (B, H, T, D).
        """
        B, _, T, _ = q.shape
        # a bounded store for generate() is made at the first call: its size does not depend on the length
        st, declared = self.slot_state(slot, meta, B, lambda: self.empty_kv_state(B, slot.sink + slot.window,
                                                                                  k.dtype, k.device))
        step = step_of(declared, attention_mask, position_ids, B, T, q.device)
        pos, valid = step.pos, step.valid_or_ones()
        if T == 1 and isinstance(st, PagedKVState):  # a decode step reads the pages in place (the backend's op)
            slot.write(st, k, v, pos, valid)
            y = get_backend(self.cfg.backend, q).paged_decode(q, st.k, st.v, st.table, pos[:, 0], st.page, st.length,
                                                              self.scaling)
        elif T == 1 and not slot.window:  # a full store: slot t holds position t, read in place (the backend's op)
            slot.write(st, k, v, pos, valid)
            n = st.max_length  # (the scratch slot after them is never read)
            y = get_backend(self.cfg.backend, q).kv_decode(q, st.k[:, :, :n], st.v[:, :, :n], pos[:, 0], self.scaling)
        else:
            if slot.keeps_chunk(st, declared.start, T):
                slot.write(st, k, v, pos, valid)
                keys, values, key_pos = st.read()
            else:
                keys, values, key_pos = st.read()
                keys, values = torch.cat([keys, k.to(keys.dtype)], 2), torch.cat([values, v.to(values.dtype)], 2)
                key_pos = torch.cat([key_pos, torch.where(valid, pos, -1)], 1)  # (B, N + 1 + T)
                slot.write(st, k, v, pos, valid)
            allowed = slot.visible(key_pos, pos)  # (B, T, K)
            y = self.softmax_attention(q, keys.to(q.dtype), values.to(q.dtype), allowed[:, None])
        if meta is None:
            slot.seen += T
        return y

    # ------------------------------------------------------------ attention transfer

    def _distill(self, q, k, v, attention_mask, log_gate, featured):
        """``featured``: the (q, k) the feature maps read (:meth:`project`)."""
        with torch.no_grad():
            y_true = self.softmax_attention(q, k, v, attention_mask)
        q, k, v = q.detach(), k.detach(), v.detach()
        log_gate = None if log_gate is None else log_gate.detach()
        fq, fk = self.features(*(x.detach() for x in featured))
        want_xent = self.collect_xent
        y_pred, w_pred = self.student_attention(q, k, v, fq, fk, return_weights=want_xent, log_gate=log_gate)
        if self.collector is not None:
            mse = F.mse_loss(y_pred.float(), y_true.float())
            xent = self._attention_xent(q, k, w_pred) if want_xent else None
            self.collector.append(DistillOutput(self.layer_idx, mse, xent, y_true.numel()))
        return y_true

    def _attention_xent(self, q, k, w_pred):
        """Cross-entropy between teacher softmax weights and student weights, per query."""
        T = q.shape[2]
        with torch.no_grad():
            s = (q.float() @ expand_kv_heads(k.float(), q.shape[1]).transpose(-1, -2)) * self.scaling
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
            w_true = torch.softmax(s, -1)
        return -(w_true * torch.log(w_pred.clamp_min(1e-12))).sum(-1).mean()

    def extra_repr(self) -> str:
        c = self.cfg
        if not self.converted:
            return f"layer={self.layer_idx}, softmax (kept)"
        gate = f", gate={c.gate}" if c.gate != "none" else ""
        return (f"layer={self.layer_idx}, kind={c.kind}, feature_map={c.feature_map}, window={c.window_size}{gate}, "
                f"mode={self.mode}")
