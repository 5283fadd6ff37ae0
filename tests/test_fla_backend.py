"""The fla backend's wrapper (normaliser column, padding to an even value width, GQA, states),
checked on CPU against the reference with a stand-in for fla's kernel that has fla's interface
and its even-width requirement. The real kernel is compared on CUDA in test_kernels.py."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lolcats.ops.delta.naive import gated_delta_recurrent
from lolcats.ops.linear.naive import linear_attention_quadratic


def _fake_chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                            cu_seqlens=None):
    """fla's contract: (B, T, H, K) inputs, un-normalised causal linear attention, state (B, H, K, V)."""
    assert not normalize and scale == 1.0
    assert v.shape[-1] % 2 == 0, "fla's bf16 backward needs an even value width"
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.clone()
    out = []
    for t in range(T):
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t].float(), v[:, t].float())
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t].float(), S))
    return torch.stack(out, 1).to(v.dtype), (S if output_final_state else None)


def _fake_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, **kw):
    """fla's contract: (B, T, H, .) inputs, as many key heads as query heads, state (B, H, K, V)."""
    assert q.shape[2] == k.shape[2] == v.shape[2] == g.shape[2] == beta.shape[2], "fla: one head count"
    hf = lambda x: x.transpose(1, 2)  # noqa: E731
    o, s = gated_delta_recurrent(hf(q), hf(k), hf(v), hf(g), hf(beta), scale, initial_state, output_final_state)
    return hf(o), s


@pytest.fixture()
def fla_linear(monkeypatch):
    pkg = types.ModuleType("fla")
    ops = types.ModuleType("fla.ops")
    la = types.ModuleType("fla.ops.linear_attn")
    la.chunk_linear_attn = _fake_chunk_linear_attn
    gdr = types.ModuleType("fla.ops.gated_delta_rule")
    gdr.chunk_gated_delta_rule = gdr.fused_recurrent_gated_delta_rule = _fake_gated_delta_rule
    stubs = (("fla", pkg), ("fla.ops", ops), ("fla.ops.linear_attn", la), ("fla.ops.gated_delta_rule", gdr))
    for name, mod in stubs:
        monkeypatch.setitem(sys.modules, name, mod)
    from lolcats.ops import BACKENDS

    before = dict(BACKENDS)
    sys.modules.pop("lolcats.ops.fla_backend", None)
    yield importlib.import_module("lolcats.ops.fla_backend").fla_linear
    sys.modules.pop("lolcats.ops.fla_backend", None)  # registered with the stand-in: forget it
    BACKENDS.clear()
    BACKENDS.update(before)


@pytest.mark.parametrize("Dv", [8, 7])
def test_fla_wrapper_matches_reference(fla_linear, Dv):
    g = torch.Generator().manual_seed(0)
    B, H, Hk, T, F = 2, 4, 2, 11, 6
    fq, fk = torch.rand(B, H, T, F, generator=g), torch.rand(B, Hk, T, F, generator=g)
    v = torch.randn(B, Hk, T, Dv, generator=g)
    s0 = (torch.randn(B, Hk, F, Dv, generator=g), torch.rand(B, Hk, F, generator=g) + 1)
    for init in (None, s0):
        y, (kv, z) = fla_linear(fq, fk, v, initial_state=init, output_final_state=True)
        yr, (kvr, zr) = linear_attention_quadratic(fq, fk, v, initial_state=init, output_final_state=True)
        torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(kv, kvr, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(z, zr, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T", [1, 9])
def test_fla_gated_delta_wrapper_matches_reference(fla_linear, T):
    """Layout (head-first to fla's sequence-first), GQA (KV heads repeated for fla, one head of each group's
    final state back) and the initial state, against the reference."""
    fla_gated_delta = sys.modules["lolcats.ops.fla_backend"].fla_gated_delta
    g = torch.Generator().manual_seed(0)
    B, H, Hk, K, V = 2, 4, 2, 6, 5
    q, k = torch.randn(B, H, T, K, generator=g), F.normalize(torch.randn(B, Hk, T, K, generator=g), dim=-1)
    v, s0 = torch.randn(B, Hk, T, V, generator=g), torch.randn(B, Hk, K, V, generator=g)
    gate, beta = F.logsigmoid(torch.randn(B, Hk, T, generator=g)), torch.rand(B, Hk, T, generator=g)
    for init in (None, s0):
        o, s = fla_gated_delta(q, k, v, gate, beta, 0.5, init, True)
        o1, s1 = gated_delta_recurrent(q, k, v, gate, beta, 0.5, init, True)
        torch.testing.assert_close(o, o1, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s, s1, rtol=1e-4, atol=1e-5)


def test_fla_gated_backward_is_used_only_where_fla_runs_it(fla_linear):
    """fla 0.6 refuses the gated chunk backward on Hopper with Triton 3.4.0 - 3.7.0 (fla issue #640) unless tilelang
    is installed; elsewhere it runs it."""
    ok = sys.modules["lolcats.ops.fla_backend"].fla_backward_ok
    assert not ok((9, 0), "3.6.0", False) and not ok((9, 0), "3.4.0", False)
    assert ok((9, 0), "3.7.1", False) and ok((9, 0), "3.3.1", False) and ok((9, 0), "3.6.0", True)
    assert ok((8, 0), "3.6.0", False) and ok((10, 0), "3.6.0", False)
