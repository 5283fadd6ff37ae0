"""Block-wise attention transfer: k = L equals the joint run, k = 1 is no worse per layer, the
stored states are the teacher's, a killed block resumes to the same weights, blocks can run apart,
and two gloo processes (this file run as a script under ``torch.distributed.run``) train the
blocks side by side to the one-process weights, FSDP-sharded (killed once and resumed) or
replicated."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import save_tiny, torchrun_two, write_alpaca
from lolcats.checkpoint import load_tensors
from lolcats.pipeline import prepare, run_distill, stage_dirs
from lolcats.runs import STATE
from lolcats.training.blockwise import HIDDEN_DIR, block_dir, parse_blocks
from lolcats.training.hidden_store import HiddenStateReader, HiddenStoreError
from lolcats.training.trainer import StopTraining
from test_pipeline import make_cfg

L = 2
STEPS = {"distill.max_steps": 8}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("blockwise")
    return root, save_tiny(root / "model"), write_alpaca(root / "alpaca.jsonl", n=120)


def _distill(cfg, **kw):
    ctx = prepare(cfg)
    result = run_distill(ctx, **kw)
    return ctx, result


def _summary(directory):
    return json.loads((directory / "summary.json").read_text())


@pytest.fixture(scope="module")
def joint_and_k1(env):
    root, model_dir, data = env
    joint = make_cfg(root / "joint", model_dir, data, **STEPS)
    k1 = make_cfg(root / "k1", model_dir, data, **STEPS, **{"distill.block_size": 1})
    _distill(joint)
    ctx, result = _distill(k1)
    return joint, k1, ctx, result


def test_k_equals_L_gives_the_joint_weights(env):
    root, model_dir, data = env
    over = {**STEPS, "model.dtype": "bfloat16"}  # stored states are bf16: exact only for a bf16 model
    joint = make_cfg(root / "jl", model_dir, data, **over)
    block = make_cfg(root / "bl", model_dir, data, **over, **{"distill.block_size": L})
    _distill(joint)
    _, result = _distill(block)
    a, b = load_tensors(stage_dirs(joint)[0] / "best"), load_tensors(stage_dirs(block)[0] / "best")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6)
    sa, sb = _summary(stage_dirs(joint)[0]), _summary(stage_dirs(block)[0])
    assert sb["steps"] == sa["steps"] and sb["tokens"] == sa["tokens"] == result.tokens
    assert sb["best_val"] == pytest.approx(sa["best_val"], rel=1e-6)


def test_k1_per_layer_mse_no_worse_than_joint(joint_and_k1):
    joint, k1, _, result = joint_and_k1
    hist = _summary(stage_dirs(joint)[0])["history"]
    d1 = stage_dirs(k1)[0]
    for i in range(L):
        best_joint = min(h[f"mse/{i}"] for h in hist)
        best_block = _summary(block_dir(d1, i))["best_metrics"][f"mse/{i}"]
        assert best_block <= best_joint * 1.05, (i, best_block, best_joint)
        assert result.best_metrics[f"mse/{i}"] == best_block
    # the gathered checkpoint is a normal stage-1 checkpoint, loaded by a second run
    meta = json.loads((d1 / "best" / "meta.json").read_text())
    assert meta["stage"] == "distill" and meta["num_layers"] == L
    assert run_distill(prepare(k1)) is None


def test_stored_states_are_the_teachers(joint_and_k1):
    _, k1, _, _ = joint_and_k1
    ctx = prepare(k1)  # fresh, unconverted teacher
    root = stage_dirs(k1)[0] / HIDDEN_DIR
    for split, ids in (("train", ctx.train), ("val", ctx.val)):
        with torch.no_grad():
            ref = ctx.model.model(input_ids=ids, output_hidden_states=True).hidden_states  # L+1 of (N, T, d)
        for b in range(L):
            r = HiddenStateReader(root, b, split)
            got = torch.stack([r[i] for i in range(len(r))])  # (N, T, d) bf16
            assert got.shape == (len(ids), ids.shape[1], 64)
            torch.testing.assert_close(got, ref[b].to(torch.bfloat16))


def test_store_of_another_model_is_refused(env, tmp_path):
    _, model_dir, data = env
    cfg = make_cfg(tmp_path, model_dir, data, **STEPS, **{"distill.block_size": 1})
    assert _distill(cfg, blocks=[])[1] is None  # only collects the hidden states
    manifest = stage_dirs(cfg)[0] / HIDDEN_DIR / "manifest.json"
    m = json.loads(manifest.read_text())
    m["meta"]["model_fingerprint"] = "another-model"
    manifest.write_text(json.dumps(m))
    with pytest.raises(HiddenStoreError, match="another meta"):
        _distill(cfg)


def test_blocks_apart_and_killed_block_resume_to_same_weights(env, joint_and_k1):
    root, model_dir, data = env
    _, straight_cfg, _, _ = joint_and_k1
    cfg = make_cfg(root / "k1r", model_dir, data, **STEPS, **{"distill.block_size": 1})
    d1 = stage_dirs(cfg)[0]
    assert _distill(cfg, blocks=[0])[1] is None  # block 0 alone (as another process would)
    assert (block_dir(d1, 0) / "summary.json").is_file() and not (d1 / "summary.json").exists()

    def kill(step):
        if step == 5:
            raise StopTraining

    with pytest.raises(StopTraining):
        _distill(cfg, blocks=[1], on_step=kill)
    assert (block_dir(d1, 1) / STATE).is_file() and not (block_dir(d1, 1) / "summary.json").exists()
    _, result = _distill(cfg)  # resumes block 1, skips block 0, gathers
    assert result is not None
    a, b = load_tensors(stage_dirs(straight_cfg)[0] / "best"), load_tensors(d1 / "best")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    sa, sb = _summary(stage_dirs(straight_cfg)[0]), _summary(d1)
    assert sb["steps"] == sa["steps"] and sb["tokens"] == sa["tokens"]


def test_parse_blocks():
    assert parse_blocks(None, 4) is None
    assert parse_blocks("", 4) == []
    assert parse_blocks("0,2-3", 4) == [0, 2, 3]
    with pytest.raises(ValueError, match="out of range"):
        parse_blocks("4", 4)


def test_two_processes_train_blocks_side_by_side(env, joint_and_k1):
    root, model_dir, data = env
    _, k1, _, _ = joint_and_k1
    torchrun_two(__file__, str(root), str(model_dir), str(data))
    one = stage_dirs(k1)[0]
    ref = load_tensors(one / "best")
    for parallel in ("fsdp", "replicate"):
        d1 = stage_dirs(side_by_side_cfg(root, model_dir, data, parallel))[0]
        got = load_tensors(d1 / "best")
        assert got.keys() == ref.keys() and ref
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5, msg=f"{parallel} {k}")
        sa, sb = _summary(one), _summary(d1)
        assert sb["steps"] == sa["steps"] and sb["tokens"] == sa["tokens"], parallel
        for i in range(L):  # each block's own run: same validation curve as in one process
            assert [h["val_loss"] for h in _summary(block_dir(d1, i))["history"]] == pytest.approx(
                [h["val_loss"] for h in _summary(block_dir(one, i))["history"]], rel=1e-6)


def side_by_side_cfg(root, model_dir, data, parallel: str):
    cfg = make_cfg(root / "k1", model_dir, data, **STEPS, **{"distill.block_size": 1, "run.parallel": parallel})
    cfg.run.output_dir = str(root / f"two-{parallel}")  # not part of the run-directory hash
    return cfg


def _rank_main(root, model_dir, data) -> None:
    """FSDP: killed at step 5 of each rank's block, then resumed; replicated: straight through."""
    from lolcats.distributed import barrier

    def kill(step):
        if step == 5:
            raise StopTraining

    fsdp = side_by_side_cfg(root, model_dir, data, "fsdp")
    try:
        _distill(fsdp, on_step=kill)
        raise AssertionError("not killed")
    except StopTraining:
        pass
    barrier()  # the other rank may still be on its way to step 5
    assert all((block_dir(stage_dirs(fsdp)[0], i) / STATE).is_file() for i in range(L))
    ctx, result = _distill(fsdp)
    assert result is not None and ctx.distributed and ctx.strategy == "fsdp"
    assert hasattr(ctx.model, "lolcats_load_report")  # built sharded
    ctx, result = _distill(side_by_side_cfg(root, model_dir, data, "replicate"))
    assert result is not None and ctx.strategy == "replicate"


if __name__ == "__main__":  # one rank of the two-process run
    torch.set_num_threads(1)
    _rank_main(*(Path(a) for a in sys.argv[1:4]))
    from lolcats.distributed import cleanup

    cleanup()
