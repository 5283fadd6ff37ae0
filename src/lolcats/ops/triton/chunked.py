"""Chunked Triton kernels for causal linear and hybrid (window + linear) attention.

One code path serves three kinds (``KIND``): 0 = linear, 1 = sliding window, 2 = terraced
window; the references are ``ops/linear/naive.py`` and ``ops/hybrid/naive.py`` (plain case).

Sequence split into chunks of C (64) tokens. For query chunk c the keys fall in two parts:

* chunks ``< c0 = max(c - NX, 0)``: linear for every query of the chunk, consumed through the
  prefix state ``S_c0 = S0 + sum_{j < c0 C} fk_j v_j^T`` (F, Dv) and ``z_c0`` (F,);
* chunks ``c0 .. c`` ("explicit"): scores computed tile by tile, every (i, j) put in the window,
  the linear part or neither by the exact masks of the reference.

``NX`` (0 for linear, 1 for a 64-window with C = 64, 1..2 for terraced) is the smallest offset
for which the first part is entirely linear.
The forward makes one pass over the (at most NX + 1) explicit tiles, diagonal first: the window
part sum_W g exp(s_ij - m_i) v_j with an online max (rescaled when the running max grows), the
linear part (fq_i S_c0 and the linear entries) unscaled, combined at the end as
``y_i = (win_i + lin_i) / (wsum_i + lsum_i + eps)`` with m_i the final window max: the same
function as the reference. Tiles with no window (or no linear) entry skip those products.

Backward, with den_i, dō_i = do_i / den_i, δ̄_i = do_i.y_i / den_i (for windows from the
unrounded y, recomputed in a first pass over the explicit tiles) and dw_ij = do_i.v_j / den_i - δ̄_i:
  * linear entries: dfq_i += dw_ij fk_j, dfk_j += dw_ij fq_i, dv_j += a_ij dō_i;
  * window entries: ds_ij = g p_ij dw_ij, minus c_i = g sum_k p_ik dw_ik at j = argmax_i (the
    gradient through m_i; ties are given to one key), dq/dk from ds times scale, and
    dg = sum_i sum_k p_ik dw_ik;
  * the linear part through states: dfq_i += S_c0 dō_i - z_c0 δ̄_i, and for key chunk c the
    suffix state ``R = dSf + sum_{query chunks > c + NX} fq dō^T`` gives dfk_j += R v_j - Rz,
    dv_j += R^T fk_j (Rz = sum fq δ̄ - dzf). R at chunk 0 is the initial state's gradient.

Gated (a log forget gate per KV head and token, ``ops/gate.py``: key j's linear weight for query
i is multiplied by exp(G_i - GA_j), G the cumulative log gate, GA_j = G at the position where j
leaves the window; the initial state's by exp(G_i)): every exponent is kept <= 0 by referencing
the state of query chunk c at its first position r = cC. Keys of chunks < c0 have all arrived by r
(that is what NX guarantees), so the state of query chunk c is

    Q_c = exp(G_r) S0 + sum_{j < c0 C} exp(G_r - GA_j) fk_j v_j^T      (z likewise),
    Q_{c+1} = exp(G_{r+C} - G_r) Q_c + (key chunk c - NX, weighted to r + C)

(a scan with chunk decays), query i reads exp(G_i - G_r) fq_i Q_c, and the explicit tiles weight
their linear entries by exp(G_i - GA_j) (<= 0 where j is linear for i). The backward runs the same
way with the reverse states R_c = sum_{i >= cC} exp(G_i - G_cC) fq_i dō_i^T + decayed dSf, each
key weighted to the state it enters. d log_gate needs no kernel: fq_i appears only times exp(G_i)
and fk_j only times exp(-GA_j), so dL/dG_i = fq_i . dfq_i - sum_{j arriving at i} fk_j . dfk_j
(``gate_gradient``), then a reverse cumsum.

Kernels: ``_chunk_sums`` (per-chunk fk^T v, or sum over the group of fq^T dō, all chunks in
parallel) and ``_scan`` (prefix / suffix sums over chunks) give the states; ``_fwd`` (one
program per (query chunk, b, h)), ``_bwd_dq``, ``_bwd_dkv`` (one program per (key chunk, b, hk),
looping over its group).
No T x T matrix is ever stored; the states cost (B, Hk, T/C + 1, F Dv + F) float32.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lolcats.ops.gate import arrival_positions

CHUNK = 64


def pad_dim(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=256)
def explicit_chunks(kind: int, window: int, chunk: int, num_chunks: int) -> int:
    """NX: query chunk c must see key chunks c - NX .. c tile by tile (earlier ones are linear)."""
    if kind == 0:
        return 0
    nx = 0
    for c in range(num_chunks):
        q0 = c * chunk
        first = q0 - window + 1 if kind == 1 else (q0 // window - 1) * window
        nx = max(nx, c - max(first, 0) // chunk)
    return nx


@triton.jit
def tile_dot(a, b, DT: tl.constexpr):
    """a @ b with operands in DT and a float32 result; float32 operands are multiplied exactly."""
    if DT == tl.float32:
        out = tl.dot(a.to(DT), b.to(DT), input_precision="ieee")
    else:
        out = tl.dot(a.to(DT), b.to(DT))
    return out


@triton.jit
def _masks(i, j, T, KIND: tl.constexpr, W: tl.constexpr):
    """i (query positions) and j (key positions), broadcastable: (window, linear) masks."""
    valid = (i < T) & (j < T) & (j <= i)
    if KIND == 1:
        win = valid & (i - j < W)
        lin = valid & (i - j >= W)
    elif KIND == 2:
        db = i // W - j // W
        win = valid & (db <= 1)
        lin = valid & (db >= 2)
    else:
        win = valid & (i < 0)
        lin = valid
    return win, lin


@triton.jit
def _tile_parts(i_lo, i_hi, j_lo, j_hi, KIND: tl.constexpr, W: tl.constexpr):
    """Whether queries i_lo..i_hi x keys j_lo..j_hi hold any (window, linear) entry (scalars)."""
    causal = j_lo <= i_hi
    if KIND == 1:
        win = causal & (i_lo - j_hi < W)
        lin = i_hi - j_lo >= W
    elif KIND == 2:
        win = causal & (i_lo // W - j_hi // W <= 1)
        lin = i_hi // W - j_lo // W >= 2
    else:
        win = causal & (i_lo < 0)
        lin = causal
    return win, lin


@triton.jit
def _chunk_sums(a, b, den_in, dlt_in, wrow, loc, T, NC, H, HK,
                BWD: tl.constexpr, GATED: tl.constexpr, F: tl.constexpr, DV: tl.constexpr, FP: tl.constexpr,
                BV: tl.constexpr, C: tl.constexpr, DT: tl.constexpr):
    """Per-chunk sums, one program per (chunk, b * hk, Dv block), into loc (B*Hk, NC, F*Dv + F).

    Forward (a = fk, b = v): fk^T v and sum fk. Backward (a = fq, b = do, summed over the query
    heads of the group): fq^T (do / den) and sum fq * δ̄. GATED: the rows of a are weighted by
    wrow (B*Hk, T) first (their decay to the state's reference position).
    """
    c = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    iv = tl.program_id(2)
    rf, rc = tl.arange(0, FP), tl.arange(0, C)
    rv = iv * BV + tl.arange(0, BV)
    mf, mv = rf < F, rv < DV
    t = c * C + rc
    mt = t < T
    acc = tl.zeros([FP, BV], tl.float32)
    accz = tl.zeros([FP], tl.float32)
    wt = tl.full([C], 1.0, tl.float32)
    if GATED:
        wt = tl.load(wrow + bhk * T + t, mask=mt, other=0.0)
    if BWD:
        G = H // HK
        for gg in range(G):
            bh = (bhk // HK) * H + (bhk % HK) * G + gg
            at = tl.load(a + bh * T * F + t[:, None] * F + rf[None, :], mask=mt[:, None] & mf[None, :], other=0.0)
            bt = tl.load(b + bh * T * DV + t[:, None] * DV + rv[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
            den = tl.load(den_in + bh * T + t, mask=mt, other=1.0)
            dlt = tl.load(dlt_in + bh * T + t, mask=mt, other=0.0)
            if GATED:
                at = at.to(tl.float32) * wt[:, None]
            acc += tile_dot(tl.trans(at), bt.to(tl.float32) / den[:, None], DT)
            accz += tl.sum(at.to(tl.float32) * dlt[:, None], 0)
    else:
        at = tl.load(a + bhk * T * F + t[:, None] * F + rf[None, :], mask=mt[:, None] & mf[None, :], other=0.0)
        bt = tl.load(b + bhk * T * DV + t[:, None] * DV + rv[None, :], mask=mt[:, None] & mv[None, :], other=0.0)
        if GATED:
            at = at.to(tl.float32) * wt[:, None]
        acc = tile_dot(tl.trans(at), bt, DT)
        accz = tl.sum(at.to(tl.float32), 0)
    loc += (bhk * NC + c) * (F * DV + F)
    tl.store(loc + rf[:, None] * DV + rv[None, :], acc, mask=mf[:, None] & mv[None, :])
    tl.store(loc + F * DV + rf, accz, mask=mf & ((rf * 0 + iv) == 0))  # ksum: first Dv block only


@triton.jit
def _scan(loc, init, dec, out, NC, E, SHIFT, HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, GATED: tl.constexpr,
          CB: tl.constexpr, BE: tl.constexpr):
    """States from chunk sums, one program per (b * hk, E block): loc (B*Hk, NC, E) -> out (B*Hk, NC+1, E).

    Forward: out[0] = init, out[c+1] = out[c] + loc[c]. Reverse: out[NC] = init, out[c] = out[c+1] + loc[c].
    CB chunks are loaded at once and summed with a cumsum, so loads are not serialised behind the adds.
    GATED, with chunk decays dec (B*Hk, NC), one chunk at a time: forward out[c+1] = dec[c] out[c] +
    loc[c - SHIFT] (0 for c < SHIFT), reverse out[c] = dec[c] out[c+1] + loc[c].
    """
    bhk = tl.program_id(0).to(tl.int64)
    re = tl.program_id(1) * BE + tl.arange(0, BE)
    me = re < E
    loc += bhk * NC * E
    out += bhk * (NC + 1) * E
    if HAS_INIT:
        carry = tl.load(init + bhk * E + re, mask=me, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BE], tl.float32)
    if REVERSE:
        tl.store(out + NC * E + re, carry, mask=me)
    else:
        tl.store(out + re, carry, mask=me)
    if GATED:
        for r in range(0, NC):
            if REVERSE:
                c = NC - 1 - r
                x = tl.load(loc + c * E + re, mask=me, other=0.0)
                dst = c
            else:
                c = r
                x = tl.load(loc + (c - SHIFT) * E + re, mask=me & ((re * 0 + c) >= SHIFT), other=0.0)
                dst = c + 1
            carry = tl.load(dec + bhk * NC + c) * carry + x
            tl.store(out + dst * E + re, carry, mask=me)
    else:
        rb = tl.arange(0, CB)
        for c0 in range(0, NC, CB):
            r = c0 + rb
            mr = r < NC
            if REVERSE:
                c = NC - 1 - r
                dst = c
            else:
                c = r
                dst = r + 1
            msk = mr[:, None] & me[None, :]
            x = tl.load(loc + c[:, None] * E + re[None, :], mask=msk, other=0.0)
            tl.store(out + dst[:, None] * E + re[None, :], tl.cumsum(x, 0) + carry[None, :], mask=msk)
            carry += tl.sum(x, 0)


@triton.jit
def _pair_decay(ga, bhk, gi, j, mj, lin, T):
    """exp(G_i - GA_j) on the linear entries of a (queries, keys) tile, 0 elsewhere."""
    gaj = tl.load(ga + bhk * T + j, mask=mj, other=0.0)
    return tl.exp(tl.where(lin, gi[:, None] - gaj[None, :], float("-inf")))


@triton.jit
def _state_decay(gl, bhk, i, mi, cq, T, C: tl.constexpr, GATED: tl.constexpr):
    """Row weights (C,) of the state part: exp(G_i - G_r), r = cq C its reference (1 ungated, 0 past T);
    and G_i (the rows' cumulative log gates)."""
    gi = tl.zeros([C], tl.float32)
    qs = tl.full([C], 1.0, tl.float32)
    if GATED:
        gi = tl.load(gl + bhk * T + i, mask=mi, other=0.0)
        qs = tl.exp(tl.where(mi, gi - tl.load(gl + bhk * T + cq * C), float("-inf")))
    return qs, gi


@triton.jit
def _fwd(q, k, v, fq, fk, gp, st, gl, ga, y, m_out, den_out, am_out, T, NC, NX, H, HK, scale, eps,
         KIND: tl.constexpr, W: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
         DP: tl.constexpr, DVP: tl.constexpr, FP: tl.constexpr, C: tl.constexpr, DT: tl.constexpr,
         GATED: tl.constexpr):
    """One pass over the explicit tiles, diagonal first, softmax part with an online max.

    acc / l hold g sum_W exp(s - m) v / its sum, rescaled whenever the running max m grows;
    acc_l / den_l hold the linear part (prefix state and linear entries of every tile but the
    last), never rescaled. The last tile (c0) comes after every rescale, so its linear entries
    join the window weights in one product. y = (acc + acc_l) / (l + den_l + eps).
    GATED: the state is the one of the query chunk (entry cq, referenced at cq C) and every linear
    term is weighted by its decay (module docstring).
    """
    cq = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    bhk = b * HK + h // (H // HK)
    rc, rd, rv, rf = tl.arange(0, C), tl.arange(0, DP), tl.arange(0, DVP), tl.arange(0, FP)
    md, mv, mf = rd < D, rv < DV, rf < F
    i = cq * C + rc
    mi = i < T
    fqt = tl.load(fq + bh * T * F + i[:, None] * F + rf[None, :], mask=mi[:, None] & mf[None, :], other=0.0)
    c0 = tl.maximum(cq - NX, 0)
    sidx = c0
    if GATED:
        sidx = cq
    sb = st + (bhk * (NC + 1) + sidx) * (F * DV + F)
    S = tl.load(sb + rf[:, None] * DV + rv[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
    z = tl.load(sb + F * DV + rf, mask=mf, other=0.0)
    qs, gi = _state_decay(gl, bhk, i, mi, cq, T, C, GATED)
    acc_l = tile_dot(fqt, S, DT)  # (C, DVP)
    den_l = tl.sum(fqt.to(tl.float32) * z[None, :], 1)
    if GATED:
        acc_l = acc_l * qs[:, None]
        den_l = den_l * qs
    acc = tl.zeros([C, DVP], tl.float32)
    l = tl.zeros([C], tl.float32)
    k += bhk * T * D
    v += bhk * T * DV
    fk += bhk * T * F
    m = tl.full([C], -1e30, tl.float32)
    am = tl.zeros([C], tl.int32)
    g = 0.0
    if KIND != 0:
        g = tl.load(gp + h).to(tl.float32)
        qt = tl.load(q + bh * T * D + i[:, None] * D + rd[None, :], mask=mi[:, None] & md[None, :], other=0.0)
    for r in range(0, cq - c0 + 1):
        ck = cq - r
        j = ck * C + rc
        mj = j < T
        has_win, has_lin = _tile_parts(cq * C, cq * C + C - 1, ck * C, ck * C + C - 1, KIND, W)
        win, lin = _masks(i[:, None], j[None, :], T, KIND, W)
        vt = tl.load(v + j[:, None] * DV + rv[None, :], mask=mj[:, None] & mv[None, :], other=0.0)
        wt = tl.zeros([C, C], tl.float32)
        if KIND != 0:
            if has_win:
                kt = tl.load(k + j[:, None] * D + rd[None, :], mask=mj[:, None] & md[None, :], other=0.0)
                s = tl.where(win, tile_dot(qt, tl.trans(kt), DT) * scale, float("-inf"))
                tmax = tl.max(s, 1)
                am = tl.where(tmax > m, tl.argmax(s, 1).to(tl.int32) + ck * C, am)
                m_new = tl.maximum(m, tmax)
                alpha = tl.exp(m - m_new)
                acc = acc * alpha[:, None]
                l = l * alpha
                m = m_new
                wt = g * tl.exp(s - m[:, None])
        if has_lin:
            fkt = tl.load(fk + j[:, None] * F + rf[None, :], mask=mj[:, None] & mf[None, :], other=0.0)
            a = tile_dot(fqt, tl.trans(fkt), DT)
            if GATED:
                a = a * _pair_decay(ga, bhk, gi, j, mj, lin, T)
            a = tl.where(lin, a, 0.0)
            if ck == c0:
                wt += a
            else:
                acc_l += tile_dot(a, vt, DT)
                den_l += tl.sum(a, 1)
        acc += tile_dot(wt, vt, DT)
        l += tl.sum(wt, 1)
    den = l + den_l + eps
    out = (acc + acc_l) / den[:, None]
    tl.store(y + bh * T * DV + i[:, None] * DV + rv[None, :], out.to(y.dtype.element_ty), mask=mi[:, None] & mv[None, :])
    tl.store(den_out + bh * T + i, den, mask=mi)
    if KIND != 0:
        tl.store(m_out + bh * T + i, m, mask=mi)
        tl.store(am_out + bh * T + i, am, mask=mi)


@triton.jit
def _bwd_dq(q, k, v, fq, fk, gp, st, gl, ga, do, y, m_in, den_in, am_in, dq, dfq, dlt_out, csum_out, dgq,
            T, NC, NX, H, HK, scale,
            KIND: tl.constexpr, W: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
            DP: tl.constexpr, DVP: tl.constexpr, FP: tl.constexpr, C: tl.constexpr, DT: tl.constexpr,
            GATED: tl.constexpr):
    cq = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    bhk = b * HK + h // (H // HK)
    rc, rd, rv, rf = tl.arange(0, C), tl.arange(0, DP), tl.arange(0, DVP), tl.arange(0, FP)
    md, mv, mf = rd < D, rv < DV, rf < F
    i = cq * C + rc
    mi = i < T
    fqt = tl.load(fq + bh * T * F + i[:, None] * F + rf[None, :], mask=mi[:, None] & mf[None, :], other=0.0)
    dot_ = tl.load(do + bh * T * DV + i[:, None] * DV + rv[None, :], mask=mi[:, None] & mv[None, :], other=0.0)
    den = tl.load(den_in + bh * T + i, mask=mi, other=1.0)
    c0 = tl.maximum(cq - NX, 0)
    sidx = c0
    if GATED:
        sidx = cq
    sb = st + (bhk * (NC + 1) + sidx) * (F * DV + F)
    S = tl.load(sb + rf[:, None] * DV + rv[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
    z = tl.load(sb + F * DV + rf, mask=mf, other=0.0)
    qs, gi = _state_decay(gl, bhk, i, mi, cq, T, C, GATED)
    k += bhk * T * D
    v += bhk * T * DV
    fk += bhk * T * F
    dq_acc = tl.zeros([C, DP], tl.float32)
    csum = tl.zeros([C], tl.float32)
    g = 0.0
    if KIND == 0:
        yt = tl.load(y + bh * T * DV + i[:, None] * DV + rv[None, :], mask=mi[:, None] & mv[None, :], other=0.0)
        dlt = tl.sum(dot_.to(tl.float32) * yt.to(tl.float32), 1) / den  # δ̄
    else:
        g = tl.load(gp + h).to(tl.float32)
        qt = tl.load(q + bh * T * D + i[:, None] * D + rd[None, :], mask=mi[:, None] & md[None, :], other=0.0)
        m = tl.load(m_in + bh * T + i, mask=mi, other=0.0)
        # do.y from the unrounded output (the window factor's gradient cancels over rows, so the
        # rounding of a 16-bit y would show): y_i den_i = fq_i S + sum_j w_ij v_j, recomputed.
        ys = tile_dot(fqt, S, DT)
        if GATED:
            ys = ys * qs[:, None]
        ydo = tl.sum(ys * dot_.to(tl.float32), 1)
        for ck in range(c0, cq + 1):
            j = ck * C + rc
            mj = j < T
            has_win, has_lin = _tile_parts(cq * C, cq * C + C - 1, ck * C, ck * C + C - 1, KIND, W)
            vt = tl.load(v + j[:, None] * DV + rv[None, :], mask=mj[:, None] & mv[None, :], other=0.0)
            win, lin = _masks(i[:, None], j[None, :], T, KIND, W)
            wt = tl.zeros([C, C], tl.float32)
            if has_win:
                kt = tl.load(k + j[:, None] * D + rd[None, :], mask=mj[:, None] & md[None, :], other=0.0)
                s = tile_dot(qt, tl.trans(kt), DT) * scale
                wt = g * tl.exp(tl.where(win, s, float("-inf")) - m[:, None])
            if has_lin:
                fkt = tl.load(fk + j[:, None] * F + rf[None, :], mask=mj[:, None] & mf[None, :], other=0.0)
                a = tile_dot(fqt, tl.trans(fkt), DT)
                if GATED:
                    a = a * _pair_decay(ga, bhk, gi, j, mj, lin, T)
                wt += tl.where(lin, a, 0.0)
            ydo += tl.sum(wt * tile_dot(dot_, tl.trans(vt), DT), 1)
        dlt = ydo / den / den
    dob = dot_.to(tl.float32) / den[:, None]  # dō
    dfq_acc = tile_dot(dob, tl.trans(S), DT) - dlt[:, None] * z[None, :]
    if GATED:
        dfq_acc = dfq_acc * qs[:, None]
    for ck in range(c0, cq + 1):
        j = ck * C + rc
        mj = j < T
        has_win, has_lin = _tile_parts(cq * C, cq * C + C - 1, ck * C, ck * C + C - 1, KIND, W)
        vt = tl.load(v + j[:, None] * DV + rv[None, :], mask=mj[:, None] & mv[None, :], other=0.0)
        win, lin = _masks(i[:, None], j[None, :], T, KIND, W)
        dw = tile_dot(dot_, tl.trans(vt), DT) / den[:, None] - dlt[:, None]
        if has_lin:
            fkt = tl.load(fk + j[:, None] * F + rf[None, :], mask=mj[:, None] & mf[None, :], other=0.0)
            dwl = dw
            if GATED:
                dwl = dw * _pair_decay(ga, bhk, gi, j, mj, lin, T)
            dfq_acc += tile_dot(tl.where(lin, dwl, 0.0), fkt, DT)
        if KIND != 0:
            if has_win:
                kt = tl.load(k + j[:, None] * D + rd[None, :], mask=mj[:, None] & md[None, :], other=0.0)
                s = tile_dot(qt, tl.trans(kt), DT) * scale
                pdw = tl.exp(tl.where(win, s, float("-inf")) - m[:, None]) * dw
                csum += tl.sum(pdw, 1)
                dq_acc += tile_dot((g * pdw), kt, DT)
    tl.store(dfq + bh * T * F + i[:, None] * F + rf[None, :], dfq_acc.to(dfq.dtype.element_ty),
             mask=mi[:, None] & mf[None, :])
    tl.store(dlt_out + bh * T + i, dlt, mask=mi)
    if GATED:  # fq_i . dfq_i in float32, for the gate's gradient
        tl.store(dgq + bh * T + i, tl.sum(fqt.to(tl.float32) * dfq_acc, 1), mask=mi)
    if KIND != 0:
        am = tl.load(am_in + bh * T + i, mask=mi, other=0)
        kam = tl.load(k + am[:, None] * D + rd[None, :], mask=mi[:, None] & md[None, :], other=0.0)
        dq_acc = (dq_acc - (g * csum)[:, None] * kam.to(tl.float32)) * scale
        tl.store(dq + bh * T * D + i[:, None] * D + rd[None, :], dq_acc.to(dq.dtype.element_ty),
                 mask=mi[:, None] & md[None, :])
        tl.store(csum_out + bh * T + i, csum, mask=mi)


@triton.jit
def _bwd_dkv(q, k, v, fq, fk, gp, rst, gl, ga, kw, do, m_in, den_in, am_in, dlt_in, csum_in, dk, dv, dfk, dgk,
             T, NC, NX, H, HK, scale,
             KIND: tl.constexpr, W: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
             DP: tl.constexpr, DVP: tl.constexpr, FP: tl.constexpr, C: tl.constexpr, DT: tl.constexpr,
             GATED: tl.constexpr):
    ck = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b, hk = bhk // HK, bhk % HK
    G = H // HK
    rc, rd, rv, rf = tl.arange(0, C), tl.arange(0, DP), tl.arange(0, DVP), tl.arange(0, FP)
    md, mv, mf = rd < D, rv < DV, rf < F
    j = ck * C + rc
    mj = j < T
    vt = tl.load(v + bhk * T * DV + j[:, None] * DV + rv[None, :], mask=mj[:, None] & mv[None, :], other=0.0)
    fkt = tl.load(fk + bhk * T * F + j[:, None] * F + rf[None, :], mask=mj[:, None] & mf[None, :], other=0.0)
    r = tl.minimum(ck + NX + 1, NC)
    rb = rst + (bhk * (NC + 1) + r) * (F * DV + F)
    R = tl.load(rb + rf[:, None] * DV + rv[None, :], mask=mf[:, None] & mv[None, :], other=0.0)
    Rz = tl.load(rb + F * DV + rf, mask=mf, other=0.0)
    dfk_acc = tile_dot(vt, tl.trans(R), DT) - Rz[None, :]  # (C, FP)
    dv_acc = tile_dot(fkt, R, DT)  # (C, DVP)
    gaj = tl.zeros([C], tl.float32)
    if GATED:  # the keys' weights to the state they enter (R's reference); their arrival log gates
        kwj = tl.load(kw + bhk * T + j, mask=mj, other=0.0)
        dfk_acc = dfk_acc * kwj[:, None]
        dv_acc = dv_acc * kwj[:, None]
        gaj = tl.load(ga + bhk * T + j, mask=mj, other=0.0)
    dk_acc = tl.zeros([C, DP], tl.float32)
    if KIND != 0:
        kt = tl.load(k + bhk * T * D + j[:, None] * D + rd[None, :], mask=mj[:, None] & md[None, :], other=0.0)
    last = tl.minimum(ck + NX, NC - 1)
    for gg in range(G):
        h = hk * G + gg
        bh = b * H + h
        g = 0.0
        if KIND != 0:
            g = tl.load(gp + h).to(tl.float32)
        for cq in range(ck, last + 1):
            i = cq * C + rc
            mi = i < T
            has_win, has_lin = _tile_parts(cq * C, cq * C + C - 1, ck * C, ck * C + C - 1, KIND, W)
            dot_ = tl.load(do + bh * T * DV + i[:, None] * DV + rv[None, :], mask=mi[:, None] & mv[None, :], other=0.0)
            den = tl.load(den_in + bh * T + i, mask=mi, other=1.0)
            dlt = tl.load(dlt_in + bh * T + i, mask=mi, other=0.0)
            win, lin = _masks(i[None, :], j[:, None], T, KIND, W)  # (keys, queries)
            dw = tile_dot(vt, tl.trans(dot_), DT) / den[None, :] - dlt[None, :]
            wt = tl.zeros([C, C], tl.float32)
            if has_lin:
                fqt = tl.load(fq + bh * T * F + i[:, None] * F + rf[None, :], mask=mi[:, None] & mf[None, :],
                              other=0.0)
                a = tile_dot(fkt, tl.trans(fqt), DT)
                dwl = dw
                if GATED:
                    gi = tl.load(gl + bhk * T + i, mask=mi, other=0.0)
                    rho = tl.exp(tl.where(lin, gi[None, :] - gaj[:, None], float("-inf")))
                    a = a * rho
                    dwl = dw * rho
                wt = tl.where(lin, a, 0.0)
                dfk_acc += tile_dot(tl.where(lin, dwl, 0.0), fqt, DT)
            if KIND != 0:
                if has_win:
                    qt = tl.load(q + bh * T * D + i[:, None] * D + rd[None, :], mask=mi[:, None] & md[None, :],
                                 other=0.0)
                    m = tl.load(m_in + bh * T + i, mask=mi, other=0.0)
                    am = tl.load(am_in + bh * T + i, mask=mi, other=-1)
                    cs = tl.load(csum_in + bh * T + i, mask=mi, other=0.0)
                    s = tile_dot(kt, tl.trans(qt), DT) * scale
                    p = g * tl.exp(tl.where(win, s, float("-inf")) - m[None, :])
                    wt += p
                    ds = p * dw - tl.where(am[None, :] == j[:, None], g * cs[None, :], 0.0)
                    dk_acc += tile_dot(ds, qt, DT)
            dob = dot_.to(tl.float32) / den[:, None]
            dv_acc += tile_dot(wt, dob, DT)
    tl.store(dv + bhk * T * DV + j[:, None] * DV + rv[None, :], dv_acc.to(dv.dtype.element_ty),
             mask=mj[:, None] & mv[None, :])
    tl.store(dfk + bhk * T * F + j[:, None] * F + rf[None, :], dfk_acc.to(dfk.dtype.element_ty),
             mask=mj[:, None] & mf[None, :])
    if GATED:  # fk_j . dfk_j in float32, for the gate's gradient
        tl.store(dgk + bhk * T + j, tl.sum(fkt.to(tl.float32) * dfk_acc, 1), mask=mj)
    if KIND != 0:
        tl.store(dk + bhk * T * D + j[:, None] * D + rd[None, :], (dk_acc * scale).to(dk.dtype.element_ty),
                 mask=mj[:, None] & md[None, :])


# ----------------------------------------------------------------------------- host side


def dot_dtype(*tensors: torch.Tensor):
    """Operand dtype of every tl.dot: float32 if all inputs are, else the 16-bit input type.

    The Triton interpreter multiplies bfloat16 tiles wrongly (triton 3.9), so under
    TRITON_INTERPRET=1 products are taken in float32 (inputs and outputs keep their dtypes).
    """
    dts = {t.dtype for t in tensors if t is not None}
    if dts <= {torch.float32} or os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return tl.float16 if torch.float16 in dts and torch.bfloat16 not in dts else tl.bfloat16


def unit_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` if its last dimension is contiguous (the kernels take the other strides), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """torch.empty, NaN-filled when LOLCATS_KERNEL_DEBUG=1 so an unwritten element shows in tests."""
    out = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    if os.environ.get("LOLCATS_KERNEL_DEBUG") == "1" and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def _bv(dv: int) -> int:
    return min(64, pad_dim(dv))


# Launch settings per kernel, (num_warps, num_stages), for head dims max(D, Dv) <= 64 and > 64
# (measured on an H200 at SmolLM2 / Llama-3-8B shapes, F = 128: benchmarks/kernel_profile.py).
# num_stages = 1 for the backward kernels at 128: their loops hold five 64 x 128 tiles, and
# pipelining them needs more than the 227 KB of shared memory of an H100 / H200.
LAUNCH = {
    "fwd": {64: (4, 1), 128: (4, 1)},
    "bwd_dq": {64: (4, 1), 128: (4, 1)},
    "bwd_dkv": {64: (4, 1), 128: (8, 1)},
    "sums": {64: (4, 2), 128: (4, 2)},
}


def _launch(name: str, *dims: int) -> dict:
    warps, stages = LAUNCH[name][64 if max(dims) <= 64 else 128]
    return dict(num_warps=warps, num_stages=stages)


def _states(a, b, init, C, dt, reverse=False, den=None, dlt=None, heads=None, gate=None, shift=0):
    """Chunk states (B, Hk, NC+1, F*Dv + F) float32: [..., :F*Dv] is the (F, Dv) state, [..., F*Dv:] the F sums.

    Forward (a = fk, b = v, init = (kv0, ks0) or None): prefix states, entry c = state before chunk c.
    Reverse (a = fq, b = do, heads = Hk, init = (dkv, -dks) or None): suffix states, entry c = init
    + the sums of chunks >= c. Chunk sums are computed in parallel, then scanned over chunks.
    With ``gate`` (:class:`GateTerms`): rows weighted (forward: keys to the state they enter,
    reverse: queries to their chunk's start) and chunk decays in the scan; forward entry c is
    the state of query chunk c (key chunk c - 1 - shift enters it).
    """
    B, T, F, Dv = a.shape[0], a.shape[2], a.shape[-1], b.shape[-1]
    Hk = heads if reverse else a.shape[1]
    NC, E = triton.cdiv(T, C), F * Dv + F
    loc = torch.empty((B, Hk, NC, E), dtype=torch.float32, device=a.device)
    BV = _bv(Dv)
    wrow = a if gate is None else (gate.qw if reverse else gate.kw)
    _chunk_sums[(NC, B * Hk, triton.cdiv(Dv, BV))](
        a, b, den if reverse else a, dlt if reverse else a, wrow, loc, T, NC, a.shape[1], Hk, BWD=reverse,
        GATED=gate is not None, F=F, DV=Dv, FP=pad_dim(F), BV=BV, C=C, DT=dt, **_launch("sums", Dv))
    out = _empty((B, Hk, NC + 1, E), a, torch.float32)
    has = init is not None
    ini = torch.cat([init[0].float().reshape(B, Hk, F * Dv), init[1].float().reshape(B, Hk, F)], -1) if has else loc
    BE = 256
    _scan[(B * Hk, triton.cdiv(E, BE))](loc, ini, loc if gate is None else gate.dec, out, NC, E, shift, HAS_INIT=has,
                                         REVERSE=reverse, GATED=gate is not None, CB=8, BE=BE, num_warps=4)
    return out


@dataclass
class GateTerms:
    """What the kernels need of a log forget gate (B, Hk, T), all float32 (ops/gate.py for the function).

    G: cumulative log gate (inclusive); GA: G at each key's arrival in the linear part (0 if it
    arrives after the sequence, ``arrived`` False); kw: key j's weight exp(G_r - GA_j) to the
    state it enters (r = the start of query chunk j // C + NX + 1, or T - 1), 0 if it does not;
    qw: exp(G_i - G_{start of i's chunk}); dec: (B, Hk, NC) chunk decays exp(G_{next start or T-1}
    - G_start); e0 = exp(G_0): the initial state's decay to query chunk 0.
    """

    G: torch.Tensor
    GA: torch.Tensor
    kw: torch.Tensor
    qw: torch.Tensor
    dec: torch.Tensor
    e0: torch.Tensor
    arrival: torch.Tensor  # (T,) int64, clamped to T - 1
    arrived: torch.Tensor  # (T,) bool


def gate_terms(log_gate: torch.Tensor, kind: int, window: int, C: int, NX: int) -> GateTerms:
    T = log_gate.shape[-1]
    G = log_gate.float().cumsum(-1).contiguous()  # (B, Hk, T)
    j = torch.arange(T, device=G.device)
    a = arrival_positions(j, kind, window)
    arrived = a < T
    a = a.clamp(max=T - 1)
    GA = torch.where(arrived, G[..., a], 0.0).contiguous()
    ref = ((j // C + NX + 1) * C).clamp(max=T - 1)
    kw = torch.exp(torch.where(arrived & (a <= ref), G[..., ref] - GA, float("-inf"))).contiguous()
    starts = torch.arange(0, T, C, device=G.device)
    qw = torch.exp(G - G[..., (j // C) * C]).contiguous()
    dec = torch.exp(G[..., (starts + C).clamp(max=T - 1)] - G[..., starts]).contiguous()
    return GateTerms(G, GA, kw, qw, dec, torch.exp(G[..., 0]), a, arrived)


def gate_gradient(gt: GateTerms, dgq: torch.Tensor, dgk: torch.Tensor, final=None) -> torch.Tensor:
    """d log_gate (B, Hk, T) from dgq = fq . dfq (B, H, T) and dgk = fk . dfk (B, Hk, T), per row: fq_i
    appears only times exp(G_i) and fk_j only times exp(-GA_j), so dL/dG_i = fq_i . dfq_i (over the
    group) - sum_{j arriving at i} fk_j . dfk_j; ``final`` = (kv, ks, dkv, dks) of an output final
    state adds its own term at T - 1."""
    B, H, T = dgq.shape
    Hk = dgk.shape[1]
    dG = dgq.view(B, Hk, H // Hk, T).sum(2)
    dk = dgk * gt.arrived  # (B, Hk, T)
    dG = dG.scatter_add(-1, gt.arrival.expand(B, Hk, T), -dk)
    if final is not None:
        kv, ks, dkv, dks = final
        dG[..., -1] += (kv * dkv.float()).sum((-2, -1)) + (ks * dks.float()).sum(-1)
    return dG.flip(-1).cumsum(-1).flip(-1)  # G_t sums the log gates up to t


def _split(st: torch.Tensor, c: int, F: int, Dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry c of a (B, Hk, NC+1, F*Dv + F) state buffer: (B, Hk, F, Dv), (B, Hk, F) copies."""
    x = st[:, :, c]
    return x[..., : F * Dv].reshape(*x.shape[:2], F, Dv).clone(), x[..., F * Dv :].clone()


class ChunkedAttention(torch.autograd.Function):
    """y, final kv, final ksum = f(q, k, v, fq, fk, g, kv0, ks0, log_gate); see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, fq, fk, g, s0, z0, lg, kind: int, window: int, scale: float, eps: float, chunk: int):
        B, H, T, F = fq.shape
        Hk, Dv = v.shape[1], v.shape[-1]
        D = q.shape[-1] if q is not None else 16
        C = chunk
        NC = triton.cdiv(T, C)
        NX = explicit_chunks(kind, window, C, NC)
        dt = dot_dtype(q, k, v, fq, fk)
        fq, fk, v = fq.contiguous(), fk.contiguous(), v.contiguous()
        q = q.contiguous() if q is not None else fq
        k = k.contiguous() if k is not None else fk
        gg = g.contiguous() if g is not None else fq
        init = None
        if s0 is not None or z0 is not None:
            init = (s0 if s0 is not None else fk.new_zeros(B, Hk, F, Dv, dtype=torch.float32),
                    z0 if z0 is not None else fk.new_zeros(B, Hk, F, dtype=torch.float32))
        gt = gate_terms(lg, kind, window, C, NX) if lg is not None else None
        if gt is not None and init is not None:  # the initial state decays to query chunk 0's start
            init = (init[0].float() * gt.e0[..., None, None], init[1].float() * gt.e0[..., None])
        st = _states(fk, v, init, C, dt, gate=gt, shift=NX)
        y = _empty((B, H, T, Dv), v)
        m = _empty((B, H, T), v, torch.float32)
        den = _empty((B, H, T), v, torch.float32)
        am = torch.empty((B, H, T), dtype=torch.int32, device=v.device)
        dims = dict(KIND=kind, W=max(window, 1), D=D, DV=Dv, F=F, DP=pad_dim(D), DVP=pad_dim(Dv), FP=pad_dim(F), C=C,
                    DT=dt, GATED=gt is not None)
        gl, ga = (gt.G, gt.GA) if gt is not None else (fq, fq)
        _fwd[(NC, B * H)](q, k, v, fq, fk, gg, st, gl, ga, y, m, den, am, T, NC, NX, H, Hk, scale, eps,
                          **dims, **_launch("fwd", D, Dv))
        ctx.save_for_backward(q, k, v, fq, fk, gg, st, y, m, den, am, lg)
        ctx.cfg = (kind, window, NX, scale, dims, g is not None, s0 is not None, z0 is not None)
        kvf, ksf = _split(st, NC, F, Dv)
        return y, kvf, ksf

    @staticmethod
    def backward(ctx, dy, dkvf, dksf):
        q, k, v, fq, fk, gg, st, y, m, den, am, lg = ctx.saved_tensors
        kind, window, NX, scale, dims, has_g, has_s0, has_z0 = ctx.cfg
        B, H, T, F = fq.shape
        Hk, Dv = v.shape[1], v.shape[-1]
        C = dims["C"]
        NC = triton.cdiv(T, C)
        dy = dy.contiguous()
        gt = gate_terms(lg, kind, window, C, NX) if lg is not None else None
        gl, ga, kw = (gt.G, gt.GA, gt.kw) if gt is not None else (fq, fq, fq)
        dq = _empty(q.shape, q) if kind else None
        dfq = _empty(fq.shape, fq)
        dlt = _empty((B, H, T), v, torch.float32)
        csum = _empty((B, H, T), v, torch.float32) if kind else dlt
        dgq = _empty((B, H, T), v, torch.float32) if gt is not None else dlt
        _bwd_dq[(NC, B * H)](q, k, v, fq, fk, gg, st, gl, ga, dy, y, m, den, am, dq if kind else dfq, dfq, dlt, csum,
                             dgq, T, NC, NX, H, Hk, scale, **dims, **_launch("bwd_dq", dims["D"], Dv))
        init = None
        if dkvf is not None or dksf is not None:
            init = (dkvf if dkvf is not None else st.new_zeros(B, Hk, F, Dv),
                    -dksf if dksf is not None else st.new_zeros(B, Hk, F))
        rst = _states(fq, dy, init, C, dims["DT"], reverse=True, den=den, dlt=dlt, heads=Hk, gate=gt)
        dk = _empty(k.shape, k) if kind else None
        dv, dfk = _empty(v.shape, v), _empty(fk.shape, fk)
        dgk = _empty((B, Hk, T), v, torch.float32) if gt is not None else dlt
        _bwd_dkv[(NC, B * Hk)](q, k, v, fq, fk, gg, rst, gl, ga, kw, dy, m, den, am, dlt, csum,
                               dk if kind else dfk, dv, dfk, dgk, T, NC, NX, H, Hk, scale, **dims,
                               **_launch("bwd_dkv", dims["D"], Dv))
        dg = csum.sum((0, 2)).to(gg.dtype) if has_g else None
        ds0, mdz0 = _split(rst, 0, F, Dv) if (has_s0 or has_z0) else (None, None)
        dlg = None
        if gt is not None and ctx.needs_input_grad[8]:
            final = (*_split(st, NC, F, Dv), dkvf, dksf) if dkvf is not None and dksf is not None else None
            dlg = gate_gradient(gt, dgq, dgk, final).to(lg.dtype)
        if gt is not None and ds0 is not None:  # the initial state entered scaled by exp(G_0)
            ds0, mdz0 = ds0 * gt.e0[..., None, None], mdz0 * gt.e0[..., None]
        return (dq, dk, dv, dfq, dfk, dg, ds0 if has_s0 else None, -mdz0 if has_z0 else None,
                dlg, None, None, None, None, None)
