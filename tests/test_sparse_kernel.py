"""The fused sparse-cache prefill (``ops/triton/sparse.py``) against the chunk reference: outputs, the cache it
keeps (as a set), the linear state and the window, over chunks continuing a state, with padding, sinks and both
scores; and a model's prefill + decode through it against the reference backend. Without CUDA the kernel runs
in the Triton interpreter at tiny shapes."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the backend is asked for by name: "auto" stays torch on CPU
triton = pytest.importorskip("triton")

import lolcats.ops.triton.sparse as sparse_mod  # noqa: E402
from lolcats.ops import get_backend  # noqa: E402
from lolcats.ops.decode.state import DecodeState  # noqa: E402
from lolcats.ops.sparse.naive import sparse_chunk  # noqa: E402

if not CUDA and not type(sparse_mod._evict).__name__.startswith("Interpreted"):
    sparse_mod = importlib.reload(sparse_mod)

DEV = "cuda" if CUDA else "cpu"
KIND = "terraced_window"


def rand_chunk(B, H, Hk, T, D, F, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    xs = (r(B, H, T, D), r(B, Hk, T, D), r(B, Hk, T, D), r(B, H, T, F).exp() * 0.3, r(B, Hk, T, F).exp() * 0.3)
    return tuple(x.to(DEV, dtype) for x in xs) + (torch.rand(H, generator=g).to(DEV),)


def by_position(st: DecodeState):
    """The sparse cache's pairs ordered by position (the kernel's slot order is not the reference's)."""
    order = st.sparse_pos.argsort(-1)
    take = lambda x: x.gather(2, order[..., None].expand(*order.shape, x.shape[-1])).float()  # noqa: E731
    return st.sparse_pos.gather(-1, order), take(st.sparse_k), take(st.sparse_v), take(st.sparse_fk)


def run(op, cuts, xs, pos, valid, w, G, score, sink):
    q, k, v, fq, fk, wf = xs
    B, Hk = k.shape[:2]
    st = DecodeState.for_layer(B, Hk, KIND, w, q.shape[-1], v.shape[-1], fk.shape[-1], k.dtype, DEV, sparse=G)
    ys = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        sl = slice(a, b)
        y, st = op(st, q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl], fk[:, :, sl], pos[:, sl], valid[:, sl],
                   wf, KIND, w, 0.3, score, sink)
        ys.append(y)
    return torch.cat(ys, 2), st


@pytest.mark.parametrize("w,G,cuts,sink,score,pad", [
    (4, 3, (0, 9, 20, 33), 2, "self_recall", 5),  # chunks starting inside a block, a left-padded row
    (4, 6, (0, 14, 40), 0, "recency", 0),
    (5, 7, (0, 3, 27, 41), 3, "self_recall", 7),  # w not a power of two, G more than one block
    (4, 20, (0, 17, 30), 0, "self_recall", 0),  # a cache larger than a tile
    (4, 5, (0, 30), 2, "self_recall", -6),  # a right-padded row (the serving engine's first chunk)
])
def test_kernel_equals_the_chunk_reference(w, G, cuts, sink, score, pad):
    B, T = 2, cuts[-1]
    xs = rand_chunk(B, 6, 2, T, 8, 6, seed=w * 100 + G)
    valid = torch.ones(B, T, dtype=torch.bool, device=DEV)
    valid[1, :pad] = False  # left padding; a negative pad: right padding
    if pad < 0:
        valid[1] = torch.arange(T, device=DEV) < T + pad
    pos = (valid.long().cumsum(-1) - 1).clamp_min(0)
    fused = get_backend("triton", xs[0])
    assert fused.sparse_fused(KIND, score, window=w) and not fused.sparse_fused("sliding_window", score, window=w)
    y, st = run(fused.sparse_chunk, cuts, xs, pos, valid, w, G, score, sink)
    y_ref, ref = run(sparse_chunk, cuts, xs, pos, valid, w, G, score, sink)
    m = valid[:, None, :, None].expand_as(y)
    torch.testing.assert_close(y[m], y_ref[m], atol=1e-4, rtol=1e-4)
    assert (y[~m] == 0).all()
    assert int((ref.sparse_pos >= 0).sum()) > 0
    for a, b in zip(by_position(st), by_position(ref)):
        torch.testing.assert_close(a, b)
    for name in ("kv", "ks", "win_pos"):
        torch.testing.assert_close(getattr(st, name), getattr(ref, name), msg=name)
    filled = (ref.win_pos >= 0)[:, None, :, None]
    for name in ("win_k", "win_v", "win_fk"):
        torch.testing.assert_close(getattr(st, name) * filled, getattr(ref, name) * filled, msg=name)
    _, after = fused.sparse_chunk(st, *(x[:, :, :4] for x in xs[:5]), pos[:, :4] + T, valid[:, :4], xs[5], KIND, w,
                                  0.3, score, sink)
    assert after is st  # the kernel updates the state in place (no copy of it per layer and chunk)


def test_bfloat16_state_equals_the_reference():
    """The model's dtype: the state in bfloat16 (window, cache), kv / ks in float32, outputs rounded once."""
    B, T, w, G = 2, 30, 4, 5
    xs = rand_chunk(B, 6, 2, T, 8, 6, seed=3, dtype=torch.bfloat16)
    valid = torch.ones(B, T, dtype=torch.bool, device=DEV)
    pos = torch.arange(T, device=DEV).expand(B, T)
    y, st = run(get_backend("triton", xs[0]).sparse_chunk, (0, 13, T), xs, pos, valid, w, G, "self_recall", 2)
    y_ref, ref = run(sparse_chunk, (0, 13, T), xs, pos, valid, w, G, "self_recall", 2)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(by_position(st)[0], by_position(ref)[0])  # the same pairs kept
    torch.testing.assert_close(st.kv, ref.kv, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not CUDA, reason="model shapes: too slow for the interpreter")
@pytest.mark.parametrize("w", [64, 256])
def test_model_shapes_fit_and_equal_the_reference(w):
    """SmolLM2's shapes in bfloat16 (head dim 64, Hedgehog features 128, a cache of 256): the eviction fits the
    card's shared memory at window 64 and 256 (a 256 window once needed 320 KB) and keeps the reference's pairs."""
    B, T, G = 2, 6 * w + 17, 256
    xs = rand_chunk(B, 3, 1, T, 64, 128, seed=w, dtype=torch.bfloat16)
    valid = torch.ones(B, T, dtype=torch.bool, device=DEV)
    pos = torch.arange(T, device=DEV).expand(B, T)
    cuts = (0, 2 * w + 5, T)
    y, st = run(get_backend("triton", xs[0]).sparse_chunk, cuts, xs, pos, valid, w, G, "self_recall", 64)
    y_ref, ref = run(sparse_chunk, cuts, xs, pos, valid, w, G, "self_recall", 64)
    same = (st.sparse_pos[..., :, None] == ref.sparse_pos[..., None, :]).any(-1).float().mean()
    assert same > 0.98  # the same pairs kept, but for near-ties that round either way (one in 512 at window 256)
    torch.testing.assert_close(y.float(), y_ref.float(), atol=3e-2, rtol=3e-2)
    # a pair kept by one and folded by the other moves between cache and kv: their sum is the same either way
    torch.testing.assert_close(folded_and_kept(st), folded_and_kept(ref), atol=5e-2, rtol=1e-2)


def folded_and_kept(st: DecodeState) -> torch.Tensor:
    """(B, Hk, F, Dv) float32: kv plus the outer products phi(k) v of the pairs the cache holds."""
    live = (st.sparse_pos >= 0)[..., None].float()
    return st.kv + torch.einsum("bhgf,bhgd->bhfd", st.sparse_fk.float() * live, st.sparse_v.float())


def test_other_kinds_wide_windows_gradients_and_registered_scores_take_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(sparse_mod, "_evict", None)  # would fail if launched
    import lolcats.ops.triton_backend as tb
    monkeypatch.setattr(tb, "sparse_prefill_triton", lambda *a, **k: calls.append(a))
    xs = rand_chunk(1, 2, 1, 9, 8, 6, seed=0)
    pos = torch.arange(9, device=DEV)[None]
    valid = torch.ones(1, 9, dtype=torch.bool, device=DEV)
    st = DecodeState.for_layer(1, 1, "sliding_window", 4, 8, 8, 6, torch.float32, DEV, sparse=3)
    fused = get_backend("triton", xs[0])
    y, _ = fused.sparse_chunk(st, *xs[:5], pos, valid, xs[5], "sliding_window", 4, 0.3, "self_recall")
    q = xs[0].clone().requires_grad_()
    st = DecodeState.for_layer(1, 1, KIND, 4, 8, 8, 6, torch.float32, DEV, sparse=3)
    y2, _ = fused.sparse_chunk(st, q, *xs[1:5], pos, valid, xs[5], KIND, 4, 0.3, "self_recall")
    assert not calls and y2.requires_grad
    wide = sparse_mod.MAX_WINDOW + 1  # past the windows the kernels are tested at
    assert fused.sparse_fused(KIND, "self_recall", window=wide - 1) and not fused.sparse_fused(KIND, "self_recall",
                                                                                               window=wide)
    st = DecodeState.for_layer(1, 1, KIND, wide, 8, 8, 6, torch.float32, DEV, sparse=3)
    fused.sparse_chunk(st, *xs[:5], pos, valid, xs[5], KIND, wide, 0.3, "self_recall")
    assert not calls
    from lolcats.ops.sparse import SCORES, register_score  # a score registered over a built-in one
    base = SCORES["self_recall"]
    register_score("self_recall", lambda *a: base(*a))
    try:
        fused.sparse_chunk(st, *xs[:5], pos, valid, xs[5], KIND, 4, 0.3, "self_recall")
    finally:
        register_score("self_recall", base)
    assert not calls


@torch.no_grad()
def test_a_model_with_the_kernel_equals_the_reference(monkeypatch):
    """A tiny model with a sparse cache: the whole forward, and prefill in chunks then decode, through the
    kernel (only ``sparse_chunk`` swapped in: the other kernels are tested in test_kernels.py)."""
    from dataclasses import replace

    import lolcats.ops as ops
    from lolcats.attention.generate import prefill_capturable
    from lolcats.attention.layers import lolcats_modules
    from lolcats.attention.use import set_sparse_cache
    from test_generation import VOCAB, build, incremental_logits

    fused = get_backend("triton", torch.zeros(1, device=DEV))
    monkeypatch.setitem(ops.BACKENDS, "sparse-kernel", replace(ops.BACKENDS["torch"], name="sparse-kernel",
                                                                sparse_chunk=fused.sparse_chunk,
                                                                sparse_fused=fused.sparse_fused))
    model = build("llama", KIND).to(DEV)
    set_sparse_cache(model, 3, sink=2)
    for m in lolcats_modules(model):  # the reference ("auto" takes the kernels on CUDA)
        m.cfg = replace(m.cfg, backend="torch")
    ids = torch.randint(1, VOCAB, (2, 35), device=DEV)
    mask = torch.ones_like(ids)
    want = model(ids).logits, incremental_logits(model, ids, mask, splits=[13, 22])
    like = next(model.parameters())
    assert not prefill_capturable(model, like)  # the reference's loop reads the host
    for m in lolcats_modules(model):
        m.cfg = replace(m.cfg, backend="sparse-kernel")
    assert prefill_capturable(model, like)
    got = model(ids).logits, incremental_logits(model, ids, mask, splits=[13, 22])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # the layer gives the kernel the whole chunk, and the reference (a score registered over a built-in one) pieces
    from lolcats.attention.mixers import HybridMixer
    from lolcats.ops.sparse import SCORES, register_score

    pieces = []
    monkeypatch.setattr(HybridMixer, "piece_len", lambda self, st, B, H: pieces.append(B) or 16)
    model(ids)
    assert not pieces
    base = SCORES["self_recall"]
    register_score("self_recall", lambda *a: base(*a))
    try:
        model(ids)
    finally:
        register_score("self_recall", base)
    assert pieces
