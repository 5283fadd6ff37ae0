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

Blocks can run one after another in one process, or in separate processes (one per GPU):
``blocks=[...]`` (or the environment variable ``LOLCATS_BLOCKS="0,1,4-7"``; empty = only
collect the hidden states) picks the blocks a process trains. Collect the states first (one
process with ``LOLCATS_BLOCKS=""``), then start the block processes; whichever finishes the
last block writes ``d1/best``, or run once more without the variable to gather.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch

from lolcats.attention.convert import (collect_distill_outputs, set_attention_mode, set_attention_trainable,
                                       stage1_checkpoint_names)
from lolcats.checkpoint import load_tensors, save_checkpoint, write_json
from lolcats.config import Config
from lolcats.runs import BEST, SUMMARY, stage_done
from lolcats.runtime import autocast_context
from lolcats.training.hidden_store import (HiddenStateReader, HiddenStateWriter, collect_hidden_states,
                                           run_layer_block)
from lolcats.training.stages import aggregate_distill_outputs, distill_validate
from lolcats.training.trainer import Stage, StageResult, train_stage

HIDDEN_DIR = "hidden"
BLOCKS_ENV = "LOLCATS_BLOCKS"
SPLITS = ("train", "val")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

def block_ranges(num_layers: int, k: int) -> list[tuple[int, int]]:
    """[(start, end)] of the blocks: boundaries range(0, L, k)."""
    if k <= 0:
        raise ValueError(f"block size must be > 0; got {k}")
    return [(s, min(s + k, num_layers)) for s in range(0, num_layers, k)]


def block_dir(d1: Path, index: int) -> Path:
    return Path(d1) / f"block-{index:02d}"


def layer_of(name: str) -> int:
    m = _LAYER.search(name)
    if m is None:
        raise ValueError(f"parameter {name!r} is not inside a decoder layer (.layers.<i>.)")
    return int(m.group(1))


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


def store_meta(model_fingerprint: str, cfg: Config) -> dict:
    """What the stored states depend on: the base weights and the model and data sections."""
    return {"model_fingerprint": model_fingerprint, "config_fingerprint": cfg.fingerprint("model", "data")}


# ---------------------------------------------------------------- step 1: the teacher's states


def collect_block_inputs(model, data: dict[str, torch.Tensor], root: Path, boundaries: list[int], meta: dict,
                         batch_size: int, device) -> None:
    """Store the teacher's hidden states entering ``boundaries`` for every split of ``data``
    ({split: token ids (N, T)}); resumes after the sequences already on disk."""
    any_ids = next(iter(data.values()))
    d_model = model.config.hidden_size
    writer = HiddenStateWriter(root, boundaries, d_model, any_ids.shape[1], meta)  # raises on another meta
    if writer.complete:
        return
    for split, ids in data.items():
        if writer.split_complete(split):
            continue
        for i in range(writer.num_written(split), len(ids), batch_size):
            writer.add(split, collect_hidden_states(model, ids[i:i + batch_size].to(device), boundaries))
        writer.finish_split(split)
    writer.finish()


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
    d1/summary.json."""
    summaries, tensors = [], {}
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
    save_checkpoint(d1 / BEST, tensors, {**meta, "metrics": metrics})
    history = [{**h, "block": i} for i, s in zip(todo, summaries) for h in s["history"]]
    result = StageResult(metrics["val_loss"], metrics, metrics["step"], metrics["tokens"],
                         sum(s["seconds"] for s in summaries), sum(s["trainable"] for s in summaries),
                         summaries[0]["total"] if summaries else 0, history)
    write_json(d1 / SUMMARY, result.to_dict())
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
                         store_meta(fingerprint, cfg), cfg.distill.micro_batch_size, device)
    for i in todo if blocks is None else [b for b in blocks if b in todo]:
        if not stage_done(block_dir(d1, i)):
            _train_block(model, cfg, ranges[i], i, root, fingerprint, device, meta, d1, on_step)
    pending = [i for i in todo if not stage_done(block_dir(d1, i))]
    if pending:
        print(f"lolcats: block-wise stage 1 in {d1}: blocks {pending} still to train "
              f"(run them, e.g. {BLOCKS_ENV}={','.join(map(str, pending))}); not gathered yet", file=sys.stderr)
        return None
    return gather_blocks(d1, ranges, todo, meta)


def _train_block(model, cfg, span, index, root, fingerprint, device, meta, d1, on_step) -> StageResult:
    readers = {s: HiddenStateReader(root, span[0], s) for s in SPLITS}
    for r in readers.values():
        r.verify(fingerprint, cfg.fingerprint("model", "data"))
    meta = {**meta, "stage": "distill-block", "block": index, "layers": list(span)}
    stage = block_stage(model, cfg, span[0], span[1], readers["train"], readers["val"], device, meta)
    ids = torch.arange(len(readers["train"]))[:, None]  # (N, 1): the trainer's "data"
    return train_stage(stage, ids, block_dir(d1, index), cfg.run.seed, device, cfg.run.progress, on_step)
