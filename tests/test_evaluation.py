"""Evaluation: perplexity against hand-computed log-likelihoods, the lm_eval bridge on a tiny
local task against hand-picked answers, local task folders, the comparison table, eval_main."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import SHARED_DATA, tiny_model, tiny_tokenizer
from lolcats.attention.convert import convert_model
from lolcats.config import AttentionConfig
from lolcats.evaluation import (compare_table, eval_main, frame_documents,
                                packed_perplexity, perplexity, token_perplexity)
from lolcats.evaluation.harness import localized_include_path, resolve_data_path, resolve_task_names
from lolcats.evaluation.perplexity import document_windows, packed_windows

DATA = Path(__file__).parent / "data"
PPL_FILE = DATA / "ppl_docs.txt"
TASKS = DATA / "lm_eval_tasks"
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason="lm_eval not installed (pip install 'lolcats[eval]')")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_model(vocab_size=len(tok.get_vocab()), seed=1)
    return convert_model(m, AttentionConfig(feature_dim=8, window_size=4, init_window_factor=0.5))


@pytest.fixture(scope="module")
def docs(tok) -> list[list[int]]:
    from lolcats.data import format_record, read_documents

    texts = [format_record(r, "auto", "alpaca", tok) for r in read_documents(str(PPL_FILE))]
    assert len(texts) == 4
    return frame_documents(texts, tok)


@torch.no_grad()
def hand_nll(model, ids: list[int], n_target: int | None = None) -> tuple[float, int]:
    """Sum of -log p(ids[t] | ids[:t]) over the last ``n_target`` tokens (all but the first by default)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (T, V)
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    n = len(ids) - 1 if n_target is None else n_target
    picked = [-float(logp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids))]
    return sum(picked), n


# ---------------------------------------------------------------- perplexity


def test_framing_adds_eos(docs, tok):
    assert all(d[-1] == tok.eos_token_id for d in docs)
    assert all(tok.eos_token_id not in d[:-1] for d in docs)


def test_document_perplexity_matches_hand(model, tok, docs):
    total, count = 0.0, 0
    for d in docs:
        s, n = hand_nll(model, d)
        total, count = total + s, count + n
    out = perplexity(model, tok, PPL_FILE, mode="document", seq_len=64, batch_size=3)
    assert out["tokens"] == count == sum(len(d) - 1 for d in docs)
    assert out["loss"] == pytest.approx(total / count, abs=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert out["documents"] == 4 and out["windows"] == 4


def test_packed_perplexity_matches_hand(model, tok, docs):
    seq_len = 16
    stream = [t for d in docs for t in d]
    chunks = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
    total, count = 0.0, 0
    for c in chunks:
        s, n = hand_nll(model, c)
        total, count = total + s, count + n
    out = perplexity(model, tok, PPL_FILE, mode="packed", seq_len=seq_len, batch_size=2)
    assert out["tokens"] == count == len(stream) - len(chunks)
    assert out["loss"] == pytest.approx(total / count, abs=1e-5)
    # the trainer's entry point on the full chunks, as an (N, T) tensor
    full = torch.tensor(stream[: (len(stream) // seq_len) * seq_len]).view(-1, seq_len)  # (N, T)
    hand = [hand_nll(model, row.tolist()) for row in full]
    res = packed_perplexity(model, full, batch_size=3)
    assert res["tokens"] == full.shape[0] * (seq_len - 1)
    assert res["loss"] == pytest.approx(sum(s for s, _ in hand) / res["tokens"], abs=1e-5)


def test_packed_and_document_modes(model, docs):
    one = [docs[2]]  # a single document in one window: both modes see the same thing
    a = token_perplexity(model, one, "packed", seq_len=64)
    b = token_perplexity(model, one, "document", seq_len=64)
    assert a["tokens"] == b["tokens"] == len(docs[2]) - 1 and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    # several documents: packing lets documents see the previous ones, the document mode does not
    a = token_perplexity(model, docs, "packed", seq_len=512)
    b = token_perplexity(model, docs, "document", seq_len=512)
    assert a["tokens"] == b["tokens"] + len(docs) - 1
    assert a["loss"] != pytest.approx(b["loss"], abs=1e-6)


@pytest.mark.parametrize("length,max_length,stride", [(10, 4, None), (10, 4, 2), (17, 5, 1), (3, 8, None)])
def test_document_windows_score_every_token_once(length, max_length, stride):
    doc = list(range(100, 100 + length))
    wins = document_windows(doc, max_length, stride)
    scored = [w.ids[len(w.ids) - i] for w in wins for i in range(w.n_target, 0, -1)]
    assert scored == doc[1:]
    assert all(len(w.ids) <= max_length and w.n_target < len(w.ids) for w in wins)
    assert document_windows(doc, max_length, stride, truncate=True)[0].ids == doc[:max_length]


def test_strided_document_matches_hand(model, docs):
    doc, max_length, stride = docs[2], 8, 3
    total, count = 0.0, 0
    for w in document_windows(doc, max_length, stride):
        s, n = hand_nll(model, w.ids, w.n_target)
        total, count = total + s, count + n
    out = token_perplexity(model, [doc], "document", seq_len=max_length, stride=stride, batch_size=4)
    assert out["tokens"] == count == len(doc) - 1
    assert out["loss"] == pytest.approx(total / count, abs=1e-5)


def test_bad_mode_and_lengths(model, docs):
    with pytest.raises(ValueError, match="known: packed, document"):
        token_perplexity(model, docs, "rolling")
    with pytest.raises(ValueError, match="stride"):
        document_windows(list(range(10)), 4, 4)
    assert packed_windows([[1]], 4) == []


# ---------------------------------------------------------------- lm_eval


@torch.no_grad()
def hand_choice_loglik(model, tok, context: str, choice: str) -> float:
    """log p(" " + choice | context), tokenised as lm_eval does (whole string, then split)."""
    whole = tok.encode(context + " " + choice)
    ctx = tok.encode(context)
    s, _ = hand_nll(model, whole, len(whole) - len(ctx))
    return -s


@needs_lm_eval
def test_lm_loglikelihoods_match_hand(model, tok):
    from lm_eval.api.instance import Instance

    from lolcats.evaluation.harness import lolcats_lm_class

    lm = lolcats_lm_class()(pretrained=model, tokenizer=tok, batch_size=3)
    pairs = [("question: what is the sky\nanswer:", " blue"), ("question: what is the sky\nanswer:", " a big red tree"),
             ("the cat sat", " on the mat and ran to the house"), ("who", " ran")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    got = [ll for ll, _greedy in lm.loglikelihood(reqs, disable_tqdm=True)]
    want = [hand_choice_loglik(model, tok, c, x[1:]) for c, x in pairs]
    assert got == pytest.approx(want, abs=1e-4)


@needs_lm_eval
def test_harness_tiny_task_matches_hand(model, tok):
    from lolcats.evaluation.harness import run_harness

    rows = [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines()][:3]
    acc, acc_norm = [], []
    for r in rows:
        ll = [hand_choice_loglik(model, tok, f"question: {r['question']}\nanswer:", c) for c in r["choices"]]
        acc.append(float(max(range(len(ll)), key=ll.__getitem__) == r["label"]))
        norm = [x / len(c) for x, c in zip(ll, r["choices"])]
        acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == r["label"]))
    out = run_harness(model, tok, ["tiny_mc"], batch_size=2, limit=3, include_path=str(TASKS))
    assert set(out) == {"tiny_mc"}  # asked as tiny_mc, ran tiny_mc_local
    m = out["tiny_mc"]
    assert m["samples"] == 3
    assert m["acc"] == pytest.approx(sum(acc) / 3)
    assert m["acc_norm"] == pytest.approx(sum(acc_norm) / 3)
    assert "acc_stderr" in m


def test_local_task_paths_resolve(tmp_path, monkeypatch):
    """The shared layout: YAMLs name data as ../shared/data/... relative to a sibling of shared/."""
    tasks = tmp_path / "shared" / "data" / "lm_eval_local"
    (tasks / "sub").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "x").mkdir()
    data = tmp_path / "shared" / "data" / "x" / "t.jsonl"
    data.write_text('{"a": 1}\n')
    (tasks / "t.yaml").write_text("task: t_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                  "    test: ../shared/data/x/t.jsonl\nfoo: !function utils.f\n")
    (tasks / "sub" / "_template_yaml").write_text("dataset_kwargs:\n  data_files: [../shared/data/x/t.jsonl]\n")
    monkeypatch.chdir(tmp_path / "shared")  # not where the paths were written for
    assert resolve_data_path("../shared/data/x/t.jsonl", tasks / "t.yaml") == str(data.resolve())
    with localized_include_path(tasks) as local:
        assert str(data.resolve()) in (local / "t.yaml").read_text()
        assert "!function utils.f" in (local / "t.yaml").read_text()
        assert str(data.resolve()) in (local / "sub" / "_template_yaml").read_text()
    assert not local.exists()
    # two paths, one the tail of the other: each is rewritten once, to its own file
    (tasks / "t.jsonl").write_text('{"a": 2}\n')
    (tasks / "two.yaml").write_text("task: two\ndataset_kwargs:\n  data_files:\n    test: t.jsonl\n"
                                    "    dev: ../shared/data/x/t.jsonl\n")
    with localized_include_path(tasks) as local:
        cfg = yaml.safe_load((local / "two.yaml").read_text())["dataset_kwargs"]["data_files"]
    assert cfg == {"test": str((tasks / "t.jsonl").resolve()), "dev": str(data.resolve())}
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        resolve_data_path("missing.jsonl", tasks / "t.yaml")


@pytest.mark.skipif(not (SHARED_DATA / "lm_eval_local").is_dir(), reason="no shared lm_eval_local folder")
def test_shared_local_tasks_resolve():
    with localized_include_path(SHARED_DATA / "lm_eval_local") as local:
        text = (local / "piqa_local.yaml").read_text()
        assert str((SHARED_DATA / "piqa" / "piqa_validation.jsonl").resolve()) in text


def test_task_names():
    known = ["piqa", "piqa_local", "mmlu_local", "arc_easy"]
    assert resolve_task_names(["piqa", "mmlu", "arc_easy"], known, True) == \
        {"piqa": "piqa_local", "mmlu": "mmlu_local", "arc_easy": "arc_easy"}
    assert resolve_task_names(["piqa"], known, False) == {"piqa": "piqa"}
    with pytest.raises(ValueError, match="similar: arc_easy"):
        resolve_task_names(["arc"], known, True)


@needs_lm_eval
@pytest.mark.skipif(not (SHARED_DATA / "lm_eval_local").is_dir(), reason="no shared lm_eval_local folder")
def test_shared_local_tasks_run(model, tok):
    from lolcats.evaluation.harness import run_harness

    out = run_harness(model, tok, ["piqa", "arc_easy", "arc_challenge", "mmlu"], batch_size=4, limit=2,
                      include_path=str(SHARED_DATA / "lm_eval_local"))
    assert {"piqa", "arc_easy", "arc_challenge", "mmlu"} <= set(out)
    assert all(0.0 <= out[t]["acc"] <= 1.0 for t in ("piqa", "arc_easy", "arc_challenge", "mmlu"))


# ---------------------------------------------------------------- report and entry point


def test_compare_table_has_both_columns():
    results = {"base": {"piqa": {"acc": 0.61, "acc_stderr": 0.011, "acc_norm": 0.62}, "ppl:wiki": {"ppl": 20.5}},
               "linearized": {"piqa": {"acc": 0.6, "acc_stderr": 0.0115}, "ppl:wiki": {"ppl": 21.25}}}
    table = compare_table(results)
    lines = table.splitlines()
    assert lines[0] == "| task | metric | base | linearized | Δ |"
    assert "| piqa | acc | 0.6100 ± 0.0110 | 0.6000 ± 0.0115 | -0.0100 |" in lines
    assert "| piqa | acc_norm | 0.6200 | – | – |" in lines
    assert "| ppl:wiki | ppl | 20.5000 | 21.2500 | +0.7500 |" in lines


def test_eval_main_from_flags(model, tok, tmp_path, monkeypatch):
    import lolcats.evaluation as evaluation
    from lolcats.cli import main
    from lolcats.models.trained import ModelSource

    loaded = []

    def fake_load(source, device=None, dtype="auto"):
        loaded.append((source.base, source.stage1))
        return model, tok

    monkeypatch.setattr(evaluation, "load_trained", fake_load)
    assert main(["eval", "--base", "tiny", "--stage1", "s1", "--ppl", str(PPL_FILE), "--seq-len", "32",
                 "--ppl-mode", "document", "--compare-base", "--output", str(tmp_path / "r.json")]) == 0
    assert loaded == [("tiny", None), ("tiny", "s1")]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert list(saved["results"]) == ["base", "linearized"]
    assert saved["results"]["linearized"]["ppl:ppl_docs.txt"]["tokens"] > 0
    assert "| base | linearized |" in saved["table"]
    with pytest.raises(ValueError, match="nothing to evaluate"):
        eval_main(ModelSource(base="tiny"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_perplexity_on_cuda_bf16_close_to_cpu(model, docs):
    cpu = token_perplexity(model, docs, "packed", seq_len=16)
    model.cuda()
    try:
        gpu = token_perplexity(model, docs, "packed", seq_len=16)  # bf16 autocast on CUDA
        rows = torch.tensor([t for d in docs for t in d][:48]).view(3, 16)  # (N, T)
        assert packed_perplexity(model, rows.cuda())["tokens"] == 45
    finally:
        model.cpu()
    assert gpu["tokens"] == cpu["tokens"]
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=2e-2)


@needs_lm_eval
def test_registered_model_type_loads_from_model_args(tiny_model_dir):
    from lm_eval.api.registry import get_model

    from lolcats.evaluation.harness import lolcats_lm_class

    cls = lolcats_lm_class()
    assert get_model("lolcats") is cls
    lm = cls.create_from_arg_string(f"base={tiny_model_dir},dtype=float32,device=cpu", {"batch_size": 2})
    assert lm.model.config.model_type == "llama" and lm.batch_size == 2


def test_limit_bounds_perplexity_and_progress_shows(model, tok, tmp_path, monkeypatch, capsys):
    """`lolcats eval --ppl FILE --limit N` scores the first N windows of the file (it scored them all, silently:
    issue 29), with a progress bar on stderr; a fraction < 1 takes that share of the windows."""
    import lolcats.evaluation as evaluation
    from lolcats.cli import main

    monkeypatch.setattr(evaluation, "load_trained", lambda source, device=None, dtype="auto": (model, tok))
    calls = []
    hook = model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                       with_kwargs=True)
    try:
        whole = perplexity(model, tok, PPL_FILE, "packed", seq_len=8, batch_size=2)
        assert whole["windows"] > 3
        calls.clear()
        capsys.readouterr()
        assert main(["eval", "--base", "tiny", "--ppl", str(PPL_FILE), "--seq-len", "8", "--batch-size", "2",
                     "--limit", "3", "--output", str(tmp_path / "r.json")]) == 0
        assert sum(calls) == 3 and len(calls) == 2  # 3 windows: batches of 2 and 1
        err = capsys.readouterr().err
        assert "ppl ppl_docs.txt" in err and "3/3" in err  # the bar, in windows
        saved = json.loads((tmp_path / "r.json").read_text())
        scored = saved["results"]["base"]["ppl:ppl_docs.txt"]
        assert scored["windows"] == 3 and scored["tokens"] == 3 * 7 and saved["settings"]["limit"] == 3
        half = perplexity(model, tok, PPL_FILE, "packed", seq_len=8, batch_size=2, limit=0.5)
        assert half["windows"] == math.ceil(whole["windows"] / 2)
    finally:
        hook.remove()
