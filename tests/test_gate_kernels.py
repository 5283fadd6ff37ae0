"""The gated Triton kernels (a log forget gate on the linear part) against the PyTorch references:
outputs, gradients (the gate's too), final states, the decode step, and the layer on the triton
backend. Same set-up as test_kernels.py (interpreter on CPU, NaN-filled outputs); ``gpu`` tests
add real model shapes."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from test_kernels import CUDA, DEV, GPU_SHAPES, TOL, _check_grad, _grads, _inputs, assert_close  # noqa: I001
from lolcats.ops.decode.naive import DecodeState, decode_step_naive, window_slots
from lolcats.ops.hybrid.naive import hybrid_attention_naive
from lolcats.ops.linear.naive import linear_attention_quadratic
from lolcats.ops.triton import hybrid_attention_triton, linear_attention_triton
from lolcats.ops.triton.decode import decode_step_triton


def _log_gate(B, Hk, T, strength=0.3, seed=7):
    """Log gates in [-strength, 0): strength 0.3 forgets within tens of tokens, 8 within one."""
    g = torch.Generator().manual_seed(seed)
    return (-torch.rand(B, Hk, T, generator=g) * strength).to(DEV).requires_grad_()


@pytest.mark.parametrize("T", [1, 37, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_linear_matches_reference(T, dtype):
    q, k, v, fq, fk, _ = _inputs(1, 4, 2, T, 16, 8, dtype)
    lg = _log_gate(1, 2, T)
    g = torch.Generator().manual_seed(3)
    s0 = (torch.rand(1, 2, 8, 16, generator=g).to(DEV).requires_grad_(),
          torch.rand(1, 2, 8, generator=g).to(DEV).requires_grad_())
    ins = [fq, fk, v, lg, *s0]
    y, st = linear_attention_triton(fq, fk, v, s0, True, lg)
    yr, sr = linear_attention_quadratic(fq, fk, v, s0, True, log_gate=lg)
    tol = TOL[dtype]
    assert y.dtype == yr.dtype
    assert_close(y, yr, tol, "y")
    for a, b, n in zip(st, sr, ("kv", "ks")):
        assert_close(a, b, tol, f"final {n}")
    w = [torch.randn(t.shape, generator=g).to(DEV) for t in (y, *st)]
    loss = lambda outs: sum((t.float() * wt).sum() for t, wt in zip(outs, w))  # noqa: E731
    gk = torch.autograd.grad(loss((y, *st)), ins)
    gr = torch.autograd.grad(loss((yr, *sr)), ins)
    for a, b, n in zip(gk, gr, ("dfq", "dfk", "dv", "dlog_gate", "dkv0", "dks0")):
        assert_close(a, b, tol, n)


GATED_HYBRID_CASES = [  # (T, window, dtype): odd lengths, windows below / at / not dividing the chunk
    (1, 16, torch.float32),
    (37, 16, torch.float32),
    (100, 16, torch.float32),
    (130, 64, torch.float32),
    (150, 40, torch.float32),
    (130, 64, torch.bfloat16),
]


@pytest.mark.parametrize("kind", ["sliding_window", "terraced_window"])
@pytest.mark.parametrize("T,window,dtype", GATED_HYBRID_CASES)
def test_gated_hybrid_matches_reference(kind, T, window, dtype):
    q, k, v, fq, fk, wf = _inputs(1, 4, 2, T, 16, 8, dtype, seed=T + window)
    lg = _log_gate(1, 2, T, seed=T)
    ins = [q, k, v, fq, fk, wf, lg]
    y = hybrid_attention_triton(q, k, v, fq, fk, wf, kind, window, None, lg)
    yr, _ = hybrid_attention_naive(q, k, v, fq, fk, wf, kind, window, log_gate=lg)
    tol = TOL[dtype]
    assert y.dtype == yr.dtype and y.shape == yr.shape
    assert_close(y, yr, tol, "y")
    names = ("dq", "dk", "dv", "dfq", "dfk", "dwindow_factor", "dlog_gate")
    for a, b, n in zip(_grads(y, ins), _grads(yr, ins), names):
        _check_grad(a, b, tol, n)


@pytest.mark.parametrize("kind", ["linear", "sliding_window", "terraced_window"])
def test_strong_gates_stay_finite(kind):
    """Log gates down to -8 per token (e^-500 across a chunk): every exponent the kernels take is <= 0,
    so nothing overflows; outputs and gradients match the reference."""
    q, k, v, fq, fk, wf = _inputs(2, 2, 1, 150, 16, 8, torch.float32, seed=1)
    lg = _log_gate(2, 1, 150, strength=8.0)
    if kind == "linear":
        ins, y, yr = [fq, fk, v, lg], linear_attention_triton(fq, fk, v, log_gate=lg)[0], \
            linear_attention_quadratic(fq, fk, v, log_gate=lg)[0]
    else:
        ins = [q, k, v, fq, fk, wf, lg]
        y = hybrid_attention_triton(q, k, v, fq, fk, wf, kind, 16, None, lg)
        yr = hybrid_attention_naive(q, k, v, fq, fk, wf, kind, 16, log_gate=lg)[0]
    assert_close(y, yr, 1e-4, "y")
    for a, b in zip(_grads(y, ins), _grads(yr, ins)):
        assert torch.isfinite(a).all()
        _check_grad(a, b, 1e-4, "dwindow_factor")  # sums of cancelling terms: scale + 1


def test_gate_of_one_equals_the_ungated_kernel():
    q, k, v, fq, fk, wf = _inputs(1, 4, 2, 100, 16, 8, torch.float32)
    zero = torch.zeros(1, 2, 100, device=DEV)
    for kind in ("sliding_window", "terraced_window"):
        assert_close(hybrid_attention_triton(q, k, v, fq, fk, wf, kind, 16, None, zero),
                     hybrid_attention_triton(q, k, v, fq, fk, wf, kind, 16), 1e-5, kind)
    assert_close(linear_attention_triton(fq, fk, v, log_gate=zero)[0], linear_attention_triton(fq, fk, v)[0], 1e-5,
                 "linear")


def test_gated_batch_beyond_the_grid_runs_in_slices(monkeypatch):
    import lolcats.ops.triton as tri

    q, k, v, fq, fk, wf = _inputs(5, 4, 2, 20, 16, 8, torch.float32)
    lg = _log_gate(5, 2, 20)
    runs = []
    for limit in (tri.MAX_GRID_Y, 8):
        monkeypatch.setattr(tri, "MAX_GRID_Y", limit)
        y, st = tri.linear_attention_triton(fq, fk, v, None, True, lg)
        yh = tri.hybrid_attention_triton(q, k, v, fq, fk, wf, "terraced_window", 8, None, lg)
        runs.append((y, *st, yh, *torch.autograd.grad((y * y).sum() + (yh * yh).sum(), [q, fq, lg])))
    for a, b, n in zip(*runs, ("y", "kv", "ks", "y hybrid", "dq", "dfq", "dlog_gate")):
        assert_close(a, b, 1e-5, n, floor=1e-6)


@pytest.mark.parametrize("kind,dtype", [("linear", torch.float32), ("sliding_window", torch.float32),
                                        ("terraced_window", torch.float32), ("terraced_window", torch.bfloat16)])
def test_gated_decode_step_matches_reference(kind, dtype):
    B, H, Hk, D, F, w = 3, 4, 2, 16, 8, 4
    st = DecodeState.empty(B, Hk, window_slots(kind, w), D, D, F, dtype, DEV)
    st2 = copy.deepcopy(st)
    g = torch.Generator().manual_seed(0)
    wf = torch.rand(H, generator=g).to(DEV) if kind != "linear" else None
    pos = torch.zeros(B, dtype=torch.long, device=DEV)
    for t in range(11):
        q, fq = torch.randn(B, H, D, generator=g), torch.rand(B, H, F, generator=g)
        k, v = torch.randn(B, Hk, D, generator=g), torch.randn(B, Hk, D, generator=g)
        fk = torch.rand(B, Hk, F, generator=g)
        q, k, v, fq, fk = (x.to(DEV, dtype) for x in (q, k, v, fq, fk))
        lg = (-torch.rand(B, Hk, generator=g)).to(DEV)
        valid = torch.tensor([True, t >= 3, t % 2 == 0], device=DEV)  # left padding, gaps
        y1 = decode_step_naive(q, k, v, fq, fk, st, pos, wf, kind, w, D**-0.5, valid, lg)
        y2 = decode_step_triton(q, k, v, fq, fk, st2, pos, wf, kind, w, D**-0.5, valid, lg)
        assert_close(y2, y1, TOL[dtype], f"y at step {t}", floor=1e-6)
        for name, a in vars(st).items():
            if a.numel():
                assert_close(getattr(st2, name), a, TOL[dtype], f"{name} at step {t}", floor=1e-6)
        pos = pos + valid.long()


@pytest.mark.parametrize("kind", ["linear", "sliding_window", "terraced_window"])
@torch.no_grad()
def test_gated_layer_on_the_triton_backend_equals_torch(monkeypatch, kind):
    """The model with the gate on the triton backend (fused full sequence, fused prefill then the
    decode kernel) gives the torch backend's logits."""
    from lolcats.attention.convert import lolcats_modules
    from test_generation import VOCAB, build, incremental_logits

    monkeypatch.setenv("LOLCATS_TRITON_ON_CPU", "1")
    model = build("llama", kind, gate="pooled_keys").to(DEV)
    ids = torch.randint(1, VOCAB, (2, 70), generator=torch.Generator().manual_seed(0)).to(DEV)
    outs = {}
    for backend in ("torch", "triton"):
        for m in lolcats_modules(model):
            m.cfg = replace(m.cfg, backend=backend)
        outs[backend] = (model(ids).logits, incremental_logits(model, ids, torch.ones_like(ids), splits=[66]))
    for a, b, n in zip(outs["triton"], outs["torch"], ("full", "prefill + decode")):
        assert_close(a, b, 1e-4, n)


# ----------------------------------------------------------------------------- GPU, real shapes


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kind", ["linear", "sliding_window", "terraced_window"])
@pytest.mark.parametrize("B,H,Hk,D,F,T", GPU_SHAPES)
def test_gpu_gated_real_shapes(kind, B, H, Hk, D, F, T):
    q, k, v, fq, fk, wf = _inputs(B, H, Hk, T, D, F, torch.bfloat16, seed=T)
    with torch.no_grad():  # hedgehog-like features: rows of a softmax
        fq.copy_(torch.softmax(fq.float() * 4, -1))
        fk.copy_(torch.softmax(fk.float() * 4, -1))
    lg = _log_gate(B, Hk, T, strength=0.1)  # Liger's scale: logsigmoid(x) / 16 is about -0.04 at x = 0
    if kind == "linear":
        ins = [fq, fk, v, lg]
        y = linear_attention_triton(fq, fk, v, log_gate=lg)[0]
        yr = linear_attention_quadratic(fq, fk, v, log_gate=lg)[0]
        names = ("dfq", "dfk", "dv", "dlog_gate")
    else:
        ins = [q, k, v, fq, fk, wf, lg]
        y = hybrid_attention_triton(q, k, v, fq, fk, wf, kind, 64, None, lg)
        yr = hybrid_attention_naive(q, k, v, fq, fk, wf, kind, 64, log_gate=lg)[0]
        names = ("dq", "dk", "dv", "dfq", "dfk", "dwindow_factor", "dlog_gate")
    assert_close(y, yr, 2e-2, "y")
    gk = _grads(y, ins)
    gr = _grads(yr, ins)
    del yr
    for a, b, n in zip(gk, gr, names):
        _check_grad(a, b, 3e-2, n)
