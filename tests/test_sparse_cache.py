"""LoLA's sparse global cache: off is today's layer, prefill + decode equals one forward, hand cases
of what the cache keeps and what it folds into (kv, ks), the fast path, the load-time option."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pytest
import torch

from lolcats.attention.generate import make_cache
from lolcats.attention.layers import lolcats_modules
from lolcats.attention.modes import set_attention_mode
from lolcats.attention.use import set_sparse_cache
from lolcats.config import AttentionConfig, ConfigError, UseSettings, config_from_dict
from lolcats.generation import FastGenerator
from lolcats.ops.decode.naive import absorb_chunk, decode_step_naive
from lolcats.ops.decode.state import DecodeState
from lolcats.ops.hybrid.naive import hybrid_attention_naive
from lolcats.ops.kinds import window_slots
from lolcats.ops.sparse.cache import self_recall_error
from lolcats.ops.sparse.naive import sparse_chunk
from test_generation import (VOCAB, build, check_fast_paths_on_cuda, check_left_padded_rows_equal_rows_alone,
                             decode_state_sizes, incremental_logits, left_pad)

WINDOWS = ("sliding_window", "terraced_window")


pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_model(kind: str, size: int = 3, arch: str = "llama", score: str | None = None, sink: int | None = None):
    model = build(arch, kind)
    set_sparse_cache(model, size, score, sink)
    return model


def rand_chunk(B=2, H=4, Hk=2, T=29, D=8, F=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return (r(B, H, T, D), r(B, Hk, T, D), r(B, Hk, T, D), r(B, H, T, F).exp(), r(B, Hk, T, F).exp(),
            torch.rand(H, generator=g))


def sorted_cache(st: DecodeState):
    """The sparse cache's pairs ordered by position (slots may be permuted)."""
    order = st.sparse_pos.argsort(-1)
    take = lambda x: x.gather(2, order[..., None].expand(*order.shape, x.shape[-1]))  # noqa: E731
    return st.sparse_pos.gather(-1, order), take(st.sparse_k), take(st.sparse_v), take(st.sparse_fk)


# ---------------------------------------------------------------- off = today's layer


@pytest.mark.parametrize("kind", ["linear", *WINDOWS])
def test_sparse_cache_zero_state_is_todays(kind):
    st = DecodeState.for_layer(2, 2, kind, 4, 8, 8, 6, torch.float32, "cpu")
    assert st.sparse_size == 0 and all(getattr(st, n).numel() == 0 for n in vars(st) if n.startswith("sparse_"))
    S = window_slots(kind, 4)
    assert st.nbytes() == 2 * 2 * S * (8 + 8 + 6) * 4 + 2 * S * 8 + 2 * 2 * (6 * 8 + 6) * 4  # the six old buffers
    model = build("llama", kind)
    assert all(m.cfg.sparse_cache == 0 for m in lolcats_modules(model))
    assert make_cache(model, 2).states()[0].sparse_size == 0


@pytest.mark.parametrize("kind", WINDOWS)
def test_chunk_reference_with_empty_cache_is_lolcats(kind):
    """The sparse machinery with G = 0 folds every leaving token at once: the plain hybrid reference."""
    q, k, v, fq, fk, wf = rand_chunk()
    B, T, w = 2, q.shape[2], 5
    pos = torch.arange(T).expand(B, T)
    valid = torch.ones(B, T, dtype=torch.bool)
    ref, _ = hybrid_attention_naive(q, k, v, fq, fk, wf, kind, w, 0.3)
    st = DecodeState.for_layer(B, 2, kind, w, 8, 8, 6, torch.float32, "cpu")
    want = DecodeState.for_layer(B, 2, kind, w, 8, 8, 6, torch.float32, "cpu")
    ys = []
    for sl in (slice(0, 11), slice(11, T)):
        y, st = sparse_chunk(st, q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl], fk[:, :, sl], pos[:, sl],
                             valid[:, sl], wf, kind, w, 0.3, "self_recall")
        absorb_chunk(want, k[:, :, sl], v[:, :, sl], fk[:, :, sl], pos[:, sl], valid[:, sl], kind, w)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 2), ref)
    for name, a in vars(want).items():
        torch.testing.assert_close(getattr(st, name), a, msg=name)


# ---------------------------------------------------------------- one reference, every path


@pytest.mark.parametrize("kind", WINDOWS)
@pytest.mark.parametrize("sink", [0, 2])
def test_chunk_reference_equals_decode_steps(kind, sink):
    q, k, v, fq, fk, wf = rand_chunk(T=33, seed=1)
    B, T, w = 2, q.shape[2], 4
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :6] = False  # row 1 left-padded
    pos = (valid.long().cumsum(-1) - 1).clamp_min(0)
    one = DecodeState.for_layer(B, 2, kind, w, 8, 8, 6, torch.float32, "cpu", sparse=3)
    ys = []
    for t in range(T):
        ys.append(decode_step_naive(q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], fk[:, :, t], one, pos[:, t],
                                    wf, kind, w, 0.3, valid[:, t], sparse_sink=sink))
    st = DecodeState.for_layer(B, 2, kind, w, 8, 8, 6, torch.float32, "cpu", sparse=3)
    chunks = []
    for sl in (slice(0, 9), slice(9, 20), slice(20, T)):
        y, st = sparse_chunk(st, q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl], fk[:, :, sl], pos[:, sl],
                             valid[:, sl], wf, kind, w, 0.3, "self_recall", sink)
        chunks.append(y)
    ref = torch.stack(ys, 2)
    torch.testing.assert_close(torch.cat(chunks, 2)[valid[:, None, :].expand_as(ref[..., 0])],
                               ref[valid[:, None, :].expand_as(ref[..., 0])])
    assert int((one.sparse_pos >= 0).sum()) == 2 * 2 * 3  # the cache filled up
    sunk = ((one.sparse_pos >= 0) & (one.sparse_pos < sink)).sum((1, 2))
    assert sunk.tolist() == [2 * sink] * 2  # every KV head of every row still holds positions 0..sink-1
    for a, b in zip(sorted_cache(st), sorted_cache(one)):
        torch.testing.assert_close(a, b)
    filled = (one.win_pos >= 0)[:, None, :, None]  # empty slots hold stale values
    assert torch.equal(st.win_pos, one.win_pos)
    for name in ("win_k", "win_v", "win_fk"):
        torch.testing.assert_close(getattr(st, name) * filled, getattr(one, name) * filled, msg=name)
    for name in ("kv", "ks"):
        torch.testing.assert_close(getattr(st, name), getattr(one, name), msg=name)


@pytest.mark.parametrize("kind,arch,sink", [("sliding_window", "llama", 0), ("terraced_window", "llama", 0),
                                            ("sliding_window", "mistral", 0), ("terraced_window", "llama", 2)])
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(kind, arch, sink):
    model = sparse_model(kind, arch=arch, sink=sink)
    ids = torch.randint(1, VOCAB, (2, 35))
    full = model(ids).logits
    inc = incremental_logits(model, ids, torch.ones_like(ids), splits=[13, 22])
    torch.testing.assert_close(inc, full, atol=2e-5, rtol=1e-4)
    set_sparse_cache(model, 0)
    assert (model(ids).logits - full).abs().max() > 1e-3  # the cache changed the function


@pytest.mark.parametrize("kind", WINDOWS)
@torch.no_grad()
def test_left_padded_rows_equal_rows_alone(kind):
    check_left_padded_rows_equal_rows_alone(sparse_model(kind))


@pytest.mark.parametrize("kind", WINDOWS)
@torch.no_grad()
def test_cache_as_long_as_the_text_is_softmax_attention(kind):
    """Nothing is ever folded: every key is a softmax term and the window factor cancels."""
    model = sparse_model(kind, size=40)
    ids = torch.randint(1, VOCAB, (2, 30))
    student = model(ids).logits
    set_attention_mode(model, "teacher")
    torch.testing.assert_close(student, model(ids).logits, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_state_size_is_constant_in_generated_length():
    cache, sizes = decode_state_sizes(sparse_model("sliding_window"))
    st = cache.states()[0]
    assert len(set(sizes)) == 1 and st.sparse_size == 3 and bool((st.sparse_pos >= 0).all())
    assert sizes[0] == sum(s.nbytes() for s in cache.states().values())


@pytest.mark.parametrize("kind", WINDOWS)
@torch.no_grad()
def test_fast_path_greedy_equals_generate(kind):
    model = sparse_model(kind)
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (23, 14, 4)])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)[:, ids.shape[1]:]
    fast = FastGenerator(model, batch_size=4, max_new_tokens=24, eos_token_ids=[], use_cuda_graph=False)
    assert torch.equal(fast.generate(ids, mask), ref)
    assert torch.equal(fast.generate(ids, mask), ref)  # reset in place, sparse buffers included


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_graph_path_equals_eager():
    """The sparse decode step (topk, gathers and scatters on fixed-size buffers) captures in a graph."""
    check_fast_paths_on_cuda(sparse_model("terraced_window").cuda())


def test_sequence_forward_has_gradients():
    model = sparse_model("terraced_window")
    for p in model.parameters():
        p.requires_grad_(True)
    model(torch.randint(1, VOCAB, (1, 30))).logits.sum().backward()
    grads = [m.q_proj.weight.grad for m in lolcats_modules(model)]
    assert all(g is not None and bool(torch.isfinite(g).all()) and g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------- hand cases


def run_steps(pairs, G, w=1, score="self_recall", sink=0):
    """Sliding window of ``w``, one KV head, F = Dv = 2: decode steps over (phi(k), v) pairs."""
    st = DecodeState.for_layer(1, 1, "sliding_window", w, 2, 2, 2, torch.float32, "cpu", sparse=G)
    for p, (fk, v) in enumerate(pairs):
        fk, v = torch.tensor([[fk]], dtype=torch.float32), torch.tensor([[v]], dtype=torch.float32)
        decode_step_naive(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), v, torch.ones(1, 1, 2), fk, st,
                          torch.tensor([p]), torch.ones(1), "sliding_window", w, 1.0, sparse_score=score,
                          sparse_sink=sink)
    return st


def test_cache_holds_the_pair_the_state_recalls_worst():
    """Pairs along e0 with value (1, 0) are recalled exactly once one is folded; the lone e1 pair
    with value (0, 5) is not (the state has no e1 mass): it stays cached, everything else folds."""
    pairs = [([1.0, 0.0], [1.0, 0.0])] * 10
    pairs[1] = ([0.0, 1.0], [0.0, 5.0])
    st = run_steps(pairs, G=1, w=2)
    assert st.sparse_pos.tolist() == [[[1]]]
    assert st.sparse_v.tolist() == [[[[0.0, 5.0]]]]
    left = 8 - 1  # positions 0..7 left the window (8, 9 in it), position 1 is cached
    torch.testing.assert_close(st.kv, torch.tensor([[[[float(left), 0.0], [0.0, 0.0]]]]))
    torch.testing.assert_close(st.ks, torch.tensor([[[float(left), 0.0]]]))


def test_eviction_folds_the_pushed_out_pair_and_rescores():
    """Window 1, cache 1. By hand, scores against the state at each eviction:
    p=1: token 0 leaves, cache empty -> cached.
    p=2: token 1 (e0, (1,0)) leaves: scores 0: 2, 1: 1 -> fold 1: kv = e0 (1,0), ks = e0.
    p=3: token 2 (e1, (0,2.1)) leaves: scores 0: 2, 2: 2.1 -> fold 0: kv += e1 (0,2), ks += e1.
    p=4: token 3 (e0, (0,1)) leaves: 2 re-scored against kv: |2.1 - 2| = 0.1 (it was 2.1 when cached);
         3: |(0,1) - (1,0)| = sqrt 2 -> fold 2 (a stale score would have kept it)."""
    pairs = [([0.0, 1.0], [0.0, 2.0]), ([1.0, 0.0], [1.0, 0.0]), ([0.0, 1.0], [0.0, 2.1]),
             ([1.0, 0.0], [0.0, 1.0]), ([1.0, 0.0], [9.0, 9.0])]
    after3 = run_steps(pairs[:4], G=1)
    assert after3.sparse_pos.tolist() == [[[2]]]
    torch.testing.assert_close(after3.kv, torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]]))
    torch.testing.assert_close(after3.ks, torch.tensor([[[1.0, 1.0]]]))
    score = self_recall_error(after3.sparse_v, after3.sparse_fk, after3.sparse_pos, after3.kv, after3.ks)
    torch.testing.assert_close(score, torch.tensor([[[0.1]]]), atol=1e-5, rtol=0)
    after4 = run_steps(pairs, G=1)
    assert after4.sparse_pos.tolist() == [[[3]]]
    torch.testing.assert_close(after4.kv, torch.tensor([[[[1.0, 0.0], [0.0, 4.1]]]]))
    torch.testing.assert_close(after4.ks, torch.tensor([[[1.0, 2.0]]]))
    assert after4.win_pos.tolist() == [[4]]


def test_sink_keeps_the_first_pairs_whatever_their_score():
    """Cache 2 under the recency score keeps the latest two to leave (6, 7); with sink 1, position 0 holds
    one slot for good and the other keeps the latest (7); 1..6 fold into the state."""
    pairs = [([1.0, 0.0], [1.0, 0.0])] * 10
    assert sorted(run_steps(pairs, G=2, w=2, score="recency").sparse_pos.flatten().tolist()) == [6, 7]
    for score in ("recency", "self_recall"):
        sunk = run_steps(pairs, G=2, w=2, score=score, sink=1)
        assert 0 in sunk.sparse_pos.flatten().tolist()
        if score == "recency":
            assert sorted(sunk.sparse_pos.flatten().tolist()) == [0, 7]
        torch.testing.assert_close(sunk.ks, torch.tensor([[[6.0, 0.0]]]))  # 8 left the window, 2 cached


def test_recency_score_keeps_the_latest_to_leave():
    st = run_steps([([1.0, 0.0], [1.0, 0.0])] * 10, G=2, w=2, score="recency")
    assert sorted(st.sparse_pos.flatten().tolist()) == [6, 7]


def test_cached_pair_is_a_softmax_term_by_hand():
    """Step 10 (window 1, cache 1 holding the e1 pair at position 3): token 9 leaves and folds
    (recalled exactly), the new token takes the window. With phi(q) = (1, 1), window factor g = 0.5 and
    scores 0 (window) and 20 (cache, the max):
        y = (phi(q) kv + g (e^-20 v_new + e^0 v_3)) / (phi(q) ks + g (e^-20 + 1)),  kv = 9 e0 (1, 0)."""
    st = run_steps([([1.0, 0.0], [1.0, 0.0])] * 3 + [([0.0, 1.0], [0.0, 5.0])] + [([1.0, 0.0], [1.0, 0.0])] * 6,
                   G=1)
    assert st.sparse_pos.tolist() == [[[3]]]
    st.sparse_k.copy_(torch.tensor([[[[0.0, 20.0]]]]))  # its key (q . k = 20)
    y = decode_step_naive(torch.tensor([[[0.0, 1.0]]]), torch.zeros(1, 1, 2), torch.zeros(1, 1, 2),
                          torch.ones(1, 1, 2), torch.tensor([[[1.0, 0.0]]]), st, torch.tensor([10]),
                          torch.full((1,), 0.5), "sliding_window", 1, 1.0)
    e = torch.exp(torch.tensor(-20.0))
    want = (torch.tensor([9.0, 0.0]) + 0.5 * torch.tensor([0.0, 5.0])) / (9.0 + 0.5 * (e + 1))
    torch.testing.assert_close(y[0, 0], want)
    assert st.ks.tolist() == [[[9.0, 0.0]]]


# ---------------------------------------------------------------- settings and loading


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="window kind"):
        config_from_dict({"attention": {"kind": "linear", "sparse_cache": 4}})
    with pytest.raises(ConfigError, match=">= 0"):
        config_from_dict({"attention": {"sparse_cache": -1}})
    with pytest.raises(ConfigError, match="sparse_score"):
        config_from_dict({"attention": {"sparse_score": "oldest"}})
    with pytest.raises(ConfigError, match="xent"):
        config_from_dict({"attention": {"sparse_cache": 4}, "distill": {"xent_factor": 1.0}})
    with pytest.raises(ConfigError, match="finetune.cuda_graph"):
        config_from_dict({"attention": {"sparse_cache": 4}, "finetune": {"cuda_graph": True}})
    for sink, size in ((4, 4), (1, 0), (-1, 4)):
        with pytest.raises(ConfigError, match="sparse_sink"):
            config_from_dict({"attention": {"sparse_cache": size, "sparse_sink": sink}})
    model = sparse_model("terraced_window", size=4, sink=2)
    set_sparse_cache(model, 0)  # off again: its sink goes with it
    assert {(m.cfg.sparse_cache, m.cfg.sparse_sink) for m in lolcats_modules(model)} == {(0, 0)}
    model = build("llama", "linear")
    with pytest.raises(ConfigError, match="window kind"):
        set_sparse_cache(model, 4)


def test_fingerprint_unchanged_at_default():
    base = config_from_dict({})
    assert config_from_dict({"attention": {"sparse_cache": 0}}).fingerprint() == base.fingerprint()
    assert config_from_dict({"attention": {"sparse_cache": 8}}).fingerprint() != base.fingerprint()


def test_model_source_checks_the_option():
    from lolcats.models.trained import ModelSource

    with pytest.raises(ValueError, match="linearized"):
        ModelSource(base="x", use=UseSettings(sparse_cache=4))
    with pytest.raises(ValueError, match="--sparse-cache N"):
        ModelSource(checkpoint="x", use=UseSettings(sparse_score="recency"))
    with pytest.raises(ValueError, match="--sparse-sink needs"):
        ModelSource(checkpoint="x", use=UseSettings(sparse_sink=4))


def eval_with_model_flags(tmp_path, monkeypatch, flags: list[str]):
    """``lolcats eval --checkpoint ... FLAGS --ppl`` on a tiny converted model (loading stubbed):
    (the model, the saved JSON)."""
    from conftest import tiny_tokenizer
    from lolcats import cli
    from lolcats.evaluation import eval_main
    from lolcats.models import trained

    tok = tiny_tokenizer()
    model = build("llama", "terraced_window", vocab=len(tok.get_vocab()))
    monkeypatch.setattr(trained, "checkpoint_pair", lambda source: ("stage1", None))
    monkeypatch.setattr(trained, "_load_stages", lambda *a, **k: (model, tok))
    monkeypatch.setattr(trained, "checkpoint_use", lambda directory: UseSettings())  # no checkpoint to read it from
    text = tmp_path / "docs.txt"
    text.write_text("the cat sat on the mat and the dog ran to the big red house\n" * 4)
    out = tmp_path / "eval.json"
    parser = argparse.ArgumentParser()
    cli._model_flags(parser)  # the flags of export, generate, chat, serve and eval
    args, rest = parser.parse_known_args(["--checkpoint", "somewhere/best", *flags])
    eval_main(cli.model_source(args, rest), ppl=[str(text)], seq_len=32, output=str(out), device="cpu",
              print_table=False)
    return model, json.loads(out.read_text())


def test_cli_flag_reaches_the_loaded_model_and_the_eval_output(tmp_path, monkeypatch):
    model, saved = eval_with_model_flags(tmp_path, monkeypatch,
                                         ["--sparse-cache", "5", "--sparse-score", "recency", "--sparse-sink", "2"])
    assert {(m.cfg.sparse_cache, m.cfg.sparse_score, m.cfg.sparse_sink) for m in lolcats_modules(model)} == {
        (5, "recency", 2)}
    assert model.config.lolcats_attention["sparse_cache"] == 5
    assert saved["models"]["linearized"]["sparse_cache"] == 5
    assert saved["models"]["linearized"]["sparse_score"] == "recency"
    assert saved["models"]["linearized"]["sparse_sink"] == 2


def test_attention_config_roundtrip_keeps_the_fields():
    cfg = replace(AttentionConfig(), sparse_cache=16, sparse_score="recency")
    assert AttentionConfig(**vars(cfg)) == cfg


@torch.no_grad()
def test_fast_path_evicts_only_where_a_block_starts(monkeypatch):
    """Terraced window 8: FastGenerator runs the eviction through the cache only at steps where some row's token
    starts a block (the host knows the positions), and its tokens still equal generate()'s, which evicts at
    every step; the reference decode step with evict=False is the same step wherever nothing leaves."""
    import lolcats.ops.decode.evict as evict

    model = sparse_model("terraced_window")
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (21, 14)])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)[:, ids.shape[1]:]
    calls = []
    real = evict.evict_to_cache
    monkeypatch.setattr(evict, "evict_to_cache", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = FastGenerator(model, batch_size=2, max_new_tokens=30, eos_token_ids=[], use_cuda_graph=False)
    fast.prefill(ids, mask)
    calls.clear()
    fast.decode(29)
    assert torch.equal(fast.out[:, :30], ref)
    # decode step k feeds positions 21 + k and 14 + k: one of them starts a block (% 8 == 0) at k = 2, 3 (mod 8)
    assert len(calls) == 8 * 2  # 8 of the 29 steps, 2 layers
