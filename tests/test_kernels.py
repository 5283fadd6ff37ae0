"""Triton kernels against the PyTorch references: outputs, gradients, final states, decode state.

Without CUDA the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set here
before the kernels are imported) at tiny shapes; with CUDA the same tests run compiled, and the
``gpu`` tests add real model shapes. Kernel outputs are allocated NaN-filled
(LOLCATS_KERNEL_DEBUG=1), so an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import copy
import importlib
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["LOLCATS_KERNEL_DEBUG"] = "1"

triton = pytest.importorskip("triton")

from lolcats.ops.decode.naive import decode_step_naive  # noqa: E402
from lolcats.ops.decode.state import DecodeState  # noqa: E402
from lolcats.ops.kinds import window_slots  # noqa: E402
from lolcats.ops.hybrid.naive import hybrid_attention_naive  # noqa: E402
from lolcats.ops.linear.naive import linear_attention_quadratic  # noqa: E402


def _kernels():
    """The kernel modules, re-imported in interpreter mode if something imported them compiled on CPU."""
    import lolcats.ops.triton.activation as activation
    import lolcats.ops.triton.chunked as chunked
    import lolcats.ops.triton.decode as decode
    import lolcats.ops.triton.feature_map as feature_map
    import lolcats.ops.triton.norm as norm
    import lolcats.ops.triton.rope_feature_map as rope_feature_map

    if not CUDA and not type(chunked._fwd).__name__.startswith("Interpreted"):
        chunked = importlib.reload(chunked)
        decode, feature_map = importlib.reload(decode), importlib.reload(feature_map)
        for mod in (rope_feature_map, norm, activation):  # FastGenerator's step runs these too
            importlib.reload(mod)
    return chunked, decode


_kernels()
from lolcats.ops.triton import hybrid_attention_triton, linear_attention_triton  # noqa: E402
from lolcats.ops.triton.decode import decode_step_triton  # noqa: E402
from lolcats.attention.feature_maps import hedgehog_reference  # noqa: E402
from lolcats.ops.triton.feature_map import hedgehog_triton  # noqa: E402
from lolcats.ops.feature_map.naive import rope_hedgehog_reference  # noqa: E402
from lolcats.ops.triton.rope_feature_map import rope_hedgehog_triton  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


ZERO_FLOOR = 1e-6  # absolute error allowed against an exactly-zero reference (inputs are O(1)): fp32 rounding


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str, floor: float = 0.0) -> None:
    """max |a - b| <= tol * (max |b| + floor); no NaN. A reference that is exactly zero everywhere
    (e.g. dq at T = 1, where the only score is its own window max) allows ZERO_FLOOR absolute error."""
    assert not torch.isnan(a).any(), f"{what}: NaN (unwritten element?)"
    err = (a.float() - b.float()).abs().max().item()
    ref = b.float().abs().max().item() + floor
    bound = tol * ref if ref > 0 else ZERO_FLOOR
    assert err <= bound, f"{what}: max err {err:.3e} vs scale {ref:.3e}"


def _inputs(B, H, Hk, T, D, F, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, pos=False):
        x = torch.rand(*s, generator=g) if pos else torch.randn(*s, generator=g)
        return x.to(DEV, dtype).requires_grad_()

    q, k, v = r(B, H, T, D), r(B, Hk, T, D), r(B, Hk, T, D)
    fq, fk = r(B, H, T, F, pos=True), r(B, Hk, T, F, pos=True)
    wf = torch.rand(H, generator=g).to(DEV).requires_grad_()
    return q, k, v, fq, fk, wf


def _log_gate(B, Hk, T, strength=0.3, seed=7):
    """Log forget gates in [-strength, 0): strength 0.3 forgets within tens of tokens, 8 within one."""
    g = torch.Generator().manual_seed(seed)
    return (-torch.rand(B, Hk, T, generator=g) * strength).to(DEV).requires_grad_()


GATED = pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])  # with a forget gate or not


def _grads(out, inputs, seed=1):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    return torch.autograd.grad((out.float() * w).sum(), inputs)


# ----------------------------------------------------------------------------- linear


@pytest.mark.parametrize("T", [1, 37, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@GATED
def test_linear_matches_reference(T, dtype, gated):
    q, k, v, fq, fk, _ = _inputs(1, 4, 2, T, 16, 8, dtype)
    lg = _log_gate(1, 2, T) if gated else None
    g = torch.Generator().manual_seed(3)
    s0 = (torch.rand(1, 2, 8, 16, generator=g).to(DEV).requires_grad_(),
          torch.rand(1, 2, 8, generator=g).to(DEV).requires_grad_())
    ins = [fq, fk, v, *([lg] if gated else []), *s0]
    y, st = linear_attention_triton(fq, fk, v, s0, True, lg)
    yr, sr = linear_attention_quadratic(fq, fk, v, s0, True, log_gate=lg)
    tol = TOL[dtype]
    assert y.dtype == yr.dtype
    assert_close(y, yr, tol, "y")
    for a, b, n in zip(st, sr, ("kv", "ks")):
        assert_close(a, b, tol, f"final {n}")

    def loss(y, st):
        return sum((t.float() * torch.cos(torch.arange(t.numel(), device=t.device).view(t.shape))).sum()
                   for t in (y, *st))

    gk = torch.autograd.grad(loss(y, st), ins)
    gr = torch.autograd.grad(loss(yr, sr), ins)
    names = ("dfq", "dfk", "dv") + (("dlog_gate",) if gated else ()) + ("dkv0", "dks0")
    for a, b, n in zip(gk, gr, names):
        assert_close(a, b, tol, n)


def test_linear_without_state():
    _, _, v, fq, fk, _ = _inputs(2, 2, 2, 70, 16, 16, torch.float32)
    y, st = linear_attention_triton(fq, fk, v)
    assert st is None
    assert_close(y, linear_attention_quadratic(fq, fk, v)[0], 1e-4, "y")


@GATED
def test_batch_x_heads_beyond_the_grid_runs_in_slices(monkeypatch, gated):
    """B x H above the grid's second-axis limit (lowered here to 8): the batch goes in slices,
    with the same outputs, final states and gradients."""
    import lolcats.ops.triton as tri

    q, k, v, fq, fk, wf = _inputs(5, 4, 2, 20, 16, 8, torch.float32)
    lg = _log_gate(5, 2, 20) if gated else None
    g = torch.Generator().manual_seed(5)
    s0 = (torch.rand(5, 2, 8, 16, generator=g).to(DEV), torch.rand(5, 2, 8, generator=g).to(DEV))
    ins = [q, k, v, fq, fk, wf] + ([lg] if gated else [])
    runs = []
    for limit in (tri.MAX_GRID_Y, 8):  # 8: two sequences per call, three calls
        monkeypatch.setattr(tri, "MAX_GRID_Y", limit)
        y, st = tri.linear_attention_triton(fq, fk, v, s0, True, lg)
        yh = tri.hybrid_attention_triton(q, k, v, fq, fk, wf, "terraced_window", 8, None, lg)
        grads = torch.autograd.grad((y * y).sum() + (yh * yh).sum(), ins)
        runs.append((y, *st, yh, *grads))
    names = ("y", "kv", "ks", "y hybrid", "dq", "dk", "dv", "dfq", "dfk", "dwf", "dlog_gate")
    for a, b, n in zip(*runs, names):
        assert_close(a, b, 1e-5, n, floor=1e-6)


# ----------------------------------------------------------------------------- hybrid

HYBRID_CASES = [  # (T, window, dtype)
    (1, 16, torch.float32),
    (37, 16, torch.float32),
    (100, 16, torch.float32),
    (130, 64, torch.float32),
    (150, 40, torch.float32),
    (130, 64, torch.bfloat16),
]


@pytest.mark.parametrize("kind", ["sliding_window", "terraced_window"])
@pytest.mark.parametrize("T,window,dtype", HYBRID_CASES)
@GATED
def test_hybrid_matches_reference(kind, T, window, dtype, gated):
    q, k, v, fq, fk, wf = _inputs(1, 4, 2, T, 16, 8, dtype, seed=T + window)
    lg = _log_gate(1, 2, T, seed=T) if gated else None
    ins = [q, k, v, fq, fk, wf] + ([lg] if gated else [])
    y = hybrid_attention_triton(q, k, v, fq, fk, wf, kind, window, None, lg)
    yr, _ = hybrid_attention_naive(q, k, v, fq, fk, wf, kind, window, log_gate=lg)
    tol = TOL[dtype]
    assert y.dtype == yr.dtype and y.shape == yr.shape
    assert_close(y, yr, tol, "y")
    names = ("dq", "dk", "dv", "dfq", "dfk", "dwindow_factor", "dlog_gate")
    for a, b, n in zip(_grads(y, ins), _grads(yr, ins), names):
        _check_grad(a, b, tol, n)


def _check_grad(a, b, tol, name):
    """The window factor's gradient sums terms that cancel: compared against the scale + 1."""
    assert_close(a, b, tol, name, floor=1.0 if name == "dwindow_factor" else 0.0)


def test_hybrid_whole_window_is_softmax():
    """A window covering the sequence gives softmax attention (the window factor cancels)."""
    q, k, v, fq, fk, wf = _inputs(1, 2, 1, 50, 16, 8, torch.float32)
    y = hybrid_attention_triton(q, k, v, fq, fk, wf, "sliding_window", 64)
    kk, vv = (t.expand(1, 2, 50, 16) for t in (k, v))
    ref = torch.softmax((q @ kk.transpose(-1, -2)) / 4 + torch.full((50, 50), float("-inf"), device=DEV).triu(1), -1)
    assert_close(y, ref @ vv, 1e-4, "y")


def test_unknown_kind_raises():
    q, k, v, fq, fk, wf = _inputs(1, 2, 2, 4, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="known"):
        hybrid_attention_triton(q, k, v, fq, fk, wf, "tiled", 16)


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("kind,dtype,sparse", [("linear", torch.float32, 0), ("sliding_window", torch.float32, 0),
                                               ("terraced_window", torch.float32, 0), ("terraced_window", torch.bfloat16, 0),
                                               ("sliding_window", torch.float32, 3), ("terraced_window", torch.float32, 3),
                                               ("terraced_window", torch.bfloat16, 3),
                                               ("terraced_window", torch.float32, 6)])  # a cache that takes a block
@GATED
def test_decode_step_matches_reference(kind, dtype, sparse, gated):
    """Left padding and gaps; with ``sparse`` a sparse cache of 3 (or 6) pairs per KV head, which fills, evicts by
    self-recall and folds in step with the reference (after the gate's decay); 6 empty slots take a whole block of 4
    without scoring it."""
    B, H, Hk, D, F, w = 3, 4, 2, 16, 8, 4
    st = DecodeState.empty(B, Hk, window_slots(kind, w), D, D, F, dtype, DEV, sparse=sparse)
    st2 = copy.deepcopy(st)
    g = torch.Generator().manual_seed(0)
    wf = torch.rand(H, generator=g).to(DEV) if kind != "linear" else None
    pos = torch.zeros(B, dtype=torch.long, device=DEV)
    for t in range({0: 11, 3: 21}.get(sparse, 33)):
        q, fq = torch.randn(B, H, D, generator=g), torch.rand(B, H, F, generator=g)
        k, v, fk = torch.randn(B, Hk, D, generator=g), torch.randn(B, Hk, D, generator=g), torch.rand(B, Hk, F, generator=g)
        q, k, v, fq, fk = (x.to(DEV, dtype) for x in (q, k, v, fq, fk))
        lg = (-torch.rand(B, Hk, generator=g)).to(DEV) if gated else None
        valid = torch.tensor([True, t >= 3, t % 2 == 0], device=DEV)  # left padding, gaps
        y1 = decode_step_naive(q, k, v, fq, fk, st, pos, wf, kind, w, D**-0.5, valid, lg)
        y2 = decode_step_triton(q, k, v, fq, fk, st2, pos, wf, kind, w, D**-0.5, valid, lg)
        assert_close(y2, y1, TOL[dtype], f"y at step {t}", floor=1e-6)
        for name, a in vars(st).items():
            b = getattr(st2, name)
            if a.numel() and not name.startswith("sparse_"):
                assert_close(b, a, TOL[dtype], f"{name} at step {t}", floor=1e-6)
        names = ("sparse_pos", "sparse_k", "sparse_v", "sparse_fk")
        for name, a, b in zip(names, by_position(st), by_position(st2)):  # the same pairs, slots in any order
            assert_close(b, a, TOL[dtype], f"{name} at step {t}", floor=1e-6)
        pos = pos + valid.long()
    assert not sparse or bool((st.sparse_pos >= 0).all())  # the cache filled


def by_position(st: DecodeState) -> tuple[torch.Tensor, ...]:
    """The sparse cache's positions, keys, values and phi(k), ordered by position (slot order is free)."""
    if not st.sparse_size:
        return ()
    order = st.sparse_pos.argsort(-1)
    pos = st.sparse_pos.gather(-1, order)
    live = (pos >= 0)[..., None]
    take = lambda x: x.gather(2, order[..., None].expand(*order.shape, x.shape[-1])).float() * live  # noqa: E731
    return pos, take(st.sparse_k), take(st.sparse_v), take(st.sparse_fk)  # empty slots' contents are not compared


def test_decode_step_reads_strided_positions_and_valid():
    """pos and valid as columns of (B, L) tensors (what HF generate passes: position_ids[:, -1:]):
    the kernel reads row b's own entry, not offset b of the storage."""
    B, H, Hk, D, F, w = 3, 2, 1, 16, 8, 4
    st = DecodeState.empty(B, Hk, w, D, D, F, torch.float32, DEV)
    st2 = copy.deepcopy(st)
    g = torch.Generator().manual_seed(0)
    wf = torch.rand(H, generator=g).to(DEV)
    table = torch.arange(3 * 9, device=DEV).view(3, 9) % 9  # row b: 0..8
    ok = torch.ones(3, 9, dtype=torch.bool, device=DEV)
    for t in range(9):
        x = [torch.randn(B, H, D, generator=g), torch.randn(B, Hk, D, generator=g), torch.randn(B, Hk, D, generator=g),
             torch.rand(B, H, F, generator=g), torch.rand(B, Hk, F, generator=g)]
        x = [a.to(DEV) for a in x]
        pos, valid = table[:, t], ok[:, t]  # strided views
        y1 = decode_step_naive(*x, st, pos.clone(), wf, "sliding_window", w, 0.25, valid.clone())
        y2 = decode_step_triton(*x, st2, pos, wf, "sliding_window", w, 0.25, valid)
        assert_close(y2, y1, 1e-4, f"y at step {t}")
    assert torch.equal(st2.win_pos, st.win_pos)


def test_decode_dispatcher():
    from lolcats.ops import get_backend

    def decode_step(*a, backend):
        return get_backend(backend, a[0]).decode(*a)

    B, H, Hk, D, F, w = 2, 2, 1, 16, 8, 4
    st = DecodeState.empty(B, Hk, w, D, D, F, torch.float32, DEV)
    st2 = copy.deepcopy(st)
    args = [torch.randn(B, H, D), torch.randn(B, Hk, D), torch.randn(B, Hk, D), torch.rand(B, H, F),
            torch.rand(B, Hk, F)]
    args = [a.to(DEV) for a in args]
    pos, wf = torch.zeros(B, dtype=torch.long, device=DEV), torch.rand(H, device=DEV)
    y1 = decode_step(*args, st, pos, wf, "sliding_window", w, 0.25, backend="torch")
    y2 = decode_step(*args, st2, pos, wf, "sliding_window", w, 0.25, backend="triton")
    assert_close(y2, y1, 1e-4, "y")
    with pytest.raises(ValueError, match="known"):
        decode_step(*args, st, pos, wf, "sliding_window", w, 0.25, backend="cuda")


# ----------------------------------------------------------------------------- registry


def test_backend_registered(monkeypatch):
    from lolcats.ops import get_backend

    x = torch.zeros(1, device=DEV)
    monkeypatch.delenv("LOLCATS_TRITON_ON_CPU", raising=False)
    assert get_backend("triton", x).name == "triton"
    assert get_backend("auto", x).name == ("triton" if CUDA else "torch")
    monkeypatch.setenv("LOLCATS_TRITON_ON_CPU", "1")
    assert get_backend("auto", x).name == "triton"
    q, k, v, fq, fk, wf = _inputs(1, 2, 1, 20, 16, 8, torch.float32)
    y = get_backend("triton", x).hybrid(q, k, v, fq, fk, wf, "terraced_window", 8, 0.25)
    assert_close(y, hybrid_attention_naive(q, k, v, fq, fk, wf, "terraced_window", 8, 0.25)[0], 1e-4, "y")


# ----------------------------------------------------------------------------- GPU, real shapes

GPU_SHAPES = [  # (B, H, Hk, D, F, T)
    (1, 9, 3, 64, 128, 1024),
    (1, 9, 3, 64, 128, 4096),
    (1, 32, 8, 128, 128, 2048),
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kind", ["linear", "sliding_window", "terraced_window"])
@pytest.mark.parametrize("B,H,Hk,D,F,T", GPU_SHAPES)
@GATED
def test_gpu_real_shapes(kind, B, H, Hk, D, F, T, gated):
    q, k, v, fq, fk, wf = _inputs(B, H, Hk, T, D, F, torch.bfloat16, seed=T)
    with torch.no_grad():  # hedgehog-like features: rows of a softmax
        fq.copy_(torch.softmax(fq.float() * 4, -1))
        fk.copy_(torch.softmax(fk.float() * 4, -1))
    # the gate at Liger's scale: logsigmoid(x) / 16 is about -0.04 at x = 0
    lg, gate = (_log_gate(B, Hk, T, strength=0.1), ["dlog_gate"]) if gated else (None, [])
    if kind == "linear":
        ins = [fq, fk, v] + ([lg] if gated else [])
        y = linear_attention_triton(fq, fk, v, log_gate=lg)[0]
        yr = linear_attention_quadratic(fq, fk, v, log_gate=lg)[0]
    else:
        ins = [q, k, v, fq, fk, wf] + ([lg] if gated else [])
        y = hybrid_attention_triton(q, k, v, fq, fk, wf, kind, 64, None, lg)
        yr = hybrid_attention_naive(q, k, v, fq, fk, wf, kind, 64, log_gate=lg)[0]
    assert_close(y, yr, 2e-2, "y")
    names = (["dfq", "dfk", "dv"] if kind == "linear" else ["dq", "dk", "dv", "dfq", "dfk", "dwindow_factor"]) + gate
    gk = _grads(y, ins)
    gr = _grads(yr, ins)
    del yr
    for a, b, n in zip(gk, gr, names):
        _check_grad(a, b, 3e-2, n)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kind", ["sliding_window", "terraced_window"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_gpu_decode_cuda_graph(kind, gated):
    """Prefill-free decoding (with and without a forget gate): eager kernel == reference over 150 steps,
    and one step captures in a CUDA graph."""
    B, H, Hk, D, F, w = 64, 32, 8, 128, 128, 64
    st = DecodeState.empty(B, Hk, window_slots(kind, w), D, D, F, torch.bfloat16, DEV)
    st2 = copy.deepcopy(st)
    wf = torch.rand(H, device=DEV)
    pos = torch.zeros(B, dtype=torch.long, device=DEV)
    for t in range(150):
        q, k, v = torch.randn(B, H, D, device=DEV), torch.randn(B, Hk, D, device=DEV), torch.randn(B, Hk, D, device=DEV)
        fq, fk = torch.rand(B, H, F, device=DEV), torch.rand(B, Hk, F, device=DEV)
        q, k, v, fq, fk = (x.bfloat16() for x in (q, k, v, fq, fk))
        lg = -torch.rand(B, Hk, device=DEV) * 0.1 if gated else None  # log forget gate per KV head
        y1 = decode_step_naive(q, k, v, fq, fk, st, pos, wf, kind, w, D**-0.5, None, lg)
        y2 = decode_step_triton(q, k, v, fq, fk, st2, pos, wf, kind, w, D**-0.5, None, lg)
        assert_close(y2, y1, 2e-2, f"y at step {t}")
        pos += 1
    assert_close(st2.kv, st.kv, 1e-2, "kv")
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        yg = decode_step_triton(q, k, v, fq, fk, st2, pos, wf, kind, w, D**-0.5, None, lg)
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.isnan(yg.float()).any()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fla_backend_matches_reference(dtype):
    """The optional flash-linear-attention backend: output, gradients, final state (with an initial one)."""
    pytest.importorskip("fla")
    from lolcats.ops.fla_backend import fla_linear

    _, _, v, fq, fk, _ = _inputs(2, 9, 3, 300, 64, 128, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    s0 = (torch.randn(2, 3, 128, 64, generator=g).to(DEV), torch.rand(2, 3, 128, generator=g).to(DEV) + 1)
    y, (kv, z) = fla_linear(fq, fk, v, initial_state=s0, output_final_state=True)
    yr, (kvr, zr) = linear_attention_quadratic(fq, fk, v, initial_state=s0, output_final_state=True)
    tol = TOL[dtype] * 5
    assert_close(y, yr, tol, "y")
    assert_close(kv, kvr, tol, "kv")
    assert_close(z, zr, tol, "z")
    for a, b, n in zip(_grads(y, [fq, fk, v]), _grads(yr, [fq, fk, v]), ("dfq", "dfk", "dv")):
        assert_close(a, b, tol * 2, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,T,D,F", [(2, 3, 70, 16, 16), (1, 2, 5, 32, 24), (70, 2, 1, 16, 8)])
def test_hedgehog_kernel_matches_reference(dtype, B, H, T, D, F):
    """The fused Hedgehog map: outputs, dx and dW against the PyTorch reference (T not a multiple of
    the 64-row block, so blocks span sequences; F not a power of two; T = 1 as in decoding)."""
    g = torch.Generator().manual_seed(T)
    x = (torch.randn(B, H, T, D, generator=g) * 2).to(DEV, dtype).requires_grad_()
    w = (torch.randn(H, D, F, generator=g) / D**0.5).to(DEV).requires_grad_()
    dy = torch.randn(B, H, T, 2 * F, generator=g).to(DEV)
    tol = TOL[dtype] if dtype == torch.float32 else 3e-2
    want = hedgehog_reference(x, w)
    want_dx, want_dw = torch.autograd.grad(want, [x, w], dy)
    got = hedgehog_triton(x, w)
    got_dx, got_dw = torch.autograd.grad(got, [x, w], dy)
    assert got.dtype == torch.float32 and got.shape == (B, H, T, 2 * F)
    assert_close(got, want, tol, "phi")
    assert_close(got_dx, want_dx, tol, "dx")
    assert_close(got_dw, want_dw, tol, "dW")


def test_hedgehog_kernel_weight_gradient_only():
    """Attention transfer detaches q and k: the backward then computes dW alone (no dx)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 40, 16, generator=g).to(DEV)
    w = (torch.randn(3, 16, 8, generator=g) / 4).to(DEV).requires_grad_()
    dy = torch.randn(2, 3, 40, 16, generator=g).to(DEV)
    (want,) = torch.autograd.grad(hedgehog_reference(x, w), [w], dy)
    (got,) = torch.autograd.grad(hedgehog_triton(x, w), [w], dy)
    assert_close(got, want, TOL[torch.float32], "dW")


def test_module_features_use_the_backends_fused_map(monkeypatch):
    """With the triton backend, LolcatsAttention's Hedgehog features come from the fused op,
    equal (values and weight gradients) to the feature-map modules (the reference)."""
    from dataclasses import replace

    from conftest import tiny_model
    from lolcats import ops
    from lolcats.attention.convert import convert_model
    from lolcats.config import AttentionConfig

    monkeypatch.setenv("LOLCATS_TRITON_ON_CPU", "1")
    calls = []
    tri = ops.get_backend("triton", torch.zeros(1))
    counted = replace(tri, hedgehog=lambda x, w: calls.append(x.shape) or hedgehog_triton(x, w))
    monkeypatch.setitem(ops.BACKENDS, "triton", counted)
    model = convert_model(tiny_model().to(DEV), AttentionConfig(backend="triton", feature_init="random"))
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, attn.num_heads, 70, attn.head_dim, generator=g).to(DEV)
    k = torch.randn(2, attn.num_kv_heads, 70, attn.head_dim, generator=g).to(DEV)
    fq, fk = attn.features(q, k)
    assert calls == [q.shape, k.shape]
    wq, wk = attn.feature_map_q.weight, attn.feature_map_k.weight
    dq, dk = torch.randn(fq.shape, generator=g).to(DEV), torch.randn(fk.shape, generator=g).to(DEV)
    got = torch.autograd.grad((fq * dq).sum() + (fk * dk).sum(), [wq, wk])
    rq, rk = attn.feature_map_q(q), attn.feature_map_k(k)
    want = torch.autograd.grad((rq * dq).sum() + (rk * dk).sum(), [wq, wk])
    assert_close(fq, rq, TOL[torch.float32], "phi(q)")
    assert_close(fk, rk, TOL[torch.float32], "phi(k)")
    for a, b, n in zip(got, want, ("dWq", "dWk")):
        assert_close(a, b, TOL[torch.float32], n)


def _rope_inputs(B, H, Hk, T, D, F, dtype, cos_batch, seed=0):
    """q, k as slices of one projection output (B, T, (H + 2 Hk) D) (strided, as the fused QKV GEMM gives
    them), cos, sin (cos_batch, T, D) as HF's rotary embedding makes them, W_q (H, D, F), W_k (Hk, D, F)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (H + 2 * Hk) * D, generator=g).to(DEV, dtype)
    q = qkv[..., :H * D].view(B, T, H, D).transpose(1, 2)
    k = qkv[..., H * D:(H + Hk) * D].view(B, T, Hk, D).transpose(1, 2)
    pos = torch.randint(0, 4096, (cos_batch, T), generator=g).float()
    inv = 10000.0 ** (-torch.arange(0, D, 2).float() / D)
    ang = pos[..., None] * inv  # (cos_batch, T, D / 2)
    ang = torch.cat([ang, ang], -1)
    wq = (torch.randn(H, D, F, generator=g) / D**0.5).to(DEV)
    wk = (torch.randn(Hk, D, F, generator=g) / D**0.5).to(DEV)
    return q, k, ang.cos().to(DEV, dtype), ang.sin().to(DEV, dtype), wq, wk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,Hk,T,D,F,cos_batch", [
    (2, 4, 2, 1, 16, 8, 2),  # decoding: T = 1
    (1, 3, 1, 70, 32, 24, 1),  # > one 64-row block, cos shared by the batch, F not a power of two
    (3, 2, 2, 5, 64, 16, 3),
    (1, 2, 1, 3, 128, 16, 1),
])
@pytest.mark.parametrize("feature_rope", [True, False])
def test_rope_hedgehog_kernel_matches_reference(dtype, B, H, Hk, T, D, F, cos_batch, feature_rope):
    """RoPE + Hedgehog of q and k in one launch against rope_hedgehog_reference on each (H != Hk, strided
    inputs): x_rot in x's dtype within one rounding, phi float32; the maps of x_rot, or of x before RoPE; phi(q)
    times the linear scale (0.3 with the maps before RoPE, the recipe's)."""
    q, k, cos, sin, wq, wk = _rope_inputs(B, H, Hk, T, D, F, dtype, cos_batch)
    scale = 1.0 if feature_rope else 0.3
    with torch.no_grad():
        got = rope_hedgehog_triton(q, k, cos, sin, wq, wk, feature_rope=feature_rope, q_scale=scale)
    (rq, fq), (rk, fk) = (rope_hedgehog_reference(x, cos, sin, w, feature_rope=feature_rope)
                          for x, w in ((q, wq), (k, wk)))
    fq = fq * scale
    if not feature_rope:  # phi before RoPE differs from phi after it: the flag reached the kernel
        assert not torch.allclose(fq, rope_hedgehog_reference(q, cos, sin, wq)[1] * scale) or T == 1
    tol = TOL[dtype]
    for a, b, n in zip(got, (rq, rk, fq, fk), ("q_rot", "k_rot", "phi(q)", "phi(k)")):
        assert a.shape == b.shape and a.dtype == b.dtype, n
        assert_close(a, b, tol, n)


def test_rope_hedgehog_kernel_is_forward_only_and_compiles():
    """A gradient through it is refused; torch.compile records it as one op (fullgraph) with the same result."""
    q, k, cos, sin, wq, wk = _rope_inputs(2, 4, 2, 1, 16, 8, torch.float32, 2)
    with pytest.raises(ValueError, match="no backward"):
        rope_hedgehog_triton(q, k, cos, sin, wq.requires_grad_(), wk)
    wq.requires_grad_(False)
    with torch.no_grad():
        want = rope_hedgehog_triton(q, k, cos, sin, wq, wk)
        got = torch.compile(rope_hedgehog_triton, backend="eager", fullgraph=True)(q, k, cos, sin, wq, wk)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,gate,feature_rope", [("triton", "none", True), ("triton", "pooled_keys", True),
                                                      ("torch", "none", True), ("triton", "none", False)])
@torch.no_grad()
def test_fast_generator_with_the_fused_rope_features(monkeypatch, backend, gate, feature_rope):
    """FastGenerator's step runs RoPE + Hedgehog as one op per layer on the fused QKV projection's output:
    the tokens of generate() and of fuse=False. With the triton backend (every kernel); with the torch
    backend given the op, also compiled (dynamo cannot trace the other kernels in the interpreter); with the
    feature maps before RoPE (``feature_rope`` off) through the same op."""
    from dataclasses import replace

    import torch._dynamo

    from lolcats import ops
    from lolcats.attention.convert import convert_model
    from lolcats.attention.generate import enable_lolcats_generation
    from lolcats.attention.modes import set_attention_mode
    from lolcats.config import AttentionConfig
    from lolcats.generation import FastGenerator
    from conftest import tiny_model

    monkeypatch.setenv("LOLCATS_TRITON_ON_CPU", "1")
    calls = []
    counted = lambda *a, **kw: calls.append(a[0].shape) or rope_hedgehog_triton(*a, **kw)  # noqa: E731
    monkeypatch.setitem(ops.BACKENDS, backend, replace(ops.get_backend(backend, torch.zeros(1)),
                                                       rope_hedgehog=counted))
    model = convert_model(tiny_model("qwen2").to(DEV), AttentionConfig(
        backend=backend, kind="terraced_window", window_size=4, feature_dim=8, feature_init="random", gate=gate,
        feature_rope=feature_rope, linear_scale=1.0 if feature_rope else 0.3))  # the op scales phi(q) itself
    set_attention_mode(model, "student")
    model.generation_config.eos_token_id = None
    enable_lolcats_generation(model)
    ids = torch.randint(3, 128, (2, 9)).to(DEV)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)[:, ids.shape[1]:]
    kw = dict(eos_token_ids=[], use_cuda_graph=False)
    assert torch.equal(FastGenerator(model, 2, 5, fuse=False, **kw).generate(ids, mask), ref)
    calls.clear()
    assert torch.equal(FastGenerator(model, 2, 5, **kw).generate(ids, mask), ref)
    assert len(calls) == 2 * 5 and calls[-1][2] == 1  # 2 layers x (prefill + 4 steps); decoding: T = 1
    if backend == "torch":
        torch._dynamo.reset()
        calls.clear()
        assert torch.equal(FastGenerator(model, 2, 5, compile="eager", **kw).generate(ids, mask), ref)
        assert len(calls) == 2 * 5  # traced into the compiled step as one op
