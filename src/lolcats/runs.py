"""Run directories: where each stage of a config trains, and whether it has finished.

    <run.output_dir>/<run name>/distill-<hash>-s<seed>/    stage 1 (attention transfer)
    <run.output_dir>/<run name>/finetune-<hash>-s<seed>/   stage 2 (LoRA)

The stage-1 hash covers what stage 1 depends on (model, attention, data, distill sections, less
``STAGE2_ONLY``: stage 1 transfers every converted layer whatever ``attention.softmax_count`` will
keep, so runs that differ only in it share stage 1), the stage-2 hash those plus the finetune
section; the run name comes from ``run.name`` or from the model name, attention kind and feature map. A stage directory holds::

    state.safetensors   resumable state (weights, optimiser, scheduler, data position, RNG)
    best/               best checkpoint by validation loss (the stage's output)
    summary.json        written when the stage finishes (marks it done)
    train_log.jsonl     one line per step and per validation
    block-XX/           block-wise transfer: one such directory per block (same layout)
    lock                the process training in it (PID, host, command), while one is

One process trains in a directory at a time (:func:`lock_dir`): the lock is an ``fcntl.flock``
on ``lock``, which the kernel drops when the process ends however it ends, so a killed run
never leaves it stuck; the file's text (PID, host, command) only names the holder in the error.
Under torchrun only global rank 0 takes it (the ranks of one job share the directory; a second
job's rank 0 stops, and torchrun stops the rest of that job).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from lolcats.checkpoint import META
from lolcats.config import Config, ConfigError

STAGE1_SECTIONS = ("model", "attention", "data", "distill")
STAGE2_ONLY = ("attention.softmax_count", "attention.softmax_pick")  # fields of STAGE1_SECTIONS that only stage 2 uses
STATE, SUMMARY, TRAIN_LOG, BEST, LOCK = "state.safetensors", "summary.json", "train_log.jsonl", "best", "lock"
LEGACY_STATE = "state.pt"  # resume state of lolcats <= 0.1 (a pickle): never read


def run_name(cfg: Config) -> str:
    if cfg.run.name:
        return cfg.run.name
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", Path(cfg.model.name).name.removesuffix(".gguf")).strip("-").lower()
    return f"{slug}-{cfg.attention.kind.replace('_window', '')}-{cfg.attention.feature_map}"


def stage_dirs(cfg: Config) -> tuple[Path, Path]:
    """(stage-1 directory, stage-2 directory) of ``cfg``'s run."""
    root = Path(cfg.run.output_dir) / run_name(cfg)
    fp1 = cfg.fingerprint(*STAGE1_SECTIONS, leave_out=STAGE2_ONLY) + f"-s{cfg.run.seed}"
    fp2 = cfg.fingerprint(*STAGE1_SECTIONS, "finetune") + f"-s{cfg.run.seed}"
    return root / f"distill-{fp1}", root / f"finetune-{fp2}"


def stage_done(directory: Path) -> bool:
    """A stage (or a block of block-wise transfer) finished: its summary and best checkpoint exist."""
    return (Path(directory) / SUMMARY).is_file() and (Path(directory) / BEST / META).is_file()


def finished_checkpoints(cfg: Config) -> tuple[Path, Path | None]:
    """(stage-1 best, stage-2 best or None) of ``cfg``'s run; an error if stage 1 has not finished."""
    d1, d2 = stage_dirs(cfg)
    if not stage_done(d1):
        raise ValueError(f"no trained model for this config (nothing finished at {d1}): run `lolcats linearize` "
                         "with the same flags, or pass --checkpoint DIR or --export DIR")
    return d1 / BEST, (d2 / BEST if stage_done(d2) else None)


class RunInUseError(RuntimeError):
    """Another process is training in a run directory."""


_HELD: set[str] = set()  # real paths of the directories this process holds the lock of


@contextlib.contextmanager
def lock_dir(directory: str | Path) -> Iterator[None]:
    """Hold ``directory``'s lock for the block; re-entrant within a process; a no-op on ranks other
    than 0. Another live process holding it: :class:`RunInUseError` naming it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)  # every rank writes in it (block-wise: its own blocks)
    key = os.path.realpath(directory)
    if int(os.environ.get("RANK", "0")) != 0 or key in _HELD:
        yield
        return
    fd = _acquire(directory / LOCK)
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        if fd is not None:
            os.ftruncate(fd, 0)
            os.close(fd)  # releases the flock


def _acquire(path: Path) -> int | None:
    """The locked file's descriptor (its text: this process), None where the file system has no locks."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunInUseError(f"run directory {path.parent} is in use by {holder}: wait for that run to finish "
                                "or stop it (two runs in one directory overwrite each other's checkpoints)") from None
        print(f"lolcats: cannot lock {path} ({e.strerror}): make sure no other run trains in {path.parent}",
              file=sys.stderr)
        return None
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(record).encode())
    return fd


def _holder(fd: int) -> str:
    try:
        rec = json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}")
        return f"PID {rec['pid']} on {rec['host']} (since {rec['since']}: {rec['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def check_output_dir(cfg: Config) -> None:
    """run.output_dir is a directory that can be written, or can be made (checked before anything loads)."""
    out = Path(cfg.run.output_dir)
    there = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not there.is_dir():
        raise ConfigError(f"run.output_dir: {there} is a file, not a directory; give a directory for the runs")
    if not os.access(there, os.W_OK | os.X_OK):
        raise ConfigError(f"run.output_dir: cannot write in {there}; give a directory you can write in")
