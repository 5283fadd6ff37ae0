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
    _run("benchmarks/kernels.py", "--quick", "--sections", "decode,feature_map", "--out", str(md))
    data = json.loads(md.with_suffix(".json").read_text())
    assert data["prefill"] == [] and len(data["decode"]) == 6  # 3 kinds x 2 batches
    fm = data["feature_map"]
    assert len(fm) == 1 and all(fm[0][k] > 0 for k in ("phi_fwd", "phi_fwdbwd", "phi_triton_fwd",
                                                            "phi_triton_fwdbwd", "attn_fwd", "attn_fwdbwd"))
    assert 0 < fm[0]["phi_share_fwd"] < 1
    assert "Hedgehog feature map" in md.read_text()


def test_kernels_benchmark_rejects_unknown_section():
    out = subprocess.run([sys.executable, "benchmarks/kernels.py", "--quick", "--sections", "prefil"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "prefil" in out.stderr


def test_distill_throughput_on_a_random_shape(tmp_path):
    out = tmp_path / "d.json"
    text = _run("benchmarks/distill_throughput.py", "--model", "smollm2-135m", "--init", "random", "--stages",
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

    spec = importlib.util.spec_from_file_location("distill_throughput", REPO / "benchmarks/distill_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        assert mod.resolve_backend("triton+torch-phi", "cpu") == "triton+torch-phi"
        variant, base = ops.BACKENDS["triton+torch-phi"], ops.BACKENDS["triton"]
        assert base.hedgehog is not None and variant.hedgehog is None
        assert variant.hybrid is base.hybrid and "triton+torch-phi" not in ops.AUTO_ORDER
    finally:
        ops.BACKENDS.pop("triton+torch-phi", None)


def test_scaling_benchmark_reads_a_blockwise_run(tmp_path, tiny_model_dir, tiny_alpaca, monkeypatch, capsys):
    """A rank's run and the report, in this process (the launcher adds torchrun; smoke-tested with gloo by hand)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("scaling", REPO / "benchmarks/scaling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
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
