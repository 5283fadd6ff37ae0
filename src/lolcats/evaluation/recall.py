"""Long-context recall: can the model repeat a number it read far back in its context?

A linearized model keeps a short softmax window (64 tokens by default) and folds everything
older into the linear-attention state, so what it read long ago is blurred. These tasks
measure how much survives, for the base and the linearized model on identical prompts.

Tasks (:data:`RECALL_TASKS`):

* ``passkey``: filler text ("The grass is green. The sky is blue. ...", repeated) with one
  key sentence ("The pass key is 71432. Remember it. 71432 is the pass key.") at a depth of
  the filler, then "What is the pass key?".
* ``multikey``: ``keys`` named key sentences ("The pass key of lemon is 71432. ..."), all
  numbers distinct; the asked one sits at the sample's depth, the others at random depths;
  the question names one of them.
* ``niah_single``, ``niah_multikey``, ``niah_multivalue`` (RULER's needle-in-a-haystack tasks,
  arXiv 2404.06654): the haystack is natural text, a contiguous span of the file ``haystack``
  names at a seeded offset (:mod:`lolcats.evaluation.haystack`; a linear state compresses
  repeated filler far more easily). A needle is "The special magic number for lemon is
  1234567." (``values``: ``numbers``, 7 digits, or ``words``, "quiet lantern"). ``niah_single``:
  one needle; ``niah_multikey``: ``keys`` needles with distinct names, one asked;
  ``niah_multivalue``: ``value_count`` needles "One of the special magic numbers for lemon is
  ..." for one name, all asked. The asked (first) needle sits at the sample's depth, the others
  at random depths.

Each prompt is exactly ``length`` tokens of the model's tokenizer, chat template and question
included: its pieces (template head, instructions, filler, key sentences, question, template
tail, answer lead-in) are tokenized on their own and concatenated as token ids, the filler cut
to the token to fill the rest; key sentences sit at sentence boundaries of the filler, the one
nearest to ``depth`` x the filler's length (depth 0: right after the instructions, 1: just
before the question). So all prompts of one length have one token count and a batch needs no
padding (a linearized model's unpadded prefill runs the fused kernel on GPU).

With the chat template (default when the tokenizer has one) the whole text is one user message
followed by the generation prompt; without it the prompt starts with the tokenizer's bos (if it
adds one). The answer lead-in ("The pass key is", "The special magic number for lemon
mentioned in the provided text is") ends the prompt, after the assistant header with a chat
template: by default (``lead_in`` None) in every niah prompt, and in passkey / multikey prompts
without a chat template only (their first design); ``lead_in`` True / False puts it in every
prompt / none. Greedy decoding (``model.generate``, ``max_new_tokens``: by default 16 for passkey
and multikey, 16 + 16 per asked value for niah; bf16 autocast on CUDA; a converted model
generates with its constant-size LolcatsCache), scored on the generated text: a passkey or
multikey sample is a hit when the first 5-digit number of the output is the asked key; a niah
sample scores the share of its asked values that appear in the output (RULER's string match,
case-folded) and is a hit when all do. A tokenizer that cannot write "71432" (say a word-level
one) gets the digits spaced out ("7 1 4 3 2") in prompt and answer.

Samples are seeded per (task, length, sample): the same seed (and haystack file) gives the same
prompts for every model with the same tokenizer. Depths cycle through ``depths`` (or are uniform
at random). Lengths past the model's ``max_position_embeddings`` are refused. Results, as
``{task@length: metrics}``: ``acc`` (share of hits), ``acc_stderr`` (standard error of that mean,
as lm_eval computes it), ``samples``, ``tokens``, for niah_multivalue ``acc_partial`` (mean share
of values found, with ``_stderr``), for a depth list ``acc@d<depth>`` (with ``_stderr``) per depth,
and ``answers`` (per prompt: depth, key, hit, the model's output; ``found``, the share, for
several values).

    lolcats eval --base smollm2-135m-instruct --stage1 runs/x/distill/best --compare-base \\
        --recall passkey,multikey --recall-lengths 1024,2048,4096 --recall-samples 25 --output recall.json
    lolcats eval ... --compare-base --recall niah_single,niah_multikey,niah_multivalue \\
        --recall-haystack ../shared/data/wikitext-2/wiki.test.tokens --recall-values words

    from lolcats.evaluation.recall import RecallSettings, evaluate_recall
    evaluate_recall(model, tokenizer, RecallSettings(tasks=("passkey",), lengths=(2048,)))
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lolcats.evaluation.haystack import read_haystack
from lolcats.evaluation.perplexity import model_device
from lolcats.runtime import autocast_context

KEY_DIGITS = 5
VALUE_DIGITS = 7  # niah numbers, as RULER's
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NAMES = ("apple", "river", "garden", "tiger", "castle", "violin", "forest", "rocket", "pencil", "island",
         "candle", "dragon", "mirror", "planet", "bridge", "lemon", "harbor", "falcon", "meadow", "piano",
         "cat", "dog", "house", "tree", "window", "anchor", "basket", "comet", "desert", "engine")
# niah word values are "adjective noun" pairs (RULER's are adjective-noun too); the nouns are none of NAMES
ADJECTIVES = ("big", "small", "red", "blue", "green", "quiet", "bright", "ancient", "silent", "golden",
              "crooked", "gentle", "hollow", "frozen", "narrow", "purple", "brave", "dusty", "humble", "rusty")
NOUNS = ("sky", "mat", "lantern", "saddle", "quarry", "orchard", "compass", "marble", "ribbon", "kettle",
         "canyon", "thimble", "walnut", "glacier", "tulip", "beacon", "carpet", "feather", "saucer", "jacket")
VALUE_KINDS = {"numbers": "number", "words": "word"}  # RecallSettings.values -> the word in the needle
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
CHAT_MARK = "<<<lolcats-recall-text>>>"


# ---------------------------------------------------------------- tasks


@dataclass
class Needles:
    """The text of one sample: key sentences with their depths, and what is asked."""

    intro: str
    sentences: list[tuple[float, str]]  # (depth in the filler, sentence with a leading space)
    question: str
    lead: str  # answer lead-in, with a leading space
    answer: str  # digits of the asked key, no separator (niah: the asked values so, joined by ", ")
    asked: int = 0  # index in ``sentences`` of the asked key
    info: dict[str, Any] = field(default_factory=dict)
    values: tuple[str, ...] = ()  # niah: the asked values as the prompt writes them (scored by string match)
    new_tokens: int = 16  # greedy tokens the answer gets unless RecallSettings.max_new_tokens says


@dataclass(frozen=True)
class Writing:
    """What the tokenizer writes back unchanged: how a number's digits are joined, names, word values."""

    sep: str
    names: tuple[str, ...]
    words: tuple[str, ...]


TaskFn = Callable[[random.Random, float, "RecallSettings", Writing], Needles]


@dataclass(frozen=True)
class RecallTask:
    """A registered task: its needles and how its prompt is made."""

    needles: TaskFn
    "fn(rng, depth, settings, writing) -> Needles."
    natural: bool = False
    "Its haystack is the natural text of RecallSettings.haystack (else the built-in repeated filler)."
    lead_in: bool | None = None
    "Answer lead-in by default: True in every prompt, None in prompts without a chat template only."


RECALL_TASKS: dict[str, RecallTask] = {}


def register_recall_task(name: str, fn: TaskFn, natural: bool = False, lead_in: bool | None = None) -> TaskFn:
    """Add a task: ``fn(rng, depth, settings, writing) -> Needles`` (``writing.sep`` joins a number's digits)."""
    RECALL_TASKS[name] = RecallTask(fn, natural, lead_in)
    return fn


def get_recall_task(name: str) -> RecallTask:
    if name not in RECALL_TASKS:
        raise ValueError(f"unknown recall task {name!r}; known: {', '.join(RECALL_TASKS)}")
    return RECALL_TASKS[name]


def _write(key: int, sep: str) -> str:
    return sep.join(str(key))


def passkey_needles(rng: random.Random, depth: float, settings: RecallSettings, writing: Writing) -> Needles:
    key = rng.randint(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS - 1)
    k = _write(key, writing.sep)
    return Needles(intro="There is an important piece of information hidden inside a lot of irrelevant text. "
                         "Find it and memorize it. I will quiz you about it.",
                   sentences=[(depth, f" The pass key is {k}. Remember it. {k} is the pass key.")],
                   question="\n\nWhat is the pass key?", lead=" The pass key is", answer=str(key))


def _names(writing: Writing, n: int, task: str) -> list[str]:
    if len(writing.names) < n:
        raise ValueError(f"{task} with {n} keys needs {n} names the tokenizer can write; "
                         f"it writes {len(writing.names)} of the built-in ones (use fewer keys)")
    return list(writing.names)


def multikey_needles(rng: random.Random, depth: float, settings: RecallSettings, writing: Writing) -> Needles:
    keys, sep = settings.keys, writing.sep
    names = _names(writing, keys, "multikey")
    numbers = rng.sample(range(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS), keys)  # distinct
    who = rng.sample(names, keys)
    asked = rng.randrange(keys)
    depths = [depth if i == asked else rng.random() for i in range(keys)]
    sentences = [(d, f" The pass key of {w} is {_write(n, sep)}. Remember it. "
                     f"{_write(n, sep)} is the pass key of {w}.") for d, w, n in zip(depths, who, numbers)]
    return Needles(intro="There are several pass keys hidden inside a lot of irrelevant text. "
                         "Find them and memorize them. I will quiz you about one of them.",
                   sentences=sentences, question=f"\n\nWhat is the pass key of {who[asked]}?",
                   lead=f" The pass key of {who[asked]} is", answer=str(numbers[asked]), asked=asked,
                   info={"name": who[asked], "distractors": [str(n) for i, n in enumerate(numbers) if i != asked]})


def _values(rng: random.Random, n: int, settings: RecallSettings, writing: Writing, task: str) -> list[str]:
    """``n`` distinct values: 7-digit numbers (digits joined by ``writing.sep``) or "adjective noun" words."""
    if settings.values == "numbers":
        return [_write(v, writing.sep) for v in rng.sample(range(10 ** (VALUE_DIGITS - 1), 10 ** VALUE_DIGITS), n)]
    if len(writing.words) < n:
        raise ValueError(f"{task} needs {n} distinct word values; the tokenizer writes {len(writing.words)} of the "
                         "built-in ones (use --recall-values numbers, or fewer keys / values)")
    return rng.sample(list(writing.words), n)


def niah_needles(rng: random.Random, depth: float, settings: RecallSettings, writing: Writing, task: str,
                 several_keys: bool = False, several_values: bool = False) -> Needles:
    """RULER's needles: ``settings.keys`` names (else 1) with ``settings.value_count`` values each (else 1);
    the first value of one name is asked (with several values: all of that name's)."""
    keys, values = settings.keys if several_keys else 1, settings.value_count if several_values else 1
    kind = VALUE_KINDS[settings.values]
    who = rng.sample(_names(writing, keys, task), keys)
    drawn = _values(rng, keys * values, settings, writing, task)
    asked = rng.randrange(keys)
    name, mine = who[asked], drawn[asked * values:(asked + 1) * values]
    many = f"special magic {kind}s"
    sentences = []
    for i, w in enumerate(who):
        for j, v in enumerate(drawn[i * values:(i + 1) * values]):
            d = depth if (i, j) == (asked, 0) else rng.random()
            sentences.append((d, f" One of the {many} for {w} is {v}." if values > 1
                              else f" The special magic {kind} for {w} is {v}."))
    plain = [v.replace(writing.sep, "") if settings.values == "numbers" and writing.sep else v for v in mine]
    if values > 1:
        question, lead = (f"\nWhat are all the {many} for {name} mentioned in the provided text?",
                          f" The {many} for {name} mentioned in the provided text are")
    else:
        question, lead = (f"\nWhat is the special magic {kind} for {name} mentioned in the provided text?",
                          f" The special magic {kind} for {name} mentioned in the provided text is")
    return Needles(intro=f"Some {many} are hidden within the following text. Make sure to memorize them. "
                         f"I will quiz you about the {kind}s afterwards.\n",
                   sentences=sentences, question=question, lead=lead, answer=", ".join(plain), asked=asked * values,
                   info={"name": name}, values=tuple(mine), new_tokens=16 + 16 * values)


register_recall_task("passkey", passkey_needles)
register_recall_task("multikey", multikey_needles)
register_recall_task("niah_single", partial(niah_needles, task="niah_single"), natural=True, lead_in=True)
register_recall_task("niah_multikey", partial(niah_needles, task="niah_multikey", several_keys=True),
                     natural=True, lead_in=True)
register_recall_task("niah_multivalue", partial(niah_needles, task="niah_multivalue", several_values=True),
                     natural=True, lead_in=True)


# ---------------------------------------------------------------- settings


@dataclass
class RecallSettings:
    """What :func:`evaluate_recall` runs; checked on construction (see :func:`recall_settings`)."""

    tasks: tuple[str, ...] = ()
    "Recall tasks (names in RECALL_TASKS); none: no recall evaluation."
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    "Prompt lengths in tokens (template and question included)."
    depths: tuple[float, ...] | None = DEFAULT_DEPTHS
    "Depths of the asked key in the filler, fractions in [0, 1], cycled over samples; None: uniform at random."
    samples: int = 25
    "Prompts per (task, length)."
    keys: int = 4
    "Keys per prompt in multikey and niah_multikey (the asked one and distractors)."
    value_count: int = 4
    "Values of the asked key in niah_multivalue (all asked)."
    values: str = "numbers"
    "What the niah needles hide: numbers (7 digits) or words ('adjective noun')."
    haystack: str | None = None
    "Natural-text file the niah tasks take their haystack from (a contiguous span at a seeded offset)."
    lead_in: bool | None = None
    "Answer lead-in at the prompt's end: None: each task's default (niah: on; passkey, multikey: plain prompts)."
    seed: int = 0
    "Seed of keys, names and random depths (same seed, same prompts)."
    batch_size: int = 8
    "Prompts per generate call."
    chat_template: bool = True
    "Wrap the text in the tokenizer's chat template when it has one."
    max_new_tokens: int | None = None
    "Greedy tokens generated per prompt; None: the task's (16; niah: 16 + 16 per asked value)."

    def __post_init__(self):
        self.tasks, self.lengths = tuple(self.tasks), tuple(int(n) for n in self.lengths)
        self.depths = None if self.depths is None else tuple(float(d) for d in self.depths)
        for t in self.tasks:
            get_recall_task(t)
        if self.tasks and not self.lengths:
            raise ValueError("recall lengths: give at least one length")
        for name, value in (("lengths", min(self.lengths, default=1)), ("samples", self.samples),
                            ("keys", self.keys), ("value count", self.value_count), ("batch size", self.batch_size),
                            ("max new tokens", 1 if self.max_new_tokens is None else self.max_new_tokens)):
            if value < 1:
                raise ValueError(f"recall {name} must be >= 1, got {value}")
        if self.values not in VALUE_KINDS:
            raise ValueError(f"recall values {self.values!r}: known: {', '.join(VALUE_KINDS)}")
        natural = [t for t in self.tasks if get_recall_task(t).natural]
        if natural and self.haystack is None:
            raise ValueError(f"recall tasks {', '.join(natural)} hide their needles in natural text: give "
                             "--recall-haystack FILE (e.g. WikiText or Wikipedia text)")
        if self.haystack is not None and not Path(self.haystack).is_file():
            raise FileNotFoundError(f"--recall-haystack: no such file: {self.haystack}")
        if self.depths is not None and (not self.depths or not all(0 <= d <= 1 for d in self.depths)):
            raise ValueError(f"recall depths must be fractions in [0, 1] (or 'random'), got {list(self.depths)}")

    def names(self) -> list[str]:
        """Result names, ``task@length``, in run order."""
        return [f"{t}@{n}" for t in self.tasks for n in self.lengths]

    def depth_metrics(self) -> list[str]:
        return [] if self.depths is None else [depth_metric(d) for d in dict.fromkeys(self.depths)]


def _items(value: str | Sequence | None) -> list[str]:
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    return [p.strip() for p in parts if p.strip()]


def _numbers(value, kind: type, what: str) -> list:
    out = []
    for p in _items(value):
        try:
            out.append(kind(p))
        except ValueError:
            raise ValueError(f"recall {what}: {p!r} is not a{'n integer' if kind is int else ' number'}") from None
    return out


def recall_settings(tasks: str | Sequence[str] | None = None, lengths: str | Sequence[int] | None = None,
                    depths: str | Sequence[float] | None = None, **rest: Any) -> RecallSettings:
    """Settings from flag-like values: ``"passkey,multikey"``, ``"1024,2048"``, ``"0.1,0.5"`` or ``"random"``."""
    kw: dict[str, Any] = dict(tasks=tuple(_items(tasks)))
    if lengths is not None:
        kw["lengths"] = tuple(_numbers(lengths, int, "lengths"))
    if depths is not None:
        kw["depths"] = None if _items(depths) == ["random"] else tuple(_numbers(depths, float, "depths"))
    return RecallSettings(**kw, **{k: v for k, v in rest.items() if v is not None})


def depth_metric(depth: float) -> str:
    return f"acc@d{depth:g}"


# ---------------------------------------------------------------- prompts


@dataclass(frozen=True)
class RecallSample:
    """One prompt: ``ids`` has exactly ``length`` tokens; ``key_start`` indexes the asked key sentence."""

    task: str
    length: int
    depth: float  # requested depth of the asked key
    answer: str
    sep: str  # between the digits of a key in prompt (and expected answer)
    ids: tuple[int, ...]
    key_start: int
    placed_depth: float  # filler tokens before the asked key / filler tokens
    info: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    key_len: int = 0  # tokens of the asked key sentence: ids[key_start:key_start + key_len]
    values: tuple[str, ...] = ()  # niah: the asked values as written in the prompt (scored by string match)
    new_tokens: int = 16  # greedy tokens its answer gets unless RecallSettings.max_new_tokens says


@dataclass(frozen=True)
class Frame:
    """Token ids around the text: the chat template's head and tail, or the tokenizer's bos."""

    head: list[int]
    tail: list[int]
    chat: bool


def _encode(texts: list[str], tokenizer) -> list[list[int]]:
    from lolcats.data import tokenize_documents

    return [list(ids) for ids in tokenize_documents(texts, tokenizer)]


def prompt_frame(tokenizer, chat_template: bool = True) -> Frame:
    """Head/tail ids: the chat template (one user message + generation prompt) if asked and present."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_MARK}],
                                                 add_generation_prompt=True, tokenize=False)
        if rendered.count(CHAT_MARK) != 1:
            raise ValueError("the tokenizer's chat template does not show the user message once; "
                             "use --no-recall-chat-template")
        head, tail = _encode(rendered.split(CHAT_MARK), tokenizer)
        return Frame(head, tail, True)
    from lolcats.data import framing

    return Frame(framing(tokenizer)[0], [], False)


def digit_separator(tokenizer) -> str:
    """"" if the tokenizer writes ``0123456789`` back as it was, else " " if it does so spaced out."""
    for sep in ("", " "):
        probe = sep.join("0123456789")
        if probe in tokenizer.decode(_encode([f" {probe}."], tokenizer)[0]):
            return sep
    raise ValueError("the tokenizer cannot write digits back (neither '0123456789' nor '0 1 2 ... 9'): "
                     "it cannot run the recall tasks")


def writable_names(tokenizer, words: Sequence[str] = NAMES) -> list[str]:
    """The built-in multikey names (or other ``words``) that the tokenizer writes back unchanged."""
    decoded = tokenizer.batch_decode(_encode([f" {n}" for n in words], tokenizer))
    return [n for n, d in zip(words, decoded) if d.strip() == n]


def writing_of(tokenizer) -> Writing:
    """How the tokenizer writes numbers, and the names and "adjective noun" word values it writes back."""
    adjectives, nouns = writable_names(tokenizer, ADJECTIVES), writable_names(tokenizer, NOUNS)
    return Writing(digit_separator(tokenizer), tuple(writable_names(tokenizer)),
                   tuple(f"{a} {n}" for a in adjectives for n in nouns))


def filler_ids(sentences: list[list[int]], n: int) -> tuple[list[int], list[int]]:
    """``n`` filler tokens (the sentences cycled, the last one cut) and the sentence boundaries in [0, n]."""
    ids, bounds, i = [], [0], 0
    while len(ids) < n:
        ids += sentences[i % len(sentences)]
        bounds.append(min(len(ids), n))
        i += 1
    return ids[:n], sorted(set(bounds))


def assemble(needles: Needles, frame: Frame, length: int, task: str, tokenizer,
             fill: Callable[[int], list[list[int]]], lead: bool = False) -> tuple[list[int], int, int, float]:
    """(ids of exactly ``length`` tokens, index of the asked key sentence, its length in tokens, its placed depth).

    ``fill(n)``: filler sentences as token ids for ``n`` tokens (cycled when they hold fewer); ``lead``: end
    the prompt with the answer lead-in (with a chat template after its assistant header)."""
    question = needles.question + (needles.lead if lead and not frame.chat else "")
    after = needles.lead.lstrip() if lead and frame.chat else ""
    intro, question_ids, after_ids, *sent = _encode([needles.intro, question, after]
                                                    + [s for _, s in needles.sentences], tokenizer)
    fixed = (len(frame.head) + len(intro) + sum(map(len, sent)) + len(question_ids) + len(frame.tail)
             + len(after_ids))
    n_fill = length - fixed
    if n_fill < 1:
        raise ValueError(f"recall length {length} is too short for {task}: the template, instructions, key "
                         f"sentence(s) and question take {fixed} tokens; use lengths above {fixed}")
    hay, bounds = filler_ids(fill(n_fill), n_fill)
    cuts = [min(bounds, key=lambda b: (abs(b - d * n_fill), b)) for d, _ in needles.sentences]
    ids = frame.head + intro
    start, prev = 0, 0
    for i in sorted(range(len(cuts)), key=lambda i: (cuts[i], i)):
        ids += hay[prev:cuts[i]]
        if i == needles.asked:
            start = len(ids)
        ids += sent[i]
        prev = cuts[i]
    ids += hay[prev:] + question_ids + frame.tail + after_ids
    assert len(ids) == length, (len(ids), length)
    return ids, start, len(sent[needles.asked]), cuts[needles.asked] / n_fill


def build_samples(tokenizer, task: str, length: int, settings: RecallSettings) -> list[RecallSample]:
    """``settings.samples`` prompts of ``task`` at ``length`` tokens (seeded; see the module docstring)."""
    spec = get_recall_task(task)
    frame = prompt_frame(tokenizer, settings.chat_template)
    written = writing_of(tokenizer)
    lead = settings.lead_in if settings.lead_in is not None else spec.lead_in
    lead = not frame.chat if lead is None else lead
    hay = read_haystack(settings.haystack) if spec.natural else None
    filler = _encode([f" {s}" for s in FILLER], tokenizer)
    out = []
    for i in range(settings.samples):
        rng = random.Random(f"lolcats-recall:{task}:{length}:{settings.seed}:{i}")  # str seeds: stable across runs
        depth = rng.random() if settings.depths is None else settings.depths[i % len(settings.depths)]
        needles = spec.needles(rng, depth, settings, written)
        fill = partial(hay.span, rng, tokenizer=tokenizer) if hay is not None else (lambda n: filler)
        ids, start, key_len, placed = assemble(needles, frame, length, task, tokenizer, fill, lead)
        out.append(RecallSample(task, length, depth, needles.answer, written.sep, tuple(ids), start, placed,
                                dict(needles.info, chat_template=frame.chat, lead_in=lead), key_len,
                                needles.values, needles.new_tokens))
    return out


# ---------------------------------------------------------------- scoring


def find_key(text: str, sep: str = "", digits: int = KEY_DIGITS) -> str | None:
    """The first ``digits``-digit number in ``text`` (digits joined by ``sep``), without ``sep``; None if none."""
    s = re.escape(sep)
    body = s.join([r"\d"] * digits)
    m = re.search(rf"(?<!\d)(?<!\d{s})({body})(?!{s}\d)(?!\d)", text)
    return None if m is None else m.group(1).replace(sep, "") if sep else m.group(1)


def score(text: str, sample: RecallSample) -> float:
    """The share of the asked answer in the generated ``text``: passkey / multikey: 1 when its first 5-digit
    number is the key, else 0; niah: the share of the asked values that appear in it (RULER's string match,
    case-folded)."""
    if not sample.values:
        return float(find_key(text, sample.sep) == sample.answer)
    text = text.lower()
    return sum(v.lower() in text for v in sample.values) / len(sample.values)


def is_hit(text: str, sample: RecallSample) -> bool:
    """The whole answer is in ``text`` (every asked value, for niah)."""
    return score(text, sample) == 1


def accuracy(hits: Sequence[float]) -> dict[str, Any]:
    """``{"acc", "acc_stderr", "samples"}`` of hits (bools) or scores in [0, 1]; stderr = sample std / sqrt(n)
    as lm_eval (None for n < 2)."""
    n = len(hits)
    if n == 0:
        raise ValueError("accuracy of no samples")
    p = sum(map(float, hits)) / n
    var = sum((float(h) - p) ** 2 for h in hits) / (n - 1) if n > 1 else None
    return {"acc": p, "acc_stderr": math.sqrt(var / n) if var is not None else None, "samples": n}


def summarize(samples: Sequence[RecallSample], scores: Sequence[float], per_depth: bool = True) -> dict[str, Any]:
    """Accuracy (share of whole answers) over ``samples`` and, if asked, per requested depth (``acc@d0.5`` and
    ``acc@d0.5_stderr``); samples with several values also get ``acc_partial`` (mean share of values found)."""
    hits = [x == 1 for x in scores]
    out = {**accuracy(hits), "tokens": samples[0].length}
    if any(len(s.values) > 1 for s in samples):
        partial = accuracy(scores)
        out["acc_partial"], out["acc_partial_stderr"] = partial["acc"], partial["acc_stderr"]
    if per_depth:
        for d in dict.fromkeys(s.depth for s in samples):
            sub = accuracy([h for s, h in zip(samples, hits) if s.depth == d])
            out[depth_metric(d)], out[depth_metric(d) + "_stderr"] = sub["acc"], sub["acc_stderr"]
    return out


# ---------------------------------------------------------------- generation


def _prepare_generation(model: torch.nn.Module) -> None:
    """A converted model generates with its LolcatsCache (idempotent; load_linearized did it already)."""
    from lolcats.attention.layers import lolcats_modules

    if next(lolcats_modules(model), None) is not None:
        from lolcats.generation import enable_lolcats_generation

        enable_lolcats_generation(model)


@torch.no_grad()
def generate_answers(model: torch.nn.Module, tokenizer, samples: Sequence[RecallSample], batch_size: int = 8,
                     max_new_tokens: int = 16) -> list[str]:
    """Greedy completions (new text only) of ``samples``, ``batch_size`` prompts per unpadded batch."""
    _prepare_generation(model)
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        for b in range(0, len(samples), batch_size):
            ids = torch.tensor([s.ids for s in samples[b:b + batch_size]], device=device)  # (B, T)
            with autocast_context(device, "auto"):
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad)
            texts += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return texts


def check_context(model: torch.nn.Module, lengths: Sequence[int]) -> None:
    """Refuse lengths past the model's ``max_position_embeddings`` (where it has one)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and lengths and max(lengths) > limit:
        raise ValueError(f"recall length {max(lengths)} is past the model's context (max_position_embeddings "
                         f"{limit}); give --recall-lengths up to {limit}")


def build_all(tokenizer, settings: RecallSettings, model: torch.nn.Module | None = None
              ) -> dict[str, list[RecallSample]]:
    """``{task@length: samples}`` for every task and length (raises early on lengths too short, or, given
    ``model``, past its context)."""
    if model is not None and settings.tasks:
        check_context(model, settings.lengths)
    return {f"{t}@{n}": build_samples(tokenizer, t, n, settings) for t in settings.tasks for n in settings.lengths}


def evaluate_recall(model: torch.nn.Module, tokenizer, settings: RecallSettings,
                    prompts: dict[str, list[RecallSample]] | None = None) -> dict[str, dict[str, Any]]:
    """``{task@length: metrics}`` (see the module docstring); ``prompts`` from :func:`build_all` if given."""
    prompts = build_all(tokenizer, settings) if prompts is None else prompts
    check_context(model, [len(xs[0].ids) for xs in prompts.values() if xs])
    out = {}
    for name, samples in prompts.items():
        new = settings.max_new_tokens or max(s.new_tokens for s in samples)
        texts = generate_answers(model, tokenizer, samples, settings.batch_size, new)
        scores = [score(t, s) for t, s in zip(texts, samples)]
        out[name] = {**summarize(samples, scores, settings.depths is not None),
                     "chat_template": samples[0].info["chat_template"], "lead_in": samples[0].info["lead_in"],
                     "max_new_tokens": new, "answers": answers(samples, texts, scores)}
    return out


def answers(samples: Sequence[RecallSample], texts: Sequence[str], scores: Sequence[float]) -> list[dict[str, Any]]:
    """What the model said to each prompt (in the JSON, not the table): a miss that writes another number
    reads differently from one that writes no number or breaks down; ``found``: the share of several values."""
    return [{"depth": s.depth, "key": s.answer, "hit": x == 1, "output": t,
             **({"found": x} if len(s.values) > 1 else {})} for s, t, x in zip(samples, texts, scores)]


# ---------------------------------------------------------------- retrieval heads

# the prompts retrieval_scores reads by default: passkey at two lengths, depths spread over the filler
RETRIEVAL_PROBE = RecallSettings(tasks=("passkey",), lengths=(1024, 2048), samples=8,
                                 depths=(0.1, 0.3, 0.5, 0.7, 0.9))


def _key_mass(q: torch.Tensor, k: torch.Tensor, span: tuple[int, int], scaling: float) -> torch.Tensor:
    """q (B, H, T, D), k (B, Hk, T, D) -> (B, H): softmax attention of the last query on keys span[0]:span[1]."""
    group = q.shape[1] // k.shape[1]
    s = torch.einsum("bhd,bhtd->bht", q[:, :, -1].float(), k.float().repeat_interleave(group, 1)) * scaling
    return s.softmax(-1)[:, :, span[0]:span[1]].sum(-1)


def lengths_in_context(model: torch.nn.Module, lengths: Sequence[int]) -> list[int]:
    """The ``lengths`` within the model's ``max_position_embeddings`` (all without one); when none is, that many
    positions: the prompt lengths a probe of the model reads."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or max(lengths)
    return [n for n in lengths if n <= limit] or [limit]


@torch.no_grad()
def retrieval_scores(model: torch.nn.Module, tokenizer, settings: RecallSettings = RETRIEVAL_PROBE,
                     ) -> dict[int, float]:
    """{layer: score} for every LolcatsAttention layer, from the teacher (softmax) attention on recall prompts.

    A layer's score is its best head's mean (over ``settings``' prompts) of the softmax attention that the last
    prompt token (where the answer starts) puts on the asked key sentence: retrieval heads put most of it there,
    other heads about the span's share of the context. Lengths past the model's ``max_position_embeddings`` are
    left out (when all are, prompts of that many positions are read instead). The layers run in teacher mode
    for the scoring and get their mode back."""
    from lolcats.attention.layers import lolcats_attention_by_layer
    from lolcats.attention.modes import attention_mode

    mods = lolcats_attention_by_layer(model)
    lengths = lengths_in_context(model, settings.lengths)
    samples = [x for t in settings.tasks for n in lengths for x in build_samples(tokenizer, t, n, settings)]
    device = model_device(model)
    sums: dict[int, torch.Tensor] = {}
    span = (0, 0)

    def probe(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        mass = _key_mass(q, k, span, mods[layer].scaling).sum(0)  # (H,)
        sums[layer] = sums.get(layer, 0) + mass

    was_training = model.training
    model.eval()
    try:
        with attention_mode(model, "teacher"):
            for m in mods.values():
                m.probe = probe
            for x in samples:  # one prompt at a time: each has its own key span
                span = (x.key_start, x.key_start + x.key_len)
                ids = torch.tensor([x.ids], device=device)
                with autocast_context(device, "auto"):
                    model(input_ids=ids, use_cache=False)
    finally:
        for m in mods.values():
            m.probe = None
        model.train(was_training)
    return {i: float(v.max()) / len(samples) for i, v in sorted(sums.items())}
