"""The gated delta rule (``ops/delta``) and its mixer (``attention.kind = gated_delta``).

The recurrent and chunked references agree (outputs, final state, gradients) at lengths that are not multiples
of the chunk, with an initial state and grouped-query heads; with the window covering the sequence the layer is
softmax attention exactly; the delta rule's parameters are transferred in stage 1, which lowers the MSE. The
mixer's block-wise path equals the same function written over every key (quadratic masks and decay): outputs,
state and gradients, with padding and continued chunks; its largest tensor grows linearly with the length. The
shared mixer contract (prefill + decode = one forward, left padding, FastGenerator) is tests/test_mixers.py's,
run over every registered mixer, this one included. On CUDA with fla installed, fla's kernels equal the reference.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import save_tiny, write_alpaca
from lolcats.attention.convert import convert_model
from lolcats.attention.generate import cache_kwarg_name, make_cache
from lolcats.attention.layers import lolcats_modules
from lolcats.attention.params import attention_parameters, stage1_checkpoint_names
from lolcats.checkpoint import load_tensors
from lolcats.config import AttentionConfig, ConfigError, load_config
from lolcats.ops import get_backend
from lolcats.ops.common import expand_kv_heads
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


# ---------------------------------------------------------------- the block-wise path


@functools.lru_cache
def delta_layer(window: int, heads: int = 6, kv_heads: int = 2, seed: int = 0):
    """A gated_delta layer with grouped heads (3 query heads per KV head, as SmolLM2) and random learned maps."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=8 * heads, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    convert_model(model, AttentionConfig(kind="gated_delta", window_size=window, feature_map="hedgehog",
                                         feature_dim=8, feature_init="random"))
    layer = next(lolcats_modules(model))
    with torch.no_grad():
        for p in (layer.window_factors, *layer.feature_map_delta.parameters()):
            p.copy_(torch.randn_like(p) * 0.5 + p)
    return layer


def quadratic_attend(mixer, st, q, k, v, fq, fk, pos, valid, log_gate):
    """The mixer's function written out with every key of the chunk: window masks (B, T, W + T) by position,
    the leaving key by mask and argmax, the decayed count through a (T, T) decay. -> y, S after, n (B, Hk, T)."""
    W, H, T = mixer.cfg.window_size, q.shape[1], q.shape[2]
    gates = mixer.layer.feature_map_delta
    cat = lambda a, b: torch.cat([a, b.to(a.dtype)], 2)  # noqa: E731
    ek, ev, efk = cat(st.win_k, k), cat(st.win_v, v), cat(st.win_fk, fk)
    epos, evalid = torch.cat([st.win_pos, pos], 1), torch.cat([st.win_pos >= 0, valid], 1)
    dist = pos[:, :, None] - epos[:, None, :]  # (B, T, N)
    s = (q.float() @ expand_kv_heads(ek.float(), H).transpose(-1, -2)) * mixer.scaling
    s = s.masked_fill(~(evalid[:, None, :] & (dist >= 0) & (dist < W))[:, None], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a = mixer.window_factor().float().view(1, H, 1, 1) * torch.exp(s - m)
    num, den = a @ expand_kv_heads(ev.float(), H), a.sum(-1)
    leaves = evalid[:, None, :] & (dist == W) & valid[:, :, None]
    left, idx = leaves.any(-1), leaves.float().argmax(-1)  # (B, T)
    take = lambda x: x.gather(2, idx[:, None, :, None].expand(*x.shape[:2], -1, x.shape[-1]))  # noqa: E731
    kd, vd = F.normalize(take(efk).float(), dim=-1), take(ev).float()
    beta = gates.beta(vd) * left[:, None].float()
    g = (gates.log_decay()[None, :, None] + log_gate.float()) * valid[:, None].float()
    o, S = gated_delta_chunk(F.normalize(fq.float(), dim=-1), kd, vd, g, beta, 1.0, st.delta, True)
    G = g.cumsum(-1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    decay = torch.exp(torch.where(causal, G[..., :, None] - G[..., None, :], float("-inf")))  # (B, Hk, T, T)
    n = G.exp() * st.mass[..., None] + (decay @ left[:, None, :, None].float())[..., 0]
    mu = expand_kv_heads(n * gates.scale()[:, None], H)
    num, den = num + mu[..., None] * o.float(), den + mu
    return torch.where(den[..., None] > 0, num / den.clamp_min(1e-30)[..., None], 0.0), S, n


def padded_rows(P: int, T: int):
    """Three rows over P + T columns: full, left-padded, right-padded (positions running on, as the serving
    engine's): positions and valid (3, P + T)."""
    L = P + T
    valid = torch.ones(3, L, dtype=torch.bool)
    valid[1, : L // 3 + 2] = False
    valid[2, max(1, 2 * L // 3):] = False
    pos = torch.arange(L).expand(3, L).clone()
    pos[1] = (valid[1].long().cumsum(-1) - 1).clamp_min(0)
    return pos, valid


def random_chunk(layer, pos, valid, seed: int):
    g = torch.Generator().manual_seed(seed)
    B, T = pos.shape
    H, Hk, D, Fd = layer.num_heads, layer.num_kv_heads, layer.head_dim, layer.feature_map_k.out_dim
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    xs = [r(B, H, T, D), r(B, Hk, T, D), r(B, Hk, T, D), r(B, H, T, Fd).abs(), r(B, Hk, T, Fd).abs(),
          F.logsigmoid(r(B, Hk, T) + 2) * valid[:, None]]
    return [x.requires_grad_(True) for x in xs]


@pytest.mark.parametrize("T", [1, 5, 64, 130, 300])
@pytest.mark.parametrize("W,P", [(16, 0), (16, 45), (64, 0), (64, 70)])
def test_block_wise_path_equals_the_quadratic_form(T, W, P):
    """Outputs at valid queries, state and gradients (inputs and learned maps) equal the form over every key,
    from an empty state and continuing one (P tokens before), with left and right padding."""
    layer = delta_layer(W)
    mixer = layer.mixer
    pos, valid = padded_rows(P, T)
    st = mixer.empty_state(3, torch.float32, "cpu")
    if P:
        with torch.no_grad():
            *x, lg = random_chunk(layer, pos[:, :P], valid[:, :P], seed=1)
            mixer.attend(st, *x, pos[:, :P], valid[:, :P], lg)
    pos, valid = pos[:, P:], valid[:, P:]
    xs = random_chunk(layer, pos, valid, seed=2)
    params = [layer.window_factors, *layer.feature_map_delta.parameters()]
    w = torch.randn(3, layer.num_heads, T, layer.head_dim) * valid[:, None, :, None]  # pad outputs are not read
    y0, S0, n0 = quadratic_attend(mixer, st, *xs[:5], pos, valid, xs[5])
    y1 = mixer.attend(st.map(torch.clone), *xs[:5], pos, valid, xs[5], write=False)  # the training path's call
    assert torch.isfinite(y1).all()  # padding queries too
    torch.testing.assert_close(y1 * valid[:, None, :, None], y0 * valid[:, None, :, None], atol=1e-5, rtol=1e-4)
    for i, (a, b) in enumerate(zip(*(torch.autograd.grad((y * w).sum(), xs + params) for y in (y1, y0)))):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"gradient {i}")
    with torch.no_grad():
        mixer.attend(st, *xs[:5], pos, valid, xs[5])
    torch.testing.assert_close(st.delta, S0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(st.mass, n0[..., -1], atol=1e-5, rtol=1e-4)


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op makes while active (the backward's ops included)."""

    numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


def test_training_path_memory_is_linear_in_the_length():
    """No T x T tensor: the largest tensor a forward and backward of the whole-sequence path makes grows as T."""
    layer = delta_layer(16)
    per_token = []
    for T in (256, 512, 1024):
        pos, valid = torch.arange(T).expand(2, T), torch.ones(2, T, dtype=torch.bool)
        *xs, lg = random_chunk(layer, pos, valid, seed=0)
        with LargestTensor() as largest:
            y, _ = layer.mixer.sequence(*xs, log_gate=lg)
            y.sum().backward()
        per_token.append(largest.numel / T)
    assert max(per_token) <= 1.1 * min(per_token), per_token


# ---------------------------------------------------------------- fla's kernels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 65, 300])
def test_fla_kernels_equal_the_reference(T):
    pytest.importorskip("fla")
    from lolcats.ops.fla_backend import fla_gated_delta

    (q, k, v, g, beta), s0 = inputs(T=T, Dk=32, Dv=32, device="cuda")
    o, s = fla_gated_delta(q, k, v, g, beta, None, s0, True)  # fla's kernels (the decode step at T = 1)
    assert get_backend("auto", q).gated_delta is get_backend("fla", q).gated_delta  # auto's pick runs fla's too
    o1, s1 = gated_delta_chunk(q, k, v, g, beta, None, s0, True)
    torch.testing.assert_close(o, o1, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(s, s1, atol=1e-2, rtol=1e-2)
    if T > 1:  # gradients through the backend: fla's backward where fla runs it here, else the reference's
        xs = [t.clone().requires_grad_(True) for t in (q, k, v, g, beta)]
        get_backend("fla", q).gated_delta(*xs, None, s0, True)[0].sum().backward()
        ref = [t.clone().requires_grad_(True) for t in (q, k, v, g, beta)]
        gated_delta_chunk(*ref, None, s0, True)[0].sum().backward()
        for x, r in zip(xs, ref):
            torch.testing.assert_close(x.grad, r.grad, atol=5e-2, rtol=5e-2)
