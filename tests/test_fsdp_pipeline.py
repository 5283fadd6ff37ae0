"""The pipeline under torchrun: two CPU (gloo) processes, FSDP2-sharded or replicated, train stage 1
and stage 2 to the same weights as one process on the same global batch (stage 1 killed once and
resumed).

The two-process half runs this file as a script under ``torch.distributed.run``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import save_tiny, torchrun_two, write_alpaca
from lolcats.checkpoint import load_tensors
from lolcats.pipeline import prepare, run_distill, run_finetune, stage_dirs
from test_pipeline import make_cfg

OVER = {"distill.max_steps": 4, "finetune.max_steps": 3, "finetune.eval_every": 3}


def cfg_for(root: Path, model_dir: Path, data: Path, out: Path, device: str = "cpu", parallel: str = "fsdp"):
    gpu = {} if device == "cpu" else {"model.dtype": "float32", "distill.precision": "fp32",
                                      "finetune.precision": "fp32"}
    cfg = make_cfg(root, model_dir, data, **OVER, **gpu, **{"run.parallel": parallel})  # data cache: shared
    cfg.run.output_dir = str(out)  # not part of the run-directory hash
    cfg.run.device = device
    return cfg


def both_stages(cfg) -> None:
    ctx = prepare(cfg)
    run_distill(ctx)
    run_finetune(ctx)


def check_two_match_one(tmp_path: Path, device: str, tol: float, parallel: str = "fsdp") -> None:
    model_dir, data = save_tiny(tmp_path / "model"), write_alpaca(tmp_path / "alpaca.jsonl", n=120)
    one = cfg_for(tmp_path, model_dir, data, tmp_path / "one", device)
    both_stages(one)
    torchrun_two(__file__, str(tmp_path), str(model_dir), str(data), device, parallel)
    two = cfg_for(tmp_path, model_dir, data, tmp_path / "two", device)
    for d_one, d_two in zip(stage_dirs(one), stage_dirs(two)):
        a, b = load_tensors(d_one / "best"), load_tensors(d_two / "best")
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=tol, atol=tol, msg=k)
        sa, sb = (json.loads((d / "summary.json").read_text()) for d in (d_one, d_two))
        assert sb["steps"] == sa["steps"] and sb["tokens"] == sa["tokens"]
        assert sb["best_val"] == pytest.approx(sa["best_val"], rel=tol)


@pytest.mark.parametrize("parallel", ["fsdp", "replicate"])
def test_two_processes_match_one(tmp_path: Path, parallel: str):
    check_two_match_one(tmp_path, "cpu", 1e-5, parallel)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("parallel", ["fsdp", "replicate"])
def test_two_gpus_match_one_gpu(tmp_path: Path, parallel: str):
    """NCCL (FSDP2 or replicated) on two GPUs against one GPU, fp32 weights and compute (TF32 may differ)."""
    check_two_match_one(tmp_path, "cuda", 2e-4, parallel)


def killed_then_resumed(cfg) -> None:
    """Stage 1 killed after step 3 (state saved at step 2), then both stages resumed and run."""
    from lolcats.distributed import is_sharded
    from lolcats.training.trainer import StopTraining

    def kill(step):
        if step == 3:
            raise StopTraining

    ctx = prepare(cfg)
    assert ctx.distributed and ctx.info.world_size == 2
    assert hasattr(ctx.model, "lolcats_load_report") == (cfg.run.parallel == "fsdp")  # FSDP: built sharded
    try:
        run_distill(ctx, on_step=kill)
        raise AssertionError("not killed")
    except StopTraining:
        assert is_sharded(ctx.model) == (cfg.run.parallel == "fsdp")
    both_stages(cfg)


if __name__ == "__main__":  # one rank of the two-process run
    torch.set_num_threads(1)
    root, model_dir, data = (Path(a) for a in sys.argv[1:4])
    killed_then_resumed(cfg_for(root, model_dir, data, root / "two", sys.argv[4], sys.argv[5]))
    from lolcats.distributed import cleanup

    cleanup()
