"""Run directories: where each stage of a config trains, and whether it has finished.

    <run.output_dir>/<run name>/distill-<hash>-s<seed>/    stage 1 (attention transfer)
    <run.output_dir>/<run name>/finetune-<hash>-s<seed>/   stage 2 (LoRA)

The stage-1 hash covers what stage 1 depends on (model, attention, data, distill sections, less
``STAGE2_ONLY``: stage 1 transfers every converted layer whatever ``attention.softmax_count`` will
keep, so runs that differ only in it share stage 1), the stage-2 hash those plus the finetune
section; the run name comes from ``run.name`` or from the model name, attention kind and feature map.
Fields that cannot change the result (``config.NOT_HASHED``: token, cache places, save interval)
count as their defaults; a directory named by earlier versions' hash, which counted them as set,
is used where today's does not exist (:func:`stage_dirs`). A stage directory holds::

    config.yaml         the run's config, without secrets (no token)
    state.safetensors   resumable state (weights, optimiser, scheduler, data position, RNG)
    best/               best checkpoint by validation loss (the stage's output)
    summary.json        written when the stage finishes (marks it done)
    train_log.jsonl     one line per step and per validation
    block-XX/           block-wise transfer: one such directory per block (same layout)
    lock                the process training in it (PID, host, command less secrets), while one is

One process trains in a directory at a time (:func:`lock_dir`): the lock is an ``fcntl.flock``
on ``lock``, which the kernel drops when the process ends however it ends, so a killed run
never leaves it stuck; the file's text (PID, host, command) only names the holder in the error.
Under torchrun only global rank 0 takes it (the ranks of one job share the directory; a second
job's rank 0 stops, and torchrun stops the rest of that job). A directory the run wrote nothing in
is removed when the lock is let go, so failed runs leave no litter.
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
from lolcats.config import Config, ConfigError, redact_argv

STAGE1_SECTIONS = ("model", "attention", "data", "distill")
STAGE2_ONLY = ("attention.softmax_count", "attention.softmax_pick", "attention.softmax_pick_lengths",
               "attention.softmax_pick_samples")  # fields of STAGE1_SECTIONS that only stage 2 uses
STATE, SUMMARY, TRAIN_LOG, BEST, LOCK = "state.safetensors", "summary.json", "train_log.jsonl", "best", "lock"
CONFIG = "config.yaml"  # the run's config (secrets left out), written when a stage starts
LEGACY_STATE = "state.pt"  # resume state of lolcats <= 0.1 (a pickle): never read


def run_name(cfg: Config) -> str:
    if cfg.run.name:
        return cfg.run.name
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", Path(cfg.model.name).name.removesuffix(".gguf")).strip("-").lower()
    return f"{slug}-{cfg.attention.kind.replace('_window', '')}-{cfg.attention.feature_map}"


def stage_dirs(cfg: Config) -> tuple[Path, Path]:
    """(stage-1 directory, stage-2 directory) of ``cfg``'s run: each named by today's hash, or by the hash of
    earlier versions where only that directory exists (:func:`legacy_named`)."""
    root = Path(cfg.run.output_dir) / run_name(cfg)
    new, old = _stage_names(cfg, legacy=False), _stage_names(cfg, legacy=True)
    return tuple(root / (o if not (root / n).exists() and (root / o).exists() else n)  # type: ignore[return-value]
                 for n, o in zip(new, old))


def _stage_names(cfg: Config, legacy: bool) -> tuple[str, str]:
    fp1 = cfg.fingerprint(*STAGE1_SECTIONS, leave_out=STAGE2_ONLY, legacy=legacy) + f"-s{cfg.run.seed}"
    fp2 = cfg.fingerprint(*STAGE1_SECTIONS, "finetune", legacy=legacy) + f"-s{cfg.run.seed}"
    return f"distill-{fp1}", f"finetune-{fp2}"


def legacy_named(cfg: Config, directory: str | Path) -> bool:
    """``directory`` is one of ``cfg``'s stage directories named by the hash of earlier versions (which also
    hashed ``NOT_HASHED`` fields: token, cache places), not today's; what it holds was hashed that way too."""
    name = Path(directory).name
    return name in _stage_names(cfg, legacy=True) and name not in _stage_names(cfg, legacy=False)


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
    than 0. Another live process holding it: :class:`RunInUseError` naming it. A directory the block wrote
    nothing in is removed at the end (:func:`_remove_if_unused`)."""
    directory = Path(directory)
    made = [d for d in [directory, *directory.parents] if not d.exists()]  # deepest first
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
            _remove_if_unused(directory, made)  # while still holding the lock
            os.close(fd)  # releases the flock


def _remove_if_unused(directory: Path, made: list[Path]) -> None:
    """Remove ``directory`` if it holds nothing but its lock (and the config a stage starts with), then the
    parents ``made`` for it that are left empty: a run that failed before writing anything leaves no litter."""
    try:
        if set(os.listdir(directory)) - {LOCK, CONFIG}:
            return
        for name in (CONFIG, LOCK):
            (directory / name).unlink(missing_ok=True)
        for d in dict.fromkeys([directory, *made]):
            d.rmdir()
    except OSError:  # another process wrote in it meanwhile, or the file system refuses: leave it
        pass


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
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(redact_argv(sys.argv)),
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
