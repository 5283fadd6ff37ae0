"""LolcatsAttention: the one attention module, swapped into a stock HF decoder layer.

It keeps the pretrained q/k/v/o projections (same parameter names, so LoRA and
``from_pretrained`` see the usual keys) and RoPE, and adds feature maps phi_q (one per query
head) and phi_k (one per KV head, as the base model shares keys across a GQA group) applied
after RoPE, plus a learnable per-head window factor for the hybrid kinds.

Modes (``module.mode``):
  * ``teacher``: softmax attention through PyTorch SDPA, i.e. the original layer;
  * ``student``: linear or hybrid window attention;
  * ``distill``: both; the layer returns the teacher's output (so layers learn independently)
    and hands a :class:`DistillOutput` to ``module.collector`` for the loss.

With a :class:`~lolcats.attention.cache.LolcatsCache` (student mode) the layer reads and writes
its own slot of the cache (:meth:`LolcatsAttention.attend_cached`):

* one new token (T == 1): the backend's decode step on the constant-size state;
* a chunk (T > 1, prefill, possibly on a warm cache): on a fresh, unpadded cache the
  full-sequence path (the fused kernel on GPU), otherwise the reference semantics over the window
  slots placed in front of the new keys with their positions and the folded part as the initial
  state, in pieces of bounded memory; then the chunk is absorbed into the state
  (``ops.decode.naive.absorb_chunk``).

Padding keys (mask 0) are never written; positions come from ``position_ids`` (HF ``generate``
derives them from the attention mask, so a left-padded row keeps its own windows).

Shapes: hidden (B, T, d_model); q (B, H, T, D); k, v (B, Hk, T, D); phi(q) (B, H, T, F).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lolcats.attention.cache import LolcatsCache, LolcatsLayer
from lolcats.attention.feature_maps import HedgehogFeatureMap, build_feature_map
from lolcats.config import AttentionConfig
from lolcats.ops import get_backend
from lolcats.ops.decode.naive import DecodeState, absorb_chunk
from lolcats.ops.hybrid.naive import hybrid_attention_naive
from lolcats.ops.linear.naive import causal_linear_scores, expand_kv_heads, linear_attention_quadratic
from lolcats.runtime import capturing

Mode = Literal["teacher", "student", "distill"]
MODES = ("teacher", "student", "distill")
PREFILL_BUDGET = 2**26  # elements of one (B, H, Tq, Tk) score tensor in a reference prefill piece


@dataclass
class DistillOutput:
    """What one layer hands the attention-transfer loss."""

    layer_idx: int
    mse: torch.Tensor  # scalar, mean over (B, H, T, D)
    xent: torch.Tensor | None  # scalar, mean over (B, H, T) queries; None unless asked for
    numel: int  # elements the MSE averaged over


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q, k, cos, sin):
    """RoPE as in HF Llama/Mistral/Qwen2. q, k: (B, H, T, D); cos, sin: (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


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


class LolcatsAttention(nn.Module):
    def __init__(self, base: nn.Module, model_config, cfg: AttentionConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.q_proj, base.k_proj, base.v_proj, base.o_proj
        self.num_heads = model_config.num_attention_heads
        self.num_kv_heads = getattr(model_config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(base, "head_dim", None) or model_config.hidden_size // self.num_heads
        self.scaling = getattr(base, "scaling", self.head_dim**-0.5)
        self.config = getattr(base, "config", model_config)
        self.is_causal = True
        dev = self.q_proj.weight.device
        if dev.type == "meta":  # made where the default device is (real for the sharded loader, which keeps them)
            dev = None
        self.feature_map_q = build_feature_map(cfg.feature_map, self.num_heads, self.head_dim, cfg.feature_dim,
                                               cfg.feature_init).to(dev)
        self.feature_map_k = build_feature_map(cfg.feature_map, self.num_kv_heads, self.head_dim, cfg.feature_dim,
                                               cfg.feature_init).to(dev)
        if cfg.kind != "linear":
            logit = math.log(cfg.init_window_factor / (1 - cfg.init_window_factor))
            self.window_factors = nn.Parameter(torch.full((self.num_heads,), logit, device=dev))
        else:
            self.register_parameter("window_factors", None)
        self.mode: Mode = "student"
        self.collector: list[DistillOutput] | None = None
        self.collect_xent = False

    # ------------------------------------------------------------ pieces

    def project(self, hidden: torch.Tensor, position_embeddings):
        """hidden (B, T, d) -> q (B, H, T, D), k, v (B, Hk, T, D), RoPE applied."""
        B, T, _ = hidden.shape
        q = self.q_proj(hidden).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(B, T, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rope(q, k, cos, sin)
        return q, k, v

    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """phi(q) (B, H, T, F), phi(k) (B, Hk, T, F); Hedgehog through the backend's fused op if it has one."""
        fused = get_backend(self.cfg.backend, q).hedgehog
        if fused is not None and isinstance(self.feature_map_q, HedgehogFeatureMap):
            return fused(q, self.feature_map_q.weight), fused(k, self.feature_map_k.weight)
        return self.feature_map_q(q), self.feature_map_k(k)

    def window_factor(self) -> torch.Tensor:
        """(H,) in (0, 1)."""
        return torch.sigmoid(self.window_factors)

    def softmax_attention(self, q, k, v, attention_mask=None) -> torch.Tensor:
        """Teacher path. q (B, H, Tq, D), k/v (B, Hk, Tk, D) -> (B, H, Tq, D)."""
        Tq, Tk = q.shape[2], k.shape[2]
        mask = attention_mask
        if mask is not None and mask.dim() == 4:
            mask = mask[..., :Tk]
            if mask.dtype != torch.bool:
                mask = mask.to(q.dtype)
        is_causal = mask is None and Tq == Tk and Tq > 1
        if mask is None and Tq != Tk and Tq > 1:  # queries are the last Tq of Tk keys
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scaling,
                                              enable_gqa=self.num_kv_heads != self.num_heads)

    def student_attention(self, q, k, v, fq, fk, positions=None, key_mask=None, return_weights=False):
        """Linear or hybrid attention over a whole sequence (no cache): (B, H, T, D)."""
        plain = key_mask is None and positions is None and not return_weights
        if plain:
            backend = get_backend(self.cfg.backend, q)
            if self.cfg.kind == "linear":
                return backend.linear(fq, fk, v, None, False)[0], None
            return backend.hybrid(q, k, v, fq, fk, self.window_factor(), self.cfg.kind, self.cfg.window_size,
                                  self.scaling), None
        if self.cfg.kind == "linear":
            return self._linear_masked(fq, fk, v, key_mask, return_weights)
        return hybrid_attention_naive(q, k, v, fq, fk, self.window_factor(), self.cfg.kind, self.cfg.window_size,
                                      self.scaling, positions, positions, key_mask, None, return_weights)

    def _linear_masked(self, fq, fk, v, key_mask, return_weights):
        if key_mask is not None:  # padding keys contribute nothing
            fk = fk * key_mask[:, None, :, None].to(fk.dtype)
        y, _ = linear_attention_quadratic(fq, fk, v)
        if not return_weights:
            return y, None
        a = causal_linear_scores(fq, fk)  # (B, H, T, T)
        return y, a / (a.sum(-1, keepdim=True) + 1e-12)

    # ------------------------------------------------------------ forward

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if attention_mask is not None and capturing(hidden_states.device):
            # transformers materialises the causal mask while a CUDA graph is captured (masking_utils'
            # is_tracing), and reading it would sync the host. Captured steps are train.cuda_graph's
            # packed micro-batches and FastGenerator's decode (no mask): there is no padding to keep.
            attention_mask = None
        q, k, v = self.project(hidden_states, position_embeddings)
        B, T = hidden_states.shape[:2]

        if self.mode == "teacher":
            if cache is not None:  # a LolcatsCache refuses update() with a clear error
                k, v = cache.update(k, v, self.layer_idx)
            y = self.softmax_attention(q, k, v, attention_mask)
        elif self.mode == "distill":
            y = self._distill(q, k, v, attention_mask)
        elif isinstance(cache, LolcatsCache):
            fq, fk = self.features(q, k)
            y = self.attend_cached(cache.slot(self.layer_idx), q, k, v, fq, fk, attention_mask, position_ids)
        else:
            fq, fk = self.features(q, k)
            key_mask = key_mask_from_attention_mask(attention_mask, T)
            if key_mask is not None and bool(key_mask.all()):
                key_mask = None
            positions = None
            if key_mask is not None and position_ids is not None:
                positions = position_ids.expand(B, T)
            y, _ = self.student_attention(q, k, v, fq, fk, positions, key_mask)
        y = y.transpose(1, 2).reshape(B, T, -1).to(hidden_states.dtype)  # (B, T, H*D)
        return self.o_proj(y), None

    # ------------------------------------------------------------ with a constant-size state

    def empty_state(self, batch_size: int, dtype, device) -> DecodeState:
        """A zeroed state for ``batch_size`` sequences (window slots by kind, phi(k) width of phi_k)."""
        F = getattr(self.feature_map_k, "out_dim", self.head_dim)
        return DecodeState.for_layer(batch_size, self.num_kv_heads, self.cfg.kind, self.cfg.window_size,
                                     self.head_dim, self.head_dim, F, dtype, device)

    def attend_cached(self, slot: LolcatsLayer, q, k, v, fq, fk, attention_mask=None, position_ids=None):
        """Attention of a chunk (or one token) that continues ``slot``'s state, updating it in place.

        q (B, H, T, D), k/v (B, Hk, T, D), fq (B, H, T, F), fk (B, Hk, T, F) -> (B, H, T, D).
        """
        B, _, T, _ = q.shape
        if slot.state is None:
            slot.state = self.empty_state(B, k.dtype, k.device)
            slot.is_initialized = True
        if slot.state.batch_size != B:
            raise ValueError(f"LolcatsCache was made for batch {slot.state.batch_size}, got {B}")
        key_mask = chunk_key_mask(attention_mask, B, T)
        pos = chunk_positions(position_ids, B, T, slot.seen, q.device)
        if T == 1:
            y = self._decode(slot.state, q, k, v, fq, fk, pos, key_mask)
        else:
            y = self._prefill(slot, q, k, v, fq, fk, pos, key_mask)
        slot.seen += T
        return y

    def _decode(self, state: DecodeState, q, k, v, fq, fk, pos, key_mask):
        cfg = self.cfg
        wf = None if cfg.kind == "linear" else self.window_factor()
        valid = None if key_mask is None else key_mask[:, 0]
        y = get_backend(cfg.backend, q).decode(q[:, :, 0], k[:, :, 0], v[:, :, 0], fq[:, :, 0], fk[:, :, 0], state,
                                               pos[:, 0], wf, cfg.kind, cfg.window_size, self.scaling, valid)
        return y[:, :, None]  # (B, H, 1, Dv)

    def _prefill(self, slot: LolcatsLayer, q, k, v, fq, fk, pos, key_mask):
        B, H, T, _ = q.shape
        st, cfg = slot.state, self.cfg
        piece = max(16, int((PREFILL_BUDGET / (B * H)) ** 0.5) - st.win_pos.shape[1])
        fused = get_backend(cfg.backend, q).is_fused(cfg.kind)  # no (T, T) score tensor: any T fits
        plain = (slot.seen == 0 and (fused or T <= piece) and (key_mask is None or bool(key_mask.all()))
                 and bool((pos == torch.arange(T, device=pos.device)).all()))
        valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
        if plain:  # fresh, unpadded: the full-sequence path (a fused kernel on GPU), then absorb
            y, _ = self.student_attention(q, k, v, fq, fk)
            absorb_chunk(st, k, v, fk, pos, valid, cfg.kind, cfg.window_size)
            return y
        ys = []
        for s in range(0, T, piece):
            sl = slice(s, min(T, s + piece))
            ys.append(self._prefill_piece(st, q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl], fk[:, :, sl],
                                          pos[:, sl], valid[:, sl]))
        return torch.cat(ys, 2)

    def _prefill_piece(self, st: DecodeState, q, k, v, fq, fk, pos, valid):
        """Reference prefill of a piece: window slots in front of its keys, folded part as initial state."""
        cfg = self.cfg
        init = (st.kv, st.ks)
        if cfg.kind == "linear":
            y, _ = linear_attention_quadratic(fq, fk * valid[:, None, :, None].to(fk.dtype), v, init)
        else:  # window slots in front of the piece's keys, with their positions; empty slots masked
            cat = lambda a, b: torch.cat([a.float(), b.float()], 2)  # noqa: E731
            y, _ = hybrid_attention_naive(q, cat(st.win_k, k), cat(st.win_v, v), fq, cat(st.win_fk, fk),
                                          self.window_factor(), cfg.kind, cfg.window_size, self.scaling,
                                          pos, torch.cat([st.win_pos, pos], 1),
                                          torch.cat([st.win_pos >= 0, valid], 1), init)
            y = y.to(v.dtype)
        absorb_chunk(st, k, v, fk, pos, valid, cfg.kind, cfg.window_size)
        return y

    # ------------------------------------------------------------ attention transfer

    def _distill(self, q, k, v, attention_mask):
        with torch.no_grad():
            y_true = self.softmax_attention(q, k, v, attention_mask)
        q, k, v = q.detach(), k.detach(), v.detach()
        fq, fk = self.features(q, k)
        want_xent = self.collect_xent
        y_pred, w_pred = self.student_attention(q, k, v, fq, fk, return_weights=want_xent)
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
        return f"layer={self.layer_idx}, kind={c.kind}, feature_map={c.feature_map}, window={c.window_size}, mode={self.mode}"
