"""What runs and exports leave on disk, and how their mistakes end (issue 29): each defect a test.

No secret in any file; a run directory named only by what changes the result, and the ones
named by earlier versions' hash still found; no litter from failed runs, no step twice in a
resumed log; weight files with the modes of other files; export, device and port mistakes in
one line with exit code 2, and an export that fails leaves nothing half-written.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import save_tiny, write_alpaca
from test_robustness import assert_one_line_error, cli, run_flags

from lolcats.checkpoint import save_checkpoint
from lolcats.cli import main
from lolcats.config import load_config
from lolcats.runs import LOCK, TRAIN_LOG, lock_dir, stage_dirs

SECRET = "hf_FAKE_SECRET_123"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run trained through the CLI: its model, data and stage-2 checkpoint."""
    root = tmp_path_factory.mktemp("run-files")
    model_dir, data = save_tiny(root / "model"), write_alpaca(root / "alpaca.jsonl", n=120)
    flags = run_flags(root, model_dir, data)
    assert main(["linearize", *flags]) == 0
    return SimpleNamespace(model_dir=model_dir, data=data, s2=stage_dirs(load_config(None, flags))[1] / "best")


def plain_modes(tmp_path: Path) -> tuple[int, int]:
    """(file mode, directory mode) that ``open`` and ``mkdir`` give under this process's umask."""
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain-dir").mkdir()
    return (tmp_path / "plain.txt").stat().st_mode & 0o777, (tmp_path / "plain-dir").stat().st_mode & 0o777


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.fixture
def group_umask():
    """A umask other than the usual 022: modes must follow it."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


# ---------------------------------------------------------------- secrets and run identity (1)


def test_a_token_is_written_to_no_file(trained, tmp_path, capsys, monkeypatch):
    flags = run_flags(tmp_path, trained.model_dir, trained.data, finetune__max_steps=2)
    monkeypatch.setattr("sys.argv", ["lolcats", "linearize", *flags, "--hf-token", SECRET])
    rc, _, err = cli(capsys, "linearize", *flags, "--hf-token", SECRET)
    assert rc == 0, err
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.name == "meta.json" for p in files)
    assert [p for p in files if SECRET.encode() in p.read_bytes()] == []


def test_the_lock_names_the_command_without_its_token(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lolcats", "distill", "--hf-token", SECRET, f"--model.hf_token={SECRET}"])
    with lock_dir(tmp_path / "stage"):
        text = (tmp_path / "stage" / LOCK).read_text()
    assert SECRET not in text and "--hf-token ***" in text


def test_a_token_in_a_config_file_is_refused(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(f"model: {{hf_token: {SECRET}}}\n")
    rc, _, err = cli(capsys, "config", "--config", f)
    assert_one_line_error(rc, err, "model.hf_token", "HF_TOKEN", "--hf-token")
    assert SECRET not in err


def test_token_cache_dirs_and_save_interval_keep_the_run_directories(tmp_path):
    base = load_config(None, run_flags(tmp_path, "m", "d.jsonl"))
    other = load_config(None, run_flags(tmp_path, "m", "d.jsonl", model__hf_token=SECRET,
                                        model__cache_dir=tmp_path / "hf", data__cache_dir=tmp_path / "elsewhere",
                                        distill__save_every=3, finetune__save_every=5))
    assert stage_dirs(other) == stage_dirs(base)
    changed = load_config(None, run_flags(tmp_path, "m", "d.jsonl", data__seq_len=64))
    assert stage_dirs(changed)[0] != stage_dirs(base)[0]


def test_a_run_directory_named_by_the_old_hash_is_still_found(trained, tmp_path, capsys):
    from lolcats.runs import _stage_names

    flags = run_flags(tmp_path, trained.model_dir, trained.data, finetune__max_steps=2)
    cfg = load_config(None, flags)
    d1, d2 = stage_dirs(cfg)
    old1, old2 = (d.with_name(n) for d, n in zip((d1, d2), _stage_names(cfg, legacy=True)))
    assert (old1, old2) != (d1, d2)  # the old hash counted data.cache_dir
    assert main_ok(capsys, "linearize", *flags)
    d1.rename(old1)
    d2.rename(old2)
    assert stage_dirs(cfg) == (old1, old2)
    rc, out, err = cli(capsys, "finetune", *flags)
    assert rc == 0 and json.loads(out)["skipped"] is True, err
    assert not d1.exists() and not d2.exists()


def main_ok(capsys, *argv) -> bool:
    rc, _, err = cli(capsys, *argv)
    assert rc == 0, err
    return True


# ---------------------------------------------------------------- failed and resumed runs (9)


@pytest.mark.parametrize("command", ["distill", "linearize"])
def test_a_run_that_fails_before_writing_leaves_no_directory(trained, tmp_path, capsys, command):
    flags = run_flags(tmp_path, trained.model_dir, tmp_path / "missing.jsonl")
    rc, _, err = cli(capsys, command, *flags)
    assert_one_line_error(rc, err, "missing.jsonl")
    assert not (tmp_path / "runs").exists(), sorted((tmp_path / "runs").rglob("*"))


def test_lock_leaves_a_directory_that_holds_more_and_one_made_before(tmp_path):
    kept = tmp_path / "kept"
    with lock_dir(kept):
        (kept / "state.safetensors").write_text("x")
    assert sorted(p.name for p in kept.iterdir()) == [LOCK, "state.safetensors"]
    (tmp_path / "parent").mkdir()
    with lock_dir(tmp_path / "parent" / "a" / "b"):
        pass
    assert list((tmp_path / "parent").iterdir()) == []


def test_a_resumed_run_logs_each_step_once(trained, tmp_path, capsys, monkeypatch):
    from lolcats.training import trainer

    flags = run_flags(tmp_path, trained.model_dir, trained.data, distill__max_steps=5)
    d1 = stage_dirs(load_config(None, flags))[0]
    real = trainer._train_stage

    def killed_after_step_3(stage, data, run_dir, seed, device, progress, on_step):
        def on(step):
            if step == 3:
                raise KeyboardInterrupt
        return real(stage, data, run_dir, seed, device, progress, on)

    monkeypatch.setattr(trainer, "_train_stage", killed_after_step_3)
    assert cli(capsys, "distill", *flags)[0] == 130  # state saved at step 2, step 3 logged
    monkeypatch.setattr(trainer, "_train_stage", real)
    assert main_ok(capsys, "distill", *flags)
    records = [json.loads(line) for line in (d1 / TRAIN_LOG).read_text().splitlines()]
    steps = [r["step"] for r in records if r["event"] == "step"]
    evals = [r["step"] for r in records if r["event"] == "eval"]
    assert steps == [1, 2, 3, 4, 5] and evals == [0, 2, 4, 5]


# ---------------------------------------------------------------- file modes (10)


def test_checkpoint_weights_have_the_mode_of_other_files(tmp_path, umask):
    save_checkpoint(tmp_path / "ck", {"w": torch.ones(3)}, {"step": 1})
    want = plain_modes(tmp_path)[0]
    assert want == 0o666 & ~umask
    assert mode(tmp_path / "ck" / "weights.safetensors") == mode(tmp_path / "ck" / "meta.json") == want


def test_gguf_cache_weights_have_the_mode_of_other_files(tmp_path, umask):
    from safetensors.torch import save_file

    from lolcats.models import gguf_cache

    part = tmp_path / "gguf" / "entry" / "model-float32"
    assert gguf_cache.write_part(part, lambda out: save_file({"w": torch.ones(2)}, str(out / "model.safetensors")))
    want_file, want_dir = plain_modes(tmp_path)
    assert mode(part / "model.safetensors") == mode(part / gguf_cache.MARKER) == want_file
    assert mode(part) == want_dir


# ---------------------------------------------------------------- export, device, port (5, 10)


def test_export_has_plain_modes_and_replaces_an_earlier_export(trained, tmp_path, capsys, group_umask):
    out = tmp_path / "export"
    for _ in range(2):  # the second writes over the first
        assert main_ok(capsys, "export", out, "--checkpoint", trained.s2)
    want_file, want_dir = plain_modes(tmp_path)
    assert mode(out) == want_dir
    assert {mode(p) for p in out.rglob("*") if p.is_file()} == {want_file}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "plain-dir", "plain.txt"]


@pytest.mark.parametrize("what", ["file", "directory"])
def test_export_onto_a_file_or_a_foreign_directory_is_one_line(trained, tmp_path, capsys, what):
    out = tmp_path / "out"
    if what == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    rc, _, err = cli(capsys, "export", out, "--checkpoint", trained.s2)
    assert_one_line_error(rc, err, str(out), "file" if what == "file" else "other files")
    assert (out.read_text() if what == "file" else (out / "notes.txt").read_text()) == "mine"


def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(trained, tmp_path, capsys, monkeypatch):
    import lolcats.bundle

    out = tmp_path / "export"
    assert main_ok(capsys, "export", out, "--checkpoint", trained.s2)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lolcats.bundle, "write_bundle", full)  # the weights are written by then
    for target in (out, tmp_path / "new"):
        rc, _, err = cli(capsys, "export", target, "--checkpoint", trained.s2)
        assert_one_line_error(rc, err, str(target), "the disk is full")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


@pytest.mark.parametrize("argv, words", [
    (["distill", "--run.device", "tpu"], ["run.device", "'tpu'", "cpu", "cuda:N", "mps", "auto"]),
    (["linearize", "--run.device", "cuda:x"], ["run.device", "cuda:N"]),
    (["generate", "--device", "tpu", "--prompt", "hi"], ["--device", "'tpu'", "cuda:N"]),
    (["serve", "--port", "99999"], ["--port", "99999", "65535"]),
    (["serve", "--port", "-1"], ["--port", "-1", "65535"]),
])
def test_device_and_port_mistakes_are_one_line(capsys, argv, words):
    rc, _, err = cli(capsys, *argv)
    assert_one_line_error(rc, err, *words)


def test_a_cuda_device_that_is_not_there_is_one_line(trained, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    rc, _, err = cli(capsys, "distill", *run_flags(tmp_path, trained.model_dir, trained.data, run__device="cuda"))
    assert_one_line_error(rc, err, "device cuda", "no CUDA GPU")
    assert not (tmp_path / "runs").exists()
