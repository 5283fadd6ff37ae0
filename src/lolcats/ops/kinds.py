"""The attention kinds, defined once: names, the integer ids the kernels take, window slots."""

from __future__ import annotations

from typing import Literal

Kind = Literal["linear", "sliding_window", "terraced_window"]
KIND_IDS: dict[str, int] = {"linear": 0, "sliding_window": 1, "terraced_window": 2}


def kind_id(kind: str) -> int:
    """The kernels' integer for ``kind``; an unknown name lists the known ones."""
    if kind not in KIND_IDS:
        raise ValueError(f"unknown attention kind {kind!r}; known: {', '.join(KIND_IDS)}")
    return KIND_IDS[kind]


def window_slots(kind: str, window_size: int) -> int:
    """Slots of a decode state's window buffer: 0 (linear), w (sliding), 2w (terraced)."""
    return (0, window_size, 2 * window_size)[kind_id(kind)]
