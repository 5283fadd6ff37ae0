"""A prefill chunk through LoLA's sparse cache in three Triton launches: terraced window, eviction, attention and
the window's slots.

Same function as the chunk reference (``ops/sparse/naive.py::sparse_chunk``) for ``terraced_window`` (the
default kind), without its Python loop over eviction steps:

1. ``_evict``, one program per (batch row, KV head), walks the chunk's blocks of w positions in order, holding
   its linear state (kv, ks) in registers. At each block start p = b w (b >= 2) in the chunk, the w keys of
   block b - 2 leave the window: they and the G cached pairs are scored against the current (kv, ks)
   (``self_recall``: ||v - phi(k) kv / (phi(k) ks + eps)||; ``recency``: the position; live pairs below the
   sink +inf, empty slots -inf) and the w lowest of the G + w are dropped (a strict order: ties go to the
   lower index, cache slots before candidates), as the reference's top-G keeps the rest: one sort of all
   scores gives the w-th lowest as a threshold, the ties at it go by index. The dropped slots are scattered
   in slot order through the scratch buffer. Dropped live pairs are folded into (kv, ks): the cache's gathered
   into one tile of at most w rows, then the candidates', one (F, rows) x (rows, Dv) product each; the kept
   candidates take the dropped slots (the reference orders slots by score: the set is the same). A cache with
   w empty slots or more (a sequence's first G / w evictions) takes the block into its first empty slots without
   scoring anything: those are the w lowest (-inf), and nothing live folds. Then it writes a snapshot of what
   the block's queries read: the cache's keys, values and positions, and (kv, ks).
2. ``_attend``, one program per (batch row, query head, block), all in parallel: softmax over the block's
   cache snapshot and the window (blocks b - 1 and b, causal) under one running max, weighted by the
   window factor, and phi(q) over the snapshot's (kv, ks), one normaliser, as in ``ops/hybrid/naive.py``.
3. ``_window_write``, one program per row once the window was read: the chunk's tokens in the terraced window of
   the row's last position take their slots in every KV head, the older slots that left it are marked empty (the
   reference's ``absorb`` without folding, ~30 PyTorch launches per layer before 2026-12-07).

The eviction is a chain of T / w dependent steps per (row, KV head): its time hardly grows with the batch
(programs run side by side) and sets the prefill's (benchmarks/kernel_speed.py ``--sections sparse``). The
snapshots take (T / w + 2) x (G (D + Dv) + F (Dv + 1)) elements per (row, KV head) while the call runs.

Keys before the chunk are read from the state's window slots, keys in it from the chunk, by position. The
valid tokens of a row are one run of consecutive positions (left or right padding), as every writer gives
them. Scores, the dropped cache slots and the candidates' drop flags go through a small scratch buffer per
program, read back after a barrier. Products of float32 tiles are exact (``ieee``). In a 16-bit model the folds multiply
in the cache's dtype (its values are exact there) and the scores take the float32 kv as two bfloat16 terms
(16 bits; an fp16 cache: tf32, 10 bits): the eviction then fits a window of 256 in shared memory (112 KB;
320 KB with float32 operands). phi(q) kv is tf32. Nothing syncs with the host.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lolcats.ops.common import EPS
from lolcats.ops.decode.state import DecodeState
from lolcats.ops.sparse.cache import SCORES, recency, self_recall_error
from lolcats.ops.triton.chunked import dot_dtype, pad_dim, tile_dot

BUILT_IN = {"self_recall": self_recall_error, "recency": recency}  # the scores the kernel computes
SCORE_IDS = {name: i for i, name in enumerate(BUILT_IN)}  # the kernel's SCORE: 0 self_recall, 1 recency


@triton.jit
def _by_pos(chunk, win, wpos, p, live, p0, c0, rx, mx, X: tl.constexpr, S: tl.constexpr):
    """Rows (R, XP) in float32 of the keys at positions ``p`` (R,) where ``live``: from the chunk at or after
    its first position p0 (column c0 + p - p0), else from the state's window slot p % S where it holds p.
    Returns (rows, present (R,))."""
    in_chunk = live & (p >= p0)
    before = live & (p < p0)
    slot = tl.where(before, p % S, 0)
    in_win = before & (tl.load(wpos + slot, mask=before, other=-1) == p)
    col = tl.where(in_chunk, c0 + p - p0, 0)
    a = tl.load(chunk + col[:, None] * X + rx[None, :], mask=in_chunk[:, None] & mx[None, :], other=0.0)
    b = tl.load(win + slot[:, None] * X + rx[None, :], mask=in_win[:, None] & mx[None, :], other=0.0)
    rows = tl.where(in_chunk[:, None], a.to(b.dtype).to(tl.float32), b.to(tl.float32))  # the state's dtype
    return rows, in_chunk | in_win


@triton.jit
def _score(fkt, vt, pos, kvt, kst, sink, eps, SCORE: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr):
    """(R,) what the cache keeps the highest: fkt (R, FP) in the cache's dtype, vt (R, DVP) float32, pos (R,)
    (-1 = empty); DT the products' dtype (``dot_dtype`` of the cache)."""
    if SCORE == 0:
        if DT == tl.bfloat16:  # kv as two bfloat16 terms (16 bits, more than tf32's 10): half the memory
            hi = kvt.to(tl.bfloat16)
            num = tl.dot(fkt, hi) + tl.dot(fkt, (kvt - hi.to(tl.float32)).to(tl.bfloat16))  # (R, DVP)
        else:
            num = tl.dot(fkt.to(tl.float32), kvt, input_precision=PREC)
        den = tl.sum(fkt.to(tl.float32) * kst[None, :], 1)
        d = vt - num / (den + eps)[:, None]
        s = tl.sqrt(tl.sum(d * d, 1))
    else:
        s = pos.to(tl.float32)
    s = tl.where((pos >= 0) & (pos < sink), float("inf"), s)
    return tl.where(pos >= 0, s, float("-inf"))


@triton.jit
def _online(qt, kt, vt, mask, m, l, acc, scale, DT: tl.constexpr):
    """One tile of softmax terms into the running max m (R,), sum l (R,) and numerator acc (R, DVP)."""
    s = tile_dot(qt, tl.trans(kt), DT) * scale
    s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    mm = tl.where(m_new > float("-inf"), m_new, 0.0)  # a row with no term yet: nothing to rescale
    alpha = tl.exp(tl.where(m_new > float("-inf"), m, 0.0) - mm)
    p = tl.where(mask, tl.exp(s - mm[:, None]), 0.0)
    acc = acc * alpha[:, None] + tile_dot(p, vt, DT)
    return m_new, l * alpha + tl.sum(p, 1), acc


@triton.jit
def _tile(t: tl.constexpr, NT: tl.constexpr, G: tl.constexpr, W: tl.constexpr, R: tl.constexpr):
    """Scratch offsets (R,) of tile ``t`` (cache tiles 0..NT-1, then the candidates) and which rows are real."""
    r = tl.arange(0, R)
    if t < NT:
        idx, real = t * R + r, t * R + r < G
    else:
        idx, real = NT * R + r, r < W
    return idx, real


@triton.jit
def _merge(kvt, kst, ck, cv, cfk, wk, wv, wfk, wp, gk, gv, gfk, gpos, sc, P, p0, c0, sink, eps,
           W: tl.constexpr, S: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
           DP: tl.constexpr, DVP: tl.constexpr, FP: tl.constexpr, G: tl.constexpr, NT: tl.constexpr,
           SCORE: tl.constexpr, PREC: tl.constexpr, NS: tl.constexpr, DT: tl.constexpr):
    """The eviction at block start P (block P / w - 2 leaves) through the cache; returns (kv, ks) after it."""
    rw = tl.arange(0, R)
    rd, rv, rf = tl.arange(0, DP), tl.arange(0, DVP), tl.arange(0, FP)
    md, mv, mf = rd < D, rv < DV, rf < F
    DROP: tl.constexpr = (NT + 1) * R  # scratch: scores (cache tiles, then the candidates), then the dropped
    # cache slots in slot order and, from DROP + NT * R, the candidates' drop flags
    pc = P - 2 * W + rw  # (R,) the leaving block's positions
    live_c = rw < W
    fkc, pres = _by_pos(cfk, wfk, wp, pc, live_c, p0, c0, rf, mf, F, S)
    vc, _ = _by_pos(cv, wv, wp, pc, live_c, p0, c0, rv, mv, DV, S)
    cpos = tl.where(pres, pc, -1)
    # a cache with w empty slots or more takes the whole block: the w lowest scores are its first w empty slots
    # (-inf, lower index first), no live pair is dropped and (kv, ks) stay as they are: no scores, no rank
    n_empty = 0
    for t in tl.static_range(NT):
        rg, mg = _tile(t, NT, G, W, R)
        n_empty += tl.sum((mg & (tl.load(gpos + rg, mask=mg, other=0) < 0)).to(tl.int32), 0)
    off = 0  # how many cache slots are dropped, listed in slot order at scratch[DROP:DROP + off]
    if n_empty >= W:
        for t in tl.static_range(NT):
            rg, mg = _tile(t, NT, G, W, R)
            e = mg & (tl.load(gpos + rg, mask=mg, other=0) < 0)
            at = off + tl.cumsum(e.to(tl.int32), 0) - 1
            e = e & (at < W)
            tl.store(sc + DROP + at, rg.to(tl.float32), mask=e)
            off += tl.sum(e.to(tl.int32), 0)
        tl.store(sc + DROP + NT * R + rw, tl.zeros([R], tl.float32))
    else:
        # scores, against the state before this eviction
        for t in tl.static_range(NT):
            rg, mg = _tile(t, NT, G, W, R)
            gp = tl.load(gpos + rg, mask=mg, other=-1)
            f = tl.load(gfk + rg[:, None] * F + rf[None, :], mask=mg[:, None] & mf[None, :], other=0.0)
            v = tl.load(gv + rg[:, None] * DV + rv[None, :], mask=mg[:, None] & mv[None, :], other=0.0).to(tl.float32)
            tl.store(sc + rg, _score(f, v, gp, kvt, kst, sink, eps, SCORE, PREC, DT))
        fkc_st = fkc.to(gfk.dtype.element_ty)  # in the dtype the cache stores, as its rows above
        tl.store(sc + NT * R + rw, _score(fkc_st, vc, cpos, kvt, kst, sink, eps, SCORE, PREC, DT))
        tl.debug_barrier()
        # drop the W lowest of the G + W (a strict order: score, then index): the W-th lowest score from one sort
        # is the threshold; all below it go, and of those equal to it the first by index until W are gone
        ra = tl.arange(0, NS)
        in_a = ra < (NT + 1) * R
        real = ((ra < NT * R) & (ra < G)) | ((ra >= NT * R) & (ra < NT * R + W))
        sa = tl.where(real, tl.load(sc + ra, mask=in_a, other=float("inf")), float("inf"))
        thr = tl.max(tl.where(ra == W - 1, tl.sort(sa), float("-inf")), 0)
        below, tie = real & (sa < thr), real & (sa == thr)
        need = W - tl.sum(below.to(tl.int32), 0)
        drop = below | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= need))
        # the dropped cache slots in slot order (a cache lane's index is its slot), the candidates' flags after them
        dg = drop & (ra < NT * R)
        tl.store(sc + DROP + tl.cumsum(dg.to(tl.int32), 0) - 1, ra.to(tl.float32), mask=dg)
        tl.store(sc + DROP + ra, drop.to(tl.float32), mask=in_a & (ra >= NT * R))
        off = tl.sum(dg.to(tl.int32), 0)
    tl.debug_barrier()
    dslot = tl.load(sc + DROP + rw, mask=rw < off, other=-1.0).to(tl.int32)  # (R,) -1 past the last
    # fold the dropped live pairs into (kv, ks): the cache's in one gathered tile (at most w), then the candidates'
    has = dslot >= 0
    ds = tl.where(has, dslot, 0)
    fold = has & (tl.load(gpos + ds, mask=has, other=-1) >= 0)
    # (the dots take the cache's dtype, which holds every value exactly, and sum in float32: half the shared memory)
    f = tl.load(gfk + ds[:, None] * F + rf[None, :], mask=fold[:, None] & mf[None, :], other=0.0)
    v = tl.load(gv + ds[:, None] * DV + rv[None, :], mask=fold[:, None] & mv[None, :], other=0.0)
    kvt += tile_dot(tl.trans(f), v, DT)
    kst += tl.sum(f.to(tl.float32), 0)
    dc = tl.load(sc + DROP + NT * R + rw) != 0
    fc = tl.where((dc & pres)[:, None], fkc, 0.0)
    kvt += tile_dot(tl.trans(fc), vc, DT)
    kst += tl.sum(fc, 0)
    # the kept candidates (empty ones too) take the dropped slots, in order
    kept = live_c & ~dc
    krank = tl.cumsum(kept.to(tl.int32), 0) - 1
    dest = tl.load(sc + DROP + krank, mask=kept & (krank < off), other=-1.0).to(tl.int32)  # (R,) -1: none
    ok = kept & (dest >= 0)
    slot = tl.where(ok, dest, 0)
    kc, _ = _by_pos(ck, wk, wp, pc, live_c, p0, c0, rd, md, D, S)
    tl.store(gk + slot[:, None] * D + rd[None, :], kc.to(gk.dtype.element_ty), mask=ok[:, None] & md[None, :])
    tl.store(gv + slot[:, None] * DV + rv[None, :], vc.to(gv.dtype.element_ty), mask=ok[:, None] & mv[None, :])
    tl.store(gfk + slot[:, None] * F + rf[None, :], fkc.to(gfk.dtype.element_ty), mask=ok[:, None] & mf[None, :])
    tl.store(gpos + slot, cpos, mask=ok)
    tl.debug_barrier()
    return kvt, kst


@triton.jit
def _head_ptrs(win_k, win_v, win_fk, win_pos, sp_k, sp_v, sp_fk, sp_pos, scratch, bhk, b,
               S: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, G: tl.constexpr,
               NT: tl.constexpr):
    """Row ``b``'s, KV head ``bhk``'s window slots (keys, values, phi(k), the row's positions), sparse cache (the
    same and positions) and scratch: the state ``_merge`` reads and writes."""
    return (win_k + bhk * S * D, win_v + bhk * S * DV, win_fk + bhk * S * F, win_pos + b * S,
            sp_k + bhk * G * D, sp_v + bhk * G * DV, sp_fk + bhk * G * F, sp_pos + bhk * G,
            scratch + bhk * (2 * (NT + 1) * R))


@triton.jit
def _evict(k, v, fk, win_k, win_v, win_fk, win_pos, kv, ks, sp_k, sp_v, sp_fk, sp_pos, runs, scratch,
           snap_k, snap_v, snap_pos, snap_kv, snap_ks, T, HK, NB, eps, sink,
           W: tl.constexpr, S: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
           DP: tl.constexpr, DVP: tl.constexpr, FP: tl.constexpr, G: tl.constexpr, NT: tl.constexpr,
           SCORE: tl.constexpr, PREC: tl.constexpr, NS: tl.constexpr, DT: tl.constexpr):
    """One program per (row, KV head), the chunk's blocks in order: the eviction at each block start, then a
    snapshot of what the block's queries read (cache keys, values, positions; kv, ks) for ``_attend``."""
    bhk = tl.program_id(0).to(tl.int64)
    b = bhk // HK
    p0, c0, n = tl.load(runs + b * 3), tl.load(runs + b * 3 + 1), tl.load(runs + b * 3 + 2)
    rd, rv, rf = tl.arange(0, DP), tl.arange(0, DVP), tl.arange(0, FP)
    md, mv, mf = rd < D, rv < DV, rf < F
    ck, cv, cfk = k + bhk * T * D, v + bhk * T * DV, fk + bhk * T * F  # this KV head's rows
    wk, wv, wfk, wp, gk, gv, gfk, gpos, sc = _head_ptrs(win_k, win_v, win_fk, win_pos, sp_k, sp_v, sp_fk, sp_pos,
                                                        scratch, bhk, b, S, R, D, DV, F, G, NT)
    kv_at = rf[:, None] * DV + rv[None, :]
    kvt = tl.load(kv + bhk * F * DV + kv_at, mask=mf[:, None] & mv[None, :], other=0.0)
    kst = tl.load(ks + bhk * F + rf, mask=mf, other=0.0)
    first = p0 // W
    last = tl.where(n > 0, (p0 + n - 1) // W, first - 1)
    for blk in range(first, last + 1):
        P = blk * W
        if (P >= p0) & (blk >= 2):
            kvt, kst = _merge(kvt, kst, ck, cv, cfk, wk, wv, wfk, wp, gk, gv, gfk, gpos, sc, P, p0, c0, sink, eps,
                              W, S, R, D, DV, F, DP, DVP, FP, G, NT, SCORE, PREC, NS, DT)
        i = bhk * NB + blk - first  # this block's snapshot
        for t in tl.static_range(NT):
            rg, mg = _tile(t, NT, G, W, R)
            tl.store(snap_pos + i * G + rg, tl.load(gpos + rg, mask=mg), mask=mg)
            tl.store(snap_k + (i * G + rg[:, None]) * D + rd[None, :],
                     tl.load(gk + rg[:, None] * D + rd[None, :], mask=mg[:, None] & md[None, :]),
                     mask=mg[:, None] & md[None, :])
            tl.store(snap_v + (i * G + rg[:, None]) * DV + rv[None, :],
                     tl.load(gv + rg[:, None] * DV + rv[None, :], mask=mg[:, None] & mv[None, :]),
                     mask=mg[:, None] & mv[None, :])
        tl.store(snap_kv + i * F * DV + kv_at, kvt, mask=mf[:, None] & mv[None, :])
        tl.store(snap_ks + i * F + rf, kst, mask=mf)
    tl.store(kv + bhk * F * DV + kv_at, kvt, mask=mf[:, None] & mv[None, :])
    tl.store(ks + bhk * F + rf, kst, mask=mf)


@triton.jit
def _attend(q, k, v, fq, win_k, win_v, win_pos, runs, gp, y, snap_k, snap_v, snap_pos, snap_kv, snap_ks,
            T, H, HK, NB, scale,
            W: tl.constexpr, S: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
            DP: tl.constexpr, DVP: tl.constexpr, FP: tl.constexpr, G: tl.constexpr, NT: tl.constexpr,
            DT: tl.constexpr, PREC: tl.constexpr):
    """One program per (row, query head, block): softmax over the block's cache snapshot and the window (the
    previous block and its own, causal) under one running max, and phi(q) over the snapshot's (kv, ks)."""
    bh, j = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    bhk = b * HK + h // (H // HK)
    p0, c0, n = tl.load(runs + b * 3), tl.load(runs + b * 3 + 1), tl.load(runs + b * 3 + 2)
    P = (p0 // W + j) * W
    p_end = p0 + n
    if P < p_end:
        rw, rd, rv, rf = tl.arange(0, R), tl.arange(0, DP), tl.arange(0, DVP), tl.arange(0, FP)
        md, mv, mf = rd < D, rv < DV, rf < F
        ck, cv = k + bhk * T * D, v + bhk * T * DV
        wk, wv, wp = win_k + bhk * S * D, win_v + bhk * S * DV, win_pos + b * S
        i = bhk * NB + j
        qp = P + rw
        vq = (rw < W) & (qp >= p0) & (qp < p_end)
        rows = bh * T + tl.where(vq, c0 + qp - p0, 0)  # (R,) rows of q, fq, y
        qt = tl.load(q + rows[:, None] * D + rd[None, :], mask=vq[:, None] & md[None, :], other=0.0)
        m = tl.full([R], float("-inf"), tl.float32)
        l = tl.zeros([R], tl.float32)
        acc = tl.zeros([R, DVP], tl.float32)
        for t in tl.static_range(NT):
            rg, mg = _tile(t, NT, G, W, R)
            live = tl.load(snap_pos + i * G + rg, mask=mg, other=-1) >= 0
            kt = tl.load(snap_k + (i * G + rg[:, None]) * D + rd[None, :], mask=live[:, None] & md[None, :], other=0.0)
            vt = tl.load(snap_v + (i * G + rg[:, None]) * DV + rv[None, :], mask=live[:, None] & mv[None, :],
                         other=0.0)
            m, l, acc = _online(qt, kt, vt, vq[:, None] & live[None, :], m, l, acc, scale, DT)
        kp = P - W + rw
        k1, in1 = _by_pos(ck, wk, wp, kp, (rw < W) & (kp >= 0), p0, c0, rd, md, D, S)
        v1, _ = _by_pos(cv, wv, wp, kp, (rw < W) & (kp >= 0), p0, c0, rv, mv, DV, S)
        m, l, acc = _online(qt, k1, v1, vq[:, None] & in1[None, :], m, l, acc, scale, DT)
        here = (rw < W) & (qp < p_end)  # the block's keys: before the chunk (window slots) or in it
        k2, in2 = _by_pos(ck, wk, wp, qp, here, p0, c0, rd, md, D, S)
        v2, _ = _by_pos(cv, wv, wp, qp, here, p0, c0, rv, mv, DV, S)
        causal = in2[None, :] & (qp[None, :] <= qp[:, None])
        m, l, acc = _online(qt, k2, v2, vq[:, None] & causal, m, l, acc, scale, DT)
        fqt = tl.load(fq + rows[:, None] * F + rf[None, :], mask=vq[:, None] & mf[None, :], other=0.0).to(tl.float32)
        kvt = tl.load(snap_kv + i * F * DV + rf[:, None] * DV + rv[None, :], mask=mf[:, None] & mv[None, :],
                      other=0.0)
        kst = tl.load(snap_ks + i * F + rf, mask=mf, other=0.0)
        wf = tl.load(gp + h).to(tl.float32)
        num = wf * acc + tl.dot(fqt, kvt, input_precision=PREC)
        den = wf * l + tl.sum(fqt * kst[None, :], 1)
        out = tl.where(den[:, None] > 0, num / tl.maximum(den, 1e-30)[:, None], 0.0)
        tl.store(y + rows[:, None] * DV + rv[None, :], out.to(y.dtype.element_ty), mask=vq[:, None] & mv[None, :])


@triton.jit
def _rows_to_slots(src, dst, col, slot, take, r, X: tl.constexpr):
    """Rows ``col`` of ``src`` (T, X) into rows ``slot`` of ``dst`` (S, X), where ``take``, in ``dst``'s dtype."""
    m = (take[:, None] != 0) & (r[None, :] < X)  # (the interpreter may hand a mask over as int32)
    x = tl.load(src + col[:, None] * X + r[None, :], mask=m)
    tl.store(dst + slot[:, None] * X + r[None, :], x.to(dst.dtype.element_ty), mask=m)


@triton.jit
def _window_write(k, v, fk, win_k, win_v, win_fk, win_pos, runs, T, HK,
                  W: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                  F: tl.constexpr, DP: tl.constexpr, DVP: tl.constexpr, FP: tl.constexpr):
    """One program per row, after ``_attend`` read the window: the chunk's tokens in the terraced window of the row's
    last position take their slots (position % S) in every KV head; older slots that leave it are marked empty
    (their pairs went through the cache in ``_evict``): the reference's absorb without folding."""
    b = tl.program_id(0).to(tl.int64)
    p0, c0, n = tl.load(runs + b * 3), tl.load(runs + b * 3 + 1), tl.load(runs + b * 3 + 2)
    s = tl.arange(0, SP)
    ms = s < S
    old = tl.load(win_pos + b * S + s, mask=ms, other=-1)  # (SP,)
    last_new = tl.where(n > 0, p0 + n - 1, -1)
    last = tl.maximum(tl.max(old, 0), last_new)  # the row's last position (-1: none)
    stay_old = (old >= 0) & (last // W - tl.where(old >= 0, old, 0) // W <= 1)
    pn = last_new - (last_new - s + S) % S  # the chunk's last position in slot s
    new = ms & (n > 0) & (pn >= p0) & (last // W - tl.where(pn >= 0, pn, 0) // W <= 1)
    col = tl.where(new, c0 + pn - p0, 0)
    rd, rv, rf = tl.arange(0, DP), tl.arange(0, DVP), tl.arange(0, FP)
    for hk in range(HK):
        bhk = b * HK + hk
        _rows_to_slots(k + bhk * T * D, win_k + bhk * S * D, col, s, new, rd, D)
        _rows_to_slots(v + bhk * T * DV, win_v + bhk * S * DV, col, s, new, rv, DV)
        _rows_to_slots(fk + bhk * T * F, win_fk + bhk * S * F, col, s, new, rf, F)
    tl.store(win_pos + b * S + s, tl.where(new, pn, tl.where(stay_old, old, -1)), mask=ms)


@triton.jit
def _evict_step(win_k, win_v, win_fk, win_pos, kv, ks, sp_k, sp_v, sp_fk, sp_pos, pos_ptr, valid_ptr, scratch,
                HK, eps, sink, HAS_VALID: tl.constexpr,
                W: tl.constexpr, S: tl.constexpr, R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
                DP: tl.constexpr, DVP: tl.constexpr, FP: tl.constexpr, G: tl.constexpr, NT: tl.constexpr,
                SCORE: tl.constexpr, PREC: tl.constexpr, NS: tl.constexpr, DT: tl.constexpr):
    """A decode step's eviction, one program per (row, KV head): where the row's token starts a block (pos % w ==
    0) the block two back leaves the window through the cache (``_merge``: the window slots are its source); every
    other program returns at once. The window slots keep their positions: the decode kernel then masks the
    leaving half without folding it (``FOLD`` off) and marks it empty."""
    bhk = tl.program_id(0).to(tl.int64)
    b = bhk // HK
    pos = tl.load(pos_ptr + b)
    if HAS_VALID:
        ok = tl.load(valid_ptr + b).to(tl.int32) != 0
    else:
        ok = pos >= 0
    if ok & (pos % W == 0) & (pos >= 2 * W):
        rv, rf = tl.arange(0, DVP), tl.arange(0, FP)
        mv, mf = rv < DV, rf < F
        wk, wv, wfk, wp, gk, gv, gfk, gpos, sc = _head_ptrs(win_k, win_v, win_fk, win_pos, sp_k, sp_v, sp_fk,
                                                            sp_pos, scratch, bhk, b, S, R, D, DV, F, G, NT)
        kv_at = rf[:, None] * DV + rv[None, :]
        kvt = tl.load(kv + bhk * F * DV + kv_at, mask=mf[:, None] & mv[None, :], other=0.0)
        kst = tl.load(ks + bhk * F + rf, mask=mf, other=0.0)
        # the chunk is empty (p0 = pos): _by_pos reads every leaving key from its window slot
        kvt, kst = _merge(kvt, kst, wk, wv, wfk, wk, wv, wfk, wp, gk, gv, gfk, gpos, sc, pos, pos, 0, sink, eps,
                          W, S, R, D, DV, F, DP, DVP, FP, G, NT, SCORE, PREC, NS, DT)
        tl.store(kv + bhk * F * DV + kv_at, kvt, mask=mf[:, None] & mv[None, :])
        tl.store(ks + bhk * F + rf, kst, mask=mf)


def _sort_width(nt: int, r: int) -> int:
    """Lanes of the eviction's one sort: the scores of ``nt`` cache tiles and the candidates', ``r`` each."""
    return triton.next_power_of_2((nt + 1) * r)


def launch_constants(W: int, S: int, G: int, D: int, Dv: int, F: int, dtype: torch.dtype) -> dict:
    """The kernels' shape constants: window w (R its padded tile), S window slots, cache G (NT tiles of R), head
    dims (padded tiles DP, DVP, FP); products exact (``ieee``) for float32 values (and in the interpreter), else
    tf32 (16-bit values are exact in it)."""
    R = pad_dim(W)
    exact = dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    return dict(W=W, S=S, R=R, D=D, DV=Dv, F=F, DP=pad_dim(D), DVP=pad_dim(Dv), FP=pad_dim(F), G=G,
                NT=triton.cdiv(G, R), PREC="ieee" if exact else "tf32")


def _scratch(dims: dict, programs: int, device) -> torch.Tensor:
    """Each eviction program's scores, dropped slots and drop flags (``_head_ptrs``: 2 (NT + 1) R floats)."""
    return torch.empty(programs, 2 * (dims["NT"] + 1) * dims["R"], dtype=torch.float32, device=device)


def evict_constants(dims: dict, score: str, dot: tl.dtype) -> dict:
    """``_evict`` / ``_evict_step``'s further constants: the score, the sort's lanes, the products' dtype."""
    return dict(SCORE=SCORE_IDS[score], NS=_sort_width(dims["NT"], dims["R"]), DT=dot)


EVICT_WARPS, ATTEND_WARPS = 8, 4  # the launches' warps (the eviction: one sort, its tiles at 8)

MAX_WINDOW = 256  # the largest window the kernels are tested at (model shapes); at 512 the attention launch's
                  # w x w tiles compile for minutes


def supports(kind: str, score: str, *tensors, window: int) -> bool:
    """Whether :func:`sparse_prefill_triton` (and the decode step's eviction) takes this chunk: a terraced window of
    at most ``MAX_WINDOW``, a built-in score (not one registered over it: ``register_score``), no gradient."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return (kind == "terraced_window" and window <= MAX_WINDOW and score in BUILT_IN
            and SCORES.get(score) is BUILT_IN[score] and not grad)


def row_runs(pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, 3) int64 per row: the first valid token's position, its column, the number of valid tokens."""
    c0 = valid.to(torch.int8).argmax(1)  # first True (0 for a row with none, which n = 0 skips)
    p0 = pos.gather(1, c0[:, None])[:, 0]
    return torch.stack([p0, c0, valid.sum(1)], 1).to(torch.int64).contiguous()


def sparse_prefill_triton(state: DecodeState, q, k, v, fq, fk, pos, valid, window_factor, window_size: int,
                          scale: float, score: str, sink: int = 0) -> tuple[torch.Tensor, DecodeState]:
    """Outputs (B, H, T, Dv) of a chunk continuing ``state`` and the state after it, the chunk written into its
    window slots as the reference's absorb without folding does (``_window_write``). ``state`` itself is updated in
    place and returned when its tensors are contiguous (a row view of a batch is); else a contiguous copy is.

    q (B, H, T, D), k/v (B, Hk, T, D|Dv), fq (B, H, T, F), fk (B, Hk, T, F), pos (B, T), valid (B, T);
    terraced window, ``state.sparse_size`` > 0.
    """
    B, H, T, D = q.shape
    Hk, Dv, F = k.shape[1], v.shape[-1], fk.shape[-1]
    G, S, W = state.sparse_size, state.win_pos.shape[1], window_size
    after = state if all(t.is_contiguous() for t in state.tensors().values()) else state.map(lambda t: t.contiguous())
    q, k, v, fq, fk = (t.contiguous() for t in (q, k, v, fq, fk))
    y = torch.zeros(B, H, T, Dv, dtype=v.dtype, device=v.device)  # padding columns stay 0
    NB = T // W + 2  # the most blocks a row's run of T tokens touches
    runs = row_runs(pos, valid)
    dims = launch_constants(W, S, G, D, Dv, F, k.dtype)
    new = lambda *shape, dtype=k.dtype: torch.empty(B * Hk, NB, *shape, dtype=dtype, device=k.device)  # noqa: E731
    snap = (new(G, D, dtype=after.sparse_k.dtype), new(G, Dv, dtype=after.sparse_v.dtype),
            new(G, dtype=torch.long), new(F, Dv, dtype=torch.float32), new(F, dtype=torch.float32))
    scratch = _scratch(dims, B * Hk, q.device)
    _evict[(B * Hk,)](k, v, fk, after.win_k, after.win_v, after.win_fk, after.win_pos, after.kv, after.ks,
                      after.sparse_k, after.sparse_v, after.sparse_fk, after.sparse_pos, runs, scratch, *snap,
                      T, Hk, NB, EPS, int(sink), **dims, **evict_constants(dims, score, dot_dtype(after.sparse_fk)),
                      num_warps=EVICT_WARPS, num_stages=1)
    _attend[(B * H, NB)](q, k, v, fq, after.win_k, after.win_v, after.win_pos, runs, window_factor.float().contiguous(),
                         y, *snap, T, H, Hk, NB, float(scale), **dims, DT=dot_dtype(state.win_k, q),
                         num_warps=ATTEND_WARPS)
    _window_write[(B,)](k, v, fk, after.win_k, after.win_v, after.win_fk, after.win_pos, runs, T, Hk, W=W, S=S,
                        SP=triton.next_power_of_2(S), D=D, DV=Dv, F=F, DP=dims["DP"], DVP=dims["DVP"], FP=dims["FP"])
    return y, after


def sparse_evict_step(state: DecodeState, pos: torch.Tensor, valid: torch.Tensor | None, window_size: int,
                      score: str, sink: int = 0) -> None:
    """The eviction of a decode step on terraced windows (``evict_to_cache`` of ``ops/sparse/cache.py``), in
    place, one launch: rows whose token starts a block send the block two back through the cache (kept pairs,
    folds into (kv, ks)); the window slots are left as they are for the decode kernel (it must not fold them).

    pos (B,) int64, valid (B,) bool or None; the state contiguous. Nothing syncs with the host."""
    B, Hk, G, D = state.sparse_k.shape
    Dv, F, S, W = state.sparse_v.shape[-1], state.sparse_fk.shape[-1], state.win_pos.shape[1], window_size
    dims = launch_constants(W, S, G, D, Dv, F, state.win_k.dtype)
    scratch = _scratch(dims, B * Hk, pos.device)
    pos = pos.contiguous()
    vptr = valid.contiguous().view(torch.int8) if valid is not None else pos
    _evict_step[(B * Hk,)](state.win_k, state.win_v, state.win_fk, state.win_pos, state.kv, state.ks,
                           state.sparse_k, state.sparse_v, state.sparse_fk, state.sparse_pos, pos, vptr, scratch,
                           Hk, EPS, int(sink), HAS_VALID=valid is not None, **dims,
                           **evict_constants(dims, score, dot_dtype(state.sparse_fk)), num_warps=EVICT_WARPS,
                           num_stages=1)
