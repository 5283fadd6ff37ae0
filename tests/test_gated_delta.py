"""The gated delta rule (``ops/delta``) and its mixer (``attention.kind = gated_delta``).

The recurrent and chunked references agree (outputs, final state, gradients) at lengths that are not multiples
of the chunk, with an initial state and grouped-query heads; with the window covering the sequence the layer is
softmax attention exactly; the delta rule's parameters are transferred in stage 1, which lowers the MSE. The
shared mixer contract (prefill + decode = one forward, left padding, FastGenerator) is tests/test_mixers.py's,
run over every registered mixer, this one included. On CUDA with fla installed, fla's kernels equal the reference.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import save_tiny, write_alpaca
from lolcats.attention.generate import cache_kwarg_name, make_cache
from lolcats.attention.layers import lolcats_modules
from lolcats.attention.params import attention_parameters, stage1_checkpoint_names
from lolcats.checkpoint import load_tensors
from lolcats.config import ConfigError, load_config
from lolcats.ops import get_backend
from lolcats.ops.delta.naive import gated_delta_chunk, gated_delta_recurrent
from lolcats.pipeline import load_linearized, prepare, run_distill, stage_dirs
from test_generation import VOCAB, build, check_left_padded_rows_equal_rows_alone, incremental_logits
from test_pipeline import make_cfg


def inputs(B=2, H=4, Hk=2, T=37, Dk=8, Dv=6, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q = r(B, H, T, Dk)
    k = F.normalize(r(B, Hk, T, Dk), dim=-1)
    v = r(B, Hk, T, Dv)
    gate = F.logsigmoid(r(B, Hk, T) + 3)
    beta = torch.sigmoid(r(B, Hk, T))
    s0 = r(B, Hk, Dk, Dv) * 0.1
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, gate, beta)], s0.to(device)


@pytest.mark.parametrize("T", [1, 7, 64, 65, 130])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent(T, with_state):
    (q, k, v, g, beta), s0 = inputs(T=T)
    s0 = s0 if with_state else None
    o1, s1 = gated_delta_recurrent(q, k, v, g, beta, 0.5, s0, True)
    o2, s2 = gated_delta_chunk(q, k, v, g, beta, 0.5, s0, True)
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s2, s1, atol=1e-5, rtol=1e-4)


def test_chunked_gradients_equal_recurrent_and_are_finite():
    (q, k, v, g, beta), s0 = inputs(T=70)  # the references compute in float32
    grads = []
    for op in (gated_delta_recurrent, gated_delta_chunk):
        xs = [t.clone().requires_grad_(True) for t in (q, k, v, g, beta, s0)]
        o, s = op(*xs[:5], None, xs[5], True)
        (o.square().sum() + s.sum()).backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_one_step_is_the_delta_rule():
    """S = exp(g) S0; S += beta k (v - S^T k)^T; o = S^T q scale: fla's naive recurrent, written out for one token."""
    (q, k, v, g, beta), s0 = inputs(T=1, H=2, Hk=2)
    o, s = gated_delta_recurrent(q, k, v, g, beta, 0.5, s0, True)
    S = s0 * g[:, :, 0].exp()[..., None, None]
    kt, vt, b = k[:, :, 0], v[:, :, 0], beta[:, :, 0, None]
    S = S + kt[..., None] * (b * (vt - torch.einsum("bhkv,bhk->bhv", S, kt)))[..., None, :]
    torch.testing.assert_close(s, S)
    torch.testing.assert_close(o[:, :, 0], torch.einsum("bhk,bhkv->bhv", q[:, :, 0] * 0.5, S))


def test_padding_tokens_leave_the_state_unchanged():
    (q, k, v, g, beta), s0 = inputs(T=9)
    beta[:, :, 3:6] = 0
    g[:, :, 3:6] = 0
    keep = [0, 1, 2, 6, 7, 8]
    _, s_all = gated_delta_chunk(q, k, v, g, beta, None, s0, True)
    _, s_kept = gated_delta_recurrent(*(t[:, :, keep] for t in (q, k, v, g, beta)), None, s0, True)
    torch.testing.assert_close(s_all, s_kept, atol=1e-5, rtol=1e-4)


def test_the_registry_serves_the_reference_on_cpu():
    (q, k, v, g, beta), s0 = inputs(T=40)
    o, s = get_backend("auto", q).gated_delta(q, k, v, g, beta, None, s0, True)
    o1, s1 = gated_delta_recurrent(q, k, v, g, beta, None, s0, True)
    torch.testing.assert_close(o, o1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s, s1, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the mixer


@torch.no_grad()
def test_window_covering_the_sequence_is_softmax_exactly():
    model = build("llama", "gated_delta", window=64)
    ids = torch.randint(1, VOCAB, (2, 40))
    student = model(ids).logits
    for m in lolcats_modules(model):
        m.mode = "teacher"
    torch.testing.assert_close(student, model(ids).logits, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_keys_past_the_window_go_through_the_delta_state():
    """Past the window the output depends on the delta rule (its write strength), and the cache holds a state."""
    model = build("llama", "gated_delta", window=8)
    ids = torch.randint(1, VOCAB, (2, 30))
    before = model(ids).logits
    layer = next(lolcats_modules(model))
    layer.feature_map_delta.beta_bias.fill_(-30.0)  # beta ~ 0: nothing is written, S stays 0
    after = model(ids).logits
    torch.testing.assert_close(after[:, :8], before[:, :8])  # key 0 leaves the window of 8 at position 8
    assert (after[:, 8:] - before[:, 8:]).abs().amax() > 1e-4
    cache = make_cache(model, 2, torch.float32, "cpu")
    model(ids, use_cache=True, **{cache_kwarg_name(model): cache})
    st = cache.states()[1]
    assert st.delta.abs().amax() > 0 and bool((st.mass > 0).all())
    assert sorted(st.win_pos[0].tolist()) == list(range(22, 30))


@torch.no_grad()
def test_with_the_pooled_keys_gate_prefill_then_decode_equals_one_forward():
    """attention.gate adds its data-dependent log gate to the learned decay, on every path."""
    model = build("llama", "gated_delta", gate="pooled_keys")
    ids = torch.randint(1, VOCAB, (2, 35))
    inc = incremental_logits(model, ids, torch.ones_like(ids), splits=[13, 22])
    torch.testing.assert_close(inc, model(ids).logits, atol=2e-5, rtol=1e-4)
    check_left_padded_rows_equal_rows_alone(model, padded_forward=True)


@torch.no_grad()
def test_one_chunk_leaves_the_state_token_by_token_decoding_leaves():
    model = build("llama", "gated_delta", window=8)
    ids = torch.randint(1, VOCAB, (2, 29))
    caches = make_cache(model, 2, torch.float32, "cpu"), make_cache(model, 2, torch.float32, "cpu")
    model(ids, use_cache=True, **{cache_kwarg_name(model): caches[0]})
    for t in range(ids.shape[1]):
        model(ids[:, t : t + 1], position_ids=torch.full((2, 1), t), use_cache=True,
              **{cache_kwarg_name(model): caches[1]})
    for (i, a), b in zip(caches[0].states().items(), caches[1].states().values()):
        for name, t in a.tensors().items():
            torch.testing.assert_close(t, getattr(b, name), atol=1e-5, rtol=1e-4, msg=f"layer {i} {name}")


def test_attention_weights_are_refused_clearly():
    layer = next(lolcats_modules(build("llama", "gated_delta")))
    x = torch.randn(1, 4, 5, 16)
    with pytest.raises(ValueError, match="gated_delta: attention weights"):
        layer.mixer.sequence(x, x[:, :2], x[:, :2], x, x[:, :2], return_weights=True)


def test_delta_parameters_are_stage1_parameters():
    model = build("llama", "gated_delta")
    names = set(attention_parameters(model))
    for p in ("beta_weight", "beta_bias", "decay", "mass_scale"):
        assert {f"model.layers.{i}.self_attn.feature_map_delta.{p}" for i in range(2)} <= names
    assert set(stage1_checkpoint_names(model)) == names


@pytest.mark.parametrize("key,value", [("sparse_cache", 4), ("linear_scale", 0.5)])
def test_window_only_settings_are_refused(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"attention.{key}: needs a window kind.*gated_delta"):
        load_config(None, {"model": {"name": "x"}, "attention": {"kind": "gated_delta", key: value}})


def test_attention_cross_entropy_is_refused_at_start_up():
    with pytest.raises(ConfigError, match="distill.xent_factor: .*gated_delta"):
        load_config(None, {"model": {"name": "x"}, "attention": {"kind": "gated_delta"}, "distill": {"xent_factor": 1}})


def test_attention_transfer_lowers_the_mse(tmp_path):
    cfg = make_cfg(tmp_path, save_tiny(tmp_path / "model"), write_alpaca(tmp_path / "alpaca.jsonl", n=120),
                   **{"attention.kind": "gated_delta", "distill.max_steps": 8})
    run_distill(prepare(cfg))
    d1, _ = stage_dirs(cfg)
    h = json.loads((d1 / "summary.json").read_text())["history"]
    assert all(h[-1][f"mse/{i}"] < h[0][f"mse/{i}"] for i in range(2))
    saved = load_tensors(d1 / "best")
    assert any(".feature_map_delta.beta_weight" in n for n in saved)
    # the stage-1 checkpoint restores them: loaded, exported and read back by from_pretrained, the same logits
    import lolcats.hf  # noqa: F401  (registers the lolcats_* model types)
    from transformers import AutoModelForCausalLM

    from lolcats.hf import export_model

    model, tok = load_linearized(None, str(d1 / "best"), device="cpu", dtype="float32")
    layer = next(lolcats_modules(model))
    assert layer.feature_map_delta.beta_weight.abs().amax() > 0  # trained, not the zero initialisation
    ids = torch.randint(3, 60, (2, 30))
    export_model(model, tok, tmp_path / "export")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- fla's kernels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 65, 300])
def test_fla_kernels_equal_the_reference(T):
    pytest.importorskip("fla")
    (q, k, v, g, beta), s0 = inputs(T=T, Dk=32, Dv=32, device="cuda")
    xs = [t.clone().requires_grad_(True) for t in (q, k, v, g, beta)]
    o, s = get_backend("fla", q).gated_delta(*xs, None, s0, True)
    assert get_backend("auto", q).gated_delta is get_backend("fla", q).gated_delta  # auto's pick runs fla's too
    o1, s1 = gated_delta_chunk(q, k, v, g, beta, None, s0, True)
    torch.testing.assert_close(o, o1, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(s, s1, atol=1e-2, rtol=1e-2)
    if T > 1:  # the chunked kernel's backward
        o.sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in xs)
