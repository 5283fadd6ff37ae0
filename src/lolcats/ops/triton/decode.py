"""One batched decode step in Triton: eviction, write and attention in one launch, in place.

Same function as ``ops/decode/naive.py::decode_step_naive`` (read its docstring for the state
layout). One program per (batch row, KV head) handles the G query heads of its group as the
rows of its tiles:

1. slots leaving the window (sliding: the slot about to be written; terraced: the half about
   to be written when the token starts a block) are read (only those rows of ``win_fk``: the
   load is masked) and added into (kv, ks) with one (F, S) x (S, Dv) product (terraced: only at
   the steps where a half leaves, re-reading those rows per value block: holding the (S, F)
   tile across the loop spills registers);
2. the new k, v, phi(k) are written to slot ``pos % S`` and substituted in the tiles in registers;
3. scores over the window (softmax, window factor, max over the window) and phi(q) (kv, ks)
   share one normaliser, as in the reference.

With a log forget gate (B, Hk) the program first multiplies its (kv, ks) rows by exp(log_gate)
(valid rows), then folds: as in the reference, keys decay from the step they leave the window.

With a sparse cache (G pairs per KV head, ``ops/sparse``) the eviction through the cache runs first: on terraced
windows with a built-in score in one launch (``ops/triton/sparse.py::sparse_evict_step``: only the rows whose
token starts a block do any work; the program here then masks the leaving half without folding it), else in
PyTorch (``ops/decode/evict.py::evict_sparse``, a top-k over the cache and the leaving slots); the program reads
the G cached pairs as more softmax terms under the same max.

``win_pos`` (B, S) is shared by the KV heads of a row, so a second tiny launch (one program per
row) updates it after every head has read it. No host synchronisation and no allocation that
depends on data: the step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lolcats.ops.common import EPS
from lolcats.ops.decode.evict import decay, evict_sparse
from lolcats.ops.decode.state import DecodeState
from lolcats.ops.triton.chunked import tile_dot, dot_dtype, pad_dim
from lolcats.ops.kinds import kind_id
from lolcats.ops.triton.sparse import sparse_evict_step
from lolcats.ops.triton.sparse import supports as sparse_supports


@triton.jit
def _leave_write(wpos, rs, pos, valid, KIND: tl.constexpr, W: tl.constexpr, S: tl.constexpr):
    """Masks (SP,): slots that leave the window, the slot written now; valid: int32 scalar."""
    slot = pos % S
    ms = rs < S
    if KIND == 1:
        leave = (wpos >= 0) & (rs == slot)
    else:
        leave = (wpos >= 0) & ((rs // W) == (slot // W)) & ((rs * 0 + pos % W) == 0)
    vv = (rs * 0 + valid) != 0  # a vector: scalar-bool & vector-bool misbehaves in the interpreter
    return leave & ms & vv, (rs == slot) & vv


@triton.jit
def _rows_times(fq, heads, rf, mf, kvb, rg, GQ: tl.constexpr, GP: tl.constexpr, BV: tl.constexpr, F: tl.constexpr):
    """phi(q) (GQ rows) @ kvb (FP, BV) in float32 on the vector units, row by row: no shared-memory
    round trip of the float32 state (a float32 tl.dot is far slower here and this is bandwidth bound)."""
    num = tl.zeros([GP, BV], tl.float32)
    for g in tl.static_range(GQ):
        hg = tl.sum(tl.where(rg == g, heads, 0))
        row = tl.load(fq + hg * F + rf, mask=mf, other=0.0).to(tl.float32)
        num += tl.where(rg[:, None] == g, tl.sum(row[:, None] * kvb, 0)[None, :], 0.0)
    return num


@triton.jit
def _decode(q, k, v, fq, fk, win_k, win_v, win_fk, win_pos, kv, ks, pos_ptr, valid_ptr, gp, lg, y, sp_k, sp_v, sp_pos,
            H, HK, scale, eps,
            KIND: tl.constexpr, W: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, HAS_VALID: tl.constexpr,
            D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, DP: tl.constexpr, FP: tl.constexpr,
            GP: tl.constexpr, GQ: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, GATED: tl.constexpr,
            NS: tl.constexpr, NSP: tl.constexpr, FOLD: tl.constexpr):
    bhk = tl.program_id(0).to(tl.int64)
    b, hk = bhk // HK, bhk % HK
    G = H // HK
    rg, rd, rf = tl.arange(0, GP), tl.arange(0, DP), tl.arange(0, FP)
    mg, md, mf = rg < G, rd < D, rf < F
    heads = b * H + hk * G + rg  # (GP,) rows of q, fq, y
    pos = tl.load(pos_ptr + b)
    if HAS_VALID:
        valid = tl.load(valid_ptr + b).to(tl.int32)
    else:
        valid = (pos >= 0).to(tl.int32)
    fqt = tl.load(fq + heads[:, None] * F + rf[None, :], mask=mg[:, None] & mf[None, :], other=0.0).to(tl.float32)
    fk_new = tl.load(fk + bhk * F + rf, mask=mf, other=0.0).to(tl.float32)
    ks_row = tl.load(ks + bhk * F + rf, mask=mf, other=0.0)
    decay = 1.0
    if GATED:  # decay, then fold
        decay = tl.where(valid != 0, tl.exp(tl.load(lg + bhk).to(tl.float32)), 1.0)
        ks_row = ks_row * decay
    if KIND == 0:
        ks_row += tl.where(valid != 0, fk_new, 0.0)
        den = tl.sum(fqt * ks_row[None, :], 1) + eps
    else:
        rs = tl.arange(0, SP)
        ms = rs < S
        wpos = tl.load(win_pos + b * S + rs, mask=ms, other=-1)
        leave, write = _leave_write(wpos, rs, pos, valid, KIND, W, S)
        npos = tl.where(write, pos, tl.where(leave, -1, wpos))
        if FOLD:  # (without FOLD the leaving slots went through the sparse cache, sparse_evict_step: masked here)
            fk_old = tl.load(win_fk + (bhk * S + rs[:, None]) * F + rf[None, :], mask=leave[:, None] & mf[None, :],
                             other=0.0)  # (SP, FP): only leaving rows are read
            ks_row += tl.sum(fk_old.to(tl.float32), 0)
        k_new = tl.load(k + bhk * D + rd, mask=md, other=0.0)
        kt = tl.load(win_k + (bhk * S + rs[:, None]) * D + rd[None, :], mask=ms[:, None] & md[None, :], other=0.0)
        kt = tl.where(write[:, None], k_new[None, :].to(kt.dtype), kt)
        qt = tl.load(q + heads[:, None] * D + rd[None, :], mask=mg[:, None] & md[None, :], other=0.0)
        s = tile_dot(qt, tl.trans(kt), DT) * scale  # (GP, SP)
        s = tl.where((npos >= 0)[None, :], s, float("-inf"))
        m = tl.max(s, 1)
        if NS > 0:  # the sparse cache's pairs: more softmax terms under the same max
            rj = tl.arange(0, NSP)
            mj = rj < NS
            jpos = tl.load(sp_pos + bhk * NS + rj, mask=mj, other=-1)
            kj = tl.load(sp_k + (bhk * NS + rj[:, None]) * D + rd[None, :], mask=mj[:, None] & md[None, :], other=0.0)
            sj = tile_dot(qt, tl.trans(kj.to(kt.dtype)), DT) * scale  # (GP, NSP)
            sj = tl.where((jpos >= 0)[None, :], sj, float("-inf"))
            m = tl.maximum(m, tl.max(sj, 1))
        m = tl.where(m > float("-inf"), m, 0.0)
        g = tl.load(gp + hk * G + rg, mask=mg, other=0.0).to(tl.float32)
        p = g[:, None] * tl.exp(s - m[:, None])
        den = tl.sum(p, 1) + tl.sum(fqt * ks_row[None, :], 1)
        if NS > 0:
            pj = g[:, None] * tl.exp(sj - m[:, None])
            den += tl.sum(pj, 1)
        tl.store(win_k + (bhk * S + rs[:, None]) * D + rd[None, :], kt, mask=write[:, None] & md[None, :])
    tl.store(ks + bhk * F + rf, ks_row, mask=mf)
    for dv0 in tl.static_range(0, DV, BV):
        rv = dv0 + tl.arange(0, BV)
        mv = rv < DV
        kvb = tl.load(kv + (bhk * F + rf[:, None]) * DV + rv[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
        if GATED:
            kvb = kvb * decay
        v_new = tl.load(v + bhk * DV + rv, mask=mv, other=0.0)
        if KIND == 0:
            kvb += tl.where(valid != 0, fk_new[:, None] * v_new[None, :].to(tl.float32), 0.0)
            num = _rows_times(fq, heads, rf, mf, kvb, rg, GQ, GP, BV, F)
        else:
            vt = tl.load(win_v + (bhk * S + rs[:, None]) * DV + rv[None, :], mask=ms[:, None] & mv[None, :],
                         other=0.0)
            if FOLD:  # (with a sparse cache nothing folds here)
                if KIND == 1:  # sliding: one slot leaves at (nearly) every step
                    kvb += tile_dot(tl.trans(fk_old), vt, DT)
                elif tl.sum(leave.to(tl.int32), 0) > 0:
                    # terraced: a half leaves once per block. Its rows are re-read here (cached) rather
                    # than held in registers across the loop (that spilled: Nsight Compute, PERFORMANCE.md)
                    fko = tl.load(win_fk + (bhk * S + rs[:, None]) * F + rf[None, :],
                                  mask=leave[:, None] & mf[None, :], other=0.0)
                    kvb += tile_dot(tl.trans(fko), vt, DT)
            vt = tl.where(write[:, None], v_new[None, :].to(vt.dtype), vt)
            tl.store(win_v + (bhk * S + rs[:, None]) * DV + rv[None, :], vt, mask=write[:, None] & mv[None, :])
            num = _rows_times(fq, heads, rf, mf, kvb, rg, GQ, GP, BV, F) + tile_dot(p, vt, DT)
            if NS > 0:
                vj = tl.load(sp_v + (bhk * NS + rj[:, None]) * DV + rv[None, :], mask=mj[:, None] & mv[None, :],
                             other=0.0)
                num += tile_dot(pj, vj.to(vt.dtype), DT)
        tl.store(kv + (bhk * F + rf[:, None]) * DV + rv[None, :], kvb, mask=mf[:, None] & mv[None, :])
        if KIND == 0:
            out = num / den[:, None]
        else:
            out = tl.where(den[:, None] > 0, num / tl.maximum(den, 1e-30)[:, None], 0.0)
        tl.store(y + heads[:, None] * DV + rv[None, :], out.to(y.dtype.element_ty), mask=mg[:, None] & mv[None, :])
    if KIND != 0:  # phi(k_new) into its slot, after the leaving rows were read
        fk_w = tl.zeros([SP, FP], tl.float32) + fk_new[None, :]
        tl.store(win_fk + (bhk * S + rs[:, None]) * F + rf[None, :], fk_w.to(win_fk.dtype.element_ty),
                 mask=write[:, None] & mf[None, :])


@triton.jit
def _decode_pos(win_pos, pos_ptr, valid_ptr, KIND: tl.constexpr, W: tl.constexpr, S: tl.constexpr,
                SP: tl.constexpr, HAS_VALID: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rs = tl.arange(0, SP)
    pos = tl.load(pos_ptr + b)
    if HAS_VALID:
        valid = tl.load(valid_ptr + b).to(tl.int32)
    else:
        valid = (pos >= 0).to(tl.int32)
    wpos = tl.load(win_pos + b * S + rs, mask=rs < S, other=-1)
    leave, write = _leave_write(wpos, rs, pos, valid, KIND, W, S)
    tl.store(win_pos + b * S + rs, tl.where(write, pos, tl.where(leave, -1, wpos)), mask=rs < S)


def decode_step_triton(
    q: torch.Tensor,  # (B, H, D)
    k: torch.Tensor,  # (B, Hk, D)
    v: torch.Tensor,  # (B, Hk, Dv)
    fq: torch.Tensor,  # (B, H, F)
    fk: torch.Tensor,  # (B, Hk, F)
    state: DecodeState,  # updated in place
    pos: torch.Tensor,  # (B,) int64
    window_factor: torch.Tensor | None,  # (H,); None for linear
    kind: str,
    window_size: int,
    scale: float,
    valid: torch.Tensor | None = None,  # (B,) bool
    log_gate: torch.Tensor | None = None,  # (B, Hk) float32
    sparse_score: str = "self_recall",  # what a sparse cache keeps
    evict: bool = True,  # False: the caller knows no window slot leaves now (a sparse cache's eviction is skipped)
    sparse_sink: int = 0,  # the sparse cache always keeps the pairs of positions below this
) -> torch.Tensor:  # (B, H, Dv)
    """Same arguments and result as ``decode_step_naive``; the state tensors must be contiguous.

    With a sparse cache (``state.sparse_size`` > 0) the gate's decay and the slots leaving the window go through
    the cache first (``sparse_evict_step`` on terraced windows: the kernel then masks the leaving half and folds
    nothing; else ``evict_sparse``, which marks those slots empty), and the kernel adds the cached pairs to the
    softmax terms. The cache's slot order may differ from the reference's (the same pairs)."""
    B, H, D = q.shape
    Hk, Dv, F = k.shape[1], v.shape[-1], fk.shape[-1]
    S = state.win_pos.shape[1]
    kid = kind_id(kind)
    NS = state.sparse_size
    if NS and kid == 0:
        raise ValueError("a sparse cache needs a window kind (sliding_window or terraced_window)")
    fold = True
    # decay, then the eviction in one launch; the kernel masks the leaving half without folding it
    if NS and sparse_supports(kind, sparse_score, window=window_size):
        if log_gate is not None:
            decay(state, log_gate.float() if valid is None else torch.where(valid[:, None], log_gate.float(), 0.0))
        if evict:
            sparse_evict_step(state, pos, valid, window_size, sparse_score, sparse_sink)
        log_gate, fold = None, False
    elif NS:  # decay and eviction in the reference's order; the kernel then has neither to do
        evict_sparse(state, pos, valid, kind, window_size, log_gate, sparse_score, evict, sparse_sink)
        log_gate = None
    q, k, v, fq, fk = (t.contiguous() for t in (q, k, v, fq, fk))
    pos = pos.contiguous()  # the kernels read pos[b], valid[b] at offset b: a (B, 1) slice's column is strided
    valid = valid.contiguous() if valid is not None else None
    y = torch.empty((B, H, Dv), dtype=v.dtype, device=v.device)
    dt = dot_dtype(state.win_k)
    has_valid = valid is not None
    vptr = valid.view(torch.int8) if has_valid else pos  # bool as bytes
    gp = window_factor.contiguous() if window_factor is not None else fq
    lg = log_gate.float().contiguous() if log_gate is not None else fq
    SP = pad_dim(max(S, 1))
    common = dict(KIND=kid, W=max(window_size, 1), S=max(S, 1), SP=SP, HAS_VALID=has_valid)
    _decode[(B * Hk,)](q, k, v, fq, fk, state.win_k, state.win_v, state.win_fk, state.win_pos, state.kv, state.ks,
                       pos, vptr, gp, lg, y, state.sparse_k, state.sparse_v, state.sparse_pos, H, Hk, float(scale), EPS,
                       **common, D=D, DV=Dv, F=F, DP=pad_dim(D), FP=pad_dim(F), GP=pad_dim(H // Hk), GQ=H // Hk,
                       BV=min(64, pad_dim(Dv)), DT=dt, GATED=log_gate is not None, NS=NS, NSP=pad_dim(max(NS, 1)),
                       FOLD=fold, num_warps=4)
    if kid != 0:
        _decode_pos[(B,)](state.win_pos, pos, vptr, **common, num_warps=1)
    return y
