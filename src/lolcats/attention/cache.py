"""LolcatsCache: a Hugging Face ``Cache`` whose size per layer does not grow with the text.

It only stores. Each converted layer's slot (:class:`LolcatsLayer`) holds the state its mixer declares
(``attention/mixers``; for the built-in kinds a :class:`~lolcats.ops.decode.state.DecodeState`: a ring
buffer of the last window's keys, values and phi(k), plus the linear-attention sums kv, ks), allocated from
that declaration (``LolcatsAttention.state_spec``, ``ops/state.py``) and reset to its declared empty values,
and ``seen``, the mask columns plain calls consumed so far (pads included; HF's sequence length). The attention
layer reads and writes its slot itself (``LolcatsAttention.forward`` -> ``attend_cached``): prefill, chunked
prefill and the decode step are its mixer's math. What a call declares about itself (where it starts, which rows
it runs on, whether a slot may leave the window) travels with the call (``attention/step.py``), never on a slot.

Layers kept as softmax attention (``AttentionConfig.layers`` / ``softmax_layers``) hold their keys and
values in a :class:`SoftmaxLayer`, a :class:`KVState` store of N slots per row (static addresses for a CUDA
graph), full or bounded:

    full (window 0):         slot p holds position p, N = the longest row (later positions are dropped)
    bounded (window W, sink S): slots 0..S-1 hold positions 0..S-1; slots S..S+W-1 are a ring of the last W
                             positions (position p >= S in slot S + (p - S) % W); N = S + W

Each slot records its token's position (``pos``; -1: empty), so a query at position p attends the slots
whose position q satisfies 0 <= q <= p and (q < S or q > p - W) (:func:`kv_visible`; a full store: every
q <= p). Keys are stored after RoPE, at their true positions. ``generate()`` keeps HF's dynamic layer for an
unbounded kept layer (its memory grows as usual) and a lazily allocated bounded store for a bounded one
(``attention.use.set_softmax_window``); :class:`FastGenerator` and the serving engine preallocate the store.

The serving engine may page full stores instead (``lolcats serve --kv-tokens``): a :class:`PagedKVState` is a
view of a :class:`KVPool` shared by all its rows, pages of ``page`` positions, each row's page table
(:class:`PageTable`) naming the pages its positions live in (page 0 is scratch: a table entry no page was reserved
for, where padding and the positions a row does not own are written, never read as a row's own). The engine
reserves a row's pages for its whole sequence (prompt + new tokens) when the row starts it, so the store's memory is
what the running rows use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from lolcats.ops.decode.state import EMPTY_POS
from lolcats.ops.state import LayerState, StateSpec, StateStack, state_field


@dataclass
class KVState(LayerState):
    """A kept softmax layer's key/value store: N slots per row (layout in the module docstring) and a last,
    scratch slot, where padding and positions the store drops are written (its ``pos`` stays -1)."""

    k: torch.Tensor  # (B, Hk, N + 1, D)
    v: torch.Tensor  # (B, Hk, N + 1, Dv)
    pos: torch.Tensor = state_field(EMPTY_POS)  # (B, N + 1) int64: each slot's position, -1 = empty; (B, 0): full

    @classmethod
    def spec(cls, Hk, slots, D, Dv, dtype, bounded: bool = False) -> StateSpec:
        """A full store's slot p holds position p: only a bounded one records its slots' positions."""
        n = slots + 1
        return cls.declare(k=((Hk, n, D), dtype), v=((Hk, n, Dv), dtype), pos=((n if bounded else 0,), torch.long))

    @classmethod
    def empty(cls, B, Hk, slots, D, Dv, dtype, device, bounded: bool = False) -> KVState:
        return cls.spec(Hk, slots, D, Dv, dtype, bounded).allocate(B, device)

    def put(self, slot: torch.Tensor, keep: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            pos: torch.Tensor) -> None:
        """Write k/v (B, Hk, T, D) at slots ``slot`` (B, T) where ``keep``, the rest (and slots past the store) into
        the scratch slot; a bounded store records the kept tokens' positions ``pos``."""
        N = self.max_length
        keep = keep & (slot < N)
        idx = torch.where(keep, slot, N)  # (B, T)
        if self.pos.shape[1]:
            self.pos.scatter_(1, idx, torch.where(keep, pos, EMPTY_POS))
        idx = idx[:, None, :, None]  # (B, 1, T, 1)
        self.k.scatter_(2, idx.expand(*k.shape), k.to(self.k.dtype))
        self.v.scatter_(2, idx.expand(*v.shape), v.to(self.v.dtype))

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys (B, Hk, K, D), values (B, Hk, K, Dv), their positions (B, K), -1 where empty)."""
        return self.k, self.v, self.positions()

    def prefix(self, rows: slice, slots: int) -> KVState:
        """A view of a full store's rows ``rows`` and first ``slots`` slots (positions), slot ``slots`` its scratch:
        a step that writes and reads only positions below ``slots`` attends no more keys than that."""
        return KVState(self.k[rows, :, :slots + 1], self.v[rows, :, :slots + 1], self.pos[rows, :slots + 1])

    def positions(self) -> torch.Tensor:
        """(B, N + 1) each slot's position, -1 where empty (a full store: the slot's index; its scratch -1)."""
        if self.pos.shape[1]:
            return self.pos
        n = self.max_length
        idx = torch.arange(n + 1, device=self.k.device)
        return torch.where(idx < n, idx, EMPTY_POS).expand(self.batch_size, n + 1)

    @property
    def max_length(self) -> int:
        """N: the slots (positions of a full store)."""
        return self.k.shape[2] - 1


class PagedKVState:
    """A full key/value store in pages of a :class:`KVPool` (module docstring): one layer's pool tensors, shared by
    every row, and the rows' page tables; written and read as a :class:`KVState` is (``put``, ``read``)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, page: int, length: int):
        self.k, self.v = k, v  # (pages * page, Hk, D): the layer's pool, page 0 scratch
        self.table = table  # (B, M) int64: row b's position p lives in pool row table[b, p // page] * page + p % page
        self.page, self.length = page, length  # positions per page; positions a call reads (and writes below)

    @property
    def batch_size(self) -> int:
        return self.table.shape[0]

    @property
    def max_length(self) -> int:
        return self.length

    def rows(self, sl: slice) -> PagedKVState:
        return PagedKVState(self.k, self.v, self.table[sl], self.page, self.length)

    def prefix(self, rows: slice, slots: int) -> PagedKVState:
        """Rows ``rows``, their first ``slots`` positions (a :meth:`KVState.prefix`)."""
        return PagedKVState(self.k, self.v, self.table[rows], self.page, slots)

    def reset(self) -> None:
        """Nothing to empty: a row writes its positions before its queries read them (pages are the engine's)."""

    def map(self, fn):
        raise NotImplementedError("a paged key/value store's rows move with their page tables (the serving engine)")

    def nbytes(self) -> int:
        """0: the rows hold no memory of their own (the pool's is :meth:`KVPool.nbytes`)."""
        return 0

    def _pool_rows(self, pos: torch.Tensor) -> torch.Tensor:
        """(B, T) positions (0 <= pos < M * page) -> their pool rows."""
        page = self.table.gather(1, (pos // self.page).clamp(max=self.table.shape[1] - 1))  # (B, T)
        return page * self.page + pos % self.page

    def put(self, slot: torch.Tensor, keep: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            pos: torch.Tensor) -> None:
        """:meth:`KVState.put`: slots are positions; dropped tokens (and positions past the table) go to page 0."""
        keep = keep & (slot >= 0) & (slot < self.table.shape[1] * self.page)
        idx = torch.where(keep, self._pool_rows(slot.clamp(min=0)), 0)  # (B, T)
        self.k.index_put_((idx,), k.transpose(1, 2).to(self.k.dtype))  # rows (B, T) <- (B, T, Hk, D)
        self.v.index_put_((idx,), v.transpose(1, 2).to(self.v.dtype))

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first ``length`` positions of every row, gathered from the pool: (B, Hk, L, D) keys, values and the
        positions (B, L) (a position a row has not written is later than its queries: never seen)."""
        B, L = self.batch_size, self.length
        pos = torch.arange(L, device=self.table.device).expand(B, L)
        idx = self._pool_rows(pos)  # (B, L)
        return self.k[idx].transpose(1, 2), self.v[idx].transpose(1, 2), pos


class KVPool:
    """Pages of key/value positions for the full stores of several layers (``layers``: {layer: (Hk, D, Dv, dtype,
    device)}), shared by the rows of several caches (the serving engine's slots and staging rows). ``pages``
    includes page 0, the scratch page; the host hands the others out (:meth:`take`) and back (:meth:`give`)."""

    def __init__(self, layers: dict[int, tuple], pages: int, page: int):
        if pages < 2:
            raise ValueError(f"a key/value pool needs at least 2 pages (one is scratch), got {pages}")
        self.page, self.pages = page, pages
        groups: dict[tuple, list[int]] = {}
        for i, shape in layers.items():
            groups.setdefault(shape, []).append(i)
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.tensors: list[torch.Tensor] = []  # (n, pages * page, Hk, D): layers of one shape stacked
        for (Hk, D, Dv, dtype, device), idx in groups.items():
            k = torch.zeros(len(idx), pages * page, Hk, D, dtype=dtype, device=device)
            v = torch.zeros(len(idx), pages * page, Hk, Dv, dtype=dtype, device=device)
            self.tensors += [k, v]
            for j, i in enumerate(idx):
                self.k[i], self.v[i] = k[j], v[j]
        self.free = list(range(pages - 1, 0, -1))  # a stack: the lowest pages first

    def state(self, layer: int, table: torch.Tensor, length: int) -> PagedKVState:
        """Layer ``layer``'s store for the rows of ``table`` (B, M), rows up to ``length`` positions."""
        return PagedKVState(self.k[layer], self.v[layer], table, self.page, length)

    def pages_for(self, positions: int) -> int:
        return -(-positions // self.page)

    def take(self, n: int) -> list[int] | None:
        """``n`` free pages, or None (taking none) where fewer are free."""
        if n > len(self.free):
            return None
        taken = self.free[len(self.free) - n:][::-1]
        del self.free[len(self.free) - n:]
        return taken

    def give(self, pages: list[int]) -> None:
        self.free += pages[::-1]

    @property
    def capacity(self) -> int:
        """Positions the pool holds for rows (the scratch page left out)."""
        return (self.pages - 1) * self.page

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


class PageTable:
    """Which pages of a :class:`KVPool` rows hold (the serving engine's slots, or its staging rows): each row's page
    ids on the host and the ``(rows, M)`` table the layers read (static: graphs read it), 0 (scratch) where a row
    holds none. Without a pool (None) it holds nothing and every method does nothing."""

    def __init__(self, pool: KVPool | None, rows: int, positions: int, device):
        self.pool = pool
        self.pages: list[list[int]] = [[] for _ in range(rows)]
        M = pool.pages_for(positions) if pool is not None else 1
        self.table = torch.zeros(rows, M, dtype=torch.long, device=device)  # (rows, M)

    def take(self, row: int, positions: int) -> bool:
        """Row ``row`` (holding none) takes the pages of ``positions`` positions; False (taking none) where too few
        are free."""
        if self.pool is None:
            return True
        pages = self.pool.take(self.pool.pages_for(positions))
        if pages is None:
            return False
        self.pages[row] = pages
        host = torch.zeros(1, self.table.shape[1], dtype=torch.long)
        host[0, :len(pages)] = torch.tensor(pages)
        self.table[row:row + 1].copy_(host.pin_memory() if self.table.is_cuda else host, non_blocking=True)
        return True

    def free(self, row: int) -> None:
        """Row ``row`` gives its pages back; its table row names the scratch page."""
        if self.pages[row]:
            self.pool.give(self.pages[row])
            self.pages[row] = []
            self.table[row].zero_()

    def moved(self, src: int, dst: PageTable, row: int) -> None:
        """After row ``src``'s table row was copied into ``dst``'s row ``row``: the pages ``row`` held go back, those
        of ``src`` are its own, and ``src`` names the scratch page."""
        if self.pool is None or (dst is self and src == row):
            return
        if dst.pages[row]:
            self.pool.give(dst.pages[row])
        dst.pages[row], self.pages[src] = self.pages[src], []
        self.table[src].zero_()


def kv_slots(positions: int, window: int, sink: int) -> int:
    """N for a store of rows up to ``positions`` long: every position (window 0), else at most the sinks and the
    window (no more than the positions)."""
    return positions if not window else min(positions, sink + window)


def kv_visible(key_pos: torch.Tensor, pos: torch.Tensor, window: int, sink: int) -> torch.Tensor:
    """key_pos (B, K) the keys' positions (-1: none), pos (B, T) the queries' -> (B, T, K) bool: which keys each
    query attends (itself and earlier; with a window W, the sinks q < S and the last W positions)."""
    q = key_pos[:, None, :]  # (B, 1, K)
    p = pos[:, :, None]  # (B, T, 1)
    ok = (q >= 0) & (q <= p)
    return ok & ((q < sink) | (q > p - window)) if window else ok


class LolcatsLayer(CacheLayerMixin):
    """One converted layer's constant-size state, and ``seen``: the mask columns consumed (pads included) by plain
    calls (HF ``generate()``, a forward with the cache), which HF reads as the sequence length.

    A writer that declares its calls (``attention/step.py``'s ``StepMeta``: FastGenerator, the serving engines)
    tells the layer with each call where it starts and which rows it runs on, and the layer leaves ``seen`` alone.
    Nothing else is set on a slot: it holds what its layer's state spec declares.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = True  # masks for these layers span only the new tokens (see get_mask_sizes)
    supports_early_init = False

    def __init__(self, state: LayerState | None = None):
        super().__init__()
        self.state = state
        self.seen = 0
        self.is_initialized = state is not None

    def view(self, rows: slice | None, length: int | None = None) -> LayerState:
        """The state a call runs on: a view of ``rows`` (all when None), written in place. ``length``: positions, which
        only a kept layer's full store has (:meth:`SoftmaxLayer.view`)."""
        return self.state if rows is None else self.state.rows(rows)

    # -- HF Cache layer interface
    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a LolcatsCache layer holds no key/value history: softmax attention cannot use it "
                           "(set the model to student mode, or use a DynamicCache for the teacher)")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, self.seen  # (kv_length, kv_offset): the chunk's own keys only

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def offload(self):
        pass

    def prefetch(self):
        pass

    def reset(self) -> None:
        if self.state is not None:
            self.state.reset()  # every tensor to its declared empty value
        self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("a LolcatsCache cannot be cropped (its state has no per-token history)")

    def _map_batch(self, fn) -> None:
        if self.state is not None:
            self.state = self.state.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])


class SoftmaxLayer(LolcatsLayer):
    """A kept softmax layer's slot: its key/value store (``state``: a :class:`KVState`, full when ``window`` is 0,
    else bounded to ``sink`` + ``window`` slots; None until the first call allocates it). The layer writes it
    itself (``LolcatsAttention.attend_softmax_cached``)."""

    def __init__(self, state: KVState | None = None, window: int = 0, sink: int = 0):
        super().__init__(state)
        self.window, self.sink = window, sink if window else 0

    def visible(self, key_pos: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(B, T, K): which keys at ``key_pos`` (B, K) the queries at ``pos`` (B, T) attend."""
        return kv_visible(key_pos, pos, self.window, self.sink)

    def view(self, rows: slice | None, length: int | None = None) -> KVState:
        """The store a call runs on: a view of ``rows`` (all when None), of a full store's first ``length`` positions
        when given (a bounded ring's slots are not positions: all of them)."""
        if length is None or self.window:
            return super().view(rows)
        return self.state.prefix(slice(None) if rows is None else rows, length)

    def keeps_chunk(self, state: KVState, start: int | None, T: int) -> bool:
        """Whether a chunk of T tokens, ``start`` mask columns after the first (None: unknown), cannot overwrite its
        own keys in ``state`` (then it is written before it attends): a full store, or a ring it does not wrap."""
        return T == 1 or not self.window or (start is not None and start + T <= state.max_length)

    def write(self, st: KVState, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor) -> None:
        """Store a chunk in ``st`` (this slot's store or a view of it): k/v (B, Hk, T, D), its positions and valid
        tokens (B, T). Each kept token goes to the slot of its position; padding, positions past a full store and
        those a later token of the chunk pushes out of the ring go to the scratch slot."""
        if self.window:
            last = torch.where(valid, pos, -1).amax(1, keepdim=True)  # (B, 1): each row's newest position
            keep = valid & ((pos < self.sink) | (pos > last - self.window))
            slot = torch.where(pos < self.sink, pos, self.sink + (pos - self.sink) % self.window)
        else:
            keep, slot = valid, pos
        st.put(slot, keep, k, v, pos)  # a store made for shorter rows drops later positions


class LolcatsCache(Cache):
    """Constant-size cache for converted models; softmax layers (if any) keep dynamic layers."""

    def __init__(self, layers: list):
        super().__init__(layers=layers)
        self.stacks: list[StateStack] = []  # the layers' states in shared tensors (make_cache(stacked=True))

    def slot(self, layer_idx: int) -> LolcatsLayer:
        """The stored state of converted layer ``layer_idx``."""
        layer = self.layers[layer_idx]
        if not isinstance(layer, LolcatsLayer):
            raise RuntimeError(f"layer {layer_idx} is converted but its cache slot is {type(layer).__name__}")
        return layer

    def states(self) -> dict[int, LayerState]:
        return {i: l.state for i, l in enumerate(self.layers) if isinstance(l, LolcatsLayer) and l.state is not None}

    def state_nbytes(self) -> int:
        """Bytes held by all layers (constant in the generated length for converted layers, bounded by the
        preallocated length for SoftmaxLayers, growing for dynamic ones)."""
        total = sum(s.nbytes() for s in self.states().values())
        for l in self.layers:
            if not isinstance(l, LolcatsLayer) and getattr(l, "keys", None) is not None:
                total += l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
        return total
