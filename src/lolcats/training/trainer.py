"""The training machinery both stages share: AdamW, gradient accumulation, clipping,
ReduceLROnPlateau, periodic validation, early stopping, the best checkpoint by validation
loss, and resumable state.

A stage is described by a :class:`Stage` (its model and trainable parameters, a loss on a batch,
a validation function, and what its checkpoint holds); :func:`train_stage` runs it in a run
directory (layout: :mod:`lolcats.runs`). A resumed run first cuts ``train_log.jsonl`` back to the steps
of the state it resumes from (a fresh start empties it), so every step appears once.

A run killed at any point resumes from its state file and ends with the same weights as an
uninterrupted run: the data order is a function of (seed, epoch) and the position in it is
saved with the weights.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lolcats import distributed as dist
from lolcats.checkpoint import atomic_write, save_checkpoint, write_error, write_json
from lolcats.config import TrainConfig
from lolcats.data import iterate_batches
from lolcats.runs import BEST, LEGACY_STATE, STATE, SUMMARY, TRAIN_LOG, lock_dir
from lolcats.training.cuda_graph import GraphedLoss, graphs_wanted, loss_and_backward
from lolcats.training.state import load_state, save_state

COUNTERS = ("step", "epoch", "position", "tokens", "best_val", "best_metrics", "evals_since_best", "history",
            "seconds", "done")


@dataclass
class Stage:
    name: str
    model: torch.nn.Module  # the root module (what FSDP wraps)
    params: dict[str, torch.nn.Parameter]  # trainable, by parameter name
    loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict]]  # batch (b, T) -> (loss, logs: floats or 0-dim tensors)
    validate: Callable[[], tuple[float, dict[str, float]]]  # -> (val loss, metrics)
    cfg: TrainConfig
    checkpoint: dict[str, str]  # {checkpoint name: parameter name}: what best/ holds
    meta: dict = field(default_factory=dict)  # best/meta.json (the trainer adds "metrics")
    total_params: int = 0  # of the whole model, for the summary
    batch_tokens: Callable[[torch.Tensor], int] | None = None  # tokens in a batch; default batch.numel()
    inputs: Callable[[torch.Tensor], torch.Tensor] | None = None  # micro-batch -> loss input on the device


@dataclass
class StageResult:
    best_val: float
    best_metrics: dict[str, float]
    steps: int
    tokens: int
    seconds: float
    trainable: int
    total: int
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return vars(self).copy()


class StopTraining(Exception):
    """Raised by a step callback to stop (used to simulate a killed run in tests)."""


class _Loop:
    """Mutable state of one stage run; everything in it goes into the state file."""

    def __init__(self, stage: Stage, n_train: int):
        c = stage.cfg
        self.stage = stage
        self.opt = torch.optim.AdamW([p for p in stage.params.values() if p.requires_grad],
                                     lr=c.lr, weight_decay=c.weight_decay)
        self.sched = (torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, factor=c.plateau_factor,
                                                                 patience=c.plateau_patience)
                      if c.scheduler == "plateau" else None)
        micro_per_epoch = math.ceil(n_train / c.micro_batch_size)
        self.steps_per_epoch = max(1, micro_per_epoch // c.grad_accum)
        self.total_steps = self.steps_per_epoch * c.epochs
        if c.max_steps is not None:
            self.total_steps = min(self.total_steps, c.max_steps)
        self.step = self.epoch = self.position = self.tokens = 0
        self.best_val, self.best_metrics, self.evals_since_best = math.inf, {}, 0
        self.history: list[dict] = []
        self.seconds = 0.0
        self.done = False
        self.graphed: GraphedLoss | None = None  # set by train_stage where cfg.cuda_graph asks for it

    def save(self, path: Path) -> None:
        """Write the state file (rank 0); collective under FSDP (the state is gathered)."""
        params, optim = dist.get_training_state(self.stage.model, self.opt, set(self.stage.params))
        if dist.dist_info().is_main:
            plain = {"counters": {k: getattr(self, k) for k in COUNTERS},
                     "sched": self.sched.state_dict() if self.sched else None}
            save_state(path, params, optim, plain)

    def load(self, path: Path) -> None:
        params, optim, plain = load_state(path)
        missing = sorted(set(self.stage.params) - set(params))
        if missing:
            raise ValueError(f"{path} is not this stage's state (it lacks {missing[:3]}); delete it to restart the stage")
        dist.set_training_state(self.stage.model, self.opt, params, optim)
        if self.sched and plain["sched"]:
            self.sched.load_state_dict(plain["sched"])
        for k, v in plain["counters"].items():
            setattr(self, k, v)


def _log(run_dir: Path, record: dict) -> None:
    """Append one JSON line to the stage's training log (rank 0)."""
    if dist.dist_info().is_main:
        try:
            with open(run_dir / TRAIN_LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise write_error(run_dir / TRAIN_LOG, e) from e


def _trim_log(run_dir: Path, last_step: int) -> None:
    """Keep the training log's records up to ``last_step`` (rank 0): the steps a resumed run does again, or
    all of a fresh start's, go (a line a killed run left half-written too)."""
    path = run_dir / TRAIN_LOG
    if not dist.dist_info().is_main or not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if _log_step(line) <= last_step]
    if len(keep) != len(lines):
        atomic_write(path, lambda p: Path(p).write_text("".join(keep)))


def _log_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _save_best(stage: Stage, directory: Path, metrics: dict) -> None:
    """The stage's checkpoint: rank 0 writes the gathered tensors (collective under FSDP)."""
    full = dist.gather_trainable_state_dict(stage.model, set(stage.checkpoint.values()))
    if dist.dist_info().is_main:
        save_checkpoint(directory, {k: full[n] for k, n in stage.checkpoint.items()}, {**stage.meta, "metrics": metrics})
    dist.barrier()


def _evaluate(loop: _Loop, run_dir: Path) -> bool:
    """Validate, step the scheduler, keep the best checkpoint; True if training should stop."""
    stage, c = loop.stage, loop.stage.cfg
    val, metrics = stage.validate()
    rec = {"step": loop.step, "tokens": loop.tokens, "val_loss": val, **metrics,
           "lr": loop.opt.param_groups[0]["lr"]}
    loop.history.append(rec)
    _log(run_dir, {"event": "eval", **rec})
    if loop.sched:
        loop.sched.step(val)
    if val < loop.best_val:
        loop.best_val, loop.best_metrics, loop.evals_since_best = val, rec, 0
        _save_best(stage, run_dir / BEST, rec)
    else:
        loop.evals_since_best += 1
    return c.early_stop_patience is not None and loop.evals_since_best >= c.early_stop_patience


def train_stage(stage: Stage, train_data: torch.Tensor, run_dir: str | Path, seed: int, device: torch.device,
                progress: bool = True, on_step: Callable[[int], None] | None = None) -> StageResult:
    """Train ``stage`` on packed sequences ``train_data`` (N, T); resume from run_dir if a state exists.
    The run directory is locked meanwhile (:func:`lolcats.runs.lock_dir`)."""
    with lock_dir(run_dir):
        return _train_stage(stage, train_data, Path(run_dir), seed, device, progress, on_step)


def _train_stage(stage: Stage, train_data: torch.Tensor, run_dir: Path, seed: int, device: torch.device,
                 progress: bool, on_step: Callable[[int], None] | None) -> StageResult:
    c = stage.cfg
    loop = _Loop(stage, len(train_data))
    if graphs_wanted(c.cuda_graph, device, dist.dist_info().world_size):
        loop.graphed = GraphedLoss(stage.loss, [p for p in stage.params.values() if p.requires_grad])
    resumed = (run_dir / STATE).is_file()
    if resumed:
        loop.load(run_dir / STATE)
    else:
        if (run_dir / LEGACY_STATE).is_file():
            print(f"lolcats: {run_dir / LEGACY_STATE} (an older version's resume state, a pickle) is not read; "
                  "this stage starts again", file=sys.stderr)
        torch.manual_seed(seed)
    _trim_log(run_dir, loop.step if resumed else -1)
    if not loop.done and loop.step == 0 and not loop.history:
        _evaluate(loop, run_dir)  # the starting point is a candidate too
    trainable = sum(p.numel() for p in stage.params.values() if p.requires_grad)
    bar = _progress(stage.name, loop, progress)
    t_last, tok_last = time.time(), loop.tokens
    try:
        while not loop.done and loop.step < loop.total_steps:
            logs = _one_step(loop, train_data, seed, device)
            now = time.time()
            loop.seconds += now - t_last
            tps = (loop.tokens - tok_last) / max(now - t_last, 1e-9)
            _log(run_dir, {"event": "step", "step": loop.step, "epoch": loop.epoch, "loss": logs["loss"],
                           "lr": loop.opt.param_groups[0]["lr"], "tokens": loop.tokens, "tok_s": tps,
                           "seconds": loop.seconds})
            t_last, tok_last = now, loop.tokens
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4g}", tok_s=f"{tps:,.0f}", refresh=False)
            stop = False
            if loop.step % c.eval_every == 0 or loop.step == loop.total_steps:
                stop = _evaluate(loop, run_dir)
                bar.set_postfix(loss=f"{logs['loss']:.4g}", val=f"{loop.history[-1]['val_loss']:.4g}",
                                tok_s=f"{tps:,.0f}", refresh=False)
            loop.done = stop or loop.step >= loop.total_steps
            if loop.done or loop.step % c.save_every == 0 or loop.step % c.eval_every == 0:
                loop.save(run_dir / STATE)
            if on_step is not None:
                on_step(loop.step)
    finally:
        bar.close()
    result = StageResult(loop.best_val, loop.best_metrics, loop.step, loop.tokens, loop.seconds,
                         trainable, stage.total_params, loop.history)
    if dist.dist_info().is_main:
        write_json(run_dir / SUMMARY, result.to_dict())
    dist.barrier()
    return result


def _progress(name: str, loop: _Loop, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=loop.total_steps, initial=loop.step, desc=name, dynamic_ncols=True,
                disable=not enabled or not dist.dist_info().is_main)


def _one_step(loop: _Loop, data: torch.Tensor, seed: int, device: torch.device) -> dict[str, float]:
    """grad_accum micro-batches, clip, AdamW step; advances the data position."""
    c, stage = loop.stage.cfg, loop.stage
    loop.opt.zero_grad(set_to_none=loop.graphed is None)  # a graph adds into the gradients it was captured with
    total, logs = 0.0, {}
    info = dist.dist_info()
    for _ in range(c.grad_accum):
        batch = _next_batch(loop, data, seed)  # the global micro-batch, (b, T)
        mine, weight = _my_share(batch, info)
        x = stage.inputs(mine) if stage.inputs else mine.to(device)
        if loop.graphed is not None:
            loss, logs = loop.graphed(x, weight / c.grad_accum)
        else:
            loss, logs = loss_and_backward(stage.loss, x, weight / c.grad_accum)
        total += float(dist.all_reduce_mean(float(loss.detach()) * weight)) / c.grad_accum
        loop.tokens += stage.batch_tokens(batch) if stage.batch_tokens else batch.numel()
    params = [p for p in stage.params.values() if p.requires_grad]
    dist.average_gradients(params)  # replicated ranks; FSDP has reduced its shards already
    torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
    loop.opt.step()
    loop.step += 1
    return {**{k: float(v) for k, v in logs.items()}, "loss": total}


def _my_share(batch: torch.Tensor, info) -> tuple[torch.Tensor, float]:
    """This rank's rows of a global micro-batch and the weight of its (mean) loss.

    FSDP averages gradients over ranks, so weight = world * share / b makes the result the
    gradient of the mean over the global micro-batch even when shares differ; a rank left
    without rows runs one row with weight 0 (every rank must run the forward). One process:
    (batch, 1.0).
    """
    if info.world_size <= 1:
        return batch, 1.0
    share = batch[dist.distributed_sampler_slice(len(batch), info.rank, info.world_size)]
    if len(share) == 0:
        return batch[:1], 0.0
    return share, info.world_size * len(share) / len(batch)


def _next_batch(loop: _Loop, data: torch.Tensor, seed: int) -> torch.Tensor:
    c = loop.stage.cfg
    while True:
        for pos, batch in iterate_batches(data, c.micro_batch_size, seed, loop.epoch, loop.position):
            loop.position = pos + 1
            return batch
        loop.epoch, loop.position = loop.epoch + 1, 0
