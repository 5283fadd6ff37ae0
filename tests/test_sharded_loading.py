"""Sharded loading: built on the meta device, each process reads and holds only its part of the weights.

In-process: the piecewise build equals ``from_pretrained`` (whole, or only some decoder layers),
random weights are the same rows however they are cut, a GGUF falls back to the whole load, LoRA
starts the same on a meta-built model. Two gloo processes (this file run as a script under
``torch.distributed.run``): a ~170 MB model saved as sharded safetensors loads FSDP2-sharded with
the same weights and fingerprint as a plain load, each rank reading and holding about half of
it (bytes counted, and peak RSS measured).
"""

from __future__ import annotations

import functools
import json
import os
import resource
import sys
from pathlib import Path

import pytest
import torch

from conftest import save_tiny, tiny_config, torchrun_two
from lolcats.config import AttentionConfig, FinetuneConfig, ModelConfig
from lolcats.models.loading import Build, base_fingerprint, load_base_model, random_model
from lolcats.models.sharded import RandomSource, SafetensorsSource, build_model

BIG = dict(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
           num_attention_heads=8, num_key_value_heads=4)  # 42M parameters: 168 MB in float32


def plain(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def save_sharded(directory: Path, config, shard: str = "4MB") -> Path:
    random_model(config, "cpu", torch.float32).save_pretrained(directory, max_shard_size=shard)
    return directory


def test_piecewise_build_equals_from_pretrained(tmp_path):
    d = save_sharded(tmp_path / "m", tiny_config(), shard="60KB")
    assert (d / "model.safetensors.index.json").is_file()
    ref = dict(plain(d).named_parameters())
    whole = build_model(tiny_config(), SafetensorsSource(d), "cpu", torch.float32)
    for n, p in whole.named_parameters():
        assert torch.equal(p, ref[n]), n
    report = whole.lolcats_load_report
    assert report.bytes_read == report.model_bytes == report.bytes_allocated
    ids = torch.arange(10)[None]
    torch.testing.assert_close(whole(input_ids=ids).logits, plain(d)(input_ids=ids).logits, rtol=0, atol=0)

    part = load_base_model(ModelConfig(name=str(d)), "cpu", Build(layers=frozenset({1})))
    for n, p in part.named_parameters():
        assert p.is_meta == (".layers.1." not in n), n
        if not p.is_meta:
            assert torch.equal(p, ref[n]), n
    layer_bytes = sum(p.numel() * 4 for n, p in ref.items() if ".layers.1." in n)
    assert part.lolcats_load_report.bytes_read == layer_bytes


def test_random_rows_are_the_whole_tensors_rows():
    src = RandomSource(seed=3)
    full = src.read("model.layers.0.mlp.up_proj.weight", (10, 4), torch.float32, None, torch.device("cpu"))
    rows = src.read("model.layers.0.mlp.up_proj.weight", (10, 4), torch.float32, slice(4, 7), torch.device("cpu"))
    assert torch.equal(rows, full[4:7]) and full.std() > 0.01
    assert torch.equal(src.read("model.norm.weight", (4,), torch.float32, None, torch.device("cpu")), torch.ones(4))
    a, b = random_model(tiny_config(), "cpu", torch.float32), random_model(tiny_config(), "cpu", torch.float32)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_gguf_falls_back_to_the_whole_load(tmp_path, capsys):
    from gguf_fixture import write_tiny_gguf

    from lolcats.attention.convert import convert_model
    from lolcats.attention.layers import lolcats_modules

    cfg = ModelConfig(name=str(write_tiny_gguf(tmp_path)))
    model = load_base_model(cfg, "cpu", Build(edit=lambda m: convert_model(m, AttentionConfig(feature_dim=8))))
    assert "has no safetensors weights" in capsys.readouterr().err
    assert len(list(lolcats_modules(model))) == model.config.num_hidden_layers
    assert not any(p.is_meta for p in model.parameters())


def test_lora_starts_the_same_on_a_meta_built_model(tmp_path):
    from lolcats.attention.convert import convert_model
    from lolcats.models.lora import add_lora, lora_parameters

    d = save_tiny(tmp_path / "m")
    acfg, fcfg = AttentionConfig(feature_dim=8), FinetuneConfig()
    real = add_lora(convert_model(plain(d), acfg), fcfg, seed=5)
    built = load_base_model(ModelConfig(name=str(d)), "cpu",
                            Build(edit=lambda m: add_lora(convert_model(m, acfg), fcfg, seed=5)))
    a, b = lora_parameters(real), lora_parameters(built)
    assert a.keys() == b.keys() and a
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert any(float(p.detach().abs().sum()) > 0 for p in a.values())
    ref = dict(real.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in built.named_parameters())


def test_two_ranks_each_read_and_hold_half(tmp_path):
    check_two_ranks(tmp_path, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_each_read_and_hold_half(tmp_path):
    check_two_ranks(tmp_path, "cuda")


def check_two_ranks(tmp_path: Path, device: str) -> None:
    from transformers import LlamaConfig

    save_sharded(tmp_path / "big", LlamaConfig(**BIG, tie_word_embeddings=False), shard="16MB")
    (tmp_path / "shape.json").write_text(json.dumps({**tiny_config().to_diff_dict(), "model_type": "llama"}))
    torchrun_two(__file__, str(tmp_path), device)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    total = ranks[0]["model_bytes"]
    assert total > 150e6
    for r in ranks:
        assert r["same_weights"] and r["same_fingerprint"] and r["random_same"], r
        assert r["bytes_read"] <= 0.51 * total and r["bytes_allocated"] <= 0.51 * total, r
        if device == "cpu":  # on GPUs the CUDA context and NCCL join the host's peak
            assert r["peak_rss_growth"] < 0.75 * total, r  # a whole copy alone would be `total`
    assert ranks[0]["bytes_read"] + ranks[1]["bytes_read"] == total
    keys = ("bytes_read", "bytes_allocated", "peak_rss_growth")
    print("model bytes", total, "per rank:", [{k: r[k] for k in keys} for r in ranks])


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rank_main(root: Path, device: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from lolcats.distributed import cleanup, init_distributed, shard_model

    info = init_distributed(device)
    shard = Build(shard=functools.partial(shard_model, mixed_precision=False, info=info))
    with torch.device("meta"):  # imports and first-build costs outside the measurement
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(root / "big")))
    before = _rss_bytes()
    model = load_base_model(ModelConfig(name=str(root / "big"), dtype="float32"), info.device, shard)
    out = {**model.lolcats_load_report.to_dict(), "peak_rss_growth": _peak_rss_bytes() - before}
    fp = base_fingerprint(model)
    ref = plain(root / "big")
    want = dict(ref.named_parameters())
    out["same_weights"] = all(torch.equal(p.full_tensor().cpu(), want[n]) for n, p in model.named_parameters())
    out["same_fingerprint"] = fp == base_fingerprint(ref)
    rnd = load_base_model(ModelConfig(name=str(root / "shape.json"), init="random", dtype="float32"), info.device,
                          shard)
    whole = dict(random_model(tiny_config(), info.device, torch.float32).named_parameters())
    out["random_same"] = all(torch.equal(p.full_tensor(), whole[n]) for n, p in rnd.named_parameters())
    (root / f"rank{info.rank}.json").write_text(json.dumps(out))
    cleanup()


if __name__ == "__main__":  # one rank of the two-process run
    torch.set_num_threads(1)
    _rank_main(Path(sys.argv[1]), sys.argv[2])
