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

Each prompt is exactly ``length`` tokens of the model's tokenizer, chat template and question
included: its pieces (template head, instructions, filler, key sentences, question, template
tail) are tokenized on their own and concatenated as token ids, the filler cut to the token to
fill the rest; key sentences sit at sentence boundaries of the filler, the one nearest to
``depth`` x the filler's length (depth 0: right after the instructions, 1: just before the
question). So all prompts of one length have one token count and a batch needs no padding
(a linearized model's unpadded prefill runs the fused kernel on GPU).

With the chat template (default when the tokenizer has one) the whole text is one user message
followed by the generation prompt; without it the prompt is the tokenizer's bos (if it adds
one), the text, and an answer lead-in ("The pass key is"). Greedy decoding
(``model.generate``, ``max_new_tokens`` 16, bf16 autocast on CUDA; a converted model generates
with its constant-size LolcatsCache). A sample is a hit when the first 5-digit number of the
output is the asked key. A tokenizer that cannot write "71432" (say a word-level one) gets the
digits spaced out ("7 1 4 3 2") in prompt and answer.

Samples are seeded per (task, length, sample): the same seed gives the same prompts for every
model with the same tokenizer. Depths cycle through ``depths`` (or are uniform at random).
Results, as ``{task@length: metrics}``: ``acc`` (share of hits), ``acc_stderr`` (standard
error of that mean, as lm_eval computes it), ``samples``, ``tokens`` and, for a depth list,
``acc@d<depth>`` (with ``_stderr``) per depth, and ``answers`` (per prompt: depth, key, hit, the
model's output).

    lolcats eval --base smollm2-135m-instruct --stage1 runs/x/distill/best --compare-base \\
        --recall passkey,multikey --recall-lengths 1024,2048,4096 --recall-samples 25 --output recall.json

    from lolcats.evaluation.recall import RecallSettings, evaluate_recall
    evaluate_recall(model, tokenizer, RecallSettings(tasks=("passkey",), lengths=(2048,)))
"""

from __future__ import annotations

import math
import random
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from lolcats.evaluation.perplexity import model_device
from lolcats.runtime import autocast_context

KEY_DIGITS = 5
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NAMES = ("apple", "river", "garden", "tiger", "castle", "violin", "forest", "rocket", "pencil", "island",
         "candle", "dragon", "mirror", "planet", "bridge", "lemon", "harbor", "falcon", "meadow", "piano",
         "cat", "dog", "house", "tree", "window", "anchor", "basket", "comet", "desert", "engine")
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
CHAT_MARK = "<<<lolcats-recall-text>>>"


# ---------------------------------------------------------------- tasks


@dataclass
class Needles:
    """The text of one sample: key sentences with their depths, and what is asked."""

    intro: str
    sentences: list[tuple[float, str]]  # (depth in the filler, sentence with a leading space)
    question: str
    lead: str  # answer lead-in, used without a chat template
    answer: str  # digits of the asked key, no separator
    asked: int = 0  # index in ``sentences`` of the asked key
    info: dict[str, Any] = field(default_factory=dict)


TaskFn = Callable[[random.Random, float, int, Sequence[str], str], Needles]
RECALL_TASKS: dict[str, TaskFn] = {}


def register_recall_task(name: str, fn: TaskFn) -> TaskFn:
    """Add a task: ``fn(rng, depth, keys, names, sep) -> Needles`` (``sep`` joins a key's digits)."""
    RECALL_TASKS[name] = fn
    return fn


def get_recall_task(name: str) -> TaskFn:
    if name not in RECALL_TASKS:
        raise ValueError(f"unknown recall task {name!r}; known: {', '.join(RECALL_TASKS)}")
    return RECALL_TASKS[name]


def _write(key: int, sep: str) -> str:
    return sep.join(str(key))


def passkey_needles(rng: random.Random, depth: float, keys: int, names: Sequence[str], sep: str) -> Needles:
    key = rng.randint(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS - 1)
    k = _write(key, sep)
    return Needles(intro="There is an important piece of information hidden inside a lot of irrelevant text. "
                         "Find it and memorize it. I will quiz you about it.",
                   sentences=[(depth, f" The pass key is {k}. Remember it. {k} is the pass key.")],
                   question="\n\nWhat is the pass key?", lead=" The pass key is", answer=str(key))


def multikey_needles(rng: random.Random, depth: float, keys: int, names: Sequence[str], sep: str) -> Needles:
    if len(names) < keys:
        raise ValueError(f"multikey with {keys} keys needs {keys} names the tokenizer can write; "
                         f"it writes {len(names)} of the built-in ones (use fewer keys)")
    numbers = rng.sample(range(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS), keys)  # distinct
    who = rng.sample(list(names), keys)
    asked = rng.randrange(keys)
    depths = [depth if i == asked else rng.random() for i in range(keys)]
    sentences = [(d, f" The pass key of {w} is {_write(n, sep)}. Remember it. "
                     f"{_write(n, sep)} is the pass key of {w}.") for d, w, n in zip(depths, who, numbers)]
    return Needles(intro="There are several pass keys hidden inside a lot of irrelevant text. "
                         "Find them and memorize them. I will quiz you about one of them.",
                   sentences=sentences, question=f"\n\nWhat is the pass key of {who[asked]}?",
                   lead=f" The pass key of {who[asked]} is", answer=str(numbers[asked]), asked=asked,
                   info={"name": who[asked], "distractors": [str(n) for i, n in enumerate(numbers) if i != asked]})


register_recall_task("passkey", passkey_needles)
register_recall_task("multikey", multikey_needles)


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
    "Keys per prompt in multikey (the asked one and distractors)."
    seed: int = 0
    "Seed of keys, names and random depths (same seed, same prompts)."
    batch_size: int = 8
    "Prompts per generate call."
    chat_template: bool = True
    "Wrap the text in the tokenizer's chat template when it has one."
    max_new_tokens: int = 16
    "Greedy tokens generated per prompt."

    def __post_init__(self):
        self.tasks, self.lengths = tuple(self.tasks), tuple(int(n) for n in self.lengths)
        self.depths = None if self.depths is None else tuple(float(d) for d in self.depths)
        for t in self.tasks:
            get_recall_task(t)
        if self.tasks and not self.lengths:
            raise ValueError("recall lengths: give at least one length")
        for name, value in (("lengths", min(self.lengths, default=1)), ("samples", self.samples),
                            ("keys", self.keys), ("batch size", self.batch_size),
                            ("max new tokens", self.max_new_tokens)):
            if value < 1:
                raise ValueError(f"recall {name} must be >= 1, got {value}")
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


def writable_names(tokenizer) -> list[str]:
    """The built-in multikey names that the tokenizer writes back unchanged."""
    decoded = tokenizer.batch_decode(_encode([f" {n}" for n in NAMES], tokenizer))
    return [n for n, d in zip(NAMES, decoded) if d.strip() == n]


def filler_ids(sentences: list[list[int]], n: int) -> tuple[list[int], list[int]]:
    """``n`` filler tokens (the sentences cycled, the last one cut) and the sentence boundaries in [0, n]."""
    ids, bounds, i = [], [0], 0
    while len(ids) < n:
        ids += sentences[i % len(sentences)]
        bounds.append(min(len(ids), n))
        i += 1
    return ids[:n], sorted(set(bounds))


def assemble(needles: Needles, frame: Frame, length: int, task: str, tokenizer,
             filler: list[list[int]]) -> tuple[list[int], int, int, float]:
    """(ids of exactly ``length`` tokens, index of the asked key sentence, its length in tokens, its placed depth)."""
    question = needles.question + ("" if frame.chat else needles.lead)
    intro, question_ids, *sent = _encode([needles.intro, question] + [s for _, s in needles.sentences], tokenizer)
    fixed = len(frame.head) + len(intro) + sum(map(len, sent)) + len(question_ids) + len(frame.tail)
    n_fill = length - fixed
    if n_fill < 1:
        raise ValueError(f"recall length {length} is too short for {task}: the template, instructions, key "
                         f"sentence(s) and question take {fixed} tokens; use lengths above {fixed}")
    hay, bounds = filler_ids(filler, n_fill)
    cuts = [min(bounds, key=lambda b: (abs(b - d * n_fill), b)) for d, _ in needles.sentences]
    ids = frame.head + intro
    start, prev = 0, 0
    for i in sorted(range(len(cuts)), key=lambda i: (cuts[i], i)):
        ids += hay[prev:cuts[i]]
        if i == needles.asked:
            start = len(ids)
        ids += sent[i]
        prev = cuts[i]
    ids += hay[prev:] + question_ids + frame.tail
    assert len(ids) == length, (len(ids), length)
    return ids, start, len(sent[needles.asked]), cuts[needles.asked] / n_fill


def build_samples(tokenizer, task: str, length: int, settings: RecallSettings) -> list[RecallSample]:
    """``settings.samples`` prompts of ``task`` at ``length`` tokens (seeded; see the module docstring)."""
    fn = get_recall_task(task)
    frame = prompt_frame(tokenizer, settings.chat_template)
    sep = digit_separator(tokenizer)
    names = writable_names(tokenizer) if task != "passkey" else []
    filler = _encode([f" {s}" for s in FILLER], tokenizer)
    out = []
    for i in range(settings.samples):
        rng = random.Random(f"lolcats-recall:{task}:{length}:{settings.seed}:{i}")  # str seeds: stable across runs
        depth = rng.random() if settings.depths is None else settings.depths[i % len(settings.depths)]
        needles = fn(rng, depth, settings.keys, names, sep)
        ids, start, key_len, placed = assemble(needles, frame, length, task, tokenizer, filler)
        out.append(RecallSample(task, length, depth, needles.answer, sep, tuple(ids), start, placed,
                                dict(needles.info, chat_template=frame.chat), key_len))
    return out


# ---------------------------------------------------------------- scoring


def find_key(text: str, sep: str = "", digits: int = KEY_DIGITS) -> str | None:
    """The first ``digits``-digit number in ``text`` (digits joined by ``sep``), without ``sep``; None if none."""
    s = re.escape(sep)
    body = s.join([r"\d"] * digits)
    m = re.search(rf"(?<!\d)(?<!\d{s})({body})(?!{s}\d)(?!\d)", text)
    return None if m is None else m.group(1).replace(sep, "") if sep else m.group(1)


def is_hit(text: str, sample: RecallSample) -> bool:
    return find_key(text, sample.sep) == sample.answer


def accuracy(hits: Sequence[bool]) -> dict[str, Any]:
    """``{"acc", "acc_stderr", "samples"}``; stderr = sample std / sqrt(n) as lm_eval (None for n < 2)."""
    n = len(hits)
    if n == 0:
        raise ValueError("accuracy of no samples")
    p = sum(map(bool, hits)) / n
    return {"acc": p, "acc_stderr": math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None, "samples": n}


def summarize(samples: Sequence[RecallSample], hits: Sequence[bool], per_depth: bool = True) -> dict[str, Any]:
    """Accuracy over ``samples`` and, if asked, per requested depth (``acc@d0.5`` and ``acc@d0.5_stderr``)."""
    out = {**accuracy(hits), "tokens": samples[0].length}
    if per_depth:
        for d in dict.fromkeys(s.depth for s in samples):
            sub = accuracy([h for s, h in zip(samples, hits) if s.depth == d])
            out[depth_metric(d)], out[depth_metric(d) + "_stderr"] = sub["acc"], sub["acc_stderr"]
    return out


# ---------------------------------------------------------------- generation


def _prepare_generation(model: torch.nn.Module) -> None:
    """A converted model generates with its LolcatsCache (idempotent; load_linearized did it already)."""
    from lolcats.attention.convert import lolcats_modules

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


def _check_positions(model: torch.nn.Module, lengths: Sequence[int]) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and max(lengths) > limit:
        warnings.warn(f"recall lengths up to {max(lengths)} exceed the model's max_position_embeddings {limit}",
                      stacklevel=3)


def build_all(tokenizer, settings: RecallSettings) -> dict[str, list[RecallSample]]:
    """``{task@length: samples}`` for every task and length (raises early on lengths too short)."""
    return {f"{t}@{n}": build_samples(tokenizer, t, n, settings) for t in settings.tasks for n in settings.lengths}


def evaluate_recall(model: torch.nn.Module, tokenizer, settings: RecallSettings,
                    prompts: dict[str, list[RecallSample]] | None = None) -> dict[str, dict[str, Any]]:
    """``{task@length: metrics}`` (see the module docstring); ``prompts`` from :func:`build_all` if given."""
    prompts = build_all(tokenizer, settings) if prompts is None else prompts
    if prompts:
        _check_positions(model, settings.lengths)
    out = {}
    for name, samples in prompts.items():
        texts = generate_answers(model, tokenizer, samples, settings.batch_size, settings.max_new_tokens)
        hits = [is_hit(t, s) for t, s in zip(texts, samples)]
        out[name] = {**summarize(samples, hits, settings.depths is not None),
                     "chat_template": samples[0].info["chat_template"], "answers": answers(samples, texts, hits)}
    return out


def answers(samples: Sequence[RecallSample], texts: Sequence[str], hits: Sequence[bool]) -> list[dict[str, Any]]:
    """What the model said to each prompt (in the JSON, not the table): a miss that writes another number
    reads differently from one that writes no number or breaks down."""
    return [{"depth": s.depth, "key": s.answer, "hit": bool(h), "output": t} for s, t, h in zip(samples, texts, hits)]


# ---------------------------------------------------------------- retrieval heads

# the prompts retrieval_scores reads by default: passkey at two lengths, depths spread over the filler
RETRIEVAL_PROBE = RecallSettings(tasks=("passkey",), lengths=(1024, 2048), samples=8,
                                 depths=(0.1, 0.3, 0.5, 0.7, 0.9))


def _key_mass(q: torch.Tensor, k: torch.Tensor, span: tuple[int, int], scaling: float) -> torch.Tensor:
    """q (B, H, T, D), k (B, Hk, T, D) -> (B, H): softmax attention of the last query on keys span[0]:span[1]."""
    group = q.shape[1] // k.shape[1]
    s = torch.einsum("bhd,bhtd->bht", q[:, :, -1].float(), k.float().repeat_interleave(group, 1)) * scaling
    return s.softmax(-1)[:, :, span[0]:span[1]].sum(-1)


@torch.no_grad()
def retrieval_scores(model: torch.nn.Module, tokenizer, settings: RecallSettings = RETRIEVAL_PROBE,
                     ) -> dict[int, float]:
    """{layer: score} for every LolcatsAttention layer, from the teacher (softmax) attention on recall prompts.

    A layer's score is its best head's mean (over ``settings``' prompts) of the softmax attention that the last
    prompt token (where the answer starts) puts on the asked key sentence: retrieval heads put most of it there,
    other heads about the span's share of the context. Lengths past the model's ``max_position_embeddings`` are
    left out (when all are, prompts of that many positions are read instead). The layers run in teacher mode
    for the scoring and get their mode back."""
    from lolcats.attention.convert import lolcats_attention_by_layer

    mods = lolcats_attention_by_layer(model)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or max(settings.lengths)
    lengths = [n for n in settings.lengths if n <= limit] or [limit]
    samples = [x for t in settings.tasks for n in lengths for x in build_samples(tokenizer, t, n, settings)]
    device, modes = model_device(model), {i: m.mode for i, m in mods.items()}
    sums: dict[int, torch.Tensor] = {}
    span = (0, 0)

    def probe(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        mass = _key_mass(q, k, span, mods[layer].scaling).sum(0)  # (H,)
        sums[layer] = sums.get(layer, 0) + mass

    was_training = model.training
    model.eval()
    try:
        for m in mods.values():
            m.mode, m.probe = "teacher", probe
        for x in samples:  # one prompt at a time: each has its own key span
            span = (x.key_start, x.key_start + x.key_len)
            ids = torch.tensor([x.ids], device=device)
            with autocast_context(device, "auto"):
                model(input_ids=ids, use_cache=False)
    finally:
        for i, m in mods.items():
            m.mode, m.probe = modes[i], None
        model.train(was_training)
    return {i: float(v.max()) / len(samples) for i, v in sorted(sums.items())}
