"""A layer's per-sequence state, declared once: the cache and the serving slots allocate from the declaration.

A layer that keeps a state between calls (a student mixer, ``attention/mixers``; a kept softmax layer's
key/value store) declares it as a :class:`StateSpec`: one :class:`StateField` per tensor, with its name,
the shape of one sequence's tensor (the batch dimension left out), its dtype and the value an empty state
holds (0; -1 for a position: "nothing here"). :meth:`StateSpec.allocate` makes the tensors for a batch of
sequences, a :class:`LayerState`, which :meth:`LayerState.reset` empties again in place.

A :class:`LayerState` subclass is a dataclass of batch-first tensors ``(B, *shape)`` named as the spec's
fields, in its order; a field's empty value is part of the class (:func:`state_field`), so a state resets
itself without its spec, and :meth:`LayerState.declare` builds the spec from the class and the shapes.

This is the declaration vLLM asks of a hybrid (Mamba-style) layer: ``MambaBase.get_state_shape()`` is
``spec.shapes()``, ``get_state_dtype()`` is ``spec.dtypes()`` (docs/SERVING.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

EMPTY = "empty"  # the metadata key of a field's empty value


def state_field(empty: int | float = 0):
    """A :class:`LayerState` field whose empty state holds ``empty`` everywhere."""
    return dataclasses.field(metadata={EMPTY: empty})


@dataclass(frozen=True)
class StateField:
    name: str
    shape: tuple[int, ...]  # one sequence's tensor: the batch dimension left out
    dtype: torch.dtype
    empty: int | float = 0  # what an empty state holds

    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class StateSpec:
    """A layer's per-sequence state: its tensors (``fields``, in order) and the class that holds them."""

    state: type  # a LayerState subclass
    fields: tuple[StateField, ...]

    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-sequence shapes, in field order: vLLM's ``get_state_shape()``."""
        return tuple(f.shape for f in self.fields)

    def dtypes(self) -> tuple[torch.dtype, ...]:
        """Dtypes, in field order: vLLM's ``get_state_dtype()``."""
        return tuple(f.dtype for f in self.fields)

    def nbytes(self) -> int:
        """Bytes of one sequence's state."""
        return sum(f.nbytes() for f in self.fields)

    def allocate(self, batch_size: int, device=None) -> LayerState:
        """An empty state for ``batch_size`` sequences."""
        return self.state(**{f.name: torch.full((batch_size, *f.shape), f.empty, dtype=f.dtype, device=device)
                             for f in self.fields})

    def allocate_stack(self, layers: int, batch_size: int, device=None) -> StateStack:
        """Empty states of ``layers`` layers for ``batch_size`` sequences each, in one tensor per field."""
        return StateStack(self, {f.name: torch.full((layers, batch_size, *f.shape), f.empty, dtype=f.dtype,
                                                    device=device) for f in self.fields})


@dataclass
class StateStack:
    """The states of several layers that declare one spec, in one tensor per field, ``(n, B, *shape)``: layer i's
    state is the views ``[i]`` (contiguous, as the kernels need). Whoever moves or empties rows of every layer
    at once (the serving engine) does it in one operation per field instead of one per layer and field."""

    spec: StateSpec
    tensors: dict[str, torch.Tensor]  # {field: (n, B, *shape)}

    def layer(self, i: int) -> LayerState:
        """Layer i's state: views, written in place."""
        return self.spec.state(**{name: t[i] for name, t in self.tensors.items()})

    def reset(self, rows: slice | None = None) -> None:
        """Rows ``rows`` (all when None) of every layer back to the fields' empty values, in place."""
        for f in self.spec.fields:
            t = self.tensors[f.name]
            (t if rows is None else t[:, rows]).fill_(f.empty)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def allocate_stacked(specs: list[StateSpec], batch_size: int,
                     devices: list) -> tuple[list[LayerState], list[StateStack]]:
    """Empty states for layers declaring ``specs`` on ``devices`` (in order), those with equal specs on one device
    stacked: (each layer's state, the stacks in order of their first layer)."""
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(specs, map(torch.device, devices))):
        groups.setdefault(key, []).append(i)
    states: list[LayerState | None] = [None] * len(specs)
    stacks = []
    for (spec, device), idx in groups.items():
        stack = spec.allocate_stack(len(idx), batch_size, device)
        stacks.append(stack)
        for j, i in enumerate(idx):
            states[i] = stack.layer(j)
    return states, stacks


class LayerState:
    """Base of a layer's state: subclasses are dataclasses of batch-first tensors (B, ...), one per field."""

    @classmethod
    def declare(cls, **fields: tuple[tuple[int, ...], torch.dtype]) -> StateSpec:
        """The spec of this state with each field's per-sequence ``(shape, dtype)``; every field must be given."""
        names = [f.name for f in dataclasses.fields(cls)]
        if sorted(names) != sorted(fields):
            raise ValueError(f"{cls.__name__}.declare: fields {sorted(fields)} given, the state has {names}")
        return StateSpec(cls, tuple(StateField(f.name, tuple(fields[f.name][0]), fields[f.name][1],
                                               f.metadata.get(EMPTY, 0)) for f in dataclasses.fields(cls)))

    def tensors(self) -> dict[str, torch.Tensor]:
        """{name: tensor (B, ...)} in field order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors().values())).shape[0]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        """A state of the same class with ``fn`` applied to every tensor."""
        return type(self)(**{n: fn(t) for n, t in self.tensors().items()})

    def rows(self, sl: slice):
        """A view of rows ``sl``: writing it writes this state."""
        return self.map(lambda t: t[sl])

    def reset(self) -> None:
        """Every tensor back to its field's empty value, in place."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).fill_(f.metadata.get(EMPTY, 0))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())
