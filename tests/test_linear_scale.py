"""attention.linear_scale: the weight of the hybrid's linear terms against its softmax terms. 1 is today's
layer; 0 leaves softmax over the window (and the sparse cache); prefill + decode equals one forward; the
load-time option reaches the model."""

from __future__ import annotations

import pytest
import torch

from lolcats.attention.layers import lolcats_modules
from lolcats.attention.use import set_linear_scale, set_sparse_cache
from lolcats.config import ConfigError, config_from_dict
from lolcats.generation import FastGenerator
from lolcats.ops.hybrid.naive import hybrid_attention_naive, window_masks
from test_generation import VOCAB, build, incremental_logits, left_pad
from test_sparse_cache import eval_with_model_flags

WINDOWS = ("sliding_window", "terraced_window")

pytestmark = pytest.mark.usefixtures("one_thread")


def scaled_model(kind: str, scale: float, sparse: int = 0, sink: int = 0, arch: str = "llama"):
    model = build(arch, kind)
    if sparse:
        set_sparse_cache(model, sparse, None, sink)
    set_linear_scale(model, scale)
    return model


@torch.no_grad()
def test_scale_one_is_todays_layer():
    ids = torch.randint(1, VOCAB, (2, 30))
    model = build("llama", "terraced_window")
    today = model(ids).logits
    set_linear_scale(model, 1.0)
    assert torch.equal(model(ids).logits, today)
    set_linear_scale(model, 0.3)
    assert (model(ids).logits - today).abs().max() > 1e-3  # it changes the function


@pytest.mark.parametrize("kind", WINDOWS)
def test_scale_zero_leaves_softmax_over_the_window_by_hand(kind):
    """phi(q) times 0: the linear terms vanish from numerator and normaliser; the window factor cancels."""
    g = torch.Generator().manual_seed(0)
    B, H, T, D, F, w = 2, 2, 21, 8, 6, 4
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    fq, fk = (torch.randn(B, H, T, F, generator=g).exp() for _ in range(2))
    y, _ = hybrid_attention_naive(q, k, v, fq * 0.0, fk, torch.full((H,), 0.3), kind, w)
    pos = torch.arange(T).expand(B, T)
    win, _ = window_masks(pos, pos, kind, w)  # (B, 1, T, T)
    s = (q @ k.transpose(-1, -2) / D ** 0.5).masked_fill(~win, float("-inf"))
    torch.testing.assert_close(y, s.softmax(-1) @ v)


@pytest.mark.parametrize("kind,arch,sparse,sink", [
    ("sliding_window", "llama", 0, 0), ("terraced_window", "llama", 0, 0), ("sliding_window", "mistral", 0, 0),
    ("terraced_window", "llama", 6, 2), ("sliding_window", "llama", 3, 0)])
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(kind, arch, sparse, sink):
    model = scaled_model(kind, 0.3, sparse, sink, arch)
    ids = torch.randint(1, VOCAB, (2, 35))
    full = model(ids).logits
    inc = incremental_logits(model, ids, torch.ones_like(ids), splits=[13, 22])
    torch.testing.assert_close(inc, full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", WINDOWS)
@torch.no_grad()
def test_fast_path_greedy_equals_generate(kind):
    model = scaled_model(kind, 0.3, sparse=4, sink=1)
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (23, 14, 4)])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)[:, ids.shape[1]:]
    fast = FastGenerator(model, batch_size=4, max_new_tokens=20, eos_token_ids=[], use_cuda_graph=False)
    assert torch.equal(fast.generate(ids, mask), ref)


def test_settings_are_checked():
    for bad in (-0.5, float("nan"), float("inf"), True):
        with pytest.raises(ConfigError, match="linear_scale"):
            config_from_dict({"attention": {"linear_scale": bad}})
    with pytest.raises(ConfigError, match="window kind"):
        config_from_dict({"attention": {"kind": "linear", "linear_scale": 0.5}})
    assert config_from_dict({"attention": {"linear_scale": 0}}).attention.linear_scale == 0
    with pytest.raises(ConfigError, match="window kind"):
        set_linear_scale(build("llama", "linear"), 0.5)
    base = config_from_dict({})
    assert config_from_dict({"attention": {"linear_scale": 1.0}}).fingerprint() == base.fingerprint()
    assert config_from_dict({"attention": {"linear_scale": 0.5}}).fingerprint() != base.fingerprint()


def test_model_source_checks_the_option():
    from lolcats.config import UseSettings
    from lolcats.models.trained import ModelSource

    with pytest.raises(ValueError, match="linearized"):
        ModelSource(base="x", use=UseSettings(linear_scale=0.5))
    with pytest.raises(ValueError, match=">= 0"):
        ModelSource(checkpoint="x", use=UseSettings(linear_scale=-1.0))


def test_cli_flag_reaches_the_loaded_model_and_the_eval_output(tmp_path, monkeypatch):
    model, saved = eval_with_model_flags(tmp_path, monkeypatch, ["--linear-scale", "0.25"])
    assert {m.cfg.linear_scale for m in lolcats_modules(model)} == {0.25}
    assert saved["models"]["linearized"]["linear_scale"] == 0.25
