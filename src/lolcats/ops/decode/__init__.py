"""Decode step with a constant-size state: the reference (``naive``); kernels register in ``lolcats.ops``."""

from lolcats.ops.decode.naive import DecodeState, decode_step_naive, window_slots

__all__ = ["DecodeState", "decode_step_naive", "window_slots"]
