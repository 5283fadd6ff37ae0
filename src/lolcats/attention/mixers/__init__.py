"""Student mixers by name: one variant per file, picked by ``attention.kind``.

A mixer (``mixers/base.py``) declares its per-sequence state and implements a whole sequence, a chunked
prefill and a decode step against it; the layer (``LolcatsAttention``) keeps the projections, feature maps and
modes and hands the attention math to its mixer. A new variant is one new file plus a
:func:`register_mixer` call; the shared contract tests (tests/test_mixers.py) run over every registered one.
"""

from __future__ import annotations

from lolcats.attention.mixers.base import Mixer
from lolcats.attention.mixers.gated_delta import GatedDeltaMixer
from lolcats.attention.mixers.hybrid import HybridMixer
from lolcats.attention.mixers.linear import LinearMixer
from lolcats.attention.step import Step

MIXERS: dict[str, type[Mixer]] = {}


def register_mixer(name: str, mixer: type[Mixer]) -> None:
    """Make ``attention.kind = name`` use ``mixer``."""
    MIXERS[name] = mixer


def get_mixer(name: str) -> type[Mixer]:
    if name not in MIXERS:
        raise ValueError(f"unknown attention kind {name!r}; known: {', '.join(MIXERS)}")
    return MIXERS[name]


register_mixer("linear", LinearMixer)
register_mixer("sliding_window", HybridMixer)
register_mixer("terraced_window", HybridMixer)
register_mixer("gated_delta", GatedDeltaMixer)

__all__ = ["MIXERS", "GatedDeltaMixer", "HybridMixer", "LinearMixer", "Mixer", "Step", "get_mixer", "register_mixer"]
