"""Registers an ``fla`` backend (flash-linear-attention's chunked kernel), linear kind only, and fla's gated
delta rule kernels in it and in the ``triton`` backend (``pip install lolcats[delta]``).

Not chosen by ``auto``; import failure (no ``fla``) is harmless. fla's own ``normalize`` uses
another epsilon and ignores an initial state's key sum, so the normaliser is computed here
exactly: a ones column appended to v makes column Dv of the output fq_i . z_i (plus a zero column
when Dv + 1 is odd: fla's bf16 backward needs an even value width).
Hybrid calls fall back to the reference (fla has no LoLCATs window); the decode step is the
Triton one (fla has no decode kernel, and needs triton itself); gated linear attention (a
``log_gate``) runs the Triton kernel too.

The gated delta rule (``Backend.gated_delta``, ``ops/delta/naive.py``; the ``gated_delta`` mixer) runs
``chunk_gated_delta_rule`` (a chunk) or ``fused_recurrent_gated_delta_rule`` (a decode step, T = 1) on CUDA
tensors, here and in the ``triton`` backend (what ``auto`` picks on CUDA): fla takes (B, T, H, .) tensors with
as many key heads as query heads, so each KV head is repeated for its query group (the state too) and the
final state is one head of each group; CPU tensors take the reference. fla 0.6 refuses the gated chunk kernel's
backward on Hopper GPUs with Triton >= 3.4.0, < 3.7.1 unless tilelang is installed (wrong gradients there, fla
issue #640): there a call that needs gradients takes the reference (forward and backward; one warning), and a
call without them still runs fla's forward.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging

import torch
import triton
from packaging import version
import torch.nn.functional as F
from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from fla.ops.linear_attn import chunk_linear_attn

from lolcats.ops import BACKENDS, Backend, register_backend
from lolcats.ops.common import EPS, State, expand_kv_heads
from lolcats.ops.triton import linear_attention_triton
from lolcats.ops.triton.decode import decode_step_triton


def fla_linear(
    fq: torch.Tensor,  # (B, H, T, F)
    fk: torch.Tensor,  # (B, Hk, T, F)
    v: torch.Tensor,  # (B, Hk, T, Dv)
    initial_state: State | None = None,
    output_final_state: bool = False,
    log_gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State | None]:
    if log_gate is not None:
        return linear_attention_triton(fq, fk, v, initial_state, output_final_state, log_gate)
    H, Hk, Dv = fq.shape[1], fk.shape[1], v.shape[-1]
    dt = v.dtype
    pad = (0, 1 - Dv % 2)  # a zero column keeps the value width even
    v1 = F.pad(torch.cat([v, torch.ones_like(v[..., :1])], -1), pad)  # (B, Hk, T, Dv + 1 or Dv + 2)
    q_, k_, v_ = (expand_kv_heads(t, H).to(dt).transpose(1, 2) for t in (fq, fk, v1))  # (B, T, H, .)
    h0 = None
    if initial_state is not None:
        s0 = F.pad(torch.cat([initial_state[0], initial_state[1][..., None]], -1), pad)
        h0 = expand_kv_heads(s0.float(), H)  # (B, H, F, Dv + 1 or Dv + 2)
    o, hT = chunk_linear_attn(q_, k_, v_, scale=1.0, initial_state=h0, output_final_state=output_final_state,
                              normalize=False)
    o = o.transpose(1, 2).float()  # (B, H, T, Dv + 1 or Dv + 2)
    y = (o[..., :Dv] / (o[..., Dv : Dv + 1] + EPS)).to(dt)
    if not output_final_state:
        return y, None
    hT = hT[:, :: H // Hk].float()  # (B, Hk, F, Dv + 1 or Dv + 2): one head of each group
    return y, (hT[..., :Dv], hT[..., Dv])


def fla_gated_delta(
    q: torch.Tensor,  # (B, H, T, Dk)
    k: torch.Tensor,  # (B, Hk, T, Dk), L2-normalised
    v: torch.Tensor,  # (B, Hk, T, Dv)
    g: torch.Tensor,  # (B, Hk, T) log decay
    beta: torch.Tensor,  # (B, Hk, T)
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,  # (B, Hk, Dk, Dv) float32
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's gated delta rule kernels with the reference's head-first, grouped-query interface."""
    H, Hk, T, dt = q.shape[1], k.shape[1], q.shape[2], v.dtype
    seq = lambda x: expand_kv_heads(x, H).transpose(1, 2).contiguous()  # noqa: E731  (B, T, H, .)
    h0 = None if initial_state is None else expand_kv_heads(initial_state.float(), H)  # (B, H, Dk, Dv)
    op = fused_recurrent_gated_delta_rule if T == 1 else chunk_gated_delta_rule
    o, hT = op(q=q.to(dt).transpose(1, 2).contiguous(), k=seq(k.to(dt)), v=seq(v), g=seq(g.float()),
               beta=seq(beta.to(dt)), scale=scale, initial_state=h0, output_final_state=output_final_state)
    o = o.transpose(1, 2).to(dt)  # (B, H, T, Dv)
    return o, (hT[:, :: H // Hk].float() if output_final_state else None)


log = logging.getLogger(__name__)


def fla_backward_ok(capability: tuple[int, int], triton_version: str, tilelang: bool) -> bool:
    """Whether fla runs its gated chunk kernel's backward on a GPU of CUDA ``capability`` with this Triton: fla 0.6
    refuses it on Hopper (9.x) with Triton >= 3.4.0, < 3.7.1 (wrong gradients, fla issue #640) unless tilelang is
    installed (then it dispatches there)."""
    bad = version.parse("3.4.0") <= version.parse(triton_version) < version.parse("3.7.1")
    return tilelang or capability[0] != 9 or not bad


@functools.cache
def _backward_ok(device: torch.device) -> bool:
    ok = fla_backward_ok(torch.cuda.get_device_capability(device), triton.__version__,
                         importlib.util.find_spec("tilelang") is not None)
    if not ok:
        log.warning("fla's gated delta rule backward does not run on this GPU with Triton %s (fla issue #640): "
                    "training calls take the PyTorch reference (slower); Triton >= 3.7.1 or `pip install tilelang` "
                    "lifts this", triton.__version__)
    return ok


def _gated_delta(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """fla's kernels on CUDA tensors (with gradients only where fla runs their backward), the reference elsewhere."""
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (q, k, v, g, beta, initial_state))
    use_fla = q.is_cuda and (not grads or _backward_ok(q.device))
    op = fla_gated_delta if use_fla else BACKENDS["torch"].gated_delta
    return op(q, k, v, g, beta, scale, initial_state, output_final_state)


register_backend(Backend("fla", linear=fla_linear, hybrid=BACKENDS["torch"].hybrid, decode=decode_step_triton,
                         supports=lambda x: x.is_cuda, fused=frozenset({"linear"}), gated_delta=_gated_delta),
                 auto=False)
if "triton" in BACKENDS:  # auto's pick on CUDA has no delta-rule kernel of its own
    register_backend(dataclasses.replace(BACKENDS["triton"], gated_delta=_gated_delta))
