"""Hidden-state store: what is stored is the teacher's own states; resume; fingerprints; layer blocks."""

from __future__ import annotations

import json

import pytest
import torch

from lolcats.training.hidden_store import (
    HiddenStateReader,
    HiddenStateWriter,
    HiddenStoreError,
    collect_hidden_states,
    run_layer_block,
)

L, T, D = 4, 12, 64
META = {"model_fingerprint": "m1", "config_fingerprint": "c1", "tokens": 0}


def tiny_model(dtype=torch.float32, convert: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=D, intermediate_size=128, num_hidden_layers=L,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    if convert:
        from lolcats.attention.convert import convert_model
        from lolcats.config import AttentionConfig

        convert_model(model, AttentionConfig(feature_map="hedgehog", feature_dim=8, kind="linear", backend="torch"))
    return model


def batches(n_batches: int, b: int = 3):
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(0, 128, (b, T), generator=gen) for _ in range(n_batches)]


def teacher_states(model, ids):
    """L+1 of (B, T, D): HF's hidden states, the last one taken before the final norm."""
    last = []
    h = model.model.layers[-1].register_forward_hook(lambda m, a, out: last.append(out))
    with torch.no_grad():
        out = model.model(input_ids=ids, output_hidden_states=True)
    h.remove()
    torch.testing.assert_close(model.model.norm(last[0]), out.last_hidden_state)
    return list(out.hidden_states[:L]) + [last[0]]


def write_store(root, model, data, boundaries, split="train", shard_size=4, stop_after=None):
    w = HiddenStateWriter(root, boundaries, D, T, META, shard_size=shard_size)
    done = w.num_written(split)
    for k, ids in enumerate(data):
        if k * len(ids) < done:
            continue
        w.add(split, collect_hidden_states(model, ids, boundaries))
        if stop_after is not None and k + 1 == stop_after:
            return w  # "killed": no finish, buffered sequences lost
    w.finish_split(split)
    w.finish()
    return w


@pytest.mark.parametrize("convert", [False, True])
def test_stored_states_are_the_teachers(tmp_path, convert):
    model, data, boundaries = tiny_model(convert=convert), batches(3), [0, 2, L]
    if convert:
        from lolcats.attention.modes import set_attention_mode

        set_attention_mode(model, "student")
        plain = tiny_model()  # the teacher is the unconverted model
    else:
        plain = model
    write_store(tmp_path, model, data, boundaries)
    ids = torch.cat(data)
    ref = teacher_states(plain, ids)
    for b in boundaries:
        r = HiddenStateReader(tmp_path, b, "train")
        assert len(r) == len(ids)
        got = torch.stack([r[i] for i in range(len(r))])
        assert got.dtype == torch.bfloat16 and got.shape == (len(ids), T, D)
        torch.testing.assert_close(got, ref[b].to(torch.bfloat16), atol=0, rtol=0)
    if convert:  # modes restored
        from lolcats.attention.layers import lolcats_modules

        assert all(m.mode == "student" for m in lolcats_modules(model))


def test_early_stop_captures_only_what_is_asked():
    model = tiny_model()
    calls = []
    h = model.model.layers[2].register_forward_pre_hook(lambda m, a: calls.append(1))
    out = collect_hidden_states(model, batches(1)[0], [0, 1])
    h.remove()
    assert sorted(out) == [0, 1] and calls == []  # layer 2 never ran


def test_resume_after_kill(tmp_path):
    model, data, boundaries = tiny_model(), batches(5), [0, 2]
    write_store(tmp_path, model, data, boundaries, stop_after=3)  # 9 seqs seen, 2 shards of 4 on disk
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["splits"]["train"]["num_sequences"] == 8
    with pytest.raises(HiddenStoreError, match="incomplete"):
        HiddenStateReader(tmp_path, 0, "train")
    # a half-written third shard of the killed run
    (tmp_path / "train" / "b0000" / "000002.bin").write_bytes(b"\0" * 100)

    w = HiddenStateWriter(tmp_path, boundaries, D, T, META, shard_size=4)
    assert w.num_written("train") == 8 and not w.complete
    # resume from sequence 8: batch 2 holds sequences 6..8; feed from where the store stops
    ids = torch.cat(data)
    rest = ids[8:]
    for chunk in rest.split(3):
        w.add("train", collect_hidden_states(model, chunk, boundaries))
    w.finish_split("train")
    w.finish()
    ref = teacher_states(model, ids)
    r = HiddenStateReader(tmp_path, 2, "train")
    assert len(r) == len(ids)
    got = torch.stack([r[i] for i in range(len(r))])
    torch.testing.assert_close(got, ref[2].to(torch.bfloat16), atol=0, rtol=0)


def test_truncated_listed_shard_is_dropped(tmp_path):
    model, data = tiny_model(), batches(3)
    write_store(tmp_path, model, data, [0])
    (tmp_path / "train" / "b0000" / "000001.bin").write_bytes(b"\0" * 10)  # damaged after the fact
    with pytest.raises(HiddenStoreError, match="missing or truncated"):
        HiddenStateReader(tmp_path, 0, "train")
    w = HiddenStateWriter(tmp_path, [0], D, T, META, shard_size=4)
    assert w.num_written("train") == 4 and not w.complete and not w.split_complete("train")


def test_mismatch_errors(tmp_path):
    model = tiny_model()
    write_store(tmp_path, model, batches(1), [0, 2])
    r = HiddenStateReader(tmp_path, 2, "train")
    r.verify("m1", "c1")
    with pytest.raises(HiddenStoreError, match="model_fingerprint"):
        r.verify("other", "c1")
    with pytest.raises(HiddenStoreError, match="config_fingerprint"):
        r.verify("m1", "c2")
    with pytest.raises(HiddenStoreError, match="another meta"):
        HiddenStateWriter(tmp_path, [0, 2], D, T, {**META, "model_fingerprint": "m2"})
    with pytest.raises(HiddenStoreError, match="another boundaries"):
        HiddenStateWriter(tmp_path, [0, 1], D, T, META)
    with pytest.raises(HiddenStoreError, match="boundary 1 is not stored"):
        HiddenStateReader(tmp_path, 1, "train")
    with pytest.raises(HiddenStoreError, match="split 'val'"):
        HiddenStateReader(tmp_path, 0, "val")
    with pytest.raises(ValueError, match="manifest_meta needs"):
        HiddenStateWriter(tmp_path / "x", [0], D, T, {"tokens": 1})
    w = HiddenStateWriter(tmp_path, [0, 1], D, T, META, overwrite=True)
    assert w.num_written("train") == 0


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.0), (torch.float32, 3e-2)])
def test_run_layer_block_reproduces_final_state(tmp_path, dtype, tol):
    model, data = tiny_model(dtype), batches(1)
    write_store(tmp_path, model, data, [0, 2, L])
    ref = teacher_states(model, data[0])
    x0 = torch.stack([HiddenStateReader(tmp_path, 0)[i] for i in range(len(data[0]))]).to(dtype)
    with torch.no_grad():
        out = run_layer_block(model, 0, L, x0)
        torch.testing.assert_close(out.float(), ref[L].float(), atol=tol, rtol=tol)
        x2 = torch.stack([HiddenStateReader(tmp_path, 2)[i] for i in range(len(data[0]))]).to(dtype)
        torch.testing.assert_close(run_layer_block(model, 2, L, x2).float(), ref[L].float(), atol=tol, rtol=tol)
