"""The converted-GGUF cache (lolcats.models.gguf_cache) behind load_base_model / load_tokenizer.

Most tests use a stand-in: a tiny HF model directory with a dummy ``model.gguf`` beside it, loaded
with the ``gguf_file`` argument dropped, so the cache is keyed by the dummy file while the weights
come from the directory. The real built-in GGUF is used by the slow test at the end.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from conftest import save_tiny
from lolcats.config import ModelConfig
from lolcats.models import gguf_cache, loading


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """(ModelConfig naming a 'GGUF' that is a tiny HF model, cache root)."""
    d = save_tiny(tmp_path / "model")
    (d / "model.gguf").write_bytes(b"GGUF stand-in v1")
    real = loading.hub_kwargs
    monkeypatch.setattr(loading, "hub_kwargs", lambda cfg, gguf: {k: v for k, v in real(cfg, gguf).items()
                                                                   if k != "gguf_file"})
    root = tmp_path / "cache"
    monkeypatch.setenv("LOLCATS_CACHE_DIR", str(root))
    monkeypatch.delenv("LOLCATS_GGUF_CACHE", raising=False)
    return ModelConfig(name=str(d), gguf_file="model.gguf", dtype="float32"), root


def _parts(root):
    return sorted(p.name for p in (root / "gguf").glob("*/*") if gguf_cache.complete(p))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_second_load_reads_the_cache_and_gives_the_same_model(stand_in):
    cfg, root = stand_in
    m1, t1 = loading.load_base_model(cfg, "cpu"), loading.load_tokenizer(cfg)
    assert _parts(root) == ["model-float32", "tokenizer"]
    for f in ("model.safetensors", "config.json", "tokenizer.json"):  # the source is gone: only the cache can serve
        (loading.Path(cfg.name) / f).unlink()
    m2, t2 = loading.load_base_model(cfg, "cpu"), loading.load_tokenizer(cfg)
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    ids = torch.tensor([t1("the cat sat on the mat")["input_ids"]])
    assert torch.equal(ids, torch.tensor([t2("the cat sat on the mat")["input_ids"]]))
    assert torch.equal(_logits(m1, ids), _logits(m2, ids))
    assert loading.base_fingerprint(m1) == loading.base_fingerprint(m2)
    assert (t1.eos_token_id, t1.pad_token_id) == (t2.eos_token_id, t2.pad_token_id)


def test_a_changed_file_gets_a_new_entry(stand_in):
    cfg, root = stand_in
    gguf = loading.Path(cfg.name) / "model.gguf"
    loading.load_tokenizer(cfg)
    first = gguf_cache.entry_dir(gguf, root)
    gguf.write_bytes(b"GGUF stand-in v2")
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on coarse clocks
    second = gguf_cache.entry_dir(gguf, root)
    assert second != first
    loading.load_tokenizer(cfg)
    assert gguf_cache.complete(first / "tokenizer") and gguf_cache.complete(second / "tokenizer")


def test_a_half_written_part_is_not_used(stand_in):
    cfg, root = stand_in
    entry = gguf_cache.entry_dir(loading.Path(cfg.name) / "model.gguf", root)
    broken = entry / "model-float32"
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"truncated")  # no marker: a copy that never finished
    stale = entry / ".model-float32.tmp-1-deadbeef"
    stale.mkdir()
    os.utime(stale, (time.time() - 3 * 86400,) * 2)
    model = loading.load_base_model(cfg, "cpu")  # would fail reading the truncated file
    assert gguf_cache.complete(broken) and not stale.exists()
    assert sum(p.numel() for p in model.parameters()) > 0


def test_a_part_that_cannot_be_written_leaves_nothing(tmp_path, capsys):
    part = tmp_path / "entry" / "model-float32"

    def fail(out):
        (out / "half").write_text("x")
        raise OSError("disk full")

    assert not gguf_cache.write_part(part, fail)
    assert not part.exists() and list(part.parent.iterdir()) == []
    assert "could not cache" in capsys.readouterr().err
    assert gguf_cache.write_part(part, lambda out: (out / "ok").write_text("y"))
    assert gguf_cache.complete(part) and (part / "ok").read_text() == "y"
    assert gguf_cache.write_part(part, fail)  # complete already: not written again


def test_the_file_hash_is_remembered_per_path_size_and_mtime(tmp_path):
    f, root = tmp_path / "m.gguf", tmp_path / "cache"
    f.write_bytes(b"abc")
    h = gguf_cache.file_sha256(f, root)
    (memo,) = (root / "gguf" / "hashes").iterdir()
    memo.write_text("f" * 64)  # a remembered hash is used without reading the file
    assert gguf_cache.file_sha256(f, root) == "f" * 64
    os.utime(f, ns=(time.time_ns(), f.stat().st_mtime_ns + 10**9))
    assert gguf_cache.file_sha256(f, root) == h  # touched: hashed again


def test_cache_off(stand_in, monkeypatch):
    cfg, root = stand_in
    monkeypatch.setenv("LOLCATS_GGUF_CACHE", "0")
    assert gguf_cache.cache_root() is None
    loading.load_base_model(cfg, "cpu")
    loading.load_tokenizer(cfg)
    assert not root.exists()


def test_shared_reads_parse_a_file_once(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("test.value", 7)
    w.add_tensor("t", torch.arange(8, dtype=torch.float32).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    original = gguf.GGUFReader
    with gguf_cache.shared_gguf_reads():
        a, b = gguf.GGUFReader(str(path)), gguf.GGUFReader(path)
        with gguf_cache.shared_gguf_reads():  # nested: the same readers
            c = gguf.GGUFReader(str(path))
        assert a is b is c
        assert int(a.fields["test.value"].parts[-1][0]) == 7
    assert gguf.GGUFReader is original and gguf.GGUFReader(str(path)) is not a


@pytest.mark.slow
def test_builtin_gguf_cold_then_warm(tmp_path, monkeypatch):
    """The real SmolLM2 GGUF: the cold load parses it once (model and tokenizer), the warm one not
    at all, and both give the direct load's weights, logits, tokenizer and fingerprint."""
    gguf = pytest.importorskip("gguf")
    cfg = ModelConfig(dtype="float32")
    try:
        loading.resolve_source(cfg)
    except ImportError as e:
        pytest.skip(str(e))
    parses = []
    real = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: parses.append(a) or real(*a, **k))
    monkeypatch.setenv("LOLCATS_CACHE_DIR", str(tmp_path))
    cold = loading.load_base_model(cfg, "cpu")
    tok = loading.load_tokenizer(cfg)
    assert len(parses) == 1
    warm, tok2 = loading.load_base_model(cfg, "cpu"), loading.load_tokenizer(cfg)
    assert len(parses) == 1
    text = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == tok2.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                            tokenize=False)
    ids = torch.tensor([tok(text)["input_ids"]])
    assert torch.equal(ids, torch.tensor([tok2(text)["input_ids"]]))
    assert torch.equal(_logits(cold, ids), _logits(warm, ids))
    assert loading.base_fingerprint(cold) == loading.base_fingerprint(warm)
    assert cold.generation_config.eos_token_id == warm.generation_config.eos_token_id


def test_a_cache_folder_that_cannot_be_made_does_not_stop_the_load(stand_in, monkeypatch, capsys):
    cfg, root = stand_in
    blocker = root.parent / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("LOLCATS_CACHE_DIR", str(blocker))
    model, tok = loading.load_base_model(cfg, "cpu"), loading.load_tokenizer(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0 and tok.eos_token_id is not None
    assert "not caching" in capsys.readouterr().err
