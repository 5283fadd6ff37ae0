"""A kept softmax layer's key/value store (attention/cache.py): full, or bounded to a window plus sink positions.

A bound covering every row changes nothing (the same slots, bit for bit); a small one gives the masked attention
over the sinks and the last W positions, through chunked prefill that wraps the ring and token-by-token decoding.
"""

from __future__ import annotations

import pytest
import torch

from lolcats.attention.cache import SoftmaxLayer, kv_visible
from lolcats.attention.generate import make_cache
from lolcats.attention.layers import lolcats_attention_by_layer
from lolcats.attention.use import set_softmax_window
from lolcats.generation import FastGenerator
from test_generation import VOCAB, left_pad
from test_softmax_layers import build


@torch.no_grad()
def test_bounded_store_gives_masked_attention_over_sinks_and_window():
    torch.manual_seed(0)
    model = build(kept=(0,), layers=2)
    set_softmax_window(model, window=4, sink=2)
    m = lolcats_attention_by_layer(model)[0]
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (23, 17)])
    B, T = ids.shape
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, T)
    h = model.model.embed_tokens(ids)
    q, k, v, _ = m.project(h, model.model.rotary_emb(h, pos))  # keys after RoPE at their true positions
    want = kv_visible(torch.where(mask.bool(), pos, -1), pos, 4, 2)  # (B, T, T): sinks, last 4, causal
    ref = m.softmax_attention(q, k, v, want[:, None])
    slot = m.softmax_slot(B, T, torch.float32, "cpu")
    assert slot.state.max_length == 6  # sink + window slots, not T
    outs, start = [], 0
    for end in (7, 8, 9, 14, 15, 18, T):  # chunks that wrap the ring, and single tokens
        sl = slice(start, end)
        outs.append(m.attend_softmax_cached(slot, q[:, :, sl], k[:, :, sl], v[:, :, sl], mask[:, :end], pos[:, sl]))
        start = end
    real = mask.bool()
    torch.testing.assert_close(torch.cat(outs, 2).transpose(1, 2)[real], ref.transpose(1, 2)[real],
                               atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_bound_covering_the_rows_changes_nothing():
    model = build()
    rows = [torch.randint(1, VOCAB, (n,)) for n in (19, 7, 12)]
    ids, mask = left_pad(rows)
    kw = dict(batch_size=4, max_new_tokens=10, eos_token_ids=[], use_cuda_graph=False)
    full = FastGenerator(model, **kw).generate(ids, mask)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)[:, ids.shape[1]:]
    set_softmax_window(model, window=ids.shape[1] + 6, sink=4)  # more slots than positions
    assert torch.equal(FastGenerator(model, **kw).generate(ids, mask), full)
    cache = make_cache(model)  # generate(): a bounded store, allocated at the first call
    assert [type(layer) for layer in cache.layers].count(SoftmaxLayer) == 2
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)[:, ids.shape[1]:],
                       out)


@torch.no_grad()
def test_small_bound_is_the_same_in_generate_and_fast_generator_and_bounds_memory():
    model = build()
    set_softmax_window(model, window=5, sink=2)
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (19, 7, 12)])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)[:, ids.shape[1]:]
    fast = FastGenerator(model, batch_size=4, max_new_tokens=10, eos_token_ids=[], use_cuda_graph=False,
                         prefill_tokens=20)  # one row per prefill group
    assert torch.equal(fast.generate(ids, mask), out)
    cache = make_cache(model, 1, max_length=100_000, device="meta")  # the serving engine's size: the bound
    assert {layer.state.max_length for layer in cache.layers if isinstance(layer, SoftmaxLayer)} == {7}
    set_softmax_window(model, 0)
    assert {layer.state.max_length for layer in make_cache(model, 1, max_length=50).layers
            if isinstance(layer, SoftmaxLayer)} == {50}


def test_softmax_window_is_checked():
    model = build(kept=(0,), layers=2)
    with pytest.raises(ValueError, match="a sink needs a window"):
        set_softmax_window(model, 0, 4)
    with pytest.raises(ValueError, match=">= 0"):
        set_softmax_window(model, -1)
