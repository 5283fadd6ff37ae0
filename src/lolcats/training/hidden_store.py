"""Hidden states on disk for block-wise attention transfer.

Block-wise transfer trains layers [s, s+k) from the teacher's hidden state entering layer s, so
the teacher runs once over the data and the input of every block is stored:
``2 bytes (bf16) x T tokens x d_model`` per boundary, ``ceil(L / k)`` boundaries.

Layout under ``root``::

    manifest.json                        # written atomically after every shard
    <split>/b<boundary>/<shard>.bin      # raw bf16 bits (as uint16), (n_seq, seq_len, d_model)

A shard holds ``shard_size`` sequences for every boundary and is listed in the manifest only
once all its files are on disk, so a killed run loses at most the shard in progress: a new
writer with the same fingerprints resumes after the last listed shard (``num_written``).

    writer = HiddenStateWriter(root, [0, 4, 8], d_model, seq_len, meta)
    for ids in batches[writer.num_written("train") // b:]:   # (b, T) batches in a fixed order
        writer.add("train", collect_hidden_states(model, ids, writer.boundaries))
    writer.finish_split("train"); writer.finish()
    reader = HiddenStateReader(root, boundary=4, split="train"); reader.verify(model_fp, cfg_fp)
    hidden = reader[i]                                          # (seq_len, d_model) bf16
    out = run_layer_block(model, 4, 8, hidden[None].to(dtype))  # (1, seq_len, d_model)
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

import torch.nn as nn

from lolcats.attention.layers import decoder_stack, lolcats_modules
from lolcats.checkpoint import write_json
from lolcats.distributed import is_sharded

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_META = ("model_fingerprint", "config_fingerprint")


class HiddenStoreError(RuntimeError):
    """A hidden-state store that is missing, incomplete, or made for another model or config."""


# ---------------------------------------------------------------- manifest


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise HiddenStoreError(f"no hidden-state store at {root} ({MANIFEST} missing)")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise HiddenStoreError(f"{path}: format version {manifest.get('format_version')}, "
                               f"this lolcats reads {FORMAT_VERSION}; delete the store to rebuild it")
    return manifest


def _shard_bytes(n_seq: int, seq_len: int, d_model: int) -> int:
    return n_seq * seq_len * d_model * 2


def _valid_shards(root: Path, split: dict, seq_len: int, d_model: int) -> list[dict]:
    """The listed shards up to the first one whose files are missing or truncated."""
    good = []
    for shard in split["shards"]:
        size = _shard_bytes(shard["num_sequences"], seq_len, d_model)
        files = [root / f for f in shard["files"].values()]
        if not all(f.is_file() and f.stat().st_size == size for f in files):
            break
        good.append(shard)
    return good


# ---------------------------------------------------------------- writing


class HiddenStateWriter:
    """Appends (b, T, d) hidden states per boundary into shards; resumes a partial store.

    ``boundaries``: layer indices whose INPUT hidden state is stored (``L`` = the final
    pre-norm state). ``manifest_meta`` must hold ``model_fingerprint`` and
    ``config_fingerprint`` (what the states depend on: base weights, data and model config)
    and may hold anything else (token counts...). An existing store with other fingerprints,
    boundaries or shapes raises unless ``overwrite``.
    """

    def __init__(self, root: str | Path, boundaries: list[int], d_model: int, seq_len: int,
                 manifest_meta: dict[str, Any], shard_size: int = 256, overwrite: bool = False):
        missing = [k for k in REQUIRED_META if k not in manifest_meta]
        if missing:
            raise ValueError(f"manifest_meta needs {', '.join(missing)}; got keys {sorted(manifest_meta)}")
        if sorted(set(boundaries)) != list(boundaries) or not boundaries or boundaries[0] < 0:
            raise ValueError(f"boundaries must be distinct, increasing and >= 0; got {boundaries}")
        self.root, self.boundaries = Path(root), list(boundaries)
        self.d_model, self.seq_len, self.shard_size = d_model, seq_len, shard_size
        self.meta = dict(manifest_meta)
        self._pending: dict[str, int] = {}  # split -> sequences in the shard being written
        if overwrite and self.root.exists():
            shutil.rmtree(self.root)
        self.manifest = self._open()

    def _fresh_manifest(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "meta": self.meta, "boundaries": self.boundaries,
                "d_model": self.d_model, "seq_len": self.seq_len, "shard_size": self.shard_size,
                "splits": {}, "complete": False}

    def _open(self) -> dict[str, Any]:
        if not (self.root / MANIFEST).is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            manifest = self._fresh_manifest()
            write_json(self.root / MANIFEST, manifest)
            return manifest
        manifest = read_manifest(self.root)
        want = self._fresh_manifest()
        for key in ("meta", "boundaries", "d_model", "seq_len", "shard_size"):
            if manifest.get(key) != want[key]:
                raise HiddenStoreError(f"{self.root} holds a store with another {key} ({manifest.get(key)!r}, "
                                       f"wanted {want[key]!r}); delete it or pass overwrite=True")
        for split in manifest["splits"].values():  # drop shards a killed run left half-written
            good = _valid_shards(self.root, split, self.seq_len, self.d_model)
            if len(good) != len(split["shards"]):
                split["shards"], split["complete"] = good, False
                manifest["complete"] = False
            split["num_sequences"] = sum(s["num_sequences"] for s in good)
        write_json(self.root / MANIFEST, manifest)
        return manifest

    # ------------------------------------------------------------ state

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def split_complete(self, split: str) -> bool:
        return bool(self.manifest["splits"].get(split, {}).get("complete", False))

    def num_written(self, split: str) -> int:
        """Sequences of ``split`` safely on disk: skip this many when resuming."""
        return self.manifest["splits"].get(split, {}).get("num_sequences", 0)

    def _split(self, split: str) -> dict[str, Any]:
        if not split.isidentifier():
            raise ValueError(f"split name {split!r} must be a plain word (e.g. train, val)")
        return self.manifest["splits"].setdefault(split, {"num_sequences": 0, "shards": [], "complete": False})

    # ------------------------------------------------------------ writing

    def add(self, split: str, states: dict[int, torch.Tensor]) -> None:
        """``states``: boundary -> (b, T, d) hidden states of the same b sequences.

        Sequences go straight to the shard being written (``*.tmp`` files, appended), so memory
        stays at one batch; a shard is renamed into place and listed once it is full.
        """
        if self._split(split)["complete"]:
            raise HiddenStoreError(f"split {split!r} of {self.root} is already complete")
        if set(states) != set(self.boundaries):
            raise ValueError(f"states for boundaries {sorted(states)}; the store has {self.boundaries}")
        sizes = {tuple(t.shape) for t in states.values()}
        if len(sizes) != 1 or next(iter(sizes))[1:] != (self.seq_len, self.d_model):
            raise ValueError(f"hidden states must all be (b, {self.seq_len}, {self.d_model}); got {sorted(sizes)}")
        cpu = {b: t.detach().to("cpu", torch.bfloat16).contiguous() for b, t in states.items()}  # (b, T, d)
        i, n = 0, next(iter(sizes))[0]
        while i < n:
            pending = self._pending.get(split, 0)
            take = min(n - i, self.shard_size - pending)
            for b, t in cpu.items():
                with open(self._tmp_path(split, b), "ab" if pending else "wb") as f:
                    f.write(t[i:i + take].view(torch.int16).numpy().tobytes())
            self._pending[split] = pending + take
            i += take
            if self._pending[split] == self.shard_size:
                self._close_shard(split)

    def finish_split(self, split: str) -> None:
        """Write the last partial shard and mark ``split`` complete."""
        if self._pending.get(split, 0):
            self._close_shard(split)
        self._split(split)["complete"] = True
        write_json(self.root / MANIFEST, self.manifest)

    def finish(self) -> None:
        """Mark the whole store complete (after every split is finished)."""
        open_splits = [s for s, v in self.manifest["splits"].items() if not v["complete"]]
        if open_splits:
            raise HiddenStoreError(f"splits {open_splits} are not finished; call finish_split first")
        self.manifest["complete"] = True
        write_json(self.root / MANIFEST, self.manifest)

    def _rel_path(self, split: str, boundary: int, index: int) -> str:
        return f"{split}/b{boundary:04d}/{index:06d}.bin"

    def _tmp_path(self, split: str, boundary: int) -> Path:
        path = self.root / (self._rel_path(split, boundary, len(self._split(split)["shards"])) + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _close_shard(self, split: str) -> None:
        info, n = self._split(split), self._pending.pop(split)
        index = len(info["shards"])
        files = {}
        for b in self.boundaries:
            rel = self._rel_path(split, b, index)
            os.replace(self._tmp_path(split, b), self.root / rel)
            files[str(b)] = rel
        info["shards"].append({"index": index, "num_sequences": n, "files": files})
        info["num_sequences"] += n
        write_json(self.root / MANIFEST, self.manifest)


# ---------------------------------------------------------------- reading


class HiddenStateReader(torch.utils.data.Dataset):
    """The stored hidden states entering layer ``boundary``: ``reader[i]`` is (seq_len, d_model) bf16."""

    def __init__(self, root: str | Path, boundary: int, split: str = "train", allow_incomplete: bool = False):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if not (self.manifest["complete"] or allow_incomplete):
            raise HiddenStoreError(f"the hidden-state store at {root} is incomplete (a run was stopped while "
                                   "writing it); run the collection again to finish it")
        if boundary not in self.manifest["boundaries"]:
            raise HiddenStoreError(f"boundary {boundary} is not stored; stored: {self.manifest['boundaries']}")
        if split not in self.manifest["splits"]:
            raise HiddenStoreError(f"split {split!r} is not stored; stored: {sorted(self.manifest['splits'])}")
        self.seq_len, self.d_model = self.manifest["seq_len"], self.manifest["d_model"]
        shards = _valid_shards(self.root, self.manifest["splits"][split], self.seq_len, self.d_model)
        if len(shards) != len(self.manifest["splits"][split]["shards"]):
            raise HiddenStoreError(f"{root}: shard files of split {split!r} are missing or truncated")
        self.files = [self.root / s["files"][str(boundary)] for s in shards]
        self.counts = [s["num_sequences"] for s in shards]
        self.starts = np.cumsum([0] + self.counts).tolist()
        self._maps: dict[int, np.memmap] = {}

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest["meta"]

    def verify(self, expected_fingerprint: str, expected_config_fingerprint: str) -> None:
        """Raise if the store was made from another base model or another config."""
        for key, want in (("model_fingerprint", expected_fingerprint),
                          ("config_fingerprint", expected_config_fingerprint)):
            if self.meta.get(key) != want:
                raise HiddenStoreError(f"the hidden states at {self.root} were made with {key} "
                                       f"{self.meta.get(key)!r}, not {want!r}: they belong to another "
                                       "model or config; delete the store or point to the right one")

    def __len__(self) -> int:
        return self.starts[-1]

    def _map(self, j: int) -> np.memmap:
        if j not in self._maps:
            self._maps[j] = np.memmap(self.files[j], dtype=np.uint16, mode="r",
                                      shape=(self.counts[j], self.seq_len, self.d_model))
        return self._maps[j]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} sequences")
        i %= len(self)
        j = bisect.bisect_right(self.starts, i) - 1
        bits = np.array(self._map(j)[i - self.starts[j]])  # (T, d) uint16, copied out of the map
        return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


# ---------------------------------------------------------------- teacher forward


class _StopForward(Exception):
    """Raised in a hook once the last wanted hidden state is captured."""


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def collect_hidden_states(model: nn.Module, input_ids: torch.Tensor, boundaries: list[int],
                          stop_early: bool | None = None) -> dict[int, torch.Tensor]:
    """Teacher hidden states entering each boundary layer: {b: (B, T, d)}; ``L`` = final pre-norm.

    ``input_ids``: (B, T). LoLCATs layers run in teacher (softmax) mode and get their modes back
    afterwards. ``stop_early`` (default: unless the model is FSDP-sharded) ends the forward
    once the last boundary is captured. Under FSDP every rank must run the whole forward, so
    pass the root module and let it run to the end.
    """
    inner = decoder_stack(model)
    layers, n_layers = inner.layers, len(inner.layers)
    bad = [b for b in boundaries if not 0 <= b <= n_layers]
    if bad:
        raise ValueError(f"boundaries {bad} outside [0, {n_layers}] (the model has {n_layers} layers)")
    stop_early = not is_sharded(model) if stop_early is None else stop_early
    last = max(boundaries)
    captured: dict[int, torch.Tensor] = {}

    def hook_for(b: int):
        def hook(module, args, kwargs):
            captured[b] = _first_tensor(args, kwargs).detach().clone()
            if stop_early and b == last:
                raise _StopForward
        return hook

    handles = [(layers[b] if b < n_layers else inner.norm).register_forward_pre_hook(
        hook_for(b), with_kwargs=True, prepend=True) for b in boundaries]
    modes = [(m, m.mode) for m in lolcats_modules(model)]
    for m, _ in modes:
        m.mode = "teacher"
    try:
        kw = {"logits_to_keep": 1} if inner is not model and hasattr(model, "lm_head") else {}
        model(input_ids=input_ids, use_cache=False, **kw)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.mode = mode
    return {b: captured[b] for b in boundaries}


def run_layer_block(model: nn.Module, start: int, end: int, hidden: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder layers [start, end) on ``hidden`` (B, T, d) -> (B, T, d), causal, no padding.

    Rotary embeddings come from the model's own ``rotary_emb`` and each layer gets the
    arguments the HF model passes (transformers 5.17 and 5.24 alike). ``hidden`` should be in
    the compute dtype (cast stored bf16 states for an fp32 model). Not for FSDP-sharded
    models (their layers unshard only inside the root's forward).
    """
    inner = decoder_stack(model)
    if not 0 <= start <= end <= len(inner.layers):
        raise ValueError(f"layer block [{start}, {end}) is outside [0, {len(inner.layers)}]")
    B, T, _ = hidden.shape
    if position_ids is None:
        position_ids = torch.arange(T, device=hidden.device)[None]  # (1, T)
    position_embeddings = inner.rotary_emb(hidden, position_ids)  # cos, sin: (1, T, head_dim)
    for layer in inner.layers[start:end]:
        out = layer(hidden, attention_mask=None, position_ids=position_ids,
                    position_embeddings=position_embeddings, use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden
