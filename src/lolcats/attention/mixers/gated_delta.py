"""``gated_delta``: softmax over a sliding window plus a gated delta-rule state over what left it.

Each query i attends to the keys of its window (positions p_i - w < p_j <= p_i) with softmax, weighted by the
per-head window factor as in the hybrid (``mixers/hybrid.py``). A key leaves the window at the step p_j + w,
and is then written into a delta-rule state (Gated DeltaNet, arXiv 2412.06464; ``ops/delta/naive.py``): at
each real token p the state decays by exp(g_p), then takes the key j leaving at p (p_j = p - w):

    S_p = exp(g_p) S_{p-1};    S_p += beta_j k^_j (v_j - S_p^T k^_j)^T;    o_i = S_{p_i}^T q^_i

with k^ = phi(k) / |phi(k)| and q^ = phi(q) / |phi(q)| (the layer's feature maps after RoPE, L2-normalised, so
S^T k^_j -> v_j for a key written with beta -> 1: o_i is a *recalled value*, not a weighted sum), scale 1.

Combining the two. The delta rule's output is not a normalised sum, so it cannot join the softmax terms as
the hybrid's linear terms do. It enters the hybrid's one normalised sum as a single value o_i with a mass
c_h n_i: n is the decayed count of keys that have left the window (what the linear part's normaliser fq . z
would be with fq . fk = 1), c_h a learned per-KV-head scale:

    y_i = ( g_h sum_{j in W(i)} exp(s_ij - m_i) v_j + c_h n_i o_i ) / ( g_h sum_{j in W(i)} exp(s_ij - m_i) + c_h n_i ),
    n_p = exp(g_p) n_{p-1} + [a key left the window at p]

(s_ij = q_i . k_j * scale, m_i the window's max, g_h the window factor in (0, 1)). With a constant decay r
the count tends to 1 / (1 - r); c_h starts at 1 - r, so the delta part's weight starts below 1, against the
window's at least g_h (the query's own key): the exact window is not drowned at the start of training, and
c_h learns the balance (the window factor alone could not: it is at most 1). While no key has left the window
(the window covers the sequence) n = 0 and S = 0, so y is softmax attention exactly: attention transfer
starts from the teacher's function on short contexts and learns what to recall beyond the window.

Learned parameters (``DeltaGates``, the layer's ``feature_map_delta``: named with the feature maps so that
stage 1 trains them and checkpoints carry them): beta_j = sigmoid(v_j . w_h + b_h) per KV head (v, unlike k,
carries no RoPE rotation: the write strength depends on the content, not the position), a per-KV-head
log decay logsigmoid(d_h) (retention r = 0.99 at init), plus ``attention.gate``'s data-dependent log gate when
set (``ops/gate.py``), and the mass scale c_h = exp(l_h); g = 0 at padding (pads are not steps).

State (:class:`GatedDeltaState`, per sequence): the window's w slots (k, v, phi(k) and positions, -1 empty;
position p lives in slot p % w), the delta state S (Hk, F, Dv) float32 per KV head (the group's query heads
read it) and the count n (Hk,) float32 (``mass``).

Paths: one function (:meth:`GatedDeltaMixer.attend`) serves the whole sequence (from an empty state), each
prefill piece and the decode step (T = 1): the window slots go in front of the chunk's keys; the key leaving
at each query's step is found by position (so left padding and pieces need no special case: a row's valid
tokens must be one run of consecutive positions); the delta rule runs over those keys through the backend
(``Backend.gated_delta``: the chunked reference on CPU, fla's kernels on CUDA where ``lolcats[delta]`` is
installed), from the state's S. Attention weights (``distill.xent_factor``) are not available.

Memory is O(T w), never T x T (a 4,096-token training sequence would otherwise need gigabytes per layer):

* the window softmax runs over blocks of C = min(T, max(w, 64)) queries; block b reads only the C + w keys
  ending with its last query (the slots in front, for block 0), masked by position as a whole-chunk mask
  would be: scores (B, H, T, C + w);
* the key leaving at position p is at p - w: in slot (p - w) % w, or w places before its query in the
  chunk, checked by position and validity (valid tokens of a row are one run of consecutive positions,
  left or right padding, as every writer gives; a padding query's output is not defined beyond being finite);
* the count n runs in chunks of 64 steps (:func:`decayed_count`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lolcats.attention.mixers.base import PREFILL_BUDGET, Mixer
from lolcats.attention.step import Step
from lolcats.ops.common import expand_kv_heads
from lolcats.ops.state import LayerState, StateSpec, state_field

INIT_RETAIN = 0.99  # exp(g) per token of the learned decay at initialisation
BLOCK = 64  # queries per block of the window softmax (at least the window): scores (B, H, T, block + W)
COUNT_CHUNK = 64  # steps per chunk of the decayed count's scan


@dataclass
class GatedDeltaState(LayerState):
    win_k: torch.Tensor  # (B, Hk, W, D)
    win_v: torch.Tensor  # (B, Hk, W, Dv)
    win_fk: torch.Tensor  # (B, Hk, W, F)
    win_pos: torch.Tensor = state_field(-1)  # (B, W) int64, -1 = empty
    delta: torch.Tensor  # (B, Hk, F, Dv) float32: the delta-rule state S
    mass: torch.Tensor  # (B, Hk) float32: decayed count n of the keys written into S


def decayed_count(g: torch.Tensor, x: torch.Tensor, n0: torch.Tensor, chunk: int = COUNT_CHUNK) -> torch.Tensor:
    """n_t = exp(g_t) n_{t-1} + x_t from n_{-1} = n0: g, x (B, Hk, T), n0 (B, Hk) -> n (B, Hk, T) float32.

    In chunks of L steps: inside one, n_t = exp(G_t) n_start + sum_{s <= t} exp(G_t - G_s) x_s with G the
    chunk's cumulative log decay (every exponent <= 0, so nothing overflows); n_start carries over the chunks.
    Memory O(T L)."""
    B, Hk, T = g.shape
    L = min(T, chunk)
    nc = -(-T // L)
    G = F.pad(g.float(), (0, nc * L - T)).view(B, Hk, nc, L).cumsum(-1)
    xc = F.pad(x.float(), (0, nc * L - T)).view(B, Hk, nc, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=g.device).tril()
    decay = torch.exp(torch.where(causal, G[..., :, None] - G[..., None, :], float("-inf")))  # (B, Hk, nc, L, L)
    inner = (decay @ xc[..., None])[..., 0]  # (B, Hk, nc, L): the chunk's own steps
    starts, n = [], n0.float()
    for c in range(nc):
        starts.append(n)
        n = G[..., c, -1].exp() * n + inner[..., c, -1]
    n_start = torch.stack(starts, -1)  # (B, Hk, nc)
    return (G.exp() * n_start[..., None] + inner).reshape(B, Hk, nc * L)[..., :T]


class DeltaGates(nn.Module):
    """The delta rule's learned maps per KV head: write strength beta = sigmoid(v . w + b), log decay, and the
    scale of the delta part's mass."""

    def __init__(self, num_kv_heads: int, head_dim: int, init_retain: float = INIT_RETAIN):
        super().__init__()
        self.beta_weight = nn.Parameter(torch.zeros(num_kv_heads, head_dim))
        self.beta_bias = nn.Parameter(torch.zeros(num_kv_heads))
        self.decay = nn.Parameter(torch.full((num_kv_heads,), math.log(init_retain / (1 - init_retain))))
        self.mass_scale = nn.Parameter(torch.full((num_kv_heads,), math.log(1 - init_retain)))

    def beta(self, v: torch.Tensor) -> torch.Tensor:
        """v (B, Hk, T, Dv) -> (B, Hk, T) float32 in (0, 1)."""
        return torch.sigmoid(torch.einsum("bhtd,hd->bht", v.float(), self.beta_weight.float())
                             + self.beta_bias.float()[:, None])

    def log_decay(self) -> torch.Tensor:
        """(Hk,) float32, < 0."""
        return F.logsigmoid(self.decay.float())

    def scale(self) -> torch.Tensor:
        """(Hk,) float32 > 0: c, the delta part's mass per key counted."""
        return self.mass_scale.float().exp()


class GatedDeltaMixer(Mixer):
    has_window_factor = True

    @classmethod
    def modules(cls, layer) -> dict[str, nn.Module]:
        return {"feature_map_delta": DeltaGates(layer.num_kv_heads, layer.head_dim)}

    def state_spec(self, dtype: torch.dtype) -> StateSpec:
        layer, W, f32 = self.layer, self.cfg.window_size, torch.float32
        Hk, D, F_ = layer.num_kv_heads, layer.head_dim, layer.feature_map_k.out_dim
        return GatedDeltaState.declare(win_k=((Hk, W, D), dtype), win_v=((Hk, W, D), dtype),
                                       win_fk=((Hk, W, F_), dtype), win_pos=((W,), torch.long),
                                       delta=((Hk, F_, D), f32), mass=((Hk,), f32))

    def piece_len(self, state: GatedDeltaState, B: int, H: int) -> int:
        """Queries per prefill piece: its block scores (B, H, piece, block + W) fit PREFILL_BUDGET."""
        W = self.cfg.window_size
        return max(16, PREFILL_BUDGET // (B * H * (max(W, BLOCK) + W)))

    def takes_full_path(self, step: Step, q: torch.Tensor, piece: int) -> bool:
        return False  # every chunk continues the state (a fresh one is empty): attend() in pieces

    def sequence(self, q, k, v, fq, fk, positions=None, key_mask=None, return_weights=False, log_gate=None):
        if return_weights:
            raise ValueError("attention.kind gated_delta: attention weights (distill.xent_factor > 0) are not "
                             "available: the delta rule's output is not a weighted sum of values")
        B, _, T, _ = q.shape
        pos = torch.arange(T, device=q.device).expand(B, T) if positions is None else positions
        valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
        return self.attend(self.empty_state(B, k.dtype, k.device), q, k, v, fq, fk, pos, valid, log_gate,
                           write=False), None

    def prefill_piece(self, state: GatedDeltaState, q, k, v, fq, fk, pos, valid, log_gate=None) -> torch.Tensor:
        return self.attend(state, q, k, v, fq, fk, pos, valid, log_gate)

    def decode(self, state: GatedDeltaState, q, k, v, fq, fk, step: Step, log_gate=None) -> torch.Tensor:
        return self.attend(state, q, k, v, fq, fk, step.pos, step.valid_or_ones(), log_gate)

    # ------------------------------------------------------------ the math

    def attend(self, st: GatedDeltaState, q, k, v, fq, fk, pos, valid, log_gate=None, write: bool = True):
        """A chunk of T tokens (q (B, H, T, D), k, v (B, Hk, T, D), fq (B, H, T, F), fk (B, Hk, T, F), pos and
        valid (B, T), log_gate (B, Hk, T) or None) after ``st``: y (B, H, T, Dv) in v's dtype; ``write``: the
        chunk is written into ``st`` (in place)."""
        H = q.shape[1]
        cat = lambda a, b: torch.cat([a, b.to(a.dtype)], 2)  # noqa: E731  slots in front: (B, Hk, W + T, .)
        ek, ev, efk = cat(st.win_k, k), cat(st.win_v, v), cat(st.win_fk, fk)
        epos, evalid = torch.cat([st.win_pos, pos], 1), torch.cat([st.win_pos >= 0, valid], 1)  # (B, N = W + T)
        num, den = self._window(q, ek, ev, pos, epos, evalid)
        idx, left = self._leaving(pos, valid, epos, evalid)
        o, S, mass = self._delta(st, fq, efk, ev, idx, left, valid, log_gate)
        mu = expand_kv_heads(mass * self.layer.feature_map_delta.scale()[:, None], H)  # (B, H, T): c n
        num, den = num + mu[..., None] * o, den + mu
        y = torch.where(den[..., None] > 0, num / den.clamp_min(1e-30)[..., None], 0.0)
        if write:
            st.delta.copy_(S)
            st.mass.copy_(mass[..., -1])
            self._write_window(st, ek, ev, efk, epos, evalid)
        return y.to(v.dtype)

    def _window(self, q, ek, ev, pos, epos, evalid):
        """Softmax terms over each query's window (keys ek, ev (B, Hk, N, .) = slots then chunk, at epos with
        evalid (B, N)): numerator (B, H, T, Dv), normaliser (B, H, T).

        Queries go in blocks of C; block b (chunk queries bC .. bC + C - 1, keys W + bC .. W + bC + C - 1) reads
        the keys ek[bC : bC + C + W]: the W before its first query (the slots, for block 0) and its own, masked
        by position. A KV head's G query heads are rows of one product: scores (B, Hk, n, G * C, C + W)."""
        B, H, T, D = q.shape
        W, Hk = self.cfg.window_size, ek.shape[1]
        G, C = H // Hk, min(T, max(W, BLOCK))
        n = -(-T // C)
        K, pad = C + W, n * C - T
        blocks = lambda x: F.pad(x.float(), (0, 0, 0, pad)).unfold(2, K, C)  # noqa: E731  (B, Hk, n, ., K)
        qb = F.pad(q.float(), (0, 0, 0, pad)).reshape(B, Hk, G, n, C, D).transpose(2, 3)  # (B, Hk, n, G, C, D)
        s = (qb.reshape(B, Hk, n, G * C, D) @ blocks(ek)).view(B, Hk, n, G, C, K) * self.scaling
        kpos, kval = F.pad(epos, (0, pad), value=-1).unfold(1, K, C), F.pad(evalid, (0, pad)).unfold(1, K, C)
        dist = F.pad(pos, (0, pad)).view(B, n, C, 1) - kpos[:, :, None, :]  # (B, n, C, K)
        in_win = kval[:, :, None, :] & (dist >= 0) & (dist < W)
        s = s.masked_fill(~in_win[:, None, :, None], float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a padding query with no key
        a = self.window_factor().float().view(1, Hk, 1, G, 1, 1) * torch.exp(s - m)
        num = a.view(B, Hk, n, G * C, K) @ blocks(ev).transpose(-1, -2)  # (B, Hk, n, G * C, Dv)
        heads = lambda x: x.view(B, Hk, n, G, C, -1).transpose(2, 3).reshape(B, H, n * C, -1)[:, :, :T]  # noqa: E731
        return heads(num), heads(a.sum(-1, keepdim=True))[..., 0]

    def _leaving(self, pos, valid, epos, evalid):
        """The key leaving the window at each query's step (position p - W, a valid query's): its index among
        the slots then the chunk (B, T) and whether there is one (B, T) bool. It sits in slot (p - W) % W, or
        W places before the query in the chunk: index t of the N keys (a row's valid tokens are one run)."""
        W, T = self.cfg.window_size, pos.shape[1]
        want, slot = pos - W, pos % W  # (B, T)
        in_slots = evalid[:, :W].gather(1, slot) & (epos[:, :W].gather(1, slot) == want)
        in_chunk = evalid[:, :T] & (epos[:, :T] == want)
        idx = torch.where(in_slots, slot, torch.arange(T, device=pos.device))  # where none: any (beta is 0)
        return idx, valid & (in_slots | in_chunk)

    def _delta(self, st, fq, efk, ev, idx, left, valid, log_gate):
        """The delta rule over the keys leaving the window (idx, left (B, T) from :meth:`_leaving`): outputs
        (B, H, T, Dv) float32, the state S after the chunk, the decayed count n (B, Hk, T)."""
        gates = self.layer.feature_map_delta
        take = lambda x: x.gather(2, idx[:, None, :, None].expand(*x.shape[:2], -1, x.shape[-1]))  # noqa: E731
        kd, vd = F.normalize(take(efk).float(), dim=-1), take(ev).float()  # (B, Hk, T, F), (B, Hk, T, Dv)
        beta = gates.beta(vd) * left[:, None].float()  # (B, Hk, T)
        g = gates.log_decay()[None, :, None] + (0.0 if log_gate is None else log_gate.float())
        g = g * valid[:, None].float()  # (B, Hk, T): pads are not steps
        o, S = self.backend(fq).gated_delta(F.normalize(fq.float(), dim=-1), kd, vd, g, beta, 1.0, st.delta, True)
        return o.float(), S, decayed_count(g, left[:, None].float().expand_as(g), st.mass)

    @staticmethod
    def _write_window(st, ek, ev, efk, epos, evalid) -> None:
        """Keep the keys still in the window of the row's last position, each in slot p % W (in place)."""
        B, W = st.win_pos.shape
        last = torch.where(evalid, epos, -1).amax(-1, keepdim=True)  # (B, 1)
        stay = evalid & (last - epos < W)  # (B, N)
        slot = torch.where(stay, epos % W, W)  # (B, N); W = a scratch slot dropped below
        for buf, x in ((st.win_k, ek), (st.win_v, ev), (st.win_fk, efk)):
            out = buf.new_zeros(*buf.shape[:2], W + 1, buf.shape[3])
            out.scatter_(2, slot[:, None, :, None].expand(*x.shape[:3], buf.shape[3]), x)
            buf.copy_(out[:, :, :W])
        p = st.win_pos.new_full((B, W + 1), -1)
        p.scatter_(1, slot, torch.where(stay, epos, -1))
        st.win_pos.copy_(p[:, :W])
