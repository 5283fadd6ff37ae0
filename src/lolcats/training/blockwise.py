"""Block-wise attention transfer: layers trained in blocks of ``k`` from stored teacher states.

With ``distill.block_size = k`` stage 1 runs in three steps inside its run directory ``d1``:

    d1/hidden/            the teacher's hidden states entering layers 0, k, 2k, ... for the
                          train and val sequences (HiddenStateWriter; resumable; its manifest
                          records the base-model fingerprint and the (model, data) config hash)
    d1/block-XX/          one :func:`train_stage` run per block: params = that block's feature
                          maps / window factors; loss = the block's layers (distill mode) run on
                          the stored states; its own state.pt, best/ and summary.json
    d1/best/, summary.json  all blocks' best weights gathered into one stage-1 checkpoint, the
                          same format as a joint run's (written once every block is done)

The trainer iterates over sequence *indices* ``(N, 1)`` instead of token ids, so data order,
accumulation, validation and resume are those of a joint run; with ``k = L`` the two give the
same weights (the loss averages over the block's layers as the joint loss does over all).

Blocks run one after another in one process, or side by side under torchrun: the ranks share
the teacher pass (each runs the teacher on its share of the micro-batches, rank 0 writes the
store), then each rank trains its share of the blocks as one-process stages
(:func:`lolcats.distributed.alone`: no collectives inside a block), on a whole copy of the
model, or, when the model is FSDP-sharded, on a copy holding only its blocks' layers; once all
are done rank 0 gathers ``d1/best``. Blocks are dealt round-robin over the ranks among those
not yet done, so a killed run resumes each block where it was (on whichever rank gets it). The
result is the one-process result: a block's training depends only on its seed, its stored
inputs and its layers.

``blocks=[...]`` (or the environment variable ``LOLCATS_BLOCKS="0,1,4-7"``; empty = only
collect the hidden states) picks the blocks a call trains, e.g. to spread blocks over
separate processes by hand: whichever finishes the last block writes ``d1/best``, or run
once more without the variable to gather.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from lolcats import distributed as dist
from lolcats.attention.convert import convert_model
from lolcats.attention.modes import collect_distill_outputs, set_attention_mode
from lolcats.attention.params import attention_parameters, set_attention_trainable, stage1_checkpoint_names
from lolcats.checkpoint import load_tensors, save_checkpoint, write_json
from lolcats.config import Config
from lolcats.models.loading import Build, load_base_model
from lolcats.models.sharded import layer_index
from lolcats.runs import BEST, SUMMARY, legacy_named, stage_done
from lolcats.runtime import autocast_context
from lolcats.training.hidden_store import (HiddenStateReader, HiddenStateWriter, HiddenStoreError,
                                           collect_hidden_states, run_layer_block)
from lolcats.training.stages import aggregate_distill_outputs, distill_validate
from lolcats.training.trainer import Stage, StageResult, train_stage

HIDDEN_DIR = "hidden"
BLOCKS_ENV = "LOLCATS_BLOCKS"
SPLITS = ("train", "val")

def block_ranges(num_layers: int, k: int) -> list[tuple[int, int]]:
    """[(start, end)] of the blocks: boundaries range(0, L, k)."""
    if k <= 0:
        raise ValueError(f"block size must be > 0; got {k}")
    return [(s, min(s + k, num_layers)) for s in range(0, num_layers, k)]


def block_dir(d1: Path, index: int) -> Path:
    return Path(d1) / f"block-{index:02d}"


def layer_of(name: str) -> int:
    i = layer_index(name)
    if i is None:
        raise ValueError(f"parameter {name!r} is not inside a decoder layer (.layers.<i>.)")
    return i


def parse_blocks(spec: str | None, n_blocks: int) -> list[int] | None:
    """``"0,2,4-6"`` -> [0, 2, 4, 5, 6]; None (unset) -> None = all; "" -> [] (collect only)."""
    if spec is None:
        return None
    out: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    bad = [i for i in out if not 0 <= i < n_blocks]
    if bad:
        raise ValueError(f"{BLOCKS_ENV}/blocks: {bad} out of range; there are {n_blocks} blocks (0..{n_blocks - 1})")
    return sorted(set(out))


def store_meta(model_fingerprint: str, cfg: Config, d1: Path) -> dict:
    """What the stored states depend on: the base weights and the model and data sections (hashed the old way
    in a stage directory named the old way, as its store was)."""
    return {"model_fingerprint": model_fingerprint,
            "config_fingerprint": cfg.fingerprint("model", "data", legacy=legacy_named(cfg, d1))}


# ---------------------------------------------------------------- step 1: the teacher's states


def collect_block_inputs(model, data: dict[str, torch.Tensor], root: Path, boundaries: list[int], meta: dict,
                         batch_size: int, device) -> None:
    """Store the teacher's hidden states entering ``boundaries`` for every split of ``data``
    ({split: token ids (N, T)}); resumes after the sequences already on disk.

    Under torchrun every rank takes part: in each round rank r runs the teacher on the micro-batch
    r of the round (the micro-batches of one process, so the states are the same bits), the
    states are gathered, and rank 0 writes them in order (the store and its manifest as one
    process writes them). Every rank must call this.
    """
    info = dist.dist_info()
    writer, todo = None, None
    if info.is_main:
        try:
            writer = HiddenStateWriter(root, boundaries, model.config.hidden_size, next(iter(data.values())).shape[1],
                                       meta)  # raises on another meta
            todo = {s: writer.num_written(s) for s in data if not writer.split_complete(s)}
        except HiddenStoreError as e:
            todo = e
    todo = dist.broadcast_object(todo)  # {split: sequences on disk} of the splits to finish, or rank 0's error
    if isinstance(todo, HiddenStoreError):
        raise todo
    for split, done in todo.items():
        ids = data[split]
        starts = list(range(done, len(ids), batch_size))  # the micro-batches of one process
        for r in range(0, len(starts), info.world_size):
            round_ = starts[r:r + info.world_size]
            mine = round_[info.rank] if info.rank < len(round_) else None
            x = ids[mine:mine + batch_size] if mine is not None else ids[:1]  # idle ranks still join the forward
            states = collect_hidden_states(model, x.to(device), boundaries)
            gathered = {b: dist.all_gather_cat(_pad_rows(t, batch_size)) for b, t in states.items()}  # (W bs, T, d)
            if writer is not None:
                for k, start in enumerate(round_):
                    n = len(ids[start:start + batch_size])
                    writer.add(split, {b: g[k * batch_size:k * batch_size + n] for b, g in gathered.items()})
        if writer is not None:
            writer.finish_split(split)
    if writer is not None and not writer.complete:
        writer.finish()
    dist.barrier()  # the store is complete before anyone reads it


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """(n, ...) -> (rows, ...) with zero rows appended (equal shapes for the gather)."""
    return t if len(t) == rows else torch.cat([t, t.new_zeros(rows - len(t), *t.shape[1:])])


# ---------------------------------------------------------------- step 2: one block


def block_checkpoint_names(model, cfg: Config, start: int, end: int) -> dict[str, str]:
    """The stage-1 checkpoint names of layers [start, end)."""
    names = stage1_checkpoint_names(model, cfg.attention.train_window_factor)
    return {k: n for k, n in names.items() if start <= layer_of(n) < end}


def block_stage(model, cfg: Config, start: int, end: int, train: HiddenStateReader, val: HiddenStateReader,
                device, meta: dict) -> Stage:
    """The stage training layers [start, end) on stored states; batches are indices (b, 1), the loss
    takes their hidden states (b, T, d) on the device."""
    set_attention_trainable(model, True, cfg.attention.train_window_factor)
    names = block_checkpoint_names(model, cfg, start, end)
    params = {n: p for n, p in model.named_parameters() if n in names.values() and p.requires_grad}
    dtype = model.get_input_embeddings().weight.dtype
    d = cfg.distill

    def hidden_of(idx: torch.Tensor, reader: HiddenStateReader) -> torch.Tensor:
        return torch.stack([reader[int(i)] for i in idx[:, 0]]).to(device, dtype)  # (b, T, d)

    def run(hidden: torch.Tensor):
        with collect_distill_outputs(model, xent=d.xent_factor > 0) as outs, autocast_context(device, d.precision):
            run_layer_block(model, start, end, hidden)
        return aggregate_distill_outputs(outs, cfg)

    def loss(hidden):
        set_attention_mode(model, "distill")
        model.train()
        return run(hidden)

    val_idx = torch.arange(len(val))[:, None]  # (M, 1)
    return Stage(f"distill[{start}:{end}]", model, params, loss,
                 lambda: distill_validate(model, val_idx, cfg, device, d.micro_batch_size,
                                          lambda b: run(hidden_of(b, val))),
                 d, names, meta, sum(p.numel() for p in model.parameters()),
                 batch_tokens=lambda b: len(b) * train.seq_len, inputs=lambda idx: hidden_of(idx, train))


# ---------------------------------------------------------------- step 3: gather


def _converted_blocks(model, cfg: Config, ranges: list[tuple[int, int]]) -> list[int]:
    """Indices of blocks holding at least one converted layer (the others have nothing to train)."""
    layers = {layer_of(n) for n in stage1_checkpoint_names(model, cfg.attention.train_window_factor).values()}
    return [i for i, (s, e) in enumerate(ranges) if any(s <= j < e for j in layers)]


def _weighted(summaries: list[dict], key: str, weights: list[int]) -> float:
    return sum(s["best_metrics"].get(key, s["best_val"] if key == "val_loss" else 0.0) * w
               for s, w in zip(summaries, weights)) / max(sum(weights), 1)


def gather_blocks(d1: Path, ranges: list[tuple[int, int]], todo: list[int], meta: dict) -> StageResult:
    """Every block's best weights as one stage-1 checkpoint d1/best (as a joint run writes it), and
    d1/summary.json (written by rank 0; every rank gets the result)."""
    summaries, tensors = [], {}
    main = dist.dist_info().is_main
    for i in todo:
        tensors.update(load_tensors(block_dir(d1, i) / BEST))
        summaries.append(json.loads((block_dir(d1, i) / SUMMARY).read_text()))
    n_layers = [sum(k.startswith("mse/") for k in s["best_metrics"]) for s in summaries]
    metrics: dict = {"val_loss": _weighted(summaries, "val_loss", n_layers)}
    for s in summaries:
        metrics.update({k: v for k, v in s["best_metrics"].items() if k.startswith("mse/")})
    if any("xent" in s["best_metrics"] for s in summaries):
        metrics["xent"] = _weighted(summaries, "xent", n_layers)
    metrics["step"] = sum(s["steps"] for s in summaries)
    metrics["tokens"] = sum(s["tokens"] for s in summaries)
    metrics["blocks"] = [{"layers": list(ranges[i]), "val_loss": s["best_val"], "step": s["best_metrics"].get("step")}
                         for i, s in zip(todo, summaries)]
    if main:
        save_checkpoint(d1 / BEST, tensors, {**meta, "metrics": metrics})
    history = [{**h, "block": i} for i, s in zip(todo, summaries) for h in s["history"]]
    result = StageResult(metrics["val_loss"], metrics, metrics["step"], metrics["tokens"],
                         sum(s["seconds"] for s in summaries), sum(s["trainable"] for s in summaries),
                         summaries[0]["total"] if summaries else 0, history)
    if main:
        write_json(d1 / SUMMARY, result.to_dict())
    dist.barrier()  # d1/best is on disk before any rank loads it
    return result


# ---------------------------------------------------------------- the whole stage


def train_blockwise(model, cfg: Config, train: torch.Tensor, val: torch.Tensor, d1: Path, fingerprint: str,
                    device, meta: dict, on_step=None, blocks: list[int] | None = None) -> StageResult | None:
    """Stage 1 block by block (train (N, T), val (M, T) token ids). Trains ``blocks`` (default:
    $LOLCATS_BLOCKS, else all); returns the gathered result once every block is done, else None.
    ``meta``: the stage-1 checkpoint's metadata."""
    num_layers = model.config.num_hidden_layers
    ranges = block_ranges(num_layers, cfg.distill.block_size)
    todo = _converted_blocks(model, cfg, ranges)
    if blocks is None:
        blocks = parse_blocks(os.environ.get(BLOCKS_ENV), len(ranges))
    root = Path(d1) / HIDDEN_DIR
    collect_block_inputs(model, {"train": train, "val": val}, root, [s for s, _ in ranges],
                         store_meta(fingerprint, cfg, d1), cfg.distill.micro_batch_size, device)
    chosen = todo if blocks is None else [b for b in blocks if b in todo]
    info = dist.dist_info()
    initial = _attention_values(model) if dist.is_sharded(model) else None  # collective: before ranks part
    pending = dist.broadcast_object([i for i in chosen if not stage_done(block_dir(d1, i))])  # rank 0's view
    mine = pending[info.rank::info.world_size]
    with dist.alone():  # one-process stages, side by side: no collectives inside a block
        for i in mine:
            trainee = _block_model(model, cfg, ranges[i], initial, device)
            _train_block(trainee, cfg, ranges[i], i, root, fingerprint, device, meta, d1, on_step)
            del trainee
    dist.barrier()
    pending = [i for i in todo if not stage_done(block_dir(d1, i))]
    if pending:
        if info.is_main:
            print(f"lolcats: block-wise stage 1 in {d1}: blocks {pending} still to train "
                  f"(run them, e.g. {BLOCKS_ENV}={','.join(map(str, pending))}); not gathered yet", file=sys.stderr)
        return None
    return gather_blocks(d1, ranges, todo, meta)


def _attention_values(model) -> dict[str, torch.Tensor]:
    """Whole CPU copies of the stage-1 parameters of an FSDP-sharded model, on every rank (collective)."""
    return {n: p.full_tensor().cpu() for n, p in attention_parameters(model).items()}


def _block_model(model, cfg: Config, span: tuple[int, int], initial: dict | None, device):
    """The model a rank trains a block on: ``model`` itself when every rank holds it whole, else
    (FSDP-sharded) a copy holding only the block's layers, read from the weights, with ``model``'s
    stage-1 values (``initial``)."""
    if initial is None:
        return model
    layers = frozenset(range(*span))

    def edit(m):
        convert_model(m, cfg.attention)
        dist.load_full_state_dict(m, initial)
        return m

    return load_base_model(cfg.model, device, build=Build(edit=edit, layers=layers))


def _train_block(model, cfg, span, index, root, fingerprint, device, meta, d1, on_step) -> StageResult:
    readers = {s: HiddenStateReader(root, span[0], s) for s in SPLITS}
    want = store_meta(fingerprint, cfg, d1)
    for r in readers.values():
        r.verify(want["model_fingerprint"], want["config_fingerprint"])
    meta = {**meta, "stage": "distill-block", "block": index, "layers": list(span)}
    stage = block_stage(model, cfg, span[0], span[1], readers["train"], readers["val"], device, meta)
    ids = torch.arange(len(readers["train"]))[:, None]  # (N, 1): the trainer's "data"
    return train_stage(stage, ids, block_dir(d1, index), cfg.run.seed, device, cfg.run.progress, on_step)
