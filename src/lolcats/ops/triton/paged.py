"""One decode step of softmax attention over a paged key/value store, reading the pages in place.

Same function as ``ops/paged/naive.py::paged_decode_naive`` (read it for the layout). Split-K ("flash
decoding"): program (row b, KV head, split s) takes pages s * PPS .. (s + 1) * PPS - 1 of row b that hold
positions up to the query's, the G query heads of its group as the rows of its tiles (padded to 16 for
``tl.dot``), and keeps a running max, normaliser and (G, Dv) sum; a second launch (one program per row and KV
head) merges the splits. The number of splits is fixed by the shapes (rows, KV heads, the length read), so a
step is captured in a CUDA graph once per length bucket; nothing is read on the host.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lolcats.ops.triton.chunked import dot_dtype, pad_dim, tile_dot

NEG = tl.constexpr(-1.0e30)  # the running max before any key: finite, so a split without keys merges with weight 0


@triton.jit
def _paged_split(q, kp, vp, table, pos, acc_out, m_out, l_out, scale, table_stride,
                 H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                 DP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, PAGE: tl.constexpr, M: tl.constexpr,
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
    for jj in range(PPS):
        j = s * PPS + jj
        if (j < M) & (j * PAGE <= p):
            pg = tl.load(table + b * table_stride + j)
            rows = pg * PAGE + rt  # (PAGE,) pool rows
            kt = tl.load(kp + (rows[:, None] * HK + hk) * D + rd[None, :], mask=md[None, :], other=0.0)
            sc = tile_dot(qt, tl.trans(kt), DT) * scale  # (GP, PAGE)
            sc = tl.where((j * PAGE + rt)[None, :] <= p, sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            alpha = tl.exp(m - m_new)
            pr = tl.exp(sc - m_new[:, None])
            l = l * alpha + tl.sum(pr, 1)
            vt = tl.load(vp + (rows[:, None] * HK + hk) * DV + rv[None, :], mask=mv[None, :], other=0.0)
            acc = acc * alpha[:, None] + tile_dot(pr, vt, DT)
            m = m_new
    base = (b * HK + hk) * NS + s
    tl.store(m_out + base * GP + rg, m)
    tl.store(l_out + base * GP + rg, l)
    tl.store(acc_out + (base * GP + rg[:, None]) * DVP + rv[None, :], acc)


@triton.jit
def _paged_merge(acc_in, m_in, l_in, y, H: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                 DV: tl.constexpr, DVP: tl.constexpr, NS: tl.constexpr):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    rg = tl.arange(0, GP)
    rv = tl.arange(0, DVP)
    base = (b * HK + hk) * NS
    mx = tl.full([GP], NEG, tl.float32)
    for s in range(NS):
        mx = tl.maximum(mx, tl.load(m_in + (base + s) * GP + rg))
    out = tl.zeros([GP, DVP], tl.float32)
    den = tl.zeros([GP], tl.float32)
    for s in range(NS):
        w = tl.exp(tl.load(m_in + (base + s) * GP + rg) - mx)
        den += w * tl.load(l_in + (base + s) * GP + rg)
        out += w[:, None] * tl.load(acc_in + ((base + s) * GP + rg[:, None]) * DVP + rv[None, :])
    out = out / den[:, None]
    keep = (rg < G)[:, None] & (rv < DV)[None, :]
    tl.store(y + (b * H + hk * G + rg[:, None]) * DV + rv[None, :], out.to(y.dtype.element_ty), mask=keep)


@functools.lru_cache(maxsize=8)
def _programs(device: torch.device) -> int:
    """Programs that fill the device about twice (4 off CUDA: the interpreter)."""
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def splits(rows: int, pages: int, device: torch.device) -> tuple[int, int]:
    """(splits, pages per split) for ``rows`` (rows x KV heads) reading ``pages`` pages each."""
    ns = max(1, min(pages, -(-_programs(device) // rows)))
    pps = -(-pages // ns)
    return -(-pages // pps), pps


def paged_decode_triton(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                        pos: torch.Tensor, page: int, length: int, scale: float) -> torch.Tensor:
    """:func:`~lolcats.ops.paged.naive.paged_decode_naive`, the pages read in place. q (B, H, 1, D)
    -> (B, H, 1, Dv)."""
    B, H, _, D = q.shape
    Hk, Dv = k_pool.shape[1], v_pool.shape[2]
    G, M = H // Hk, -(-length // page)
    GP, DVP = pad_dim(G), pad_dim(Dv)
    ns, pps = splits(B * Hk, M, q.device)
    qc, table, pos = q.reshape(B, H, D).contiguous(), table.contiguous(), pos.contiguous()
    acc = torch.empty(B, Hk, ns, GP, DVP, device=q.device, dtype=torch.float32)
    m = torch.empty(B, Hk, ns, GP, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    DT = dot_dtype(q, k_pool)
    _paged_split[(B, Hk, ns)](qc, k_pool, v_pool, table, pos, acc, m, l, scale, table.stride(0), H=H, HK=Hk, G=G,
                              GP=GP, D=D, DP=pad_dim(D), DV=Dv, DVP=DVP, PAGE=page, M=M, PPS=pps, NS=ns, DT=DT)
    y = torch.empty(B, H, Dv, device=q.device, dtype=q.dtype)
    _paged_merge[(B, Hk)](acc, m, l, y, H=H, HK=Hk, G=G, GP=GP, DV=Dv, DVP=DVP, NS=ns)
    return y[:, :, None]
