"""The forget gate on the linear part (ops/gate.py): config, references against a brute-force
per-query computation, decode == full sequence, and the model with the gate on (prefill + decode
== one forward, left padding, constant state, attention transfer). Kernels: test_gate_kernels.py."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lolcats.attention.layers import lolcats_modules
from lolcats.attention.modes import collect_distill_outputs, set_attention_mode
from lolcats.config import Config, ConfigError, load_config
from lolcats.generation import FastGenerator
from lolcats.ops.decode.naive import absorb_chunk, decode_step_naive
from lolcats.ops.decode.state import DecodeState
from lolcats.ops.gate import cumulative_log_gate, forget_log_gate
from lolcats.ops.hybrid.naive import hybrid_attention_naive
from lolcats.ops.kinds import window_slots
from lolcats.ops.linear.naive import linear_attention_quadratic, linear_attention_recurrent
from test_generation import (VOCAB, build, check_fast_paths_on_cuda, check_left_padded_rows_equal_rows_alone,
                             decode_state_sizes, incremental_logits, left_pad)

KINDS = ("linear", "sliding_window", "terraced_window")


# ---------------------------------------------------------------- config and the gate itself


def test_gate_is_off_by_default_and_validated():
    assert load_config().attention.gate == "none"
    assert load_config(overrides=["--attention.gate", "pooled_keys"]).attention.gate == "pooled_keys"
    with pytest.raises(ConfigError, match="attention.gate: 'liger' is not one of 'none', 'pooled_keys'"):
        load_config(overrides=["--attention.gate", "liger"])


def test_gate_off_keeps_the_run_directories_of_earlier_runs():
    """The stage hash of a config with gate none is the hash it had before the field existed."""
    import hashlib
    import json

    from lolcats.config import HASHED_WHEN_SET

    cfg = Config()
    d = cfg.to_dict()
    for key in HASHED_WHEN_SET:  # the fields added after run directories existed, the gate among them
        sec, name = key.split(".")
        del d[sec][name]
    before = hashlib.sha256(json.dumps({s: d[s] for s in ("model", "attention")}, sort_keys=True).encode())
    assert cfg.fingerprint("model", "attention") == before.hexdigest()[:10]
    cfg.attention.gate = "pooled_keys"
    assert cfg.fingerprint("model", "attention") != before.hexdigest()[:10]


def test_pooled_keys_gate():
    k = torch.randn(2, 3, 5, 16) * 4
    lg = forget_log_gate(k, "pooled_keys")
    assert lg.shape == (2, 3, 5) and lg.dtype == torch.float32 and bool((lg < 0).all())
    torch.testing.assert_close(lg, F.logsigmoid(k.mean(-1)) / 16)
    assert forget_log_gate(k, "none") is None
    with pytest.raises(ValueError, match="known: none, pooled_keys"):
        forget_log_gate(k, "gla")


def test_cumulative_log_gate_sums_tokens_at_or_before_any_position():
    g = torch.Generator().manual_seed(0)
    lg = -torch.rand(2, 3, 7, generator=g)
    pos = torch.tensor([[1, 1, 1, 0, 1, 2, 3], [4, 0, 2, 1, 6, 5, 3]])  # any order; ties
    at = torch.tensor([[-1, 0, 1, 2, 9], [0, 3, 6, 2, -5]])
    want = torch.tensor([[[float((lg[b, h] * (pos[b] <= a)).sum()) for a in at[b]] for h in range(3)] for b in range(2)])
    torch.testing.assert_close(cumulative_log_gate(lg, pos, at), want)


# ---------------------------------------------------------------- references vs the definition


def _brute(q, k, v, fq, fk, wf, kind, w, scale, q_pos, k_pos, key_mask, lg, s0=None):
    """y (float64) query by query from the definition: window by positions, each linear key decayed by the
    product of the gates of the query tokens after it left the window and up to the query."""
    B, H, Tq, _ = q.shape
    G = H // k.shape[1]
    y = torch.zeros(B, H, Tq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            hk = h // G
            for i in range(Tq):
                pi = int(q_pos[b, i])
                steps = lambda lo: math.prod(math.exp(float(lg[b, hk, t])) for t in range(Tq)  # noqa: E731
                                             if lo < int(q_pos[b, t]) <= pi)
                num, den, scores = torch.zeros(v.shape[-1], dtype=torch.float64), 0.0, []
                for j in range(k.shape[2]):
                    pj = int(k_pos[b, j])
                    if not key_mask[b, j] or pj > pi:
                        continue
                    window = {"linear": False, "sliding_window": pi - pj < w,
                              "terraced_window": pi // w - pj // w <= 1}[kind]
                    left = {"linear": pj, "sliding_window": pj + w, "terraced_window": (pj // w + 2) * w}[kind]
                    if window:
                        scores.append((float(q[b, h, i].double() @ k[b, hk, j].double()) * scale, j))
                    elif left <= pi:
                        a = float(fq[b, h, i].double() @ fk[b, hk, j].double()) * steps(left)
                        num, den = num + a * v[b, hk, j].double(), den + a
                m = max((s for s, _ in scores), default=0.0)
                for s, j in scores:
                    e = float(wf[h]) * math.exp(s - m)
                    num, den = num + e * v[b, hk, j].double(), den + e
                if s0 is not None:
                    d0 = steps(-(10**9))
                    num = num + d0 * (fq[b, h, i].double() @ s0[0][b, hk].double())
                    den = den + d0 * float(fq[b, h, i].double() @ s0[1][b, hk].double())
                y[b, h, i] = num / den if den > 0 else 0.0
    return y


def _case(T=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, Hk, D, F_ = 2, 4, 2, 8, 6
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, Hk, T, D, generator=g), torch.randn(B, Hk, T, D, generator=g)
    fq, fk = torch.rand(B, H, T, F_, generator=g), torch.rand(B, Hk, T, F_, generator=g)
    wf = torch.rand(H, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :5] = False  # row 1 left-padded: pads at position 1 as HF generate puts them
    pos = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)
    lg = -torch.rand(B, Hk, T, generator=g) * mask[:, None]
    s0 = (torch.rand(B, Hk, F_, D, generator=g), torch.rand(B, Hk, F_, generator=g))
    return q, k, v, fq, fk, wf, mask, pos, lg, s0


@pytest.mark.parametrize("kind,w", [("sliding_window", 4), ("terraced_window", 4), ("sliding_window", 30),
                                    ("terraced_window", 3)])
def test_hybrid_reference_matches_brute_force(kind, w):
    q, k, v, fq, fk, wf, mask, pos, lg, s0 = _case()
    y, _ = hybrid_attention_naive(q, k, v, fq, fk, wf, kind, w, 0.3, pos, pos, mask, s0, log_gate=lg)
    want = _brute(q, k, v, fq, fk, wf, kind, w, 0.3, pos, pos, mask, lg, s0)
    rows = mask[:, None, :, None]
    torch.testing.assert_close((y.double() * rows), want * rows, atol=1e-5, rtol=1e-5)


def test_linear_reference_matches_brute_force_and_the_recurrent_form():
    q, k, v, fq, fk, wf, mask, pos, lg, s0 = _case()
    fk = fk * mask[:, None, :, None]
    y, st = linear_attention_quadratic(fq, fk, v, s0, True, log_gate=lg)
    want = _brute(q, k, v, fq, fk, wf, "linear", 1, 0.3, pos, pos, mask, lg, s0)
    rows = mask[:, None, :, None]
    torch.testing.assert_close(y.double() * rows, want * rows, atol=1e-5, rtol=1e-5)
    yr, sr = linear_attention_recurrent(fq, fk, v, s0, True, log_gate=lg)
    torch.testing.assert_close(yr, y, atol=1e-5, rtol=1e-5)
    for a, b in zip(sr, st):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_gate_of_one_is_the_ungated_function_exactly():
    q, k, v, fq, fk, wf, mask, pos, lg, s0 = _case()
    zero = torch.zeros_like(lg)
    for kind in ("sliding_window", "terraced_window"):
        a = hybrid_attention_naive(q, k, v, fq, fk, wf, kind, 4, 0.3, pos, pos, mask, s0, True)
        b = hybrid_attention_naive(q, k, v, fq, fk, wf, kind, 4, 0.3, pos, pos, mask, s0, True, zero)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    a, sa = linear_attention_quadratic(fq, fk, v, s0, True)
    b, sb = linear_attention_quadratic(fq, fk, v, s0, True, log_gate=zero)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(sa, sb))


# ---------------------------------------------------------------- decode == full sequence (references)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_steps_and_absorbed_chunks_equal_the_full_sequence(kind):
    """Prefill a chunk (absorb_chunk), then token by token (decode_step_naive), with the gate: every
    output equals the full-sequence reference; left padding and the initial state of the chunk."""
    q, k, v, fq, fk, wf, mask, pos, lg, _ = _case(T=19, seed=kind.__len__())
    B, H, T, D = q.shape
    Hk, F_, w, scale = k.shape[1], fk.shape[-1], 3, 0.3
    if kind == "linear":
        full = linear_attention_quadratic(fq, fk * mask[:, None, :, None], v, log_gate=lg)[0]
    else:
        full = hybrid_attention_naive(q, k, v, fq, fk, wf, kind, w, scale, pos, pos, mask, log_gate=lg)[0]
    st = DecodeState.empty(B, Hk, window_slots(kind, w), D, D, F_, torch.float32, "cpu")
    split = 8  # the prefill chunk: its output is the full-sequence one by construction; absorb it
    absorb_chunk(st, k[:, :, :split], v[:, :, :split], fk[:, :, :split], pos[:, :split], mask[:, :split], kind, w,
                 lg[:, :, :split])
    wfk = None if kind == "linear" else wf
    for t in range(split, T):
        y = decode_step_naive(q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], fk[:, :, t], st, pos[:, t], wfk, kind,
                              w, scale, mask[:, t], lg[:, :, t])
        torch.testing.assert_close(y, full[:, :, t], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the model with the gate on


@pytest.mark.parametrize("arch,kind", [("llama", k) for k in KINDS] + [("qwen2", "sliding_window")])
@torch.no_grad()
def test_gated_prefill_then_decode_equals_full_forward(arch, kind):
    model = build(arch, kind, gate="pooled_keys")
    ids = torch.randint(1, VOCAB, (2, 35))
    full = model(ids).logits
    inc = incremental_logits(model, ids, torch.ones_like(ids), splits=[13, 22])
    torch.testing.assert_close(inc, full, atol=2e-5, rtol=1e-4)
    for m in lolcats_modules(model):  # the gate changes the function
        m.cfg = replace(m.cfg, gate="none")
    assert not torch.allclose(model(ids).logits, full, atol=1e-4)


@pytest.mark.parametrize("kind", ["sliding_window", "terraced_window"])
@torch.no_grad()
def test_gated_left_padded_rows_equal_rows_alone(kind):
    check_left_padded_rows_equal_rows_alone(build("llama", kind, gate="pooled_keys"), padded_forward=True)


@torch.no_grad()
def test_gated_state_size_is_constant_and_equal_to_ungated():
    sizes = {}
    for gate in ("none", "pooled_keys"):
        _, steps = decode_state_sizes(build("llama", "terraced_window", gate=gate), 30)
        assert len(set(steps)) == 1
        sizes[gate] = steps[0]
    assert sizes["none"] == sizes["pooled_keys"]


@torch.no_grad()
def test_gated_fast_path_equals_generate():
    model = build("llama", "sliding_window", gate="pooled_keys")
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (23, 14, 4)])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)[:, ids.shape[1]:]
    fast = FastGenerator(model, batch_size=4, max_new_tokens=20, eos_token_ids=[], use_cuda_graph=False)
    assert torch.equal(fast.generate(ids, mask), ref)


@torch.no_grad()
def test_gate_of_one_in_the_model_is_todays_model_exactly(monkeypatch):
    """Every gated path with g = 1 (log gate 0) gives bitwise today's logits: the gate only multiplies."""
    import lolcats.attention.module as module

    ids = torch.randint(1, VOCAB, (2, 30))
    plain = build("llama", "terraced_window")
    want_full, want_inc = plain(ids).logits, incremental_logits(plain, ids, torch.ones_like(ids), [11, 19])
    monkeypatch.setattr(module, "forget_log_gate", lambda k, gate: torch.zeros(k.shape[:3]))
    gated = build("llama", "terraced_window", gate="pooled_keys")
    assert torch.equal(gated(ids).logits, want_full)
    assert torch.equal(incremental_logits(gated, ids, torch.ones_like(ids), [11, 19]), want_inc)


def test_attention_transfer_trains_with_the_gate():
    """Distill mode: the loss sees the gate; feature maps and window factors get gradients, the
    parameter-free gate none of its own (keys are detached in attention transfer)."""
    losses = {}
    for gate in ("none", "pooled_keys"):
        model = build("llama", "terraced_window", gate=gate)
        set_attention_mode(model, "distill")
        for m in lolcats_modules(model):  # a gradient could only reach k_proj through the gate
            m.k_proj.weight.requires_grad_(True)
        ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
        with collect_distill_outputs(model) as outs:
            model(ids)
        loss = sum(o.mse for o in outs)
        loss.backward()
        attn = model.model.layers[0].self_attn
        assert attn.feature_map_q.weight.grad.abs().sum() > 0 and attn.window_factors.grad.abs().sum() > 0
        assert attn.k_proj.weight.grad is None
        losses[gate] = float(loss.detach())
    assert losses["none"] != losses["pooled_keys"]


def test_study_config_file_turns_the_gate_on():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config([repo / "configs/smollm2-135m.yaml", repo / "configs/attention/hedgehog-terraced-gated.yaml"])
    assert (cfg.attention.gate, cfg.attention.kind) == ("pooled_keys", "terraced_window")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_gated_cuda_graph_path_equals_eager_and_generate():
    check_fast_paths_on_cuda(build("llama", "terraced_window", gate="pooled_keys").cuda())
