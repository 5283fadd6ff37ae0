"""One GEMM for projections of one input: their weights (and biases) as views of one tensor.

``LolcatsAttention.fuse_qkv`` concatenates q_proj, k_proj and v_proj's weights along dim 0 into one
tensor ((H + 2 Hk) D, d_model) and re-points each Parameter at its rows (:func:`fuse_rows`, :func:`share_rows`):
the state_dict keeps its keys and values and no memory is added. The MLP's gate and up projections are fused the
same way (``attention/fusion.py``). :class:`FusedRows` remembers what was fused, so the module can tell when it no
longer holds (a projection replaced, e.g. wrapped by PEFT, or a Parameter's data swapped, e.g. by ``model.to``)
and then runs the projections' GEMMs as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True, eq=False)
class FusedRows:
    """Projections' weights (and biases) as one tensor along dim 0; each Parameter is a view of it (:func:`fuse_rows`:
    q/k/v, the MLP's gate/up). Kept only to check that they still are."""

    weight: torch.Tensor  # (sum of the out_features, d_in): ((H + 2 Hk) D, d_model); gate/up (2 I, d_model)
    bias: torch.Tensor | None  # (sum of the out_features,)
    sizes: tuple[int, ...]  # each projection's out_features: H D, Hk D, Hk D; I, I
    projs: tuple[nn.Module, ...]  # the projections when fused
    params: tuple[nn.Parameter, ...]  # their weights, then biases
    ptrs: tuple[int, ...]  # the views' data pointers, in that order

    def current(self, projs: tuple[nn.Module, ...]) -> bool:
        """Whether ``projs`` are still the fused modules, with the view Parameters. The data pointers (a
        ``.data`` swap, e.g. ``model.to``) are checked outside torch.compile only, which cannot trace them."""
        params = [p.weight for p in projs] + [p.bias for p in projs if p.bias is not None]
        same = all(a is b for a, b in zip(projs, self.projs)) and len(params) == len(self.params) and all(
            a is b for a, b in zip(params, self.params))
        return same and (torch.compiler.is_compiling() or tuple(p.data_ptr() for p in params) == self.ptrs)


def fuse_rows(projs: tuple[nn.Module, ...]) -> FusedRows:
    """Make the weights (and biases) of ``projs`` (:func:`fusable`) views of one tensor each, for one GEMM."""
    weight = share_rows(projs, "weight")
    bias = share_rows(projs, "bias") if projs[0].bias is not None else None
    params = tuple(p.weight for p in projs) + (tuple(p.bias for p in projs) if bias is not None else ())
    return FusedRows(weight, bias, tuple(p.weight.shape[0] for p in projs), projs, params,
                     tuple(p.data_ptr() for p in params))


def still_fused(f: FusedRows | None, projs: tuple[nn.Module, ...]) -> FusedRows | None:
    """``f`` while ``projs`` still hold its views; None once one was replaced (e.g. wrapped by PEFT) or its data
    swapped (e.g. by ``model.to``)."""
    return f if f is not None and f.current(projs) else None


def fused_again(f: FusedRows | None, projs: tuple[nn.Module, ...]) -> FusedRows | None:
    """``f`` if it still holds, else ``projs`` fused now (:func:`fuse_rows`), or None where they are not
    :func:`fusable`."""
    return still_fused(f, projs) or (fuse_rows(projs) if fusable(projs) else None)


def share_rows(projs: tuple[nn.Module, ...], name: str) -> torch.Tensor:
    """The modules' tensors ``name`` concatenated along dim 0; each module's Parameter re-pointed at its view."""
    old = [getattr(p, name) for p in projs]
    with torch.no_grad():
        cat = torch.cat([t.detach() for t in old])
    for p, t, view in zip(projs, old, cat.split([t.shape[0] for t in old])):
        setattr(p, name, nn.Parameter(view, requires_grad=t.requires_grad))
    return cat


def fusable(projs: tuple[nn.Module, ...]) -> bool:
    """Plain nn.Linear (not a PEFT or quantized wrapper, no accelerate hook) with plain weights of one dtype and
    device, all or no biases."""
    if not all(type(p) is nn.Linear and not hasattr(p, "_hf_hook") for p in projs):
        return False
    ts = [p.weight for p in projs] + [p.bias for p in projs if p.bias is not None]
    one_kind = len({(t.dtype, t.device) for t in ts}) == 1 and all(type(t.data) is torch.Tensor for t in ts)
    biases = sum(p.bias is not None for p in projs)
    return one_kind and not ts[0].is_meta and biases in (0, len(projs))
