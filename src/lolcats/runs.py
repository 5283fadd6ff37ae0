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
"""

from __future__ import annotations

import re
from pathlib import Path

from lolcats.checkpoint import META
from lolcats.config import Config

STAGE1_SECTIONS = ("model", "attention", "data", "distill")
STAGE2_ONLY = ("attention.softmax_count",)  # fields of STAGE1_SECTIONS that only stage 2 uses
STATE, SUMMARY, TRAIN_LOG, BEST = "state.safetensors", "summary.json", "train_log.jsonl", "best"
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
