"""Slot engines: the model side of continuous batching (the only module that copies and resets cache rows).

An engine owns ``max_batch`` *slots*: rows of preallocated per-sequence buffers. A running
sequence lives in one slot; the running sequences always fill slots ``0 .. n-1`` (the scheduler
keeps them compacted: when one ends, the last one's row is copied into its slot).

* :class:`StateEngine` (student mode, the converted model): a slot is one row of every layer's
  constant-size :class:`~lolcats.ops.decode.state.DecodeState` (window ring buffer + linear state),
  i.e. a :class:`~lolcats.generation.LolcatsCache` allocated for ``max_batch`` rows. No paging,
  no growth: admitting and retiring a sequence is a row copy. With a sparse cache on terraced windows
  a step is keyed (and captured) also by whether a running row's token starts a block: only those
  steps run the eviction through the cache.
* :class:`KVEngine` (teacher mode: the same weights with softmax attention, the baseline): a slot
  is one row of every layer's key/value store (``attention/cache.py``'s ``KVState``, ``(max_batch, Hk,
  max_len + 1, D)``) preallocated for the longest allowed sequence (prompt + new tokens); decoding attends
  over the first ``L`` positions of the first ``b`` rows, ``L`` a power-of-two length bucket covering the
  longest running row, each row masked to its own positions by the store.

One decode step (embedding, decoder layers with per-row positions, norm, LM head, per-row
sampling) runs over the first ``bucket`` slots, ``bucket`` the smallest of 1, 2, 4, ..., max_batch
(with ``batch_step``: powers of two up to it, then its multiples) that holds the running sequences;
rows past ``n`` in the bucket compute garbage that no one reads (their buffers are overwritten when
a sequence is admitted there). The step is the decode runner's (``generation/runner.py``, FastGenerator's
too), told which slots it runs over and what it may skip by its ``StepMeta`` (``attention/step.py``); on
CUDA each (bucket, sampling mode[, length bucket | may evict]) step is captured once in a CUDA graph over
static buffers and replayed; on CPU the same code runs eagerly.

A prompt is prefilled into a separate one-row *staging* state, chunk by chunk, with the model's
ordinary layer forward (the fused Triton prefill on CUDA for a fresh row); then the staging row is
copied into the slot it joins. The first chunk is right-padded to a length bucket (16, 32, ...,
``prefill_chunk``; with ``prefill_step``, multiples of it above it) in static buffers, so on CUDA it
too replays a CUDA graph per bucket: an eager prefill of a large model can be bound by the host
launching its thousands of kernels, and would stall the running streams for as long. Padding at the
end changes no valid token's output (attention is causal) and is masked out of what the state keeps;
the logits are read at the last prompt token. Each staging chunk declares where it starts (``StepMeta.start``:
0 is a fresh row) and, on the student, that it is aligned (padding only at its end: the fused full-sequence
prefill without a host check).
Later chunks (prompts longer than ``prefill_chunk``) run eagerly, unpadded. Prefilling in place is
not possible because decode steps run over padding rows of their bucket, which would write into a
half-prefilled row.

Sampling is per row (``generation/sampling.py``, picked by the runner): temperature and top-p are (B,)
buffers, and the noise for a row is a hash of (the request's seed, the token's index in the request, the
vocabulary index), so a seeded request samples the same tokens whatever else is in the batch. Greedy rows take
the argmax. A step with a row that asks for penalties or log-probabilities runs the ``full`` variant: the
penalties from each row's counts of generated tokens (B, V), then top-p sampling, and the picked
token's and the ``TOP_LOGPROBS`` most likely tokens' log-probabilities; rows that ask for neither
pick the same tokens in it as in their own variant.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lolcats.attention.cache import LolcatsLayer
from lolcats.attention.generate import make_cache, prefill_capturable
from lolcats.attention.layers import causal_lm, decoder_stack, lolcats_attention_by_layer
from lolcats.attention.modes import set_attention_mode
from lolcats.attention.step import StepMeta
from lolcats.attention.use import set_inference_fusion
from lolcats.generation.runner import (DecodeRunner, StepKey, bucket_for, buckets, logprob_rows, row_buffers,
                                       set_sampling)
from lolcats.generation.sampling import MODES, Sampling


class Pending:
    """Token ids one launched step (or a finished prefill) will have produced, for ``owners``, and with
    ``logprobs`` (a full step's (n,) picked, (n, K) top log-probabilities and (n, K) top ids) those too.

    On CUDA they are copied to pinned host memory without waiting; :meth:`result` waits for them.
    """

    def __init__(self, tokens: torch.Tensor, owners: list | None = None, logprobs: tuple | None = None):
        self.owners = owners or []
        self.tokens: list[int] | None = None
        self.host = [self._copy(t) for t in (tokens, *(logprobs or ()))]
        self.event = None
        if tokens.is_cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    @staticmethod
    def _copy(t: torch.Tensor) -> torch.Tensor:
        if not t.is_cuda:
            return t.clone()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    def result(self) -> list[int]:
        if self.tokens is None:
            if self.event is not None:
                self.event.synchronize()
            self.tokens = self.host[0].tolist()
        return self.tokens

    def logprobs(self) -> list[tuple[float, list[float], list[int]]] | None:
        """Per row: (the picked token's log-probability, the top ones, their ids); None without them."""
        if len(self.host) == 1:
            return None
        self.result()
        return list(zip(*(t.tolist() for t in self.host[1:])))


# ---------------------------------------------------------------- the shared engine


class SlotEngine:
    """The slots' caches, the staging row and its prefill graphs; the decode step is a :class:`DecodeRunner`'s
    over the slots (its row buffers are the slots' positions and sampling parameters). Subclasses own the caches."""

    # whether a step may be captured between running steps: its warm-up step must leave the running
    # rows' cache contents intact (the row buffers are restored either way)
    capture_while_serving = False
    prefill_capturable = True  # whether the first-chunk prefill may be captured (no host reads in it)
    warmup_modes: tuple[str, ...] = MODES  # the sampling variants warmup() captures by default

    def __init__(self, model: nn.Module, max_batch: int, max_len: int, use_cuda_graph: bool | None = None,
                 fuse: bool = True, prefill_chunk: int = 512, batch_step: int = 0, prefill_step: int = 0):
        self.model = causal_lm(model)
        set_inference_fusion(self.model, fuse)  # one q/k/v GEMM; RoPE + Hedgehog in one op (FastGenerator's)
        self.max_batch, self.max_len = max_batch, max_len
        self.cache = self._make_cache(max_batch)  # the slots, handed to the layers
        self.stage = self._make_cache(1)  # the one-row staging cache prompts are read into
        self.runner = DecodeRunner(self.model, self.cache, max_batch, use_cuda_graph, full=True, seeded=True,
                                   batch_step=batch_step)
        r = self.runner
        self.device, self.vocab, self.use_graph, self.sizes = r.device, r.vocab, r.use_graph, r.sizes
        self.rows, self.host_pos = r.rows, r.host_pos  # the slots' buffers; each slot's position on the host
        self.stage_rows = row_buffers(1, self.vocab, self.device)  # the staging row
        P = min(prefill_chunk, max_len)
        self.prefill_sizes = buckets(P, min(16, P), prefill_step)  # the first chunk's length buckets
        self.stage_in = {"ids": torch.zeros(1, P, dtype=torch.long, device=self.device),  # right-padded chunk
                         "valid": torch.zeros(1, P, dtype=torch.bool, device=self.device),
                         "last": torch.zeros(1, dtype=torch.long, device=self.device)}  # its last prompt token
        self.stage_pos = torch.arange(P, device=self.device)[None]  # (1, P)
        self.stage_start = 0  # prompt tokens the staging row holds before the chunk it reads
        self.prefill_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    # ------------------------------------------------------------ subclass hooks

    def _make_cache(self, rows: int):
        """A cache of ``rows`` rows of ``max_len`` positions."""
        raise NotImplementedError

    def _step_key(self, n: int, mode: str) -> tuple:
        return (self.runner.bucket(n), mode)

    def _step_meta(self, key: tuple) -> StepMeta:
        """What the layers are told at step ``key``: the slots it runs over (rows past n are garbage)."""
        return StepMeta(rows=range(key[0]))

    def _stage_meta(self, T: int) -> StepMeta:
        """What the layers are told when the staging row reads a chunk of T tokens (from ``stage_start``)."""
        return StepMeta(start=self.stage_start)

    def _stage_begin(self) -> None:
        raise NotImplementedError

    def _copy_stage(self, slot: int, length: int) -> None:
        raise NotImplementedError

    def _copy_row(self, src: int, dst: int) -> None:
        raise NotImplementedError

    def _reset_row(self, slot: int) -> None:
        pass

    def _prefill_mask(self, valid: torch.Tensor) -> torch.Tensor | None:
        """The mask a right-padded first chunk is read with; ``valid`` (1, T) bool."""
        return valid

    # ------------------------------------------------------------ the forward

    def _runner_key(self, key: tuple) -> StepKey:
        """The runner's key of step ``key`` (bucket, mode, ...): its batch, sampling variant and metadata."""
        return StepKey(key[0], key[1], self._step_meta(key))

    def _stage_chunk(self, start: int) -> None:
        self.stage_start = start  # tokens already read: a fresh row (0) takes the fused full-sequence path

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, cache, mask=None, index=None) -> torch.Tensor:
        """A staging chunk: ids, pos (1, T) -> logits (1, V) of the last position (or of ``index`` (1,)), reading
        and writing ``cache`` (the staging row) from ``stage_start``."""
        return self.runner.logits(ids, pos, cache, self._stage_meta(ids.shape[1]), mask, index)

    def _first_chunk(self, T: int) -> torch.Tensor:
        """Reset the staging row and read ``stage_in``'s first ``T`` (right-padded) tokens into it, on static
        buffers only: logits (1, V) at the last prompt token."""
        self._stage_begin()
        self._stage_chunk(0)
        return self._forward(self.stage_in["ids"][:, :T], self.stage_pos[:, :T], self.stage,
                             self._prefill_mask(self.stage_in["valid"][:, :T]), self.stage_in["last"])

    def _capture_prefill(self, T: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The first-chunk prefill of length bucket ``T`` as a graph (it touches only the staging row)."""
        self.runner.side_run(lambda: self._first_chunk(T))
        return self.runner.record(lambda: self._first_chunk(T))

    @torch.no_grad()
    def warmup(self, modes: tuple[str, ...] | None = None) -> int:
        """Capture the steps of every bucket for ``modes`` (default ``warmup_modes``) now, largest first.

        Returns the number of graphs. A step missing later runs eagerly, or is captured then if
        ``capture_while_serving``. The cache holds garbage afterwards: every admission overwrites its slot.
        """
        if not self.use_graph:
            return 0
        graphs = self.runner.graphs
        for key in sorted(self._all_keys(modes or self.warmup_modes), reverse=True):
            step = self._runner_key(key)
            if step not in graphs:
                graphs[step] = self.runner.capture(step)
        if self.prefill_capturable:
            for T in reversed(self.prefill_sizes):
                if T not in self.prefill_graphs:
                    self.prefill_graphs[T] = self._capture_prefill(T)
        torch.cuda.synchronize(self.device)
        return len(graphs) + len(self.prefill_graphs)

    def _all_keys(self, modes) -> list[tuple]:
        return [(b, m) for b in self.sizes for m in modes]

    # ------------------------------------------------------------ what the scheduler calls

    @torch.no_grad()
    def launch(self, n: int, mode: str, owners: list | None = None) -> Pending:
        """One decode step for slots 0 .. n-1 (queued on the device; nothing waits)."""
        self.runner.run(self._runner_key(self._step_key(n, mode)), n, capture=self.capture_while_serving)
        return Pending(self.rows["out"][:n], owners, logprob_rows(self.rows, n) if mode == "full" else None)

    @torch.no_grad()
    def prefill(self, ids: list[int], start: int, sampling: Sampling | None, owner=None) -> Pending | None:
        """Read prompt tokens ``ids`` (positions start ..) into the staging row; ``start`` 0 resets it.

        With ``sampling`` (the prompt's last chunk) the first new token is picked on the device and a
        :class:`Pending` for it returned; :meth:`admit` then moves the row into a slot.
        """
        if start == 0 and len(ids) <= self.prefill_sizes[-1]:
            logits = self._prefill_first(ids)
        else:
            if start == 0:
                self._stage_begin()
            self._stage_chunk(start)
            pos = torch.arange(start, start + len(ids), device=self.device)[None]  # (1, T)
            logits = self._forward(self._host([ids]).to(self.device, non_blocking=True), pos, self.stage)
        if sampling is None:
            return None
        s = self.stage_rows
        set_sampling(s, slice(0, 1), sampling)
        tok = self.runner.pick(logits, s, 1, sampling.mode)
        s["out"].copy_(tok)
        s["ids"].copy_(tok)
        s["pos"].fill_(start + len(ids))
        s["counter"].fill_(1)
        return Pending(s["out"], [owner] if owner is not None else None,
                       logprob_rows(s, 1) if sampling.mode == "full" else None)

    def _host(self, rows: list[list[int]]) -> torch.Tensor:
        """Token ids (b, T) on the host, pinned on CUDA: a copy from pageable memory would first wait for
        everything queued on the device (the running decode step)."""
        host = torch.tensor(rows, dtype=torch.long)
        return host.pin_memory() if self.device.type == "cuda" else host

    def _prefill_first(self, ids: list[int]) -> torch.Tensor:
        """A prompt's first chunk, right-padded to its length bucket in ``stage_in``: a graph replay on CUDA.
        Returns logits (1, V) at its last token."""
        n = len(ids)
        T = bucket_for(n, self.prefill_sizes)
        self.stage_in["ids"][:, :T].copy_(self._host([ids + [0] * (T - n)]), non_blocking=True)
        torch.lt(self.stage_pos[:, :T], n, out=self.stage_in["valid"][:, :T])
        self.stage_in["last"].fill_(n - 1)
        if self.use_graph and self.prefill_capturable:
            if T not in self.prefill_graphs:  # touches only the staging row: safe while others run
                self.prefill_graphs[T] = self._capture_prefill(T)
            graph, logits = self.prefill_graphs[T]
            graph.replay()
            return logits
        return self._first_chunk(T)

    @torch.no_grad()
    def admit(self, slot: int, length: int) -> None:
        """Move the staging row (a prompt of ``length`` tokens, its first token picked) into ``slot``."""
        self._copy_stage(slot, length)
        for name, buf in self.rows.items():
            buf[slot] = self.stage_rows[name][0]
        self.host_pos[slot] = length

    @torch.no_grad()
    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` (state, position, sampling) into slot ``dst`` (compaction)."""
        self._copy_row(src, dst)
        for buf in self.rows.values():
            buf[dst] = buf[src]
        self.host_pos[dst] = self.host_pos[src]

    @torch.no_grad()
    def release(self, slot: int) -> None:
        """Slot ``slot`` is free: clear what of it could leak into a later sequence."""
        self._reset_row(slot)
        self.rows["pos"][slot:slot + 1].fill_(0)
        self.host_pos[slot] = 0

    def describe(self) -> dict:
        dev = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"engine": type(self).__name__, "device": dev, "max_batch": self.max_batch,
                "cuda_graphs": self.use_graph, "buckets": self.sizes}


# ---------------------------------------------------------------- student: constant-size states


class StateEngine(SlotEngine):
    """Slots are rows of the converted layers' constant-size states (student mode)."""

    def __init__(self, model: nn.Module, max_batch: int, max_len: int, use_cuda_graph: bool | None = None,
                 fuse: bool = True, prefill_chunk: int = 512, batch_step: int = 0, prefill_step: int = 0):
        mods = lolcats_attention_by_layer(causal_lm(model))
        n_layers = len(decoder_stack(model).layers)
        if len(mods) != n_layers or any(m.mode != "student" for m in mods.values()):
            raise ValueError("the constant-state engine needs every layer converted and in student mode "
                             f"({len(mods)} of {n_layers} converted); serve with --attention-mode teacher otherwise")
        super().__init__(model, max_batch, max_len, use_cuda_graph, fuse, prefill_chunk, batch_step, prefill_step)
        self.layers = [l for l in self.cache.layers if isinstance(l, LolcatsLayer)]
        self.stage_layers = [l for l in self.stage.layers if isinstance(l, LolcatsLayer)]
        # a sparse cache's prefill is captured only through its fused kernel (a kept softmax layer's KVState has none)
        self.prefill_capturable = prefill_capturable(self.model, next(self.model.parameters()))
        # a sparse cache on terraced windows evicts only when a row's token starts a block: steps are keyed
        # (and captured) by whether one does, which the host knows from the slots' positions
        self.block = self.runner.block
        self.full = [l.state for l in self.layers]

    def _make_cache(self, rows: int):
        # layers kept as softmax attention get SoftmaxLayers: key/value stores of max_len positions per row, or of
        # their bound (attention.use.set_softmax_window)
        return make_cache(self.model, rows, max_length=self.max_len)

    def _step_key(self, n: int, mode: str) -> tuple:
        if not self.block:
            return super()._step_key(n, mode)
        return (*super()._step_key(n, mode), self.runner.may_evict(n))  # the positions it feeds

    def _all_keys(self, modes) -> list[tuple]:
        keys = super()._all_keys(modes)
        return [(*k, e) for k in keys for e in (True, False)] if self.block else keys

    def _step_meta(self, key: tuple) -> StepMeta:
        evicts = key[2] if self.block else True  # rows past n (garbage) may skip an eviction: admission rewrites them
        return StepMeta(rows=range(key[0]), may_evict=evicts)

    def _stage_meta(self, T: int) -> StepMeta:
        # a chunk comes unpadded, or right-padded from position 0 (_first_chunk): aligned
        return StepMeta(start=self.stage_start, aligned=True)

    def _stage_begin(self) -> None:
        for layer in self.stage_layers:
            layer.reset()

    def _copy_stage(self, slot: int, length: int) -> None:
        for st, src in zip(self.full, self.stage_layers):
            for dst_t, src_t in zip(st.tensors().values(), src.state.tensors().values()):
                dst_t[slot].copy_(src_t[0])

    def _copy_row(self, src: int, dst: int) -> None:
        for st in self.full:
            for t in st.tensors().values():
                t[dst].copy_(t[src])

    def _reset_row(self, slot: int) -> None:
        for st in self.full:
            st.rows(slice(slot, slot + 1)).reset()  # fills the row's views in place

    def state_bytes_per_slot(self) -> int:
        return sum(st.nbytes() for st in self.full) // self.max_batch


# ---------------------------------------------------------------- teacher: softmax with KV slots


class KVEngine(SlotEngine):
    """Slots are rows of every layer's softmax key/value store (``attention/cache.py``'s :class:`KVState`, the
    store of kept layers, FastGenerator and generate()) of ``max_len`` positions (teacher mode).

    A decode step of ``b`` rows up to ``L`` positions runs over views of the stores' first ``b`` rows and ``L``
    slots; a prefill chunk of the staging row over the slots up to its end (``StepMeta.rows`` and ``length``)."""

    MIN_LEN = 64  # smallest length bucket
    # a warm-up step writes keys only at positions a running row has not reached (overwritten before read)
    capture_while_serving = True
    warmup_modes = ("greedy",)

    def __init__(self, model: nn.Module, max_batch: int, max_len: int, use_cuda_graph: bool | None = None,
                 fuse: bool = True, prefill_chunk: int = 512, batch_step: int = 0, prefill_step: int = 0):
        inner = causal_lm(model)
        if len(lolcats_attention_by_layer(inner)) != len(decoder_stack(inner).layers):
            raise ValueError("the KV-slot engine runs converted layers in teacher mode; every layer must be "
                             "converted (convert_model with attention.layers empty)")
        set_attention_mode(model, "teacher")
        super().__init__(model, max_batch, max_len, use_cuda_graph, fuse, prefill_chunk, batch_step, prefill_step)
        self.full = [layer.state for layer in self.cache.layers]
        self.stage_full = [layer.state for layer in self.stage.layers]
        self.lengths = buckets(max_len, min(self.MIN_LEN, max_len))

    def _make_cache(self, rows: int):
        return make_cache(self.model, rows, max_length=self.max_len, softmax=True)

    def _step_key(self, n: int, mode: str) -> tuple:
        longest = max(self.host_pos[:n]) + 1  # the step writes position host_pos and reads 0 .. host_pos
        if longest > self.max_len:
            raise ValueError(f"a sequence reached {longest} positions; the KV slots hold {self.max_len}")
        return (self.runner.bucket(n), mode, bucket_for(longest, self.lengths))

    def _all_keys(self, modes) -> list[tuple]:
        return [(b, m, L) for b in self.sizes for m in modes for L in self.lengths]

    def _step_meta(self, key: tuple) -> StepMeta:
        return StepMeta(rows=range(key[0]), length=key[2])  # rows past n (garbage) drop positions past L

    def _stage_meta(self, T: int) -> StepMeta:
        return StepMeta(start=self.stage_start, length=min(self.stage_start + T, self.max_len))  # up to its end

    def _prefill_mask(self, valid: torch.Tensor) -> None:
        return None  # causal softmax: the padding at the end is written past the prompt and never read

    def _stage_begin(self) -> None:
        pass  # prefill writes positions 0 .. before anything reads them

    def _copy_stage(self, slot: int, length: int) -> None:
        for dst, src in zip(self.full, self.stage_full):
            dst.k[slot, :, :length].copy_(src.k[0, :, :length])
            dst.v[slot, :, :length].copy_(src.v[0, :, :length])

    def _copy_row(self, src: int, dst: int) -> None:
        n = self.host_pos[src] + 1
        for st in self.full:
            st.k[dst, :, :n].copy_(st.k[src, :, :n])
            st.v[dst, :, :n].copy_(st.v[src, :, :n])

    def state_bytes_per_slot(self) -> int:
        return sum(st.nbytes() for st in self.full) // self.max_batch
