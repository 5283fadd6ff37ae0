"""The gated Triton kernels (a log forget gate on the linear part) beyond what test_kernels.py checks
with its ``gated`` parametrization (outputs, gradients, final states, the decode step, real shapes on
a GPU): strong gates stay finite, a gate of one is the ungated kernel, and the layer on the triton
backend equals the torch backend. Same set-up as test_kernels.py (interpreter on CPU, NaN-filled outputs)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from test_kernels import DEV, _check_grad, _grads, _inputs, _log_gate, assert_close  # noqa: I001
from lolcats.ops.hybrid.naive import hybrid_attention_naive
from lolcats.ops.linear.naive import linear_attention_quadratic
from lolcats.ops.triton import hybrid_attention_triton, linear_attention_triton


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


@pytest.mark.parametrize("kind", ["linear", "sliding_window", "terraced_window"])
@torch.no_grad()
def test_gated_layer_on_the_triton_backend_equals_torch(monkeypatch, kind):
    """The model with the gate on the triton backend (fused full sequence, fused prefill then the
    decode kernel) gives the torch backend's logits."""
    from lolcats.attention.layers import lolcats_modules
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
