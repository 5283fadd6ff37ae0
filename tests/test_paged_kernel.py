"""The decode attention kernel over a paged or contiguous store (``ops/triton/paged.py``) against its references
(``ops/paged/naive.py``), and the references against masked attention over a contiguous store: rows at different
positions (inside the first page, on a page boundary, at the last position read), pages scattered over the pool,
a contiguous store as a strided view, grouped query heads, one split or several, and a model's kept layers
decoding through it. Without CUDA the kernel runs in the Triton interpreter at tiny shapes."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

import lolcats.ops.triton.paged as paged_mod  # noqa: E402
from lolcats.ops import BACKENDS, get_backend  # noqa: E402

if not CUDA and not type(paged_mod._paged_split).__name__.startswith("Interpreted"):
    paged_mod = importlib.reload(paged_mod)

DEV = "cuda" if CUDA else "cpu"


def paged_store(B, Hk, D, page, pages, length, seed, dtype):
    """Random keys and values of B rows of ``length`` positions, as contiguous (B, Hk, L, D) tensors and as a pool
    of ``pages`` pages whose rows' pages are a random permutation (page 0, scratch, holds noise)."""
    g = torch.Generator().manual_seed(seed)
    M = -(-length // page)
    k = torch.randn(B, Hk, M * page, D, generator=g)
    v = torch.randn(B, Hk, M * page, D, generator=g)
    order = torch.randperm(pages - 1, generator=g)[:B * M] + 1
    table = order.view(B, M)
    kp = torch.randn(pages * page, Hk, D, generator=g)
    vp = torch.randn(pages * page, Hk, D, generator=g)
    rows = (table[:, :, None] * page + torch.arange(page)).reshape(B, M * page)  # (B, M * page)
    kp[rows] = k.transpose(1, 2)
    vp[rows] = v.transpose(1, 2)
    to = lambda x: x.to(DEV, dtype)  # noqa: E731
    return to(k[:, :, :length]), to(v[:, :, :length]), to(kp), to(vp), table.to(DEV)


def many_splits(monkeypatch, split_min: int) -> None:
    """As many splits as pages: programs for 64 (not the interpreter's 4), ``split_min`` positions a split."""
    monkeypatch.setattr(paged_mod, "SPLIT_MIN", split_min)
    monkeypatch.setattr(paged_mod, "_programs", lambda device: 64)


@pytest.mark.parametrize("B,H,Hk,D,page,length,dtype", [
    (3, 6, 2, 16, 16, 50, torch.float32),  # 4 pages read, G 3 (SmolLM2's grouping)
    (2, 4, 1, 32, 16, 64, torch.float32),  # one KV head: the splits cover 4 pages
    (2, 4, 2, 16, 16, 40, torch.bfloat16),
])
@pytest.mark.parametrize("split_min", [1, None])  # 1: a split a page (the merge of many); None: the defaults
def test_paged_decode_kernel_equals_the_reference(B, H, Hk, D, page, length, dtype, split_min, monkeypatch):
    if split_min:
        many_splits(monkeypatch, split_min)
    k, v, kp, vp, table = paged_store(B, Hk, D, page, 4 * B + 3, length, seed=B + H, dtype=dtype)
    q = torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(7)).to(DEV, dtype)
    pos = torch.tensor([5, page, length - 1][:B], device=DEV)  # first page, a page's first slot, the last read
    scale = D ** -0.5
    ref = BACKENDS["torch"].paged_decode(q, kp, vp, table, pos, page, length, scale)
    # the reference is attention over the contiguous store, each row masked to its positions
    mask = (torch.arange(length, device=DEV)[None, :] <= pos[:, None])[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref, want, **tol)
    got = paged_mod.paged_decode_triton(q, kp, vp, table, pos, page, length, scale)
    assert got.shape == (B, H, 1, D) and got.dtype == dtype
    torch.testing.assert_close(got, ref, **tol)


def test_the_split_count_depends_on_the_shapes_only():
    """Splits cover every page once, and more rows take fewer splits (a graph per length bucket, no host read)."""
    for rows in (1, 2, 3, 64):
        for pages in (1, 2, 7, 128):
            for least in (1, 4):
                ns, pps = paged_mod.splits(rows, pages, torch.device(DEV), least)
                assert 1 <= ns <= pages and (ns - 1) * pps < pages <= ns * pps
                assert pps >= min(least, pages)  # at least ``least`` pages a split where there are that many


@pytest.mark.skipif(not CUDA, reason="the auto backend picks the kernel on CUDA only")
def test_auto_backend_reads_the_pages_with_the_kernel():
    assert get_backend("auto", torch.zeros(1, device="cuda")).paged_decode is paged_mod.paged_decode_triton


@torch.no_grad()
def test_served_decode_through_the_kernel_equals_the_reference_backend():
    """The teacher engine with paged stores (--kv-tokens): greedy requests decoded with the kernel (backend triton)
    pick the tokens the reference backend picks."""
    import dataclasses
    import queue

    from lolcats.attention.layers import lolcats_modules
    from lolcats.generation.sampling import Sampling
    from lolcats.generation.text import eos_ids
    from lolcats.serving.engine import KVEngine
    from lolcats.serving.scheduler import Request, Scheduler
    from test_generation import char_tokenizer
    from test_serving import PROMPTS, collect, tiny

    tok = char_tokenizer()
    model = tiny(tok, "teacher").to(DEV)  # (the triton backend runs where the kernels do: CUDA, or the interpreter)
    texts = []
    for backend in ("torch", "triton"):
        for m in lolcats_modules(model):
            m.cfg = dataclasses.replace(m.cfg, backend=backend)
        sched = Scheduler(KVEngine(model, 2, 96, use_cuda_graph=False, kv_tokens=192), eos_ids(model, tok),
                          prefill_chunk=16)
        reqs = [Request(tok(p)["input_ids"], 6, Sampling(), tok, sink=queue.Queue()) for p in PROMPTS[:3]]
        sched.start()
        try:
            for r in reqs:
                sched.submit(r)
            texts.append([collect(r)[0] for r in reqs])
        finally:
            sched.stop()
    assert texts[0] == texts[1]


@pytest.mark.parametrize("B,H,Hk,D,N,rows,dtype", [
    (3, 6, 2, 16, 150, 3, torch.float32),  # 3 blocks of 64 slots, the last partial; G 3
    (2, 4, 1, 32, 64, 3, torch.float32),  # one block; a view of 2 of 3 rows
    (2, 4, 2, 16, 100, 2, torch.bfloat16),
])
@pytest.mark.parametrize("split_min", [1, None])
def test_kv_decode_kernel_reads_a_contiguous_store_in_place(B, H, Hk, D, N, rows, dtype, split_min, monkeypatch):
    """The contiguous store (a kept layer's full KVState: slot t holds position t) read in place, as a view of a
    larger store's first rows and slots (its strides), against kv_decode_naive; the reference against masked
    attention over the store."""
    if split_min:
        many_splits(monkeypatch, split_min)
    g = torch.Generator().manual_seed(N + B)
    big_k = torch.randn(rows, Hk, N + 9, D, generator=g).to(DEV, dtype)
    big_v = torch.randn(rows, Hk, N + 9, D, generator=g).to(DEV, dtype)
    k, v = big_k[:B, :, :N], big_v[:B, :, :N]  # (B, Hk, N, D) views
    q = torch.randn(B, H, 1, D, generator=g).to(DEV, dtype)
    pos = torch.tensor([5, 64, N - 1][:B], device=DEV)  # first block, a block's first slot, the last slot
    scale = D ** -0.5
    ref = BACKENDS["torch"].kv_decode(q, k, v, pos, scale)
    mask = (torch.arange(N, device=DEV)[None, :] <= pos[:, None])[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref, want, **tol)
    got = paged_mod.kv_decode_triton(q, k, v, pos, scale)
    assert got.shape == (B, H, 1, D) and got.dtype == dtype
    torch.testing.assert_close(got, ref, **tol)


@pytest.mark.skipif(not CUDA, reason="the auto backend picks the kernel on CUDA only")
def test_auto_backend_reads_a_full_store_with_the_kernel():
    assert get_backend("auto", torch.zeros(1, device="cuda")).kv_decode is paged_mod.kv_decode_triton


@torch.no_grad()
def test_kept_layers_decode_through_the_contiguous_kernel(monkeypatch):
    """FastGenerator's decode steps read the kept softmax layers' full stores with kv_decode_triton (swapped into
    the backends; on CPU everything else runs the references): its greedy tokens equal those of full forwards."""
    from dataclasses import replace

    from lolcats import ops
    from lolcats.generation import FastGenerator
    from test_softmax_layers import build, left_pad

    calls = []
    counted = lambda *a: calls.append(a[1].shape) or paged_mod.kv_decode_triton(*a)  # noqa: E731
    for name in ("torch", "triton"):  # whichever "auto" picks (triton on CUDA)
        monkeypatch.setitem(ops.BACKENDS, name, replace(ops.get_backend(name, torch.zeros(1)), kv_decode=counted))
    model = build().to(DEV)
    rows = [torch.randint(1, 64, (n,)) for n in (11, 5)]
    ids, mask = left_pad(rows)
    fast = FastGenerator(model, batch_size=2, max_new_tokens=6, eos_token_ids=[], use_cuda_graph=False)
    out = fast.generate(ids.to(DEV), mask.to(DEV))
    for i, r in enumerate(rows):
        seq = r[None].to(DEV)
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out[i], seq[0, len(r):])
    assert len(calls) == 2 * 5  # 2 kept layers x 5 decode steps
