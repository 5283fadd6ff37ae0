"""Layers kept as softmax attention (attention.softmax_layers / softmax_count): the base layer's output
exactly, the cache with generate() and FastGenerator, the pick after stage 1, checkpoints and export."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import tiny_model
from lolcats.attention.cache import SoftmaxLayer
from lolcats.attention.convert import convert_model, keep_softmax
from lolcats.attention.generate import cache_kwarg_name, make_cache
from lolcats.attention.layers import lolcats_attention_by_layer, softmax_layers
from lolcats.attention.modes import set_attention_mode
from lolcats.config import AttentionConfig, ConfigError, load_config
from lolcats.generation import FastGenerator, enable_lolcats_generation
from lolcats.training.stages import layer_mse, top_layers
from test_generation import VOCAB, check_fast_paths_on_cuda, check_left_padded_rows_equal_rows_alone, left_pad

ATTN = dict(kind="terraced_window", window_size=8, feature_map="hedgehog", feature_dim=8, feature_init="random",
            init_window_factor=0.5)


def build(kept=(0, 2), layers: int = 3, seed: int = 0):
    """A 3-layer tiny llama with ``kept`` layers softmax, the others converted (student mode)."""
    model = tiny_model(vocab_size=VOCAB, layers=layers, seed=seed)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    convert_model(model, AttentionConfig(**ATTN, softmax_layers=list(kept)))
    set_attention_mode(model, "student")
    return enable_lolcats_generation(model)


def layer_outputs(model, ids, mask) -> list[torch.Tensor]:
    """Each decoder layer's output hidden states (B, T, d) for one forward."""
    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    try:
        model(ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return outs


@torch.no_grad()
def test_kept_layer_gives_the_base_layer_output_exactly():
    base = tiny_model(vocab_size=VOCAB, layers=3)
    ids, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (21, 9)])
    want = layer_outputs(base, ids, mask)
    model = copy.deepcopy(base)
    convert_model(model, AttentionConfig(**ATTN, softmax_layers=[0]))
    for mode in ("student", "distill", "teacher"):  # a kept layer ignores the mode
        set_attention_mode(model, mode)
        torch.testing.assert_close(layer_outputs(model, ids, mask)[0], want[0], rtol=0, atol=0)
    picked = copy.deepcopy(base)  # converted by stage 1, then kept by the count pick
    convert_model(picked, AttentionConfig(**ATTN))
    keep_softmax(picked, [0])
    set_attention_mode(picked, "student")
    torch.testing.assert_close(layer_outputs(picked, ids, mask)[0], want[0], rtol=0, atol=0)
    assert softmax_layers(picked) == [0] and not hasattr(picked.model.layers[0].self_attn, "feature_map_q")
    assert picked.config.lolcats_attention["softmax_layers"] == [0]


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward_with_kept_layers():
    model = build()
    ids, mask, dynamic = check_left_padded_rows_equal_rows_alone(model)  # kept layers: HF dynamic layers
    cache, outs, start = make_cache(model, batch_size=3, max_length=ids.shape[1]), [], 0  # preallocated buffers
    assert [type(l) for l in cache.layers].count(SoftmaxLayer) == 2
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    for end in [20, *range(21, ids.shape[1] + 1)]:
        outs.append(model(ids[:, start:end], attention_mask=mask[:, :end], position_ids=pos[:, start:end],
                          use_cache=True, **{cache_kwarg_name(model): cache}).logits)
        start = end
    real = mask.bool()  # a padding query's output is not defined
    torch.testing.assert_close(torch.cat(outs, 1)[real], dynamic[real], atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_generate_and_fast_generator_with_kept_layers():
    model = build()
    rows = [torch.randint(1, VOCAB, (n,)) for n in (19, 7, 12)]
    ids, mask = left_pad(rows)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False)[:, ids.shape[1]:]
    for i, r in enumerate(rows):
        seq = r[None]
        for _ in range(14):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out[i], seq[0, len(r):])
    fast = FastGenerator(model, batch_size=4, max_new_tokens=14, eos_token_ids=[], use_cuda_graph=False,
                         prefill_tokens=20)  # one row per prefill group: views of the buffers
    fast.prefill(ids, mask)
    nbytes = fast.state_nbytes()
    kv = 2 * 4 * 2 * (ids.shape[1] + 14 + 1) * 16 * 4  # k and v, batch 4, 2 KV heads, L + 1 slots, D 16, fp32
    assert nbytes == 2 * kv + lolcats_attention_by_layer(model)[1].empty_state(4, torch.float32, "cpu").nbytes()
    fast.decode(5)
    assert fast.state_nbytes() == nbytes  # bounded: nothing grows while decoding
    assert torch.equal(fast.generate(ids, mask), out)
    longer, lmask = left_pad([torch.randint(1, VOCAB, (n,)) for n in (30, 4)])  # buffers enlarged for it
    ref = model.generate(longer, attention_mask=lmask, max_new_tokens=14, do_sample=False)[:, longer.shape[1]:]
    assert torch.equal(fast.generate(longer, lmask), ref)
    assert torch.equal(fast.generate(ids, mask), out)  # and back to the shorter prompt


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_graph_with_kept_layers_equals_generate():
    check_fast_paths_on_cuda(build().cuda())


def test_pick_takes_the_largest_stage1_errors():
    metrics = {"val_loss": 9.0, "mse/0": 0.1, "mse/1": 0.5, "mse/2": 0.3, "mse/3": 0.5, "step": 4}
    assert top_layers(layer_mse(metrics), 0) == []
    assert top_layers(layer_mse(metrics), 1) == [1]  # a tie goes to the lower index
    assert top_layers(layer_mse(metrics), 3) == [1, 2, 3]
    with pytest.raises(ValueError, match="softmax_count"):
        top_layers(layer_mse(metrics), 5)


def test_config_says_which_layers_stay_softmax_once():
    ok = load_config(None, ["--attention.softmax_layers", "0,2"])
    assert ok.attention.converted_layers(4) == [1, 3]
    assert load_config(None, {"attention": {"layers": [1, 3]}}).attention.converted_layers(4) == [1, 3]
    bad = [({"layers": [0], "softmax_layers": [1]}, "not both"),
           ({"softmax_layers": [1], "softmax_count": 1}, "not both"),
           ({"softmax_count": -1}, ">= 0"), ({"softmax_layers": [1, 1]}, "distinct"),
           ({"softmax_pick": "retrieval"}, "softmax_count, which is 0"), ({"softmax_pick": "worst"}, "softmax_pick")]
    for attention, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, {"attention": attention})
    with pytest.raises(ConfigError, match="layer 4 does not exist"):
        AttentionConfig(softmax_layers=[4]).converted_layers(4)
    with pytest.raises(ConfigError, match="below the number of converted"):
        AttentionConfig(softmax_count=2, layers=[0, 1]).converted_layers(4)
    assert AttentionConfig(softmax_layers=[0, 1]).converted_layers(2) == []  # every layer softmax: the control


def test_every_layer_softmax_is_the_lora_control(tmp_path):
    """attention.softmax_layers naming every layer: nothing to transfer (an empty stage-1 checkpoint, no
    steps), then the LoRA stage on the softmax model itself, which loads back as it was trained."""
    from conftest import save_tiny, write_alpaca
    from lolcats.checkpoint import load_tensors
    from lolcats.pipeline import linearize, load_linearized, stage_dirs
    from test_pipeline import make_cfg

    cfg = make_cfg(tmp_path, save_tiny(tmp_path / "model"), write_alpaca(tmp_path / "a.jsonl", n=120),
                   **{"attention.softmax_layers": [0, 1], "finetune.max_steps": 6})
    report = linearize(cfg)
    assert report["stage1"]["steps"] == 0 and report["stage1"]["trainable"] == 0
    assert report["stage1"]["val_loss"] == pytest.approx(report["base"]["val_loss"], abs=1e-6)
    assert report["stage2"]["val_loss"] < report["stage1"]["val_loss"]
    d1, d2 = stage_dirs(cfg)
    assert load_tensors(d1 / "best") == {}
    model, tok = load_linearized(None, None, str(d2 / "best"), device="cpu", dtype="float32")
    assert all(not m.converted for m in model.modules() if hasattr(m, "converted"))
    ids = torch.tensor([[1, 5, 9, 4]])
    out = model.generate(ids, max_new_tokens=5, do_sample=False)  # HF's own cache: no layer is converted
    fast = FastGenerator(model, 1, 5, eos_token_ids=[]).generate(ids)  # every layer a SoftmaxLayer
    assert torch.equal(fast, out[:, 4:])


def test_run_directories_follow_the_options():
    from lolcats.runs import stage_dirs

    d = {k: stage_dirs(load_config(None, {"attention": a})) for k, a in
         (("plain", {}), ("count", {"softmax_count": 2}), ("list", {"softmax_layers": [3]}))}
    assert d["count"][0] == d["plain"][0] and d["count"][1] != d["plain"][1]  # stage 1 shared
    assert d["list"][0] != d["plain"][0] and d["list"][1] != d["plain"][1]
    assert stage_dirs(load_config(None, {"finetune": {"loss": "kl"}}))[1] != d["plain"][1]
    by = stage_dirs(load_config(None, {"attention": {"softmax_count": 2, "softmax_pick": "retrieval"}}))
    assert by[0] == d["plain"][0] and by[1] != d["count"][1]  # the pick's rule: stage 2 only
    probe = stage_dirs(load_config(None, {"attention": {"softmax_count": 2, "softmax_pick": "kl",
                                                        "softmax_pick_samples": 2, "softmax_pick_lengths": [512]}}))
    kl = stage_dirs(load_config(None, {"attention": {"softmax_count": 2, "softmax_pick": "kl"}}))
    assert probe[0] == d["plain"][0] and probe[1] != kl[1]  # the kl pick's prompts: stage 2 only
    for bad in ({"softmax_pick_samples": 0}, {"softmax_pick_lengths": [0]}, {"softmax_pick_lengths": []}):
        with pytest.raises(ConfigError, match="softmax_pick"):
            load_config(None, {"attention": {"softmax_count": 2, "softmax_pick": "kl", **bad}})


# ---------------------------------------------------------------- the pipeline with a count


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """Stage 1 on a 2-layer tiny model, hand-made per-layer errors naming layer 0, then stage 2."""
    from conftest import save_tiny, write_alpaca
    from lolcats.pipeline import prepare, run_distill, run_finetune, stage_dirs
    from test_pipeline import make_cfg

    root = tmp_path_factory.mktemp("keep")
    cfg = make_cfg(root, save_tiny(root / "model"), write_alpaca(root / "alpaca.jsonl", n=120),
                   **{"attention.softmax_count": 1, "distill.max_steps": 2, "finetune.max_steps": 2,
                      "finetune.eval_every": 2})
    ctx = prepare(cfg)
    run_distill(ctx)
    d1, d2 = stage_dirs(cfg)
    meta = json.loads((d1 / "best" / "meta.json").read_text())
    meta["metrics"].update({"mse/0": 5.0, "mse/1": 1.0})
    (d1 / "best" / "meta.json").write_text(json.dumps(meta))
    model, _ = run_finetune(ctx)
    return cfg, d1, d2, model


def test_count_pick_is_recorded_and_reloaded(counted, tmp_path):
    from transformers import AutoModelForCausalLM

    from lolcats.checkpoint import load_tensors, read_meta
    from lolcats.hf import export_model
    from lolcats.models.trained import load_linearized

    cfg, d1, d2, trained = counted
    assert read_meta(d2 / "best")["softmax_layers"] == [0] and softmax_layers(trained) == [0]
    assert any(k.startswith("base_model.model.model.layers.0.self_attn.q_proj.lora_A")
               for k in load_tensors(d2 / "best"))  # LoRA in the kept layer too
    model, tok = load_linearized(None, None, str(d2 / "best"), device="cpu", dtype="float32")
    assert softmax_layers(model) == [0]
    ids = torch.randint(3, 60, (2, 30))
    set_attention_mode(trained, "student")
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(trained(ids).logits, ref, rtol=1e-5, atol=1e-5)
    export_model(model, tok, tmp_path / "export")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert softmax_layers(back) == [0]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, rtol=1e-5, atol=1e-5)
    stage1_only, _ = load_linearized(None, str(d1 / "best"), None, device="cpu", dtype="float32")
    assert softmax_layers(stage1_only) == []  # the pick belongs to stage 2


def _picked(tmp_path, by: str, **over):
    """A 2-layer tiny run keeping 1 layer picked ``by``: (cfg, softmax_pick.json, {layer: score}, stage-2 model),
    the pick checked to be the one stage 2's checkpoint records and its model keeps."""
    from conftest import save_tiny, write_alpaca
    from lolcats.checkpoint import read_meta
    from lolcats.pipeline import PICK, prepare, run_distill, run_finetune, stage_dirs
    from test_pipeline import make_cfg

    cfg = make_cfg(tmp_path, save_tiny(tmp_path / "model"), write_alpaca(tmp_path / "alpaca.jsonl", n=120),
                   **{"attention.softmax_count": 1, "attention.softmax_pick": by, "distill.max_steps": 2,
                      "finetune.max_steps": 2, "finetune.eval_every": 2, **over})
    ctx = prepare(cfg)
    run_distill(ctx)
    model, _ = run_finetune(ctx)
    d2 = stage_dirs(cfg)[1]
    pick = json.loads((d2 / PICK).read_text())
    assert read_meta(d2 / "best")["softmax_layers"] == pick["layers"] == softmax_layers(model)
    return cfg, pick, {int(i): v for i, v in pick["scores"].items()}, model


def test_retrieval_pick_is_scored_once_and_kept(tmp_path, monkeypatch):
    """softmax_pick retrieval: stage 2 keeps the layer the base model's retrieval scores rank first, writes the
    scores and the pick to softmax_pick.json, and a later run of the finished stage reads it instead of scoring."""
    import lolcats.evaluation.recall as recall
    from lolcats.pipeline import prepare, run_distill, run_finetune

    cfg, pick, scores, model = _picked(tmp_path, "retrieval")
    assert pick["by"] == "retrieval" and set(scores) == {0, 1} and all(0 < v < 1 for v in scores.values())
    assert pick["layers"] == [max(scores, key=scores.get)]
    monkeypatch.setattr(recall, "retrieval_scores", lambda *a, **k: pytest.fail("scored again"))
    ctx = prepare(cfg)
    run_distill(ctx)  # loads the finished stage 1 (as `lolcats finetune` does)
    again, _ = run_finetune(ctx)
    assert softmax_layers(again) == pick["layers"]


# ---------------------------------------------------------------- softmax_pick kl


def test_restore_kl_scores_find_the_one_layer_that_differs():
    """With a window as long as the prompt every hybrid layer is its softmax layer exactly; narrowing layer 1's
    window makes it the only one that differs: restoring it drops the KL to zero, restoring layer 0 drops none."""
    from dataclasses import replace

    from test_generation import build

    from lolcats.evaluation.layer_pick import restore_kl_scores
    from lolcats.evaluation.recall import RecallSample

    model = build(window=512).float()
    mods = lolcats_attention_by_layer(model)
    samples = [RecallSample("probe", 40, 0.5, "", "", tuple(torch.randint(3, 60, (40,), generator=g).tolist()), 0,
                            0.5) for g in [torch.Generator().manual_seed(i) for i in range(2)]]
    exact = restore_kl_scores(model, samples, answer_tokens=4)
    assert all(abs(v) < 1e-6 for v in exact.values())
    mods[1].cfg = replace(mods[1].cfg, window_size=2)
    drops = restore_kl_scores(model, samples, answer_tokens=4)
    assert set(drops) == {0, 1} and drops[1] > 1e-4 and abs(drops[0]) < 1e-6 * max(1.0, drops[1])
    assert {m.mode for m in mods.values()} == {"student"} and not model.training


def test_kl_pick_keeps_the_layer_whose_restoring_helps_most_and_records_its_probe(tmp_path):
    """softmax_pick kl: stage 2 keeps the layer with the largest KL drop, and softmax_pick.json says on which
    prompts it was scored (the run's own training text as the haystack, or passkey prompts where it is too short)."""
    _, pick, scores, _ = _picked(tmp_path, "kl", **{"attention.softmax_pick_lengths": [256],  # small for the CPU
                                                    "attention.softmax_pick_samples": 2})
    assert pick["by"] == "kl" and set(scores) == {0, 1} and pick["layers"] == [max(scores, key=scores.get)]
    assert (pick["probe"]["task"], pick["probe"]["samples"], pick["probe"]["lengths"]) == ("niah_single", 2, [256])


def test_eval_records_the_layers_kept_as_softmax():
    """`lolcats eval --output` records, beside the use settings, the layers the model keeps as softmax attention."""
    from lolcats.evaluation import _settings_used

    assert _settings_used(build(kept=(0, 2)))["softmax_layers"] == [0, 2]
