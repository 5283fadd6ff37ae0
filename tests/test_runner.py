"""The decode runner FastGenerator and the serving engines share, and the step metadata it hands the layers.

A step's ``StepMeta`` (``attention/step.py``) travels with the forward to every attention layer and from there to
its mixer: may-evict, the cache rows the step runs on; a declared call leaves the cache's own count alone. Both
users of the runner give ``generate()``'s greedy tokens on a tiny random Llama (eager, CPU), and a seeded sampled
pick is the sampling functions' on the model's logits.
"""

from __future__ import annotations

import torch

from lolcats.attention.generate import cache_kwarg_name, make_cache
from lolcats.attention.step import StepMeta
from lolcats.generation import FastGenerator
from lolcats.generation.runner import DecodeRunner, StepKey
from lolcats.generation.sampling import Sampling, pick_tokens, seeded_uniform
from lolcats.serving.engine import StateEngine
from test_generation import VOCAB, build
from test_sparse_cache import sorted_cache, sparse_model


def prefilled_runner(model, ids: torch.Tensor) -> DecodeRunner:
    """A runner over a cache that read ``ids`` (B, T) by a plain forward, its rows feeding the greedy next tokens at
    position T."""
    B, T = ids.shape
    cache = make_cache(model, B)
    logits = model(ids, use_cache=True, **{cache_kwarg_name(model): cache}).logits[:, -1]
    runner = DecodeRunner(model, cache, B, use_cuda_graph=False)
    runner.rows["ids"].copy_(logits.argmax(-1))
    runner.rows["pos"].fill_(T)
    return runner


def state_tensors(runner: DecodeRunner) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": t.clone() for i, st in runner.cache.states().items() for n, t in st.tensors().items()}


@torch.no_grad()
def test_may_evict_reaches_the_mixer(monkeypatch):
    """Terraced window 8 with a sparse cache: a step declared may-evict runs the eviction through the cache in
    every layer, one declared not skips it; at position 21, where no window slot leaves, both pick the same tokens
    and keep the same pairs (the eviction re-scores them, so their slots may be permuted)."""
    import lolcats.ops.decode.evict as evict

    model = sparse_model("terraced_window")
    ids = torch.randint(1, VOCAB, (2, 21))
    calls, real = [], evict.evict_to_cache
    monkeypatch.setattr(evict, "evict_to_cache", lambda *a, **k: calls.append(1) or real(*a, **k))
    after = {}
    for may in (True, False):
        runner = prefilled_runner(model, ids)
        calls.clear()
        runner.step(StepKey(2, "greedy", StepMeta(may_evict=may)))
        assert len(calls) == (2 if may else 0)  # once per layer, or never
        after[may] = runner.rows["ids"].tolist(), [sorted_cache(st) for st in runner.cache.states().values()]
    assert after[True][0] == after[False][0]
    for a, b in zip(after[True][1], after[False][1]):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)


@torch.no_grad()
def test_step_runs_on_the_rows_it_declares():
    """A step of batch 1 declaring rows range(1) of a 2-row cache writes row 0 as a 1-row cache's step does and
    leaves row 1 alone; declared calls leave the cache's count (HF's sequence length) where the plain prefill
    put it."""
    model = build("llama", "terraced_window")
    ids = torch.randint(1, VOCAB, (2, 13))
    two, one = prefilled_runner(model, ids), prefilled_runner(model, ids[:1])
    before = state_tensors(two)
    two.step(StepKey(1, "greedy", StepMeta(rows=range(1))))
    one.step(StepKey(1, "greedy", StepMeta()))
    rows0 = state_tensors(one)
    for name, t in state_tensors(two).items():
        torch.testing.assert_close(t[:1], rows0[name], msg=name)
        assert torch.equal(t[1:], before[name][1:]), name
    assert two.rows["ids"][:1].tolist() == one.rows["ids"].tolist() and two.rows["pos"].tolist() == [14, 13]
    assert {layer.seen for layer in two.cache.layers} == {13}


@torch.no_grad()
def test_fast_generator_and_engine_decode_through_one_runner():
    """FastGenerator and the constant-state engine both decode through a DecodeRunner, and both give generate()'s
    greedy tokens for each prompt (the engine runs the two prompts side by side in its slots)."""
    model = build("llama", "terraced_window")
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (13, 6)]
    refs = [model.generate(p[None], max_new_tokens=10, do_sample=False)[0, len(p):].tolist() for p in prompts]
    fast = FastGenerator(model, 1, 10, eos_token_ids=[], use_cuda_graph=False)
    assert isinstance(fast.runner, DecodeRunner)
    assert [fast.generate(p[None])[0].tolist() for p in prompts] == refs
    engine = StateEngine(model, 4, 64)
    assert isinstance(engine.runner, DecodeRunner) and engine.rows is engine.runner.rows
    out = []
    for slot, p in enumerate(prompts):
        out.append(engine.prefill(p.tolist(), 0, Sampling()).result())
        engine.admit(slot, len(p))
    for _ in range(9):
        for row, tok in zip(out, engine.launch(2, "greedy").result()):
            row.append(tok)
    assert out == refs


@torch.no_grad()
def test_seeded_pick_is_the_sampling_functions():
    """The engine's first token of a seeded, top-p request is pick_tokens over the model's last logits with the
    request's seeded noise (token counter 0)."""
    model = build("llama", "terraced_window")
    ids = torch.randint(1, VOCAB, (11,))
    logits = model(ids[None]).logits[:, -1]  # (1, V)
    for seed in range(4):
        u = seeded_uniform(torch.tensor([seed]), torch.tensor([0]), VOCAB)
        want = pick_tokens(logits, torch.tensor([0.8]), torch.tensor([0.9]), uniform=u).tolist()
        engine = StateEngine(model, 2, 32)
        assert engine.prefill(ids.tolist(), 0, Sampling(0.8, 0.9, seed)).result() == want
