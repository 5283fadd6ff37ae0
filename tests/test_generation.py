"""Constant-memory generation: cache vs full forward, generate(), the fast path, CLI helpers."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import pytest
import torch

from lolcats.attention.convert import convert_model
from lolcats.attention.modes import set_attention_mode
from lolcats.config import AttentionConfig
from lolcats.generation import FastGenerator, LolcatsCache, enable_lolcats_generation, make_cache
from lolcats.attention.generate import cache_kwarg_name
from lolcats.generation.text import ChatSession, run_generate, truncate_at_stop

KINDS = ("linear", "sliding_window", "terraced_window")
VOCAB = 96


def build(arch: str = "llama", kind: str = "terraced_window", window: int = 8, seed: int = 0, vocab: int = VOCAB,
          gate: str = "none", **attn):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    cfg = cls(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    convert_model(model, AttentionConfig(kind=kind, window_size=window, feature_map="hedgehog", feature_dim=8,
                                         feature_init="random", init_window_factor=0.5, gate=gate, **attn))
    set_attention_mode(model, "student")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return enable_lolcats_generation(model)


def left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """rows of lengths n_i -> ids, mask (B, max n), left-padded."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = r, 1
    return ids, mask


def incremental_logits(model, ids, mask, splits) -> torch.Tensor:
    """Prefill in chunks ending at ``splits`` then one token at a time: logits (B, T, V)."""
    cache, outs, start = make_cache(model), [], 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    ends = list(splits) + list(range(splits[-1] + 1, ids.shape[1] + 1))
    for end in ends:
        sl = slice(start, end)
        outs.append(model(ids[:, sl], attention_mask=mask[:, :end], position_ids=pos[:, sl],
                          use_cache=True, **{cache_kwarg_name(model): cache}).logits)
        start = end
    return torch.cat(outs, 1)


CASES = [("llama", k) for k in KINDS] + [("mistral", "sliding_window"), ("qwen2", "terraced_window")]


@pytest.mark.parametrize("arch,kind", CASES)
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(arch, kind):
    model = build(arch, kind)
    ids = torch.randint(1, VOCAB, (2, 35))  # > 4 windows of 8; prefill ends mid-block, a warm second chunk
    full = model(ids).logits
    inc = incremental_logits(model, ids, torch.ones_like(ids), splits=[13, 22])
    torch.testing.assert_close(inc, full, atol=2e-5, rtol=1e-4)


def check_left_padded_rows_equal_rows_alone(model, padded_forward: bool = False):
    """Three rows left-padded into one batch, read by a prefill of 20 columns then token-by-token decode
    (and, with ``padded_forward``, by one padded forward without a cache), give each row's logits alone.
    Returns ids, mask (3, 37) and the incremental logits."""
    rows = [torch.randint(1, VOCAB, (n,)) for n in (37, 26, 9)]
    ids, mask = left_pad(rows)
    inc = incremental_logits(model, ids, mask, splits=[20])
    outs = [inc]
    if padded_forward:
        outs.append(model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits)
    for i, r in enumerate(rows):
        alone = model(r[None]).logits[0]
        for out in outs:
            torch.testing.assert_close(out[i, ids.shape[1] - len(r):], alone, atol=2e-5, rtol=1e-4)
    return ids, mask, inc


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_left_padded_rows_equal_rows_alone(kind):
    check_left_padded_rows_equal_rows_alone(build("llama", kind))


@torch.no_grad()
def decode_state_sizes(model, steps: int = 40):
    """(the cache, its state bytes after each of ``steps`` one-token steps after a 12-token prompt), batch 2."""
    cache = make_cache(model)
    kw = {cache_kwarg_name(model): cache, "use_cache": True}
    model(torch.randint(1, VOCAB, (2, 12)), **kw)
    sizes = []
    for _ in range(steps):
        model(torch.randint(1, VOCAB, (2, 1)), **kw)
        sizes.append(cache.state_nbytes())
    return cache, sizes


def test_state_size_is_constant_in_generated_length():
    cache, sizes = decode_state_sizes(build("llama", "terraced_window"))
    assert len(set(sizes)) == 1 and sizes[0] > 0
    assert cache.get_seq_length() == 52


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_generate_greedy_equals_manual_loop_over_full_forwards(kind):
    model = build("llama", kind)
    rows = [torch.randint(1, VOCAB, (n,)) for n in (19, 7)]
    ids, mask = left_pad(rows)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False)
    for i, r in enumerate(rows):
        seq = r[None]
        for _ in range(14):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out[i, ids.shape[1]:], seq[0, len(r):])


@torch.no_grad()
def test_generate_with_explicit_cache_and_sampling():
    model = build("qwen2", "sliding_window")
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (11, 5)])
    cache = make_cache(model, batch_size=2)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                            **{cache_kwarg_name(model): cache})
    assert isinstance(cache, LolcatsCache) and cache.get_seq_length() == ids.shape[1] + 5
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=1.0, top_p=0.9)
    assert sampled.shape == (2, ids.shape[1] + 12) and int(sampled.max()) < VOCAB
    assert greedy.shape == (2, ids.shape[1] + 6)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_fast_path_greedy_equals_generate(kind):
    model = build("llama", kind)
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (23, 14, 4)])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)[:, ids.shape[1]:]
    fast = FastGenerator(model, batch_size=4, max_new_tokens=24, eos_token_ids=[], use_cuda_graph=False)
    assert torch.equal(fast.generate(ids, mask), ref)
    assert torch.equal(fast.generate(ids, mask), ref)  # reusable: the state is reset in place
    sampled = FastGenerator(model, 3, 10, temperature=0.7, top_p=0.8, eos_token_ids=[]).generate(ids, mask)
    assert sampled.shape == (3, 10) and int(sampled.max()) < VOCAB


@pytest.mark.parametrize("kind", ["linear", "terraced_window"])
@torch.no_grad()
def test_compiled_step_equals_eager(kind):
    """The step's forward traced by torch.compile (dynamo; the eager backend keeps it fast on CPU) gives the
    eager tokens, and later steps reuse one compiled graph."""
    import torch._dynamo

    model = build("llama", kind)
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (23, 14)])
    eager = FastGenerator(model, 2, 12, eos_token_ids=[], use_cuda_graph=False).generate(ids, mask)
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = FastGenerator(model, 2, 12, eos_token_ids=[], use_cuda_graph=False, compile="eager")
    assert torch.equal(compiled.generate(ids, mask), eager)
    assert torch.equal(compiled.generate(ids, mask), eager)
    assert counts["stats"]["unique_graphs"] >= 1 and not counts["recompiles"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@torch.no_grad()
def test_fast_path_fusion_keeps_tokens(arch):
    """FastGenerator fuses every layer's q/k/v projection (fuse=True, the default; Qwen2 with its biases):
    the same greedy tokens as generate(), eager and compiled; fuse=False turns it off on the model."""
    from lolcats.attention.layers import lolcats_modules

    model = build(arch, "terraced_window")
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (17, 6)])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)[:, ids.shape[1]:]
    fused = FastGenerator(model, 2, 10, eos_token_ids=[], use_cuda_graph=False)
    assert all(m.fused_qkv is not None for m in lolcats_modules(model))
    assert torch.equal(fused.generate(ids, mask), ref)
    compiled = FastGenerator(model, 2, 10, eos_token_ids=[], use_cuda_graph=False, compile="eager")
    assert torch.equal(compiled.generate(ids, mask), ref)
    plain = FastGenerator(model, 2, 10, eos_token_ids=[], use_cuda_graph=False, fuse=False)
    assert all(m.fused_qkv is None and not m.fuse_rope_features for m in lolcats_modules(model))
    assert torch.equal(plain.generate(ids, mask), ref)


@torch.no_grad()
def test_stop_tokens_stop_generate_and_fast_path():
    model = build("llama", "sliding_window")
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (9, 6)])
    free = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)[:, ids.shape[1]:]
    stop = int(free[0, 2])  # row 0 emits it at step 2 (or earlier)
    first = int((free[0] == stop).nonzero()[0])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=stop)
    new = out[0, ids.shape[1]:]
    assert int(new[first]) == stop and bool((new[first + 1:] == 0).all())
    fast = FastGenerator(model, 2, 10, eos_token_ids=[stop], pad_token_id=0, check_every=2).generate(ids, mask)
    assert torch.equal(fast[0, : first + 1], new[: first + 1]) and bool((fast[0, first + 1:] == 0).all())


# ---------------------------------------------------------------- text level


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for c in "abcdefghijklmnopqrstuvwxyz .,:!?\n" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789":
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def test_truncate_at_stop():
    assert truncate_at_stop("abc. def\nxyz", ["\n", ". "]) == "abc"
    assert truncate_at_stop("abc", ["zz", ""]) == "abc"


@pytest.mark.parametrize("fast", [False, True])
def test_run_generate_streams_and_cuts_at_stop_strings(fast):
    tok = char_tokenizer()
    model = build("llama", "terraced_window", vocab=len(tok.get_vocab()))
    prompts = ["hello there", "a b"]
    plain = run_generate(model, tok, prompts, max_new_tokens=16, fast=fast)
    assert len(plain) == 2 and all(isinstance(t, str) for t in plain)
    buf = io.StringIO()
    with redirect_stdout(buf):
        streamed = run_generate(model, tok, prompts[:1], max_new_tokens=16, stream=True, fast=fast)
    assert streamed[0] == plain[0] and plain[0].strip() and plain[0].strip() in buf.getvalue()
    stop = plain[0][3:5]
    cut = run_generate(model, tok, prompts[:1], max_new_tokens=16, stop=[stop], fast=fast)[0]
    assert cut == plain[0][: plain[0].find(stop)]


def test_chat_session_reuses_the_cache_across_turns():
    tok = char_tokenizer()
    model = build("llama", "sliding_window", vocab=len(tok.get_vocab()))
    chat = ChatSession(model, tok, system="be brief")
    with redirect_stdout(io.StringIO()):
        chat.reply("hi", max_new_tokens=8)
        cache = chat.cache
        second = chat.reply("more", max_new_tokens=8)
        assert chat.cache is cache  # the second turn prefilled only its new tokens on the warm state
        fresh = ChatSession(model, tok, system="be brief")
        fresh.messages = chat.messages[:-1]
        fresh.messages.pop()  # replay turn 2 from scratch on the same history
        assert fresh.reply("more", max_new_tokens=8) == second


def check_fast_paths_on_cuda(model, compiled: bool = False) -> None:
    """FastGenerator on CUDA, a left-padded batch of 2: the eager step, the graphed one (twice: the second
    call resets the states in place) and, with ``compiled``, the inductor-compiled one give HF generate()'s
    greedy tokens."""
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (30, 12)])
    ids, mask = ids.cuda(), mask.cuda()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)[:, ids.shape[1]:]
    assert torch.equal(FastGenerator(model, 2, 40, eos_token_ids=[], use_cuda_graph=False).generate(ids, mask), ref)
    graph = FastGenerator(model, 2, 40, eos_token_ids=[], use_cuda_graph=True)
    for _ in range(2):
        assert torch.equal(graph.generate(ids, mask), ref)
    if compiled:
        compiled_gen = FastGenerator(model, 2, 40, eos_token_ids=[], use_cuda_graph=True, compile=True)
        assert torch.equal(compiled_gen.generate(ids, mask), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_graph_path_equals_eager():
    check_fast_paths_on_cuda(build("llama", "terraced_window").cuda(), compiled=True)


def test_generate_main_chat_template_wraps_prompts(monkeypatch):
    """--chat-template sends each prompt as a user message through the chat template."""
    import lolcats.generation.text as gcli
    from conftest import tiny_tokenizer

    seen = {}
    monkeypatch.setattr(gcli, "run_generate", lambda m, t, prompts, *a, **k: seen.setdefault("p", prompts) and [""])
    tok = tiny_tokenizer()
    with redirect_stdout(io.StringIO()):
        gcli.complete(object(), tok, ["hello there"], chat_template=True)
    assert seen["p"] == [gcli.chat_prompt(tok, [{"role": "user", "content": "hello there"}])]
    assert seen["p"][0] != "hello there" and "hello there" in seen["p"][0]
