"""The two-stage recipe on a tiny model: training lowers the losses, checkpoints round-trip,
export loads with from_pretrained, bad input gives clear errors, and a killed run resumes."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import save_tiny, write_alpaca
from lolcats.checkpoint import CheckpointError, load_tensors
from lolcats.config import load_config
from lolcats.pipeline import (linearize, load_linearized, prepare, run_distill, run_finetune, stage_dirs,
                              student_perplexity)
from lolcats.training.trainer import StopTraining


def make_cfg(tmp_path, model_dir, data, **over):
    o = {"model": {"name": str(model_dir)},
         "attention": {"window_size": 8, "feature_dim": 8},
         "data": {"train": [str(data)], "seq_len": 32, "val_fraction": 0.2, "template": "alpaca",
                  "cache_dir": str(tmp_path / "cache"), "max_val_tokens": 512},
         "distill": {"max_steps": 12, "grad_accum": 2, "micro_batch_size": 2, "eval_every": 4, "save_every": 2,
                     "lr": 1e-2},
         "finetune": {"max_steps": 12, "grad_accum": 2, "micro_batch_size": 2, "eval_every": 4, "save_every": 2,
                      "lr": 3e-3},
         "run": {"output_dir": str(tmp_path / "runs"), "device": "cpu", "progress": False}}
    for k, v in over.items():
        sec, key = k.split(".")
        o.setdefault(sec, {})[key] = v
    return load_config(None, o)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    return root, save_tiny(root / "model"), write_alpaca(root / "alpaca.jsonl", n=200)


@pytest.fixture(scope="module")
def finished(env):
    root, model_dir, data = env
    cfg = make_cfg(root, model_dir, data)
    return cfg, linearize(cfg)


def test_distill_lowers_mse_and_finetune_lowers_val_loss(finished):
    cfg, report = finished
    d1, d2 = stage_dirs(cfg)
    h1 = json.loads((d1 / "summary.json").read_text())["history"]
    assert h1[-1]["val_loss"] < h1[0]["val_loss"]
    assert all(h1[-1][f"mse/{i}"] < h1[0][f"mse/{i}"] for i in range(2))
    h2 = json.loads((d2 / "summary.json").read_text())["history"]
    assert min(h["val_loss"] for h in h2[1:]) < h2[0]["val_loss"]
    assert report["stage2"]["val_loss"] < report["stage1"]["val_loss"]


def test_train_log_has_every_step_and_validation(finished):
    cfg, _ = finished
    for d, steps in zip(stage_dirs(cfg), (cfg.distill.max_steps, cfg.finetune.max_steps)):
        recs = [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]
        step_recs = [r for r in recs if r["event"] == "step"]
        assert [r["step"] for r in step_recs] == list(range(1, steps + 1))
        assert all(r["loss"] > 0 and r["tok_s"] > 0 for r in step_recs)
        assert step_recs[-1]["tokens"] == steps * cfg.distill.grad_accum * cfg.distill.micro_batch_size * 32
        evals = [r["step"] for r in recs if r["event"] == "eval"]
        assert evals == list(range(0, steps + 1, 4))


def test_random_init_model_trains_with_a_named_tokenizer(env, tmp_path):
    """model.init random: the architecture from a config.json, seeded weights, tokenizer from elsewhere."""
    root, model_dir, data = env
    shape = tmp_path / "shape.json"
    shape.write_text((model_dir / "config.json").read_text())
    cfg = make_cfg(tmp_path, shape, data, **{"model.init": "random", "model.tokenizer": str(model_dir),
                                              "distill.max_steps": 2, "finetune.max_steps": 2})
    ctx = prepare(cfg)
    again = prepare(cfg)
    assert all(torch.equal(a, b) for a, b in zip(ctx.model.state_dict().values(), again.model.state_dict().values()))
    assert ctx.fingerprint == again.fingerprint
    report = linearize(cfg)
    assert report["stage2"]["val_loss"] > 0
    with pytest.raises(Exception, match="model.tokenizer"):
        make_cfg(tmp_path, shape, data, **{"model.init": "random"})


def test_checkpoints_hold_only_trainable_weights(finished):
    cfg, _ = finished
    d1, d2 = stage_dirs(cfg)
    s1 = load_tensors(d1 / "best")
    assert s1 and all(".feature_map_" in k or "window_factors" in k for k in s1)
    s2 = load_tensors(d2 / "best")
    assert s2 and all("lora_" in k for k in s2)


def test_finished_stage_is_not_run_again(finished):
    cfg, _ = finished
    ctx = prepare(cfg)
    assert run_distill(ctx) is None
    _, r2 = run_finetune(ctx)
    assert r2 is None


def test_save_load_export_from_pretrained_same_logits(finished, tmp_path):
    import lolcats.hf  # noqa: F401
    from transformers import AutoModelForCausalLM

    from lolcats.hf import export_model

    cfg, _ = finished
    d1, d2 = stage_dirs(cfg)
    model, tok = load_linearized(None, str(d1 / "best"), str(d2 / "best"), device="cpu", dtype="float32")
    ids = torch.randint(3, 60, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits
    alone, _ = load_linearized(None, None, str(d2 / "best"), device="cpu", dtype="float32")  # stage 2 names stage 1
    with torch.no_grad():
        torch.testing.assert_close(alone(ids).logits, ref)
    export_model(model, tok, tmp_path / "export")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert back.config.model_type == "lolcats_llama"
    with torch.no_grad():
        out = back(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_loading_gives_the_weights_of_peft_merge_and_unload(finished, dtype):
    """Loading for use merges the adapters without peft: the same weights, bit for bit, as peft's merge of
    the adapters it loads (merge=False), and the same logits as those unmerged adapters."""
    cfg, _ = finished
    d1, d2 = stage_dirs(cfg)
    ids = torch.randint(3, 60, (1, 30))
    peft_model, _ = load_linearized(None, str(d1 / "best"), str(d2 / "best"), device="cpu", dtype=dtype, merge=False)
    merged, _ = load_linearized(None, str(d1 / "best"), str(d2 / "best"), device="cpu", dtype=dtype, merge=True)
    stage1, _ = load_linearized(None, str(d1 / "best"), None, device="cpu", dtype=dtype)
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        torch.testing.assert_close(merged(ids).logits, unmerged, **({} if dtype == "float32" else
                                                                     dict(rtol=0.05, atol=0.05)))
    ours, theirs, before = merged.state_dict(), peft_model.merge_and_unload().state_dict(), stage1.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    changed = [k for k in ours if not torch.equal(ours[k], before[k])]
    assert changed and all(k.rsplit(".", 2)[-2] in cfg.finetune.lora_targets for k in changed)


def edited_copy(checkpoint: Path, to: Path, edit) -> Path:
    """A copy of ``checkpoint`` whose tensors are ``edit(tensors)``."""
    from safetensors.torch import save_file

    shutil.copytree(checkpoint, to)
    save_file(edit(load_tensors(to)), str(to / "weights.safetensors"))
    return to


def test_stage2_checkpoint_missing_an_adapter_is_refused(finished, tmp_path):
    cfg, _ = finished
    d1, d2 = stage_dirs(cfg)
    bad = edited_copy(d2 / "best", tmp_path / "bad", lambda t: {k: v for k, v in t.items() if k != sorted(t)[0]})
    for merge in (True, False):
        with pytest.raises(CheckpointError, match="missing"):
            load_linearized(None, str(d1 / "best"), str(bad), device="cpu", merge=merge)


def test_wrong_base_model_is_refused(finished, tmp_path):
    cfg, _ = finished
    d1, _ = stage_dirs(cfg)
    other = save_tiny(tmp_path / "other", seed=1)
    with pytest.raises(CheckpointError, match="wrong base model"):
        load_linearized(str(other), str(d1 / "best"), None, device="cpu")


def test_checkpoint_with_wrong_shapes_is_refused(finished, tmp_path):
    cfg, _ = finished
    d1, _ = stage_dirs(cfg)
    bad = edited_copy(d1 / "best", tmp_path / "bad", lambda t: {**t, next(iter(t)): torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="shape"):
        load_linearized(None, str(bad), None, device="cpu")


def test_empty_dataset_is_a_clear_error(env, tmp_path):
    root, model_dir, _ = env
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = make_cfg(tmp_path, model_dir, empty)
    with pytest.raises(ValueError, match="empty.jsonl"):
        prepare(cfg)


def _trainable_after(cfg, kill_at=None):
    ctx = prepare(cfg)

    def on_step(step):
        if kill_at is not None and step == kill_at:
            raise StopTraining

    try:
        run_distill(ctx, on_step)
    except StopTraining:
        return None
    d1, _ = stage_dirs(cfg)
    return load_tensors(d1 / "best"), json.loads((d1 / "summary.json").read_text())


def test_kill_and_resume_ends_at_the_same_weights(env, tmp_path):
    root, model_dir, data = env
    straight = _trainable_after(make_cfg(tmp_path / "a", model_dir, data, **{"distill.max_steps": 9}))
    cfg = make_cfg(tmp_path / "b", model_dir, data, **{"distill.max_steps": 9})
    assert _trainable_after(cfg, kill_at=5) is None  # killed after step 5 (state saved at step 4)
    resumed = _trainable_after(cfg)
    for k in straight[0]:
        torch.testing.assert_close(resumed[0][k], straight[0][k], rtol=0, atol=0)
    assert resumed[1]["steps"] == straight[1]["steps"] == 9
    assert resumed[1]["tokens"] == straight[1]["tokens"]


def test_student_perplexity_runs_after_stage1(finished):
    cfg, _ = finished
    ctx = prepare(cfg)
    run_distill(ctx)
    assert student_perplexity(ctx) > 0


def test_the_use_section_travels_with_the_checkpoints(env, tmp_path):
    """A run's ``use`` settings are not trained with, are recorded in both checkpoints, and are set on the model
    by every load (checkpoint of either stage, or the config); the command's flags replace them."""
    from lolcats.attention.layers import lolcats_modules
    from lolcats.checkpoint import read_meta
    from lolcats.config import UseSettings
    from lolcats.evaluation import eval_main
    from lolcats.models.trained import ModelSource, load_trained

    root, model_dir, data = env
    use = {"use.sparse_cache": 8, "use.sparse_sink": 2, "use.linear_scale": 0.5}
    cfg = make_cfg(tmp_path, model_dir, data, **use, **{"distill.max_steps": 4, "finetune.max_steps": 4})
    linearize(cfg)
    d1, d2 = stage_dirs(cfg)
    assert stage_dirs(make_cfg(tmp_path, model_dir, data, **{"distill.max_steps": 4, "finetune.max_steps": 4})) == (
        d1, d2)  # not part of the run's identity
    for d in (d1, d2):
        meta = read_meta(d / "best")
        assert (meta["attention"]["sparse_cache"], meta["attention"]["linear_scale"]) == (0, 1.0)  # trained without
        assert meta["config"]["use"] == {"sparse_cache": 8, "sparse_score": None, "sparse_sink": 2, "linear_scale": 0.5}

    def used(**src):
        model, _ = load_trained(ModelSource(**src), "cpu", "float32")
        return {(m.cfg.sparse_cache, m.cfg.sparse_sink, m.cfg.linear_scale) for m in lolcats_modules(model)}

    assert used(checkpoint=str(d2 / "best")) == used(checkpoint=str(d1 / "best")) == used(config=cfg) == {(8, 2, 0.5)}
    assert used(checkpoint=str(d2 / "best"), use=UseSettings(sparse_cache=4)) == {(4, 0, 0.5)}  # flags replace all 3
    assert used(checkpoint=str(d2 / "best"), use=UseSettings(sparse_cache=0, linear_scale=1.0)) == {(0, 0, 1.0)}
    text = tmp_path / "docs.txt"
    text.write_text("the cat sat on the mat and the dog ran to the big red house\n" * 8)
    eval_main(ModelSource(checkpoint=str(d2 / "best")), ppl=[str(text)], seq_len=32, output=str(tmp_path / "e.json"),
              device="cpu", print_table=False)
    linearized = json.loads((tmp_path / "e.json").read_text())["models"]["linearized"]
    assert linearized["use"] == {
        "sparse_cache": 8, "sparse_score": "self_recall", "sparse_sink": 2, "linear_scale": 0.5}  # what it ran with
    assert linearized["softmax_layers"] == []  # the layers it keeps as softmax attention (this run: none)


def test_load_linearized_is_the_model_eval_loads(finished, tmp_path):
    """The README's Python API (load_linearized) puts a run's recorded ``use`` section on the model as
    ``lolcats eval --checkpoint`` does (issue 26: it left it off, so Python gave other numbers): the same
    settings on every layer and the same logits, for a stage-2 and a stage-1 checkpoint."""
    from lolcats.attention.layers import lolcats_modules
    from lolcats.cli import build_parser, model_source
    from lolcats.config import UseSettings
    from lolcats.models.trained import load_trained

    cfg, _ = finished
    run = tmp_path / "run"
    shutil.copytree(stage_dirs(cfg)[0].parent, run)  # the run directory: a stage 2 finds its stage 1 in it
    d1, d2 = (run / d.name / "best" for d in stage_dirs(cfg))
    for d in (d1, d2):  # a run whose config has a use section
        meta = json.loads((d / "meta.json").read_text())
        meta["config"]["use"] = {"sparse_cache": 8, "sparse_score": None, "sparse_sink": 2, "linear_scale": 0.5}
        (d / "meta.json").write_text(json.dumps(meta))

    def settings(model):
        return {(m.cfg.sparse_cache, m.cfg.sparse_score, m.cfg.sparse_sink, m.cfg.linear_scale)
                for m in lolcats_modules(model) if m.converted}

    for d, python in ((d2, lambda: load_linearized(None, None, str(d2), device="cpu", dtype="float32")),
                      (d1, lambda: load_linearized(None, str(d1), None, device="cpu", dtype="float32"))):
        args, rest = build_parser().parse_known_args(["eval", "--checkpoint", str(d), "--dtype", "float32"])
        cli_model, _ = load_trained(model_source(args, rest), "cpu", args.dtype)  # as eval_main loads it
        py_model, _ = python()
        ids = torch.randint(0, cli_model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
        assert settings(py_model) == settings(cli_model) == {(8, "self_recall", 2, 0.5)}, d
        with torch.no_grad():
            want = cli_model(input_ids=ids).logits
            assert torch.equal(py_model(input_ids=ids).logits, want), d
            trained, _ = load_linearized(None, str(d1), None if d == d1 else str(d2), device="cpu", dtype="float32",
                                         use=UseSettings())  # as trained: the settings matter on this input
            assert settings(trained) == {(0, "self_recall", 0, 1.0)}
            assert not torch.allclose(trained(input_ids=ids).logits, want)


def test_fingerprint_does_not_depend_on_float32_or_bf16():
    """A checkpoint trained on a GPU (bf16 weights) must load on a CPU (float32) and back."""
    from conftest import tiny_model
    from lolcats.models.loading import base_fingerprint

    m = tiny_model()
    fp32 = base_fingerprint(m)
    assert base_fingerprint(m.to(torch.bfloat16)) == fp32
    assert base_fingerprint(tiny_model(seed=1)) != fp32
