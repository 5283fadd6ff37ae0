"""``attention.feature_rope`` off: the feature maps read queries and keys before RoPE, so the linear terms do not
depend on positions; the softmax window keeps RoPE. Every path (one forward, prefill + decode, the static step,
attention transfer) feeds the maps the same unrotated q, k."""

from __future__ import annotations

import pytest
import torch

from lolcats.attention.layers import lolcats_modules
from lolcats.attention.modes import set_attention_mode
from lolcats.generation import FastGenerator
from test_generation import VOCAB, build, incremental_logits, left_pad


def rope_of(model, pos: torch.Tensor):
    """(cos, sin) of the model's rotary embedding at positions ``pos`` (B, T)."""
    x = torch.zeros(1, dtype=torch.float32)
    return model.model.rotary_emb(x, pos)


@pytest.mark.parametrize("kind", ["terraced_window", "sliding_window", "linear"])
@torch.no_grad()
def test_prefill_then_decode_equals_one_forward(kind):
    model = build("llama", kind, feature_rope=False)
    ids = torch.randint(1, VOCAB, (2, 35))
    inc = incremental_logits(model, ids, torch.ones_like(ids), splits=[13, 22])
    torch.testing.assert_close(inc, model(ids).logits, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_static_step_equals_generate():
    model = build("llama", feature_rope=False)
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (19, 7)])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)[:, ids.shape[1]:]
    assert torch.equal(FastGenerator(model, 2, 12, eos_token_ids=[], use_cuda_graph=False).generate(ids, mask), ref)


@torch.no_grad()
def test_features_do_not_depend_on_positions_and_the_window_does():
    """The same hidden states at positions 0.. and 37..: phi(q), phi(k) equal, q and k (rotated) differ; with
    feature_rope on (the default) phi(k) differs too."""
    for on in (False, True):
        model = build("llama", feature_rope=on)
        layer = next(iter(lolcats_modules(model)))
        h = torch.randn(1, 9, model.config.hidden_size)
        pos = torch.arange(9)[None]
        a, b = (layer.project_features(h, rope_of(model, p)) for p in (pos, pos + 37))
        assert not torch.allclose(a[1], b[1])  # k after RoPE
        assert torch.allclose(a[4], b[4], atol=1e-6) == (not on)  # phi(k)
        assert torch.allclose(a[3], b[3], atol=1e-6) == (not on)  # phi(q)


def test_attention_transfer_feeds_the_maps_what_the_student_does():
    """Distill mode computes the student's features from the same unrotated q, k as student mode."""
    model = build("llama", feature_rope=False)
    layer = next(iter(lolcats_modules(model)))
    seen, inputs = [], []
    features = layer.features
    layer.features = lambda q, k: seen.append((q.detach().clone(), k.detach().clone())) or features(q, k)
    layer.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw["hidden_states"].detach()), with_kwargs=True)
    ids = torch.randint(1, VOCAB, (1, 12))
    with torch.no_grad():
        model(ids)
    set_attention_mode(model, "distill")
    model(ids)
    (qs, ks), (qd, kd) = seen
    torch.testing.assert_close(qd, qs)
    torch.testing.assert_close(kd, ks)
    with torch.no_grad():
        q0, k0, _ = layer.qkv(inputs[0])  # the layer's q, k before RoPE
    torch.testing.assert_close(qs, q0)
    torch.testing.assert_close(ks, k0)
