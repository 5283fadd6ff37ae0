"""The student mixers' shared contract, run over every registered mixer, and the state declaration.

A new mixer is one file plus a ``register_mixer`` call: :class:`PlainLinearMixer` below (linear attention
without a window, its own two-tensor state) is registered here and passes the same tests as the built-in ones:
prefill + decode equals one forward, left-padded rows equal rows alone, the fast path's static step equals
``generate()`` (and, on CUDA, the graphed step equals the eager one).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lolcats.attention.generate import make_cache
from lolcats.attention.layers import lolcats_modules
from lolcats.attention.mixers import MIXERS, Mixer, get_mixer, register_mixer
from lolcats.generation import FastGenerator
from lolcats.ops.state import LayerState
from test_generation import (VOCAB, build, check_fast_paths_on_cuda, check_left_padded_rows_equal_rows_alone,
                             incremental_logits, left_pad)


@dataclass
class PlainState(LayerState):
    kv: torch.Tensor  # (B, Hk, F, Dv) float32: sum of phi(k_j) v_j^T
    ks: torch.Tensor  # (B, Hk, F) float32: sum of phi(k_j)


class PlainLinearMixer(Mixer):
    """Causal linear attention, no window, no gate: the backend's linear op, continuing (kv, ks) every call."""

    has_window_factor = False

    def state_spec(self, dtype):
        layer = self.layer
        Hk, F = layer.num_kv_heads, layer.feature_map_k.out_dim
        return PlainState.declare(kv=((Hk, F, layer.head_dim), torch.float32), ks=((Hk, F), torch.float32))

    def sequence(self, q, k, v, fq, fk, positions=None, key_mask=None, return_weights=False, log_gate=None):
        if key_mask is not None:  # padding keys contribute nothing
            fk = fk * key_mask[:, None, :, None].to(fk.dtype)
        return self.backend(q).linear(fq, fk, v, None, False)[0], None

    def takes_full_path(self, step, q, piece) -> bool:
        return False  # every chunk continues the state (a fresh one is zero)

    def prefill_piece(self, state, q, k, v, fq, fk, pos, valid, log_gate=None):
        fk = fk * valid[:, None, :, None].to(fk.dtype)
        y, (kv, ks) = self.backend(q).linear(fq, fk, v, (state.kv, state.ks), True)
        state.kv.copy_(kv)
        state.ks.copy_(ks)
        return y

    def decode(self, state, q, k, v, fq, fk, step, log_gate=None):
        return self.prefill_piece(state, q, k, v, fq, fk, step.pos, step.valid_or_ones())


register_mixer("plain_linear", PlainLinearMixer)
NAMES = sorted(MIXERS)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_prefill_then_decode_equals_one_forward(name):
    model = build("llama", name)
    ids = torch.randint(1, VOCAB, (2, 35))  # > 4 windows of 8; prefill ends mid-block, a warm second chunk
    inc = incremental_logits(model, ids, torch.ones_like(ids), splits=[13, 22])
    torch.testing.assert_close(inc, model(ids).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_left_padded_rows_equal_rows_alone(name):
    check_left_padded_rows_equal_rows_alone(build("llama", name), padded_forward=True)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_static_step_equals_generate(name):
    """FastGenerator's eager step (static states, allocated from the spec, reset in place between prompts)
    gives generate()'s greedy tokens."""
    model = build("llama", name)
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (19, 7)])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)[:, ids.shape[1]:]
    fast = FastGenerator(model, 2, 12, eos_token_ids=[], use_cuda_graph=False)
    for _ in range(2):
        assert torch.equal(fast.generate(ids, mask), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_graph_equals_eager(name):
    check_fast_paths_on_cuda(build("llama", name).cuda())


@pytest.mark.parametrize("name", NAMES)
def test_cache_allocates_and_resets_from_the_declared_state(name):
    model = build("llama", name)
    layer = next(lolcats_modules(model))
    spec = layer.state_spec(torch.float32)
    cache = make_cache(model, 3, torch.float32, "cpu")
    for st in cache.states().values():
        assert isinstance(st, spec.state)
        tensors = st.tensors()
        assert [(n, tuple(t.shape[1:]), t.dtype) for n, t in tensors.items()] == \
               [(f.name, f.shape, f.dtype) for f in spec.fields]
        assert all(t.shape[0] == 3 for t in tensors.values())
        assert st.nbytes() == 3 * spec.nbytes()
        for t in tensors.values():
            t.fill_(7)
    for layer_cache in cache.layers:
        layer_cache.reset()
    for st in cache.states().values():
        for f, t in zip(spec.fields, st.tensors().values()):
            assert bool((t == f.empty).all()), f.name


def test_decode_state_declares_what_vllm_asks():
    """The built-in state's declaration: per-sequence shapes and dtypes in field order (vLLM's get_state_shape /
    get_state_dtype), -1 the empty value of the positions only."""
    layer = next(lolcats_modules(build("llama", "terraced_window", window=8)))
    spec = layer.state_spec(torch.bfloat16)
    F, D, Hk = 16, 16, 2  # hedgehog of feature_dim 8; head_dim 64 / 4; two KV heads
    assert [f.name for f in spec.fields] == ["win_k", "win_v", "win_fk", "win_pos", "kv", "ks", "sparse_k",
                                            "sparse_v", "sparse_fk", "sparse_pos"]
    assert spec.shapes() == ((Hk, 16, D), (Hk, 16, D), (Hk, 16, F), (16,), (Hk, F, D), (Hk, F), (Hk, 0, D),
                             (Hk, 0, D), (Hk, 0, F), (Hk, 0))
    assert spec.dtypes() == (torch.bfloat16,) * 3 + (torch.long, torch.float32, torch.float32) + \
           (torch.bfloat16,) * 3 + (torch.long,)
    assert {f.name for f in spec.fields if f.empty != 0} == {"win_pos", "sparse_pos"}


def test_unknown_kind_lists_the_registered_mixers():
    with pytest.raises(ValueError, match="unknown attention kind 'nope'; known: .*plain_linear"):
        get_mixer("nope")
