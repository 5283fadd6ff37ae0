"""Inference fusions of the rest of a decoder layer: its RMSNorms in one op each, its SiLU MLP in two GEMMs and one
activation op.

A decoding step at batch 1 is bound by kernel launches. A stock HF decoder layer (Llama, Mistral, Qwen2) runs each
RMSNorm as about eight elementwise kernels and its MLP as five (gate GEMM, up GEMM, SiLU, product, down GEMM).
:func:`fuse_decoder` swaps, in every decoder layer,

* ``input_layernorm`` and ``post_attention_layernorm`` (and the model's final ``norm``) for a :class:`FusedRMSNorm`,
  the backend's ``rms_norm`` on the same weight (``ops/triton/norm.py``: one launch);
* ``mlp`` (gate, up and down plain nn.Linear, SiLU) for a :class:`FusedMLP`: the gate and up weights (and biases)
  become views of one tensor (:func:`~lolcats.attention.qkv.fuse_rows`, as q/k/v do), one GEMM gives both
  (..., 2I), the backend's ``silu_mul`` the activation (``ops/triton/activation.py``: one launch), then down_proj.

Where the layer is HF's Llama, Mistral or Qwen2 decoder layer, its forward becomes :func:`add_norm_forward`, the same
steps with the attention's residual add and the post-attention norm in one launch (the backend's ``add_rms_norm``).
The decode runner, which loops over the layers itself, runs them through :func:`run_layers`: the MLP's residual add
then goes into the next layer's input norm as well.

The fused modules hold the same Parameters and Linear modules (state_dict keys and values unchanged, no copy) and
keep the module they replaced outside the state_dict, so ``fuse_decoder(model, False, ...)`` puts it back. Where a
gradient is wanted they run the reference math, so training through a fused model stays correct; a gate or up
projection replaced later (e.g. wrapped by PEFT) or whose data was swapped (``model.to``) turns the one GEMM off.
``use.set_inference_fusion`` calls :func:`fuse_decoder` with the converted layers' backend.

This module fuses no attention but lives in ``attention/``: beside ``qkv.py``, whose one-GEMM views it reuses, and
``use.py``, its caller, where the other module swaps and use-time settings of a converted model are (``models/``
imports ``attention/``, never the reverse).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN

from lolcats.attention.layers import decoder_stack
from lolcats.attention.qkv import FusedRows, fusable, fused_again, still_fused
from lolcats.ops import get_backend

NORMS = ("input_layernorm", "post_attention_layernorm")  # a decoder layer's RMSNorms
SILU = (nn.SiLU, type(ACT2FN["silu"]))  # the activation modules of hidden_act silu / swish


def wants_grad(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether autograd would need a backward through an op on ``x`` and ``params`` (the kernels have none)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


class FusedRMSNorm(nn.Module):
    """An HF RMSNorm through the backend's ``rms_norm``: x (..., d) -> (..., d); the reference where a gradient is
    wanted. ``weight`` is the replaced module's Parameter itself."""

    def __init__(self, norm: nn.Module, backend: str):
        super().__init__()
        self.weight = norm.weight  # (d,), the same Parameter: state_dict key ``weight``
        self.eps = norm.variance_epsilon
        self.backend = backend
        self.replaced = (norm,)  # in a tuple: outside the state_dict and parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = "torch" if wants_grad(x, self.weight) else self.backend
        return get_backend(name, x).rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this norm of residual + x, residual + x): the residual add before the norm in the same launch."""
        name = "torch" if wants_grad(x, self.weight) or wants_grad(residual) else self.backend
        return get_backend(name, x).add_rms_norm(x, residual, self.weight, self.eps)

    def unfused(self) -> nn.Module:
        """The replaced module, given this one's weight (should it have been replaced meanwhile)."""
        norm = self.replaced[0]
        norm.weight = self.weight
        return norm

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, backend={self.backend!r}"


class FusedMLP(nn.Module):
    """HF's gated MLP with SiLU, ``down_proj(silu(gate_proj(x)) * up_proj(x))``: x (..., d) -> (..., d), with one
    gate/up GEMM and the backend's ``silu_mul`` where no gradient is wanted. Its submodules are the replaced
    MLP's own Linear modules."""

    def __init__(self, mlp: nn.Module, backend: str):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.backend = backend
        self.replaced = (mlp,)  # in a tuple: outside the state_dict
        self.rows: FusedRows | None = None
        self.fuse_gate_up()

    def fuse_gate_up(self) -> bool:
        """Make the gate and up weights (and biases) views of one tensor (2I, d) unless they still are; False
        where the projections are not plain nn.Linear (:func:`fusable`, e.g. PEFT-wrapped)."""
        self.rows = fused_again(self.rows, (self.gate_proj, self.up_proj))
        return self.rows is not None

    def _current_rows(self, x: torch.Tensor) -> FusedRows | None:
        f = self.rows = still_fused(self.rows, (self.gate_proj, self.up_proj))
        if f is None or wants_grad(x, *f.params):  # the fused tensor is not a Parameter: no gradient
            return None
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self._current_rows(x)
        if f is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate_up = F.linear(x, f.weight, f.bias)  # (..., 2I): the gate's outputs, then the up's
        return self.down_proj(get_backend(self.backend, x).silu_mul(gate_up))  # (..., I) -> (..., d)

    def unfused(self) -> nn.Module:
        """The replaced MLP, given this one's projections (should one have been wrapped meanwhile)."""
        mlp = self.replaced[0]
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = self.gate_proj, self.up_proj, self.down_proj
        return mlp


def add_norm_forward(layer: nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """HF's decoder layer forward (Llama, Mistral, Qwen2: ``h = x + attn(norm1(x)); return h + mlp(norm2(h))``),
    the attention's residual add and ``norm2`` in one op (:meth:`FusedRMSNorm.add`). The layer's keyword
    arguments go to its attention as HF's forward passes them; a positional one past ``hidden_states`` runs the
    class's own forward."""
    if args:
        return type(layer).forward(layer, hidden_states, *args, **kwargs)
    return run_layers((layer,), hidden_states, **kwargs)


def runs_add_norm(layer: nn.Module) -> bool:
    """Whether the layer's own forward is :func:`add_norm_forward` (set by :func:`fuse_decoder`)."""
    return getattr(layer.__dict__.get("forward"), "func", None) is add_norm_forward


def carries_residual(layers) -> bool:
    """Whether :func:`run_layers` may run ``layers``: each one runs :func:`add_norm_forward`, both its norms are
    still fused, and no forward hook would be skipped."""
    return len(layers) > 0 and all(
        runs_add_norm(layer) and all(isinstance(getattr(layer, n), FusedRMSNorm) for n in NORMS)
        and not layer._forward_hooks and not layer._forward_pre_hooks for layer in layers)


def run_layers(layers, h: torch.Tensor, **kwargs) -> torch.Tensor:
    """The decoder layers as :func:`add_norm_forward` runs each, the residual carried from one layer to the next: a
    layer's MLP output and the residual are added by the next layer's input norm in its launch
    (:meth:`FusedRMSNorm.add`), the last layer's add is a plain one. h (b, T, d) -> (b, T, d), the stack's output
    before its final norm, as ``for layer in layers: h = layer(h, **kwargs)`` gives it (:func:`carries_residual`)."""
    residual, x = h, layers[0].input_layernorm(h)
    for i, layer in enumerate(layers):
        a, _ = layer.self_attn(hidden_states=x, **kwargs)
        x, residual = layer.post_attention_layernorm.add(a, residual)
        m = layer.mlp(x)
        if i + 1 < len(layers):
            x, residual = layers[i + 1].input_layernorm.add(m, residual)
    return residual + m


def is_rms_norm(m: nn.Module | None) -> bool:
    """An HF RMSNorm (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm): ``weight`` and ``variance_epsilon``, no
    accelerate hook (which a swap would drop)."""
    return (type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), nn.Parameter)
            and hasattr(m, "variance_epsilon") and not hasattr(m, "_hf_hook"))


def is_silu_mlp(m: nn.Module | None) -> bool:
    """HF's gated MLP (LlamaMLP and its copies) with a SiLU activation, plain nn.Linear gate and up, no accelerate
    hook."""
    names = ("gate_proj", "up_proj", "down_proj")
    if hasattr(m, "_hf_hook") or not all(isinstance(getattr(m, n, None), nn.Module) for n in names):
        return False
    return type(getattr(m, "act_fn", None)) in SILU and fusable((m.gate_proj, m.up_proj))


def fuse_decoder(model: nn.Module, on: bool, backend: str) -> None:
    """Every decoder layer's RMSNorms and SiLU MLP, and the final norm, fused (``on``) for inference through
    ``backend``'s ops, or the replaced modules put back. Fusing twice (or unfusing an unfused model) is a no-op but
    for the backend name, and a gate/up whose views were lost (``model.to``) is fused again."""
    stack = decoder_stack(model)
    for layer in stack.layers:
        for name in NORMS:
            _swap_norm(layer, name, on, backend)
        _swap_mlp(layer, on, backend)
        _swap_forward(layer, on)
    _swap_norm(stack, "norm", on, backend)


ADD_NORM_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")  # add_norm_forward's form


def _swap_forward(layer: nn.Module, on: bool) -> None:
    """The instance's forward set to :func:`add_norm_forward` (on, where the layer is one of ADD_NORM_LAYERS with a
    fused post-attention norm and no accelerate hook), else its class's again."""
    ours = runs_add_norm(layer)
    fits = (type(layer).__name__ in ADD_NORM_LAYERS and not hasattr(layer, "_hf_hook")
            and all(isinstance(getattr(layer, n, None), FusedRMSNorm) for n in NORMS))
    if on and fits and not ours:  # a partial, not a bound method: a model saved whole (pickled) loads again
        layer.forward = functools.partial(add_norm_forward, layer)
    elif ours and not (on and fits):
        del layer.forward


def _swap_norm(parent: nn.Module, name: str, on: bool, backend: str) -> None:
    norm = getattr(parent, name, None)
    if isinstance(norm, FusedRMSNorm):
        if on:
            norm.backend = backend
        else:
            setattr(parent, name, norm.unfused())
    elif on and is_rms_norm(norm):
        setattr(parent, name, FusedRMSNorm(norm, backend))


def _swap_mlp(layer: nn.Module, on: bool, backend: str) -> None:
    mlp = getattr(layer, "mlp", None)
    if isinstance(mlp, FusedMLP):
        if on:
            mlp.backend = backend
            mlp.fuse_gate_up()
        else:
            layer.mlp = mlp.unfused()
    elif on and is_silu_mlp(mlp):
        layer.mlp = FusedMLP(mlp, backend)
