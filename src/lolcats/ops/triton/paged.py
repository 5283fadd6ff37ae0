"""One decode step of softmax attention over a key/value store, paged or contiguous, read in place.

Same functions as ``ops/paged/naive.py``'s ``paged_decode_naive`` and ``kv_decode_naive`` (read it for the
layouts). Split-K ("flash decoding"): program (row b, KV head, split s) takes pages s * PPS .. (s + 1) * PPS - 1
of row b that hold positions up to the query's (a contiguous store: blocks of PAGE slots in place of pages, no
table; one kernel, ``TABLE`` tells which, the store's strides passed in), the G query heads of its group as the
rows of its tiles (padded to 16 for ``tl.dot``), and keeps a running max, normaliser and (G, Dv) sum; a second
launch (one program per row and KV head) merges the splits, their maxima and sums as one tile. A split reads at
least ``SPLIT_MIN`` positions where the store has them: at batch 1 an 8K store in 2-page splits left the merge
67 splits to read per program (32 us of a 1.7 ms step, one H200). The number of splits is fixed by the shapes
(rows, KV heads, the length read), so a step is captured in a CUDA graph once per length bucket; nothing is read
on the host."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lolcats.ops.triton.chunked import dot_dtype, pad_dim, tile_dot, unit_last

KV_BLOCK = 64  # a contiguous store's slots per block (its "page")
SPLIT_MIN = 256  # positions a split reads at least (where the store has them)
NEG = tl.constexpr(-1.0e30)  # the running max before any key: finite, so a split without keys merges with weight 0


@triton.jit
def _paged_split(q, kp, vp, table, pos, acc_out, m_out, l_out, scale, table_stride, k_sb, k_st, k_sh, v_sb, v_st,
                 v_sh, L, TABLE: tl.constexpr, H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                 D: tl.constexpr, DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, PAGE: tl.constexpr, M: tl.constexpr,
                 PPS: tl.constexpr, NS: tl.constexpr, DT: tl.constexpr):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    s = tl.program_id(2)
    p = tl.load(pos + b)
    rg = tl.arange(0, GP)
    mg = rg < G
    rd = tl.arange(0, DP)
    md = rd < D
    rv = tl.arange(0, DVP)
    mv = rv < DV
    rt = tl.arange(0, PAGE)
    qt = tl.load(q + (b * H + hk * G + rg[:, None]) * D + rd[None, :], mask=mg[:, None] & md[None, :], other=0.0)
    m = tl.full([GP], NEG, tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DVP], tl.float32)
    kb, vb = kp + hk * k_sh, vp + hk * v_sh  # this KV head's keys and values (in the pool, or in row b's store)
    if not TABLE:
        kb, vb = kb + b.to(tl.int64) * k_sb, vb + b.to(tl.int64) * v_sb
    for jj in range(PPS):
        j = s * PPS + jj
        if (j < M) & (j * PAGE <= p):
            t = j * PAGE + rt  # (PAGE,) positions
            inside = t < L
            if TABLE:
                rows = tl.load(table + b * table_stride + j).to(tl.int64) * PAGE + rt  # (PAGE,) pool rows
            else:
                rows = t.to(tl.int64)
            kt = tl.load(kb + rows[:, None] * k_st + rd[None, :], mask=inside[:, None] & md[None, :], other=0.0)
            sc = tile_dot(qt, tl.trans(kt), DT) * scale  # (GP, PAGE)
            sc = tl.where((inside & (t <= p))[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            alpha = tl.exp(m - m_new)
            pr = tl.exp(sc - m_new[:, None])
            l = l * alpha + tl.sum(pr, 1)
            vt = tl.load(vb + rows[:, None] * v_st + rv[None, :], mask=inside[:, None] & mv[None, :], other=0.0)
            acc = acc * alpha[:, None] + tile_dot(pr, vt, DT)
            m = m_new
    base = (b * HK + hk) * NS + s
    tl.store(m_out + base * GP + rg, m)
    tl.store(l_out + base * GP + rg, l)
    tl.store(acc_out + (base * G + rg[:, None]) * DVP + rv[None, :], acc, mask=mg[:, None])  # the G real rows


@triton.jit
def _paged_merge(acc_in, m_in, l_in, y, H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                 DV: tl.constexpr, DVP: tl.constexpr, NS: tl.constexpr, NSP: tl.constexpr):
    """One program per (row, KV head): the NS splits' (max, sum, numerator) in one softmax."""
    b = tl.program_id(0)
    hk = tl.program_id(1)
    rg = tl.arange(0, GP)
    mg = rg < G
    rv = tl.arange(0, DVP)
    rs = tl.arange(0, NSP)
    base = (b * HK + hk) * NS
    at = (base + rs[:, None]) * GP + rg[None, :]  # (NSP, GP)
    ms = rs[:, None] < NS
    m = tl.load(m_in + at, mask=ms, other=NEG)
    mx = tl.max(m, 0)  # (GP,)
    w = tl.where(ms, tl.exp(m - mx[None, :]), 0.0)  # (NSP, GP): each split's weight
    den = tl.sum(w * tl.load(l_in + at, mask=ms, other=0.0), 0)
    out = tl.zeros([GP, DVP], tl.float32)
    for i in range(NS):
        wi = tl.sum(tl.where(rs[:, None] == i, w, 0.0), 0)  # (GP,) split i's row of w
        out += wi[:, None] * tl.load(acc_in + ((base + i) * G + rg[:, None]) * DVP + rv[None, :], mask=mg[:, None],
                                     other=0.0)
    out = out / den[:, None]
    keep = mg[:, None] & (rv < DV)[None, :]
    tl.store(y + (b * H + hk * G + rg[:, None]) * DV + rv[None, :], out.to(y.dtype.element_ty), mask=keep)


@functools.lru_cache(maxsize=8)
def _programs(device: torch.device) -> int:
    """Programs that fill the device about twice (4 off CUDA: the interpreter)."""
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def splits(rows: int, pages: int, device: torch.device, min_pages: int = 1) -> tuple[int, int]:
    """(splits, pages per split) for ``rows`` (rows x KV heads) reading ``pages`` pages each, at least ``min_pages``
    a split where there are that many (fewer, longer splits: less for the merge to read)."""
    ns = max(1, min(pages // max(1, min_pages), -(-_programs(device) // rows)))
    pps = -(-pages // ns)
    return -(-pages // pps), pps


def _decode(q, k, v, table, pos, page: int, length: int, scale: float, strides) -> torch.Tensor:
    """Both launches over a store of ``length`` positions read in blocks of ``page`` (table None: contiguous);
    ``strides``: the keys' and values' (row, position, head) element strides. q (B, H, 1, D) -> (B, H, 1, Dv)."""
    B, H, _, D = q.shape
    Hk, Dv = k.shape[1], v.shape[-1]  # a pool (R, Hk, D) or a store (B, Hk, N, D)
    G, M = H // Hk, -(-length // page)
    GP, DVP = pad_dim(G), pad_dim(Dv)
    ns, pps = splits(B * Hk, M, q.device, SPLIT_MIN // page)
    qc, pos = q.reshape(B, H, D).contiguous(), pos.contiguous()
    tbl = pos if table is None else table.contiguous()  # (unread without a table)
    acc = torch.empty(B, Hk, ns, G, DVP, device=q.device, dtype=torch.float32)
    m = torch.empty(B, Hk, ns, GP, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    _paged_split[(B, Hk, ns)](qc, k, v, tbl, pos, acc, m, l, scale, tbl.stride(0), *strides, length,
                              TABLE=table is not None, H=H, HK=Hk, G=G, GP=GP, D=D, DP=pad_dim(D), DV=Dv, DVP=DVP,
                              PAGE=page, M=M, PPS=pps, NS=ns, DT=dot_dtype(q, k))
    y = torch.empty(B, H, Dv, device=q.device, dtype=q.dtype)
    _paged_merge[(B, Hk)](acc, m, l, y, H=H, HK=Hk, G=G, GP=GP, DV=Dv, DVP=DVP, NS=ns, NSP=triton.next_power_of_2(ns))
    return y[:, :, None]


def paged_decode_triton(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                        pos: torch.Tensor, page: int, length: int, scale: float) -> torch.Tensor:
    """:func:`~lolcats.ops.paged.naive.paged_decode_naive`, the pages read in place. q (B, H, 1, D), pools
    (R, Hk, D | Dv) contiguous -> (B, H, 1, Dv)."""
    k_pool, v_pool = k_pool.contiguous(), v_pool.contiguous()
    strides = (0, k_pool.stride(0), k_pool.stride(1), 0, v_pool.stride(0), v_pool.stride(1))
    return _decode(q, k_pool, v_pool, table, pos, page, length, scale, strides)


def kv_decode_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """:func:`~lolcats.ops.paged.naive.kv_decode_naive`, the store read in place (any strides with a unit last
    one, e.g. a view of a larger store's rows and first slots). q (B, H, 1, D), k / v (B, Hk, N, D | Dv)
    -> (B, H, 1, Dv)."""
    k, v = unit_last(k), unit_last(v)
    strides = (k.stride(0), k.stride(2), k.stride(1), v.stride(0), v.stride(2), v.stride(1))
    return _decode(q, k, v, None, pos, KV_BLOCK, k.shape[2], scale, strides)
