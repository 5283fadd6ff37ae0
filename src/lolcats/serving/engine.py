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

Prompts are prefilled into separate *staging* rows (``prefill_rows`` of them), then copied into the slots they
join. Waiting prompts that fit in one chunk are read together, a *group* of up to ``prefill_rows`` prompts in one
forward: each right-padded to the group's length bucket (16, 32, ..., ``prefill_chunk``; with ``prefill_step``,
multiples of it above it), the rows to a power of two, in static buffers, so on CUDA each (rows, length) bucket
replays one CUDA graph (an eager prefill of a large model can be bound by the host launching its thousands of
kernels, and would stall the running streams for as long); a forward's padded tokens stay within ``group_tokens``.
Padding at the end changes no valid token's output (attention is causal) and is masked out of what the state
keeps; the logits are read at each row's last prompt token, and the group's first tokens picked in one call.
Each staging call declares where its rows start (``StepMeta.start``: 0 is fresh rows; None: per-row positions),
the staging rows it runs on, the full key/value stores' length bucket covering its last position and, on the
student, whether it is aligned (fresh rows, padding only at their ends: the fused full-sequence prefill without a
host check). Longer prompts are read chunk by chunk (:meth:`SlotEngine.prefill_chunks`): the staging rows read
their next chunks in one forward, each row from its own position (a row starting a prompt is reset first),
right-padded to a length bucket in the same static buffers, so that on CUDA each (rows, length, declaration) key
replays one CUDA graph too (captured when first needed; the warm-up a capture runs is undone on the staging rows);
rows whose prompts end pick their first tokens and are admitted (:meth:`SlotEngine.admit_rows`), and the scheduler
moves the rest down (:meth:`SlotEngine.move_stage`).
Prefilling in place is not possible because decode steps run over padding rows of their bucket, which would write
into a half-prefilled row.

Full key/value stores (the teacher's layers, the student's layers kept as softmax attention) may be paged
(``kv_tokens``, ``lolcats serve --kv-tokens``): one :class:`~lolcats.attention.cache.KVPool` of that many positions
for the slots and the staging rows, each row naming its pages in a page table (slots' and staging rows', static
buffers the graphs read). The scheduler reserves a staging row's pages for its whole sequence (prompt, new tokens and
one step) before the row starts a prompt (:meth:`SlotEngine.reserve`), and a prompt waits while too few are free;
the pages move with the row (admission, compaction: a table row copy instead of the keys) and return to the pool
when its slot is released. Rows that hold no sequence name the scratch page only, so the padding rows of a step
write nowhere that is read. Without ``kv_tokens`` each row holds ``max_len`` positions.

Sampling is per row (``generation/sampling.py``, picked by the runner): temperature and top-p are (B,)
buffers, and the noise for a row is a hash of (the request's seed, the token's index in the request, the
vocabulary index), so a seeded request samples the same tokens whatever else is in the batch. Greedy rows take
the argmax. A step with a row that asks for penalties or log-probabilities runs the ``full`` variant: the
penalties from each row's counts of generated tokens (B, V), then top-p sampling, and the picked
token's and the ``TOP_LOGPROBS`` most likely tokens' log-probabilities; rows that ask for neither
pick the same tokens in it as in their own variant.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from lolcats.attention.cache import KVState, LolcatsLayer, PageTable, SoftmaxLayer
from lolcats.attention.generate import make_cache, make_kv_pool, prefill_capturable
from lolcats.attention.layers import causal_lm, decoder_stack, lolcats_attention_by_layer
from lolcats.attention.modes import set_attention_mode
from lolcats.attention.step import StepMeta
from lolcats.attention.use import set_inference_fusion
from lolcats.generation.runner import (DecodeRunner, StepKey, bucket_for, buckets, logprob_rows, row_buffers,
                                       set_sampling)
from lolcats.generation.sampling import MODES, Sampling, batch_mode
from lolcats.ops.state import StateStack


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
    # rows' cache contents intact (the row buffers are restored either way; ``_kept_by_warmup``)
    capture_while_serving = False
    prefill_capturable = True  # whether the first-chunk prefill may be captured (no host reads in it)
    warmup_modes: tuple[str, ...] = MODES  # the sampling variants warmup() captures by default
    MIN_LEN = 64  # smallest length bucket of a full key/value store
    KV_PAGE = 64  # positions per page of a paged key/value store (kv_tokens)
    softmax_stores = False  # every layer holds a full key/value store (teacher mode)
    block = 0  # w of a sparse cache on terraced windows: steps keyed by whether a slot may leave (StateEngine)
    lengths: list[int] | None = None  # length buckets of the full key/value stores, if the slots have any

    def __init__(self, model: nn.Module, max_batch: int, max_len: int, use_cuda_graph: bool | None = None,
                 fuse: bool = True, prefill_chunk: int = 512, batch_step: int = 0, prefill_step: int = 0,
                 prefill_rows: int = 8, prefill_tokens: int = 0, kv_tokens: int = 0):
        self.model = causal_lm(model)
        # one q/k/v GEMM, RoPE + Hedgehog in one op, RMSNorms and the MLP's activation in one op each, one gate/up
        # GEMM (FastGenerator's)
        set_inference_fusion(self.model, fuse)
        self.max_batch, self.max_len = max_batch, max_len
        P = min(prefill_chunk, max_len)
        self.prefill_sizes = buckets(P, min(16, P), prefill_step)  # a group's length buckets
        R = self.prefill_rows = max(1, min(prefill_rows, max_batch))
        self.group_sizes = buckets(R)  # a group's row buckets
        self.group_tokens = max(prefill_tokens, P)  # a group's padded tokens (rows x length buckets) stay within
        # paged full key/value stores: the pool, each row's pages (host) and page table (device; 0 = scratch page)
        self.pool = make_kv_pool(self.model, kv_tokens, self.KV_PAGE, self.softmax_stores) if kv_tokens else None
        dev = next(self.model.parameters()).device
        if self.pool is not None and any(t.device != dev for t in self.pool.tensors):
            raise ValueError("--kv-tokens pages the key/value stores of a model on one device; this one spans several")
        self.slot_kv = PageTable(self.pool, max_batch, max_len, dev)
        self.stage_kv = PageTable(self.pool, R, max_len, dev)
        self.cache = self._make_cache(max_batch, self.slot_kv.table)  # the slots, handed to the layers
        self.stage = self._make_cache(R, self.stage_kv.table)  # the staging rows prompts are read into
        self.full = self.cache.stacks  # every layer's state, a row per slot, layers of one spec stacked
        self.stage_full = self.stage.stacks  # and per staging row
        self.runner = DecodeRunner(self.model, self.cache, max_batch, use_cuda_graph, full=True, seeded=True,
                                   batch_step=batch_step)
        r = self.runner
        self.device, self.vocab, self.use_graph, self.sizes = r.device, r.vocab, r.use_graph, r.sizes
        self.rows, self.host_pos = r.rows, r.host_pos  # the slots' buffers; each slot's position on the host
        self.stage_rows = row_buffers(R, self.vocab, self.device)  # the staging rows' sampling and first tokens
        z = lambda *shape, dt=torch.long: torch.zeros(*shape, dtype=dt, device=self.device)  # noqa: E731
        # the staging rows' right-padded chunks: token ids, then each row's first position and its chunk's length,
        # filled by one copy from the host; which tokens are valid, and the index of each row's last one
        host = self.stage_host = z(R, P + 2)
        self.stage_in = {"ids": host[:, :P], "start": host[:, P], "length": host[:, P + 1],
                         "valid": z(R, P, dt=torch.bool), "last": z(R)}
        self.stage_pos = torch.arange(P, device=self.device)[None]  # (1, P)
        self.prefill_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (rows, T)
        # later chunks (rows continuing or starting prompts from their own positions): (rows, T, declaration)
        self.chunk_graphs: dict[tuple[int, int, StepMeta], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    # ------------------------------------------------------------ subclass hooks

    def _make_cache(self, rows: int, table: torch.Tensor):
        """A cache of ``rows`` rows of ``max_len`` positions, its full key/value stores pages of the pool named by
        ``table`` where paged. The student's layers kept as softmax attention get SoftmaxLayers: key/value stores
        of max_len positions per row (paged), or of their bound (attention.use.set_softmax_window)."""
        return make_cache(self.model, rows, max_length=self.max_len, softmax=self.softmax_stores, stacked=True,
                          kv_pool=self.pool, kv_table=table)

    def _kept_by_warmup(self, key: StepKey) -> list[torch.Tensor]:
        """The cache tensors a warm-up step of ``key`` would change for running rows (restored after it)."""
        return []

    def _stage_meta(self, T: int, starts: list[int]) -> StepMeta:
        """What the layers are told when staging rows 0 .. b-1 read chunks of T tokens (right-padded) from positions
        ``starts``: fresh rows (every start 0) or per-row positions only, and the full key/value stores' length
        bucket covering the chunks' last positions (where the stores have one)."""
        fresh = not any(starts)
        length = None if not self.lengths else bucket_for(min(max(starts) + T, self.max_len), self.lengths)
        return StepMeta(start=0 if fresh else None, rows=range(len(starts)), length=length)

    def _stage_begin(self) -> None:
        """Reset every staging row (a group's prefill: they are all fresh)."""
        raise NotImplementedError

    def _reset_stage_row(self, row: int) -> None:
        """Staging row ``row`` starts a new prompt."""

    def _stage_pairs(self, rows: list[int], slots: list[int], length: int,
                     into_stage: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(destination view, staging view) pairs of every state tensor that moving staging rows ``rows`` into
        ``slots`` copies (staging rows instead with ``into_stage``), for rows up to ``length`` tokens long (consecutive
        rows and slots: one pair per tensor)."""
        dst = self.stage_full if into_stage else self.full
        return [(d[:, ds], s_[:, sr]) for dst_st, src_st in zip(dst, self.stage_full)
                for d, s_ in self._state_tensors(dst_st, src_st, length) for ds, sr in self._stage_moves(rows, slots)]

    def _length_buckets(self) -> list[int]:
        """Length buckets of a full key/value store (64, 128, ..., max_len): a step reads and writes it only up to
        the one covering the longest running row."""
        return buckets(self.max_len, min(self.MIN_LEN, self.max_len))

    def _state_tensors(self, dst: StateStack, src: StateStack,
                       length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(destination, source) tensors (n, B, ...) of a stack of layer states that a row move copies (all of them; a
        full key/value store's first ``length`` positions)."""
        if dst.spec.state is KVState and not dst.tensors["pos"].shape[2]:  # a full store: slot p holds position p
            return [(dst.tensors[n][..., :length, :], src.tensors[n][..., :length, :]) for n in ("k", "v")]
        return list(zip(dst.tensors.values(), src.tensors.values()))

    def _stage_moves(self, rows: list[int], slots: list[int]) -> list[tuple[slice, slice]]:
        """Row moves as (slots, staging rows) slices: one when both run consecutively, else one per row."""
        if rows == list(range(rows[0], rows[0] + len(rows))) and slots == list(range(slots[0], slots[0] + len(rows))):
            return [(slice(slots[0], slots[0] + len(rows)), slice(rows[0], rows[0] + len(rows)))]
        return [(slice(d, d + 1), slice(r, r + 1)) for r, d in zip(rows, slots)]

    def _prefill_mask(self, valid: torch.Tensor) -> torch.Tensor | None:
        """The mask a right-padded first chunk is read with; ``valid`` (1, T) bool."""
        return valid

    # ------------------------------------------------------------ the forward

    def _key(self, b: int, mode: str, evicts: bool = True, length: int | None = None) -> StepKey:
        """The step over slots 0 .. b-1 (rows past the running ones are garbage) in sampling variant ``mode``; a
        full store read and written below ``length``; ``evicts`` False: no window slot leaves (rows past n may skip
        an eviction: admission rewrites them)."""
        return StepKey(b, mode, StepMeta(rows=range(b), length=length, may_evict=evicts))

    def _step_key(self, n: int, mode: str) -> StepKey:
        """The step of the running slots 0 .. n-1: its batch bucket, whether a window slot may leave (from the
        positions they feed) and the full stores' length bucket covering the longest."""
        length = None
        if self.lengths:
            longest = max(self.host_pos[:n]) + 1  # the step writes position host_pos and reads 0 .. host_pos
            if longest > self.max_len:
                raise ValueError(f"a sequence reached {longest} positions; the slots hold {self.max_len}")
            length = bucket_for(longest, self.lengths)
        return self._key(self.runner.bucket(n), mode, self.runner.may_evict(n) if self.block else True, length)

    def _all_keys(self, modes) -> list[StepKey]:
        evicts = (True, False) if self.block else (True,)
        return [self._key(b, m, e, L) for b in self.sizes for m in modes for e in evicts for L in self.lengths or [None]]

    def _stage_chunks(self, chunks: list[list[int]], starts: list[int], T: int) -> None:
        """Staging rows 0 .. b-1's chunks into ``stage_in`` (one copy from pinned memory): row i ``chunks[i]`` from
        position ``starts[i]``, right-padded to T tokens; which tokens are valid and each row's last one."""
        b, si = len(chunks), self.stage_in
        host = [c + [0] * (self.stage_host.shape[1] - 2 - len(c)) + [s, len(c)] for c, s in zip(chunks, starts)]
        self.stage_host[:b].copy_(self._host(host), non_blocking=True)
        torch.lt(self.stage_pos[:, :T], si["length"][:b, None], out=si["valid"][:b, :T])
        torch.sub(si["length"][:b], 1, out=si["last"][:b])

    def _chunk_forward(self, b: int, T: int, meta: StepMeta) -> torch.Tensor:
        """Staging rows 0 .. b-1 read ``stage_in``'s chunks of T (right-padded) tokens, each from its row's start, on
        static buffers only: logits (b, V) at each row's last token."""
        si = self.stage_in
        pos = self.stage_pos[:, :T] + si["start"][:b, None]  # (b, T)
        return self.runner.logits(si["ids"][:b, :T], pos, self.stage, meta, self._prefill_mask(si["valid"][:b, :T]),
                                  si["last"][:b])

    def _chunks_logits(self, chunks: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Staging rows 0 .. b-1 read ``chunks`` (row i from position starts[i]; 0 resets the row) in one forward,
        right-padded to their length bucket: a graph replay on CUDA (captured when first needed). Returns logits
        (b, V) at each row's last token."""
        for i, start in enumerate(starts):
            if start == 0:
                self._reset_stage_row(i)
        b, T = len(chunks), bucket_for(max(len(c) for c in chunks), self.prefill_sizes)
        self._stage_chunks(chunks, starts, T)
        meta = self._stage_meta(T, starts)
        if not (self.use_graph and self.prefill_capturable):
            return self._chunk_forward(b, T, meta)
        key = (b, T, meta)
        if key not in self.chunk_graphs:
            self.chunk_graphs[key] = self._capture_chunk(b, T, meta)
        graph, logits = self.chunk_graphs[key]
        graph.replay()
        return logits

    def _capture_chunk(self, b: int, T: int, meta: StepMeta) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The later-chunk read of (b rows, T tokens, ``meta``) as a graph. Rows 0 .. b-1 may be reading prompts: what
        the warm-up wrote into them is undone (of a full store, the positions the call reads and its scratch slot)."""
        slots = (meta.length or self.max_len) + 1
        keep = [t[:, :b] for st in self.stage_full for t, _ in self._state_tensors(st, st, slots)]
        saved = [t.clone() for t in keep]
        table = self.stage_kv.table[:b]
        saved_table = table.clone()  # paged stores: the warm-up writes the scratch page only
        table.zero_()
        self.runner.side_run(lambda: self._chunk_forward(b, T, meta))
        torch._foreach_copy_(keep + [table], saved + [saved_table])
        return self.runner.record(lambda: self._chunk_forward(b, T, meta))

    def _first_chunk(self, b: int, T: int) -> torch.Tensor:
        """Reset the staging rows and read ``stage_in``'s first ``b`` rows of ``T`` (right-padded) tokens into them,
        from position 0, on static buffers only: logits (b, V) at each row's last prompt token."""
        self._stage_begin()
        return self._chunk_forward(b, T, self._stage_meta(T, [0] * b))

    def _capture_prefill(self, b: int, T: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The group prefill of bucket (b rows, T tokens) as a graph (it touches only the staging rows)."""
        self.runner.side_run(lambda: self._first_chunk(b, T))
        return self.runner.record(lambda: self._first_chunk(b, T))

    def group_keys(self) -> list[tuple[int, int]]:
        """The (rows, length) buckets a group may take: one row at any length, more within ``group_tokens``."""
        return [(b, T) for b in self.group_sizes for T in self.prefill_sizes if b == 1 or b * T <= self.group_tokens]

    def group_fits(self, n: int, longest: int) -> bool:
        """Whether ``n`` prompts, the longest ``longest`` tokens, are read together in one forward."""
        if n > self.prefill_rows or longest > self.prefill_sizes[-1]:
            return False
        return (bucket_for(n, self.group_sizes), bucket_for(longest, self.prefill_sizes)) in self.group_keys()

    @torch.no_grad()
    def warmup(self, modes: tuple[str, ...] | None = None) -> int:
        """Capture the steps of every bucket for ``modes`` (default ``warmup_modes``) now, largest first.

        Returns the number of graphs. A step missing later runs eagerly, or is captured then if
        ``capture_while_serving``. The cache holds garbage afterwards: every admission overwrites its slot.
        """
        if not self.use_graph:
            return 0
        graphs = self.runner.graphs
        for key in sorted(self._all_keys(modes or self.warmup_modes), key=lambda k: (k.batch, k.meta.length or 0),
                          reverse=True):
            if key not in graphs:
                graphs[key] = self.runner.capture(key)
        if self.prefill_capturable:
            for key in sorted(self.group_keys(), reverse=True):
                if key not in self.prefill_graphs:
                    self.prefill_graphs[key] = self._capture_prefill(*key)
        torch.cuda.synchronize(self.device)
        return len(graphs) + len(self.prefill_graphs)

    # ------------------------------------------------------------ what the scheduler calls

    @torch.no_grad()
    def launch(self, n: int, mode: str, owners: list | None = None) -> Pending:
        """One decode step for slots 0 .. n-1 (queued on the device; nothing waits)."""
        key = self._step_key(n, mode)
        if self.capture_while_serving and self.use_graph and key not in self.runner.graphs:
            self.runner.graphs[key] = self.runner.capture(key, keep=self._kept_by_warmup(key))
        self.runner.run(key, n)
        return Pending(self.rows["out"][:n], owners, logprob_rows(self.rows, n) if mode == "full" else None)

    @torch.no_grad()
    def prefill(self, ids: list[int], start: int, sampling: Sampling | None, owner=None) -> Pending | None:
        """Read prompt tokens ``ids`` (positions start ..) into staging row 0; ``start`` 0 resets it.

        With ``sampling`` (the prompt's last chunk) the first new token is picked on the device and a
        :class:`Pending` for it returned; :meth:`admit` then moves the row into a slot.
        """
        P = self.prefill_sizes[-1]
        if start == 0 and len(ids) <= P:
            logits = self._group_logits([ids])
            return None if sampling is None else self._pick_first(logits, [sampling], [len(ids)], [owner])
        for i in range(0, len(ids) - P, P):  # a longer piece in chunks of at most P tokens
            self.prefill_chunks([ids[i:i + P]], [start + i], [None])
        i = (len(ids) - 1) // P * P
        return self.prefill_chunks([ids[i:]], [start + i], [sampling], [owner])

    @torch.no_grad()
    def prefill_group(self, prompts: list[list[int]], samplings: list[Sampling], owners: list | None = None) -> Pending:
        """Read whole prompts (``group_fits`` them) into staging rows 0 .. n-1 in one forward and pick their first
        tokens; :meth:`admit_group` then moves the rows into slots."""
        logits = self._group_logits(prompts)
        return self._pick_first(logits, samplings, [len(p) for p in prompts], owners)

    @torch.no_grad()
    def prefill_chunks(self, chunks: list[list[int]], starts: list[int], samplings: list[Sampling | None],
                       owners: list | None = None) -> Pending | None:
        """Staging rows 0 .. b-1 read their next chunks in one forward: row i ``chunks[i]`` at positions ``starts[i]``
        .. (0 resets the row). A row with a sampling (its prompt's last chunk) picks its first token; the
        :class:`Pending` holds a token for every row (``owners[i]`` None, and ``samplings[i]`` None, where a row
        goes on reading). :meth:`admit_rows` then moves the rows that finished into slots."""
        logits = self._chunks_logits(chunks, starts)
        if all(p is None for p in samplings):
            return None
        return self._pick_first(logits, samplings, [s + len(c) for s, c in zip(starts, chunks)], owners)

    def _pick_first(self, logits: torch.Tensor, samplings: list[Sampling | None], lengths: list[int], owners) -> Pending:
        """Staging rows 0 .. n-1 (prompts read up to ``lengths``, ``logits`` (b >= n, V) at their last tokens) pick
        their first tokens with ``samplings`` (None: a row still reading, whose token nobody reads); a
        :class:`Pending` for rows 0 .. n-1."""
        n, b, s = len(samplings), logits.shape[0], self.stage_rows
        for i, p in enumerate(samplings):
            if p is not None:
                set_sampling(s, slice(i, i + 1), p)
        mode = batch_mode([p for p in samplings if p is not None])
        tok = self.runner.pick(logits, s, b, mode)
        s["out"][:b].copy_(tok)
        s["ids"][:b].copy_(tok)
        s["pos"][:n].copy_(self._host([lengths])[0].to(self.device, non_blocking=True))
        s["counter"].fill_(1)
        return Pending(s["out"][:n], owners, logprob_rows(s, n) if mode == "full" else None)

    def _host(self, rows: list[list[int]]) -> torch.Tensor:
        """Token ids (b, T) on the host, pinned on CUDA: a copy from pageable memory would first wait for
        everything queued on the device (the running decode step)."""
        host = torch.tensor(rows, dtype=torch.long)
        return host.pin_memory() if self.device.type == "cuda" else host

    def _group_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """Prompts read into staging rows 0 .. n-1 from position 0, right-padded to their (rows, length) bucket in
        ``stage_in``: a graph replay on CUDA. Returns logits (b, V) at each row's last token (rows past n: a
        one-token padding prompt, never read)."""
        n, longest = len(prompts), max(len(p) for p in prompts)
        if not self.group_fits(n, longest):
            raise ValueError(f"{n} prompts of up to {longest} tokens are not read in one forward (group_fits)")
        b, T = bucket_for(n, self.group_sizes), bucket_for(longest, self.prefill_sizes)
        self._stage_chunks(prompts + [[0]] * (b - n), [0] * b, T)  # padding rows: a one-token prompt
        if self.use_graph and self.prefill_capturable:
            if (b, T) not in self.prefill_graphs:  # touches only the staging rows: safe while others run
                self.prefill_graphs[b, T] = self._capture_prefill(b, T)
            graph, logits = self.prefill_graphs[b, T]
            graph.replay()
            return logits
        return self._first_chunk(b, T)

    @torch.no_grad()
    def admit(self, slot: int, length: int) -> None:
        """Move staging row 0 (a prompt of ``length`` tokens, its first token picked) into ``slot``."""
        self.admit_rows([0], slot, [length])

    @torch.no_grad()
    def admit_group(self, first: int, lengths: list[int]) -> None:
        """Move staging rows 0 .. n-1 (prompts of ``lengths`` tokens, their first tokens picked) into slots
        ``first`` .. ``first`` + n - 1."""
        self.admit_rows(list(range(len(lengths))), first, lengths)

    @torch.no_grad()
    def admit_rows(self, rows: list[int], first: int, lengths: list[int]) -> None:
        """Move staging rows ``rows`` (prompts of ``lengths`` tokens, their first tokens picked) into slots ``first``,
        ``first`` + 1, ...: one multi-tensor copy."""
        slots = list(range(first, first + len(rows)))
        pairs = self._stage_pairs(rows, slots, max(lengths))
        for dst, src in self._stage_moves(rows, slots):
            pairs += [(buf[dst], self.stage_rows[name][src]) for name, buf in self.rows.items()]
            pairs.append((self.slot_kv.table[dst], self.stage_kv.table[src]))
        torch._foreach_copy_(*map(list, zip(*pairs)))
        for r, d in zip(rows, slots):
            self.stage_kv.moved(r, self.slot_kv, d)
        self.host_pos[first:first + len(rows)] = lengths

    @torch.no_grad()
    def move_stage(self, src: int, dst: int, length: int) -> None:
        """Copy staging row ``src`` (a prompt read up to ``length`` tokens) into staging row ``dst`` (compaction)."""
        pairs = self._stage_pairs([src], [dst], length, into_stage=True)
        pairs.append((self.stage_kv.table[dst], self.stage_kv.table[src]))
        torch._foreach_copy_(*map(list, zip(*pairs)))
        self.stage_kv.moved(src, self.stage_kv, dst)

    @torch.no_grad()
    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` (state, position, sampling) into slot ``dst`` (compaction): one multi-tensor copy."""
        n = self.host_pos[src] + 1  # a full key/value store's positions in use
        pairs = [(d[:, dst], s_[:, src]) for st in self.full for d, s_ in self._state_tensors(st, st, n)]
        pairs += [(buf[dst], buf[src]) for buf in self.rows.values()]
        pairs.append((self.slot_kv.table[dst], self.slot_kv.table[src]))
        torch._foreach_copy_(*map(list, zip(*pairs)))
        self.slot_kv.moved(src, self.slot_kv, dst)
        self.host_pos[dst] = self.host_pos[src]

    @torch.no_grad()
    def release(self, slot: int) -> None:
        """Slot ``slot`` is free. Its state is left as it is: an admission overwrites every state tensor of the row
        (a full key/value store's first positions, those the new sequence's queries see, as it writes the rest before
        reading them), and until then the row computes garbage nobody reads, if any step's bucket covers it."""
        self.rows["pos"][slot:slot + 1].fill_(0)
        self.host_pos[slot] = 0
        self.slot_kv.free(slot)

    # ------------------------------------------------------------ key/value pages (kv_tokens)

    def fits(self, positions: int) -> bool:
        """Whether a sequence of ``positions`` positions can ever be given its pages (always without paging)."""
        return self.pool is None or self.pool.pages_for(min(positions, self.max_len)) < self.pool.pages

    def reserve(self, row: int, positions: int) -> bool:
        """Staging row ``row``, the first that holds no prompt (rows from it on hold none), takes the pages of a
        sequence of up to ``positions`` positions (prompt, new tokens and one step more); False where too few are
        free (it then holds none). Always True without paging."""
        for r in range(row, len(self.stage_kv.pages)):  # what rows of prompts that failed or left still hold
            self.stage_kv.free(r)
        return self.stage_kv.take(row, min(positions, self.max_len))

    def free_positions(self) -> int | None:
        """Positions of the pool no row holds (None without paging)."""
        return None if self.pool is None else len(self.pool.free) * self.pool.page


    def state_bytes_per_slot(self) -> int:
        return sum(st.nbytes() for st in self.full) // self.max_batch

    def describe(self) -> dict:
        dev = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"engine": type(self).__name__, "device": dev, "max_batch": self.max_batch,
                "cuda_graphs": self.use_graph, "buckets": self.sizes,
                "kv_pool_tokens": None if self.pool is None else self.pool.capacity}


# ---------------------------------------------------------------- student: constant-size states


class StateEngine(SlotEngine):
    """Slots are rows of the converted layers' constant-size states (student mode)."""

    def __init__(self, model: nn.Module, max_batch: int, max_len: int, use_cuda_graph: bool | None = None,
                 fuse: bool = True, prefill_chunk: int = 512, batch_step: int = 0, prefill_step: int = 0,
                 prefill_rows: int = 8, prefill_tokens: int = 0, kv_tokens: int = 0):
        mods = lolcats_attention_by_layer(causal_lm(model))
        n_layers = len(decoder_stack(model).layers)
        if len(mods) != n_layers or any(m.mode != "student" for m in mods.values()):
            raise ValueError("the constant-state engine needs every layer converted and in student mode "
                             f"({len(mods)} of {n_layers} converted); serve with --attention-mode teacher otherwise")
        super().__init__(model, max_batch, max_len, use_cuda_graph, fuse, prefill_chunk, batch_step, prefill_step,
                         prefill_rows, prefill_tokens, kv_tokens)
        self.layers = [l for l in self.cache.layers if isinstance(l, LolcatsLayer)]
        # a sparse cache's prefill is captured only through its fused kernel (a kept softmax layer's KVState has none)
        self.prefill_capturable = prefill_capturable(self.model, next(self.model.parameters()))
        # a sparse cache on terraced windows evicts only when a row's token starts a block: steps are keyed
        # (and captured) by whether one does, which the host knows from the slots' positions
        self.block = self.runner.block
        # layers kept as softmax attention with every position: a step reads and writes their stores only up to a
        # length bucket covering the longest running row (steps keyed by it, as the teacher's)
        if any(isinstance(l, SoftmaxLayer) and not l.window for l in self.layers):
            self.lengths = self._length_buckets()
            self.capture_while_serving, self.warmup_modes = True, ("greedy",)

    def _kept_by_warmup(self, key: StepKey) -> list[torch.Tensor]:
        # the recurrent states of the step's rows; a kept layer's step writes only the position a row has not reached
        return [t[:, key.meta.row_slice] for st in self.full if st.spec.state is not KVState
                for t in st.tensors.values()]

    def _stage_meta(self, T: int, starts: list[int]) -> StepMeta:
        # fresh rows are aligned (padding only at their ends): the fused full-sequence prefill without a host check
        meta = super()._stage_meta(T, starts)
        return dataclasses.replace(meta, aligned=meta.start == 0)

    def _stage_begin(self) -> None:
        for st in self.stage_full:
            st.reset()

    def _reset_stage_row(self, row: int) -> None:
        for st in self.stage_full:
            st.reset(slice(row, row + 1))



# ---------------------------------------------------------------- teacher: softmax with KV slots


class KVEngine(SlotEngine):
    """Slots are rows of every layer's softmax key/value store (``attention/cache.py``'s :class:`KVState`, the
    store of kept layers, FastGenerator and generate()) of ``max_len`` positions (teacher mode).

    A decode step of ``b`` rows up to ``L`` positions runs over views of the stores' first ``b`` rows and ``L``
    slots; a prefill chunk of the staging row over the slots up to its end (``StepMeta.rows`` and ``length``)."""

    # a warm-up step writes keys only at positions a running row has not reached (overwritten before read)
    capture_while_serving = True
    warmup_modes = ("greedy",)
    softmax_stores = True

    def __init__(self, model: nn.Module, max_batch: int, max_len: int, use_cuda_graph: bool | None = None,
                 fuse: bool = True, prefill_chunk: int = 512, batch_step: int = 0, prefill_step: int = 0,
                 prefill_rows: int = 8, prefill_tokens: int = 0, kv_tokens: int = 0):
        inner = causal_lm(model)
        if len(lolcats_attention_by_layer(inner)) != len(decoder_stack(inner).layers):
            raise ValueError("the KV-slot engine runs converted layers in teacher mode; every layer must be "
                             "converted (convert_model with attention.layers empty)")
        set_attention_mode(model, "teacher")
        super().__init__(model, max_batch, max_len, use_cuda_graph, fuse, prefill_chunk, batch_step, prefill_step,
                         prefill_rows, prefill_tokens, kv_tokens)
        self.lengths = self._length_buckets()

    def _prefill_mask(self, valid: torch.Tensor) -> None:
        return None  # causal softmax: the padding at the end is written past the prompt and never read

    def _stage_begin(self) -> None:
        pass  # prefill writes positions 0 .. before anything reads them

