"""Attention modes of a converted model and the distillation outputs its layers hand the trainer.

    set_attention_mode(model, "distill")
    with collect_distill_outputs(model) as outs:   # list[DistillOutput], one per layer
        model.model(input_ids)
    with attention_mode(model, "teacher"):         # each layer's mode restored after
        ...
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn

from lolcats.attention.layers import lolcats_modules
from lolcats.attention.module import MODES, DistillOutput, Mode


def set_attention_mode(model: nn.Module, mode: Mode) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; known: {', '.join(MODES)}")
    for m in lolcats_modules(model):
        m.mode = mode


@contextlib.contextmanager
def attention_mode(model: nn.Module, mode: Mode) -> Iterator[None]:
    """``set_attention_mode`` for the duration of a ``with`` block; each layer's mode restored after."""
    before = [(m, m.mode) for m in lolcats_modules(model)]
    set_attention_mode(model, mode)
    try:
        yield
    finally:
        for m, was in before:
            m.mode = was


@contextlib.contextmanager
def collect_distill_outputs(model: nn.Module, xent: bool = False) -> Iterator[list[DistillOutput]]:
    outs: list[DistillOutput] = []
    mods = list(lolcats_modules(model))
    for m in mods:
        m.collector, m.collect_xent = outs, xent
    try:
        yield outs
    finally:
        for m in mods:
            m.collector, m.collect_xent = None, False
