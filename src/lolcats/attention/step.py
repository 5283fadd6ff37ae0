"""What a cached call knows about its tokens: the writer's declaration (:class:`StepMeta`) and the mixer's view
of it (:class:`Step`).

A writer that runs the model over a :class:`~lolcats.attention.cache.LolcatsCache` itself (FastGenerator and the
serving engines) declares each call in a :class:`StepMeta` and passes it with the forward,
``model(..., lolcats_step=meta)`` or a decoder layer's ``layer(..., lolcats_step=meta)``: HF's Llama, Mistral and
Qwen2 hand keywords they do not know down to every attention layer (``**kwargs``). The declaration holds static
facts only, so a CUDA graph fixes it at capture: a writer keeps one per graph key. A plain call (HF
``generate()``, a forward with the cache) declares nothing, and the layer takes what the cache counted instead
(``LolcatsLayer.seen``).

The layer adds what the call carries, positions (``position_ids``) and valid tokens (the attention mask), and
hands its mixer a :class:`Step` (:func:`step_of`): the mixer never reads the cache, and the cache holds only
the states the mixers declare, never a writer's flags.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STEP_KWARG = "lolcats_step"  # the forward keyword a StepMeta travels by


@dataclass(frozen=True)
class StepMeta:
    """A cached call's declaration (hashable: part of a CUDA graph's key).

    ``rows`` and ``length`` pick the part of the cache the call's batch runs on (views, written in place):
    a step over the first b of a cache's rows declares ``range(b)``.
    """

    start: int | None = None  # mask columns consumed before the call (0: a fresh state); None: per-row positions only
    rows: range | None = None  # the cache rows the call's batch occupies; None: all of them
    length: int | None = None  # a full key/value store's positions the call reads and writes stay below it
    aligned: bool = False  # the chunk sits at positions start, start + 1, ... of every row, padding only at its end
    may_evict: bool = True  # False: no window slot leaves at this decode step (a sparse cache skips the eviction)

    @property
    def row_slice(self) -> slice | None:
        return None if self.rows is None else slice(self.rows.start, self.rows.stop)


@dataclass
class Step:
    """What a cached call knows about its tokens, handed to the mixer (built by :func:`step_of`).

    ``aligned``: the writer promises that the chunk's tokens sit at positions ``start``, ``start`` + 1, ... of
    every row and that padding comes only at the end, so a fresh state takes the full-sequence path without
    a host check (capturable in a CUDA graph). ``may_evict`` False: the writer promises that no window slot
    leaves at this decode step (a sparse cache then skips its eviction work).
    """

    pos: torch.Tensor  # (B, T) int64 positions
    valid: torch.Tensor | None  # (B, T) bool, False at padding; None: every token is valid
    fresh: bool  # the state holds nothing yet
    aligned: bool = False
    may_evict: bool = True

    def valid_or_ones(self) -> torch.Tensor:
        return torch.ones_like(self.pos, dtype=torch.bool) if self.valid is None else self.valid


def chunk_key_mask(attention_mask, B: int, T: int) -> torch.Tensor | None:
    """Valid keys (B, T) of the current chunk, from HF's 2D or 4D mask; None if there is none.

    A 4D mask (B|1, 1, Tq, Tk) ends with the chunk's T keys; key j of the chunk is valid iff the
    chunk's query j may see it (its own diagonal), which holds whatever window the base config adds.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"LolcatsCache needs a tensor attention mask (sdpa/eager), got {type(attention_mask).__name__}")
    if attention_mask.dim() == 2:
        return attention_mask[:, -T:].bool().expand(B, T)
    m = attention_mask[:, 0, -T:, -T:]  # (B|1, T, T)
    d = torch.diagonal(m, dim1=-2, dim2=-1)  # (B|1, T)
    return (d if d.dtype == torch.bool else d == 0).expand(B, T)


def chunk_positions(position_ids, B: int, T: int, start: int | None, device) -> torch.Tensor:
    """(B, T) int64 positions of the chunk's tokens; default start, start+1, ..."""
    if position_ids is None:
        if start is None:
            raise ValueError("a call that declares no start (StepMeta.start) must pass position_ids")
        return torch.arange(start, start + T, device=device).expand(B, T)
    return position_ids[..., -T:].to(device=device, dtype=torch.long).expand(B, T)


def step_of(meta: StepMeta, attention_mask, position_ids, B: int, T: int, device) -> Step:
    """What a cached call of T tokens knows, handed to the mixer: positions (``position_ids``, else ``start``,
    ``start`` + 1, ...), valid keys (the mask), whether the state is fresh and the writer's promises."""
    return Step(chunk_positions(position_ids, B, T, meta.start, device), chunk_key_mask(attention_mask, B, T),
                fresh=meta.start == 0, aligned=meta.aligned, may_evict=meta.may_evict)
