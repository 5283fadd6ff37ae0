"""The benchmark scripts run end to end on CPU at tiny sizes (their GPU numbers are in docs/),
so a change that breaks one shows here rather than on the GPU's limited time."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 300) -> str:
    out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_kernels_benchmark_quick_writes_its_sections(tmp_path):
    md = tmp_path / "kernels.md"
    _run("-m", "benchmarks.kernel_speed", "--quick", "--sections", "decode,feature_map", "--out", str(md))
    data = json.loads(md.with_suffix(".json").read_text())
    assert data["prefill"] == [] and len(data["decode"]) == 6  # 3 kinds x 2 batches
    fm = data["feature_map"]
    assert len(fm) == 1 and all(fm[0][k] > 0 for k in ("phi_fwd", "phi_fwdbwd", "phi_triton_fwd",
                                                            "phi_triton_fwdbwd", "attn_fwd", "attn_fwdbwd"))
    assert 0 < fm[0]["phi_share_fwd"] < 1
    assert "Hedgehog feature map" in md.read_text()


def test_kernels_benchmark_gate_section(tmp_path):
    md = tmp_path / "gate.md"
    _run("-m", "benchmarks.kernel_speed", "--quick", "--sections", "gate", "--out", str(md))
    rows = json.loads(md.with_suffix(".json").read_text())["gate"]
    assert [(r["section"], r["kind"]) for r in rows] == [(s, k) for s in ("prefill", "decode")
                                                        for k in ("linear", "sliding_window", "terraced_window")]
    assert all(r[k] > 0 for r in rows for k in r if k.endswith(("_fwd", "_fwdbwd", "_ms")))
    assert "Forget gate on the linear part" in md.read_text()


def test_kernels_benchmark_rejects_unknown_section():
    out = subprocess.run([sys.executable, "-m", "benchmarks.kernel_speed", "--quick", "--sections", "prefil"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "prefil" in out.stderr


def test_distill_throughput_on_a_random_shape(tmp_path):
    out = tmp_path / "d.json"
    text = _run("-m", "benchmarks.distill_throughput", "--model", "smollm2-135m", "--init", "random", "--stages",
                "distill", "--backends", "torch", "--batch", "1", "--seq-len", "32", "--iters", "1",
                "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["stage"], r["backend"]) for r in rows] == [("distill", "torch")]
    assert rows[0]["tokens_per_s"] > 0 and "random weights" in text


def test_distill_throughput_torch_phi_variant():
    """``triton+torch-phi``: the triton backend's kernels without its fused Hedgehog map."""
    pytest.importorskip("triton")
    import importlib.util

    from lolcats import ops

    mod = importlib.import_module("benchmarks.distill_throughput")
    try:
        assert mod.resolve_backend("triton+torch-phi", "cpu") == "triton+torch-phi"
        variant, base = ops.BACKENDS["triton+torch-phi"], ops.BACKENDS["triton"]
        assert base.hedgehog is not None and variant.hedgehog is None
        assert variant.hybrid is base.hybrid and "triton+torch-phi" not in ops.AUTO_ORDER
    finally:
        ops.BACKENDS.pop("triton+torch-phi", None)


# ---------------------------------------------------------------- benchmarks/generation.py

TINY_SHAPE = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
              "max_position_embeddings": 1024, "tie_word_embeddings": False}


def _generation_module():
    import importlib

    mod = importlib.import_module("benchmarks.generation")
    return mod


def test_generation_benchmark_all_methods_on_a_tiny_shape(tmp_path):
    """Every method, short and long rows, on CPU; hf-static through its compiled path (dynamo with the
    eager backend, which CPU runs): the first call compiles, the timed one reuses it, and every row
    compiles afresh. --plot redraws table and plot from the JSON."""
    shape = tmp_path / "tiny.json"
    shape.write_text(json.dumps(TINY_SHAPE))
    out = tmp_path / "gen"
    _run("-m", "benchmarks.generation", "--models", str(shape), "--batches", "1,2", "--short-prompt", "8",
         "--short-new", "4", "--prompt-lens", "16", "--long-new", "3", "--long-batches", "1",
         "--hf-compile-backend", "eager", "--out", str(out))
    data = json.loads((out / "generation.json").read_text())
    rows = data["rows"]
    assert {(r["method"], r["rows"], r["batch"]) for r in rows} == {
        (m, k, b) for m in ("fast", "fast-compiled", "generate", "hf-static", "hf-dynamic")
        for k, b in (("short", 1), ("short", 2), ("long", 1))}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and r["e2e_s"] > 0 and r["prefill_s"] > 0 for r in rows)
    static = [r for r in rows if r["method"] == "hf-static"]
    assert [(r["compiled"], r["recompiles_timed"]) for r in static] == [(True, 0)] * 3
    assert all(r["state_bytes_per_seq"] > 0 for r in rows if r["method"] == "fast")
    assert data["runs"][0]["device"].startswith("CPU") and data["runs"][0]["transformers"]
    assert "fast / hf-static" in (out / "generation.md").read_text()
    assert "| tiny | 8 | 4 | 2 |" in (out / "generation.md").read_text()
    for p in out.glob("*.png"):
        p.unlink()
    (out / "generation.md").unlink()
    _generation_module().main(["--plot", str(out / "generation.json"), "--out", str(out)])
    assert (out / "generation-tiny.png").is_file() and "| tiny | 16 | 3 | 1 |" in (out / "generation.md").read_text()


def test_generation_benchmark_context_limit_and_rows_of_several_calls(tmp_path):
    mod = _generation_module()
    args = mod.parse_args(["--rows", "long", "--methods", "fast", "--prompt-lens", "512,2048", "--long-new", "8",
                           "--long-batches", "1"])
    assert [r.get("status") for r in mod.plan(args, "pretrained", 1024)] == [
        None, "skipped (beyond the model's context, 1024)"]
    assert [r.get("status") for r in mod.plan(args, "random shape", None)] == [None, None]
    row = dict(model="m", method="fast", rows="long", batch=1, prompt_len=512, new_tokens=8, group="g",
               status="ok", tokens_per_s=10.0, run=0)
    out = tmp_path / "gen"
    mod.write({"runs": [{"device": "A"}], "rows": [row]}, out, png=False)
    (tmp_path / "other.json").write_text(json.dumps({"runs": [{"device": "B"}], "rows": [
        dict(row, tokens_per_s=20.0), dict(row, batch=2)]}))
    data = mod.load_results([out / "generation.json", tmp_path / "other.json"])
    assert [r["run"] for r in data["rows"]] == [1, 1]  # measured again: the later row replaces the earlier
    assert [r["tokens_per_s"] for r in data["rows"]] == [20.0, 10.0] and len(data["runs"]) == 2


def test_generation_benchmark_oom_search_and_time_budget(tmp_path, monkeypatch):
    import torch

    mod = _generation_module()
    args = mod.parse_args(["--models", "m", "--methods", "fast,hf-static", "--rows", "short", "--batches", "1,2",
                           "--find-oom", "--max-batch", "64", "--out", str(tmp_path)])
    calls = []

    def fake_row(model, method, batch, prompt_len, new, args):
        calls.append((method, batch))
        if batch >= (8 if method == "fast" else 4):
            raise RuntimeError("compiling failed") from torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return dict(status="ok", tokens_per_s=float(batch), e2e_s=1.0, prefill_s=0.1, row_s=0.01, peak_gib=None)

    monkeypatch.setattr(mod, "run_row", fake_row)
    model, done = torch.nn.Linear(1, 1), []
    rows = mod.plan(args, "m", None)
    assert [r["batch"] for r in rows if r["method"] == "fast"] == [1, 2, 4, 8, 16, 32, 64]
    for method in ("hf-static", "fast"):
        mod.sweep(model, [r for r in rows if r["method"] == method], args, float("inf"), done, lambda: None)
    assert calls == [("hf-static", 1), ("hf-static", 2), ("hf-static", 4), ("fast", 1), ("fast", 2), ("fast", 4),
                     ("fast", 8)]  # each method stops at its first OOM
    assert [r["status"] for r in done if r["method"] == "fast"] == ["ok", "ok", "ok", "OOM"]
    lines = "\n".join(mod.oom_lines(done))
    assert "m fast (prompt 128, +1024): **OOM at batch 8**; largest that ran: 4" in lines
    assert "m hf-static (prompt 128, +1024): **OOM at batch 4**; largest that ran: 2" in lines
    assert "| m | 128 | 1024 | 2 | 2 | - | - | 2 | - | 1.00x | - | - |" in "\n".join(mod.comparison(done))
    # no time left: the group's first row is recorded as skipped and the group ends there
    late = []
    mod.sweep(model, [r for r in mod.plan(args, "m", None) if r["method"] == "fast"], args, 0.0, late,
              lambda: None)
    assert [r["status"] for r in late] == ["skipped (time)"]


def test_generation_benchmark_rejects_unknown_method(capsys):
    with pytest.raises(SystemExit):
        _generation_module().parse_args(["--methods", "fast,hf-statik"])
    err = capsys.readouterr().err
    assert "hf-statik" in err and "hf-static, hf-dynamic" in err


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_generation_benchmark_on_gpu_compiles_the_static_baseline(tmp_path):
    """On CUDA: hf-static is compiled by transformers, every row reports peak memory; ~1-2 min."""
    shape = tmp_path / "tiny.json"
    shape.write_text(json.dumps(TINY_SHAPE))
    out = tmp_path / "gen"
    _run("-m", "benchmarks.generation", "--models", str(shape), "--batches", "1,4", "--short-prompt", "16",
         "--short-new", "16", "--prompt-lens", "64", "--long-new", "8", "--long-batches", "2", "--diagnose",
         "--out", str(out), timeout=900)
    data = json.loads((out / "generation.json").read_text())
    rows = data["rows"]
    per_method = 3  # short prompts at batch 1 and 4, the long one at batch 2
    assert len(rows) == per_method * len(_generation_module().METHODS)
    assert all(r["status"] == "ok" and r["peak_gib"] > 0 for r in rows)
    assert all(r["compiled"] for r in rows if r["method"] == "hf-static")
    assert all(r["kernels_per_step"] > 0 for r in rows if r["method"] == "fast")
    assert data["runs"][0]["backend"] == "triton" and data["runs"][0]["bandwidth_gbs"] > 0


# ---------------------------------------------------------------- benchmarks/startup.py


def _stage1_checkpoint(model_dir, out):
    """A stage-1 checkpoint (untrained feature maps) of the tiny model in ``model_dir``."""
    from dataclasses import asdict

    from lolcats.attention.convert import convert_model
    from lolcats.attention.params import attention_parameters
    from lolcats.checkpoint import save_checkpoint
    from lolcats.config import AttentionConfig, Config, ModelConfig
    from lolcats.models.loading import base_fingerprint, load_base_model

    cfg = Config(model=ModelConfig(name=str(model_dir)), attention=AttentionConfig(window_size=8, feature_dim=8))
    model = load_base_model(cfg.model, "cpu")
    fp = base_fingerprint(model)
    convert_model(model, cfg.attention)
    save_checkpoint(out, dict(attention_parameters(model)), {
        "stage": "distill", "base_model": str(model_dir), "base_fingerprint": fp, "attention": asdict(cfg.attention),
        "finetune": asdict(cfg.finetune), "config": cfg.to_dict(), "metrics": {}, "num_layers": 2})
    return out


def test_startup_benchmark_times_generate_and_its_phases(tmp_path, tiny_model_dir):
    ckpt = _stage1_checkpoint(tiny_model_dir, tmp_path / "ckpt")
    out = tmp_path / "startup.json"
    text = _run("-m", "benchmarks.startup", "--checkpoint", str(ckpt), "--prompt", "the cat sat", "--runs", "1",
                "--threads", "1", "--phases", "--out", str(out))
    data = json.loads(out.read_text())
    run = data["runs"][0]
    assert run["rc"] == 0 and run["cache"] == "cold" and 0 < run["exit_s"] and run["cpu_s"] > 0
    names = [p["name"] for p in data["phases"]["phases"]]
    for name in ("import torch", "argument parser", "load_base_model", "load_tokenizer", "load_stage1"):
        assert name in names
    assert data["phases"]["rc"] == 0 and data["phases"]["gguf_parses"] == 0  # a plain HF directory
    assert "| load_base_model |" in text and "CPU only" in text
    import importlib.util

    assert data["bytecode"]["dont_write_bytecode"] == bool(sys.flags.dont_write_bytecode)
    assert data["bytecode"]["torch"]["pyc"] == Path(importlib.util.cache_from_source(
        str(Path(importlib.util.find_spec("torch").origin)))).is_file()


def test_scaling_benchmark_reads_a_blockwise_run(tmp_path, tiny_model_dir, tiny_alpaca, monkeypatch, capsys):
    """A rank's run and the report, in this process (the launcher adds torchrun; smoke-tested with gloo by hand)."""
    import importlib

    mod = importlib.import_module("benchmarks.scaling")
    flags = ["--model.name", str(tiny_model_dir), "--data.train", str(tiny_alpaca), "--data.seq_len", "32",
             "--data.max_val_tokens", "256", "--data.cache_dir", str(tmp_path / "cache"),
             "--attention.feature_dim", "8",
             "--distill.max_steps", "5", "--distill.micro_batch_size", "2", "--finetune.max_steps", "2",
             "--finetune.micro_batch_size", "2", "--run.device", "cpu"]
    out = tmp_path / "tiny" / "blockwise-replicate" / "gpus-1"
    out.mkdir(parents=True)
    mod.rank_main(out, None, flags + mod.variant_flags("blockwise-replicate", 1) + ["--run.output_dir", str(out),
                                                                                    "--run.progress", "false"],
                  list(mod.STAGES))
    monkeypatch.setattr(sys, "argv", ["scaling.py", "--gpus", "1", "--variants", "blockwise-replicate", "--block-size",
                                      "1", "--out", str(tmp_path), "--label", "tiny", "--report-only", "--", *flags])
    mod.main()
    text = capsys.readouterr().out
    assert "| blockwise-replicate | distill | 1 | 10 |" in text and "| blockwise-replicate | finetune | 1 | 2 |" in text
    rec = json.loads((out / "mem-rank0.json").read_text())
    assert set(rec["stages"]) == {"load", "distill", "finetune"} and rec["stages"]["load"]["host_peak_gib"] > 0


# ---------------------------------------------------------------- experiments/study.py


def _study_module():
    import importlib

    mod = importlib.import_module("experiments.study")
    return mod


def test_study_stops_before_training_when_an_evaluation_input_is_missing(tmp_path, monkeypatch):
    """A task file naming data that is not there, or a missing perplexity file, stops the study at once with one
    line naming it: no row trains for minutes only for its evaluation to fail."""
    mod = _study_module()
    ran = []
    monkeypatch.setattr(mod, "run_logged", lambda *a, **k: ran.append(a) or 0.0)
    text = tmp_path / "wiki.txt"
    text.write_text("Some text. " * 10)
    tasks = tmp_path / "data" / "lm_eval_local"
    tasks.mkdir(parents=True)
    (tasks / "piqa_local.yaml").write_text("task: piqa_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                           "    validation: ../shared/data/piqa/missing.jsonl\n")
    common = ["--out", str(tmp_path / "out"), "--model", "M.gguf", "--data", "D", "--rows", "recipe",
              "--recall-haystack", str(text)]
    with pytest.raises(SystemExit, match="missing.jsonl"):
        mod.main([*common, "--eval-data", str(tmp_path / "data"), "--ppl", str(text)])
    with pytest.raises(SystemExit, match="--ppl .*nope.txt is not a file"):
        mod.main([*common, "--eval-data", str(tmp_path / "data"), "--ppl", str(tmp_path / "nope.txt")])
    assert ran == [] and not (tmp_path / "out").exists()


def test_study_rows_start_from_the_schema_defaults_and_differ_only_by_their_flags():
    from lolcats.config import load_config

    mod = _study_module()
    a = mod.parse_args(["--out", "OUT", "--model", "M.gguf", "--data", "D"])
    rows = {r.label: r for r in mod.ROWS}
    cmd = mod.train_command(rows["combo_r"], a)
    cfg = load_config([cmd[cmd.index("--config") + 1]])
    assert (cfg.attention.softmax_count, cfg.finetune.loss, cfg.data.template) == (0, "ce", "chat")
    assert cmd[-6:] == ["--finetune.loss", "mix", "--attention.softmax_count", "4", "--attention.softmax_pick",
                        "retrieval"]
    assert cmd[cmd.index("--data.max_file_tokens") + 1] == str(a.tokens // 3)
    for row in mod.ROWS:  # every row's flags are fields of the schema, with valid values
        if row.train:
            row_cmd = mod.train_command(row, a)
            i = row_cmd.index("--config")
            load_config([row_cmd[i + 1]], row_cmd[i + 2:])  # the row's own config: the study's, or the recipe
        else:
            assert row.checkpoint_of is None or rows[row.checkpoint_of].train


def test_study_tasks_flag_sets_or_drops_the_lm_eval_tasks_of_each_evaluation():
    """--tasks names the evaluation's LM-Eval-Harness tasks; '' leaves them out (perplexity and recall only), and
    the table shows those cells as not measured."""
    mod = _study_module()
    rows = {r.label: r for r in mod.ROWS}
    base = ["--out", "OUT", "--model", "M.gguf", "--data", "D", "--mmlu-limit", "0"]
    [(_, full)] = mod.eval_commands(rows["base"], mod.parse_args(base), rows)
    assert full[full.index("--tasks") + 1] == mod.ZERO_SHOT and "--recall" in full
    [(_, short)] = mod.eval_commands(rows["base"], mod.parse_args([*base, "--tasks", ""]), rows)
    assert "--tasks" not in short and "--recall" in short and "--ppl" in short
    line = mod.table([{"title": "base", "wikitext_ppl": 21.1}], mod.parse_args([*base, "--tasks", ""])).splitlines()[2]
    assert line.startswith("| base | 21.10 | - | - | - | - |")


def test_the_smollm2_recipe_is_the_study_row_it_came_from():
    """configs/smollm2-135m.yaml trains what the study row combo_long_kl trained (docs/RESULTS.md), at the
    study's 3M-token pool: every field but the data files, the model path and the run's own directory, and what
    issue 27's studies changed: the kept layers' pick (transfer error -> the KL drop) and the sequence length
    (4,096 -> 8,192 tokens, 1 per step: the same tokens per step), and the feature maps' input (after RoPE ->
    before it)."""
    from dataclasses import asdict

    from lolcats.config import load_config

    mod = _study_module()
    a = mod.parse_args(["--out", "OUT", "--model", "M.gguf", "--data", "D", "--tokens", "3000000"])
    cmd = mod.train_command({r.label: r for r in mod.ROWS}["combo_long_kl"], a)
    i = cmd.index("--config")
    row = asdict(load_config([cmd[i + 1]], cmd[i + 2:]))
    recipe = asdict(load_config([REPO / "configs/smollm2-135m.yaml"]))
    for cfg in (row, recipe):
        cfg["data"].pop("train"), cfg.pop("model"), cfg["run"].pop("output_dir"), cfg["run"].pop("progress")
    use = recipe.pop("use")  # what the study's eval rows of the recipe give as flags
    assert row.pop("use") == {k: None for k in use}
    assert (row["attention"].pop("softmax_pick"), recipe["attention"].pop("softmax_pick")) == ("mse", "kl")
    assert (row["data"].pop("seq_len"), recipe["data"].pop("seq_len")) == (4096, 8192)
    assert (row["attention"].pop("feature_rope"), recipe["attention"].pop("feature_rope")) == (True, False)
    for stage in ("distill", "finetune"):
        assert (row[stage].pop("micro_batch_size"), recipe[stage].pop("micro_batch_size")) == (2, 1)
    assert recipe == row
    assert mod.RECIPE_EVAL == ["--sparse-cache", str(use["sparse_cache"]), "--sparse-sink", str(use["sparse_sink"]),
                               "--linear-scale", str(use["linear_scale"])] and use["sparse_score"] is None
    picked = (recipe["finetune"]["loss"], recipe["attention"]["softmax_count"])
    assert picked == ("kl", 4)


def test_the_study_reads_the_recipe_from_its_yaml():
    """The recipe row trains configs/smollm2-135m.yaml as it is (only the seed and where the model, data and output
    are is given), and RECIPE_EVAL is that file's use section as eval flags: the study restates neither."""
    from dataclasses import asdict

    from lolcats.config import load_config

    mod = _study_module()
    a = mod.parse_args(["--out", "OUT", "--model", "M.gguf", "--data", "D", "--tokens", "123"])
    cmd = mod.train_command({r.label: r for r in mod.ROWS}["recipe"], a)
    i = cmd.index("--config")
    assert Path(cmd[i + 1]) == REPO / "configs/smollm2-135m.yaml"
    given = dict(zip(cmd[i + 2::2], cmd[i + 3::2]))
    assert set(given) == {"--seed", "--model.name", "--data.train", "--run.output_dir", "--run.progress"}
    assert given["--seed"] == "0"  # the README's seed, stated in each row's command
    row, recipe = (asdict(load_config([cmd[i + 1]], f)) for f in (cmd[i + 2:], []))
    assert row["data"]["max_file_tokens"] == recipe["data"]["max_file_tokens"] and row["use"] == recipe["use"]
    use = load_config([REPO / "configs/smollm2-135m.yaml"]).use
    flags = dict(zip(mod.RECIPE_EVAL[::2], mod.RECIPE_EVAL[1::2]))
    assert flags == {f"--{k.replace('_', '-')}": str(v) for k, v in asdict(use).items() if v is not None}


def test_study_run_again_on_the_same_out_skips_the_steps_it_finished(tmp_path, monkeypatch):
    """A study cut after a row's training runs only that row's evaluations the next time, keeping the seconds."""
    mod = _study_module()
    a = mod.parse_args(["--out", str(tmp_path), "--rows", "sm4r,combo_r,combo_r_sparse"])
    rows = {r.label: r for r in mod.ROWS}
    ran: list[tuple[str, str]] = []

    def fake_run(name, cmd, folder, fail=None):
        label = folder.name
        folder.mkdir(parents=True, exist_ok=True)
        ran.append((label, name))
        if (label, name) == fail:
            raise RuntimeError(f"{name} exited 137")
        if name == "train":
            run = tmp_path / "runs" / label / "run"
            run.mkdir(parents=True)
            (run / "report.json").write_text(json.dumps({"run_dirs": [str(run / "s1"), str(run / "s2")],
                                                         "stage1": {}, "stage2": {}}))
        else:
            (folder / f"{name}.json").write_text(json.dumps({"results": {}}))
        return 7.0

    monkeypatch.setattr(mod, "run_logged", lambda n, c, f: fake_run(n, c, f, fail=("combo_r", "eval")))
    first = mod.run_row(rows["combo_r"], a, rows)
    assert ran == [("combo_r", "train"), ("combo_r", "eval")] and "exited 137" in first["error"]
    ran.clear()
    monkeypatch.setattr(mod, "run_logged", fake_run)
    again = mod.run_row(rows["combo_r"], a, rows)
    assert ran == [("combo_r", "eval"), ("combo_r", "mmlu")]
    assert (again["train_seconds"], again["eval_seconds"], "error" in again) == (7.0, 7.0, False)
    ran.clear()
    mod.run_row(rows["combo_r_sparse"], a, rows)  # evaluates combo_r's checkpoint with its own flags
    assert ran == [("combo_r_sparse", "eval"), ("combo_r_sparse", "mmlu")]
    ran.clear()
    assert "error" not in mod.run_row(rows["combo_r"], a, rows) and ran == []


def test_study_trains_only_then_evaluates_later_without_training(tmp_path, monkeypatch):
    """--train-only trains the rows (eval-only rows skipped, no evaluation input checked); a later run on the same
    --out evaluates them and the eval-only rows of their checkpoints without training again."""
    mod = _study_module()
    ran: list[tuple[str, str]] = []

    def fake_run(name, cmd, folder):
        folder.mkdir(parents=True, exist_ok=True)
        ran.append((folder.name, name))
        if name == "train":
            run = tmp_path / "runs" / folder.name / "run"
            run.mkdir(parents=True)
            (run / "report.json").write_text(json.dumps({"run_dirs": [str(run / "s1"), str(run / "s2")]}))
        else:
            (folder / f"{name}.json").write_text(json.dumps({"results": {}}))
        return 1.0

    monkeypatch.setattr(mod, "run_logged", fake_run)
    monkeypatch.setattr(mod, "write_tables", lambda *a: Path(a[2].out, "study.md").write_text("table"))
    common = ["--out", str(tmp_path), "--rows", "recipe,recipe_nosparse", "--mmlu-limit", "0"]
    mod.main([*common, "--train-only", "--eval-data", str(tmp_path / "nowhere")])
    assert ran == [("recipe", "train")]
    ran.clear()
    monkeypatch.setattr(mod, "check_eval_inputs", lambda a: None)
    mod.main(["--out", str(tmp_path), "--rows", "recipe_nosparse", "--mmlu-limit", "0"])  # recipe not asked for
    assert ran == [("recipe_nosparse", "eval")]


# ---------------------------------------------------------------- experiments/recall_masks.py


def _masks_module():
    import importlib

    mod = importlib.import_module("experiments.recall_masks")
    return mod


def test_recall_mask_rows_and_the_mask_by_hand():
    import torch

    mod = _masks_module()
    assert mod.parse_row("full", 4).layers is None
    row = mod.parse_row("window all, keep 1,3, sink 2, key", 4)
    assert (row.layers, row.sink, row.key) == (frozenset({0, 2}), 2, True)
    assert mod.parse_row("window 2,3", 4) == mod.MaskRow("window 2,3", frozenset({2, 3}))
    for bad in ("window 9", "window all, keep 7", "windows all", "window all, sink"):
        with pytest.raises(ValueError):
            mod.parse_row(bad, 4)
    # 6 keys, the last 2 queries; window 2, sink 1, span [2, 3)
    want = torch.tensor([[1, 0, 1, 1, 1, 0],
                         [1, 0, 1, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mod.allowed(2, 6, 2, 1, (2, 3)), want)


def test_recall_masks_run_on_a_tiny_model():
    """A window as long as the prompt masks nothing: the row answers what full attention answers; a window of
    one token changes the answers (the mask reaches the model)."""
    from conftest import tiny_model, tiny_tokenizer

    mod = _masks_module()
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok.get_vocab()), seed=3).eval()
    rows = [mod.parse_row(r, 2) for r in ("full", "window all, sink 2, key")]
    wide = mod.run(model, tok, rows, [160], 3, window=1000)
    assert wide[0]["outputs"] == wide[1]["outputs"] and wide[0]["samples"] == 3
    narrow = mod.run(model, tok, [mod.parse_row("window all", 2)], [160], 3, window=1)
    assert narrow[0]["outputs"] != wide[0]["outputs"]


# ---------------------------------------------------------------- experiments/recall_probe.py


def test_recall_probe_pins_the_key_and_runs_on_a_tiny_model():
    """With the key pinned every converted layer's cache holds the whole key sentence after the prefill; the
    rows come out per linear scale, with and without the pin."""
    import importlib.util

    from conftest import tiny_tokenizer
    from test_generation import build

    from lolcats.attention.use import set_sparse_cache
    from lolcats.evaluation.recall import build_samples, recall_settings

    mod = importlib.import_module("experiments.recall_probe")
    tok = tiny_tokenizer()
    model = build("llama", "terraced_window", vocab=len(tok.get_vocab()))
    s = build_samples(tok, "passkey", 200, recall_settings("passkey", [200], samples=1))[0]
    set_sparse_cache(model, s.key_len + 4, None, 2)
    free = mod.occupancy(model, s)
    with mod.key_pinned([s.key_start, s.key_start + s.key_len], "self_recall"):
        pinned = mod.occupancy(model, s)
    assert set(pinned) == {0, 1} and all(h == s.key_len for heads in pinned.values() for h in heads)
    assert mod.occupancy(model, s) == free  # the score is restored
    rows = mod.run(model, tok, [200], 2, [1.0, 0.0], pin=True)
    assert [(r["linear_scale"], r["key_pinned"]) for r in rows[:-1]] == [(1.0, False), (1.0, True), (0.0, False),
                                                                         (0.0, True)]
    assert rows[-1]["occupancy"][0].keys() == {0, 1} and all(r["samples"] == 2 for r in rows[:-1])
