"""Decode step with a constant-size state: the state (``state``), the eviction every step shares (``evict``),
the reference (``naive``); kernels register in ``lolcats.ops``."""

from lolcats.ops.decode.state import DecodeState

__all__ = ["DecodeState"]
