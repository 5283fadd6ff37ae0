"""Stage 2 against the teacher's logits: KL from the base model's next-token distribution.

The teacher is the same model with its LoRA adapters off and every layer in softmax (teacher)
mode, i.e. the base model; no second copy is held. Per micro-batch:

    with torch.no_grad(), model.disable_adapter(), attention_mode(model, "teacher"):
        t = model(batch).logits                      # (B, T, V), the base model
    s = model(batch).logits                          # adapters on, student attention
    kl = tau^2 * mean over predicted positions of KL(softmax(t / tau) || softmax(s / tau))

The teacher pass comes first and both context managers restore the model before the student
pass, so a recomputing backward (activation checkpointing) and a CUDA-graph replay see the student.
Mode and adapter switches are Python-side state: a captured step records the kernels of both
passes once. The KL runs over rows of positions in chunks, forward and backward
(:class:`ChunkedKL`), so no float32 (B, T, V) copy is kept for the backward.
"""

from __future__ import annotations

import torch

from lolcats.attention.modes import attention_mode
from lolcats.config import FinetuneConfig
from lolcats.runtime import autocast_context

CHUNK_ELEMENTS = 2**24  # logits per chunk (float32: 64 MiB for each temporary)


class ChunkedKL(torch.autograd.Function):
    """sum_i w_i KL(softmax(t_i / tau) || softmax(s_i / tau)) over rows i; student, teacher (N, V), w (N,).

    The gradient with respect to the student logits is w_i (softmax(s_i / tau) - softmax(t_i / tau)) / tau,
    recomputed chunk by chunk in the backward; the teacher gets none."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, tau: float) -> torch.Tensor:
        ctx.save_for_backward(student, teacher, weight)
        ctx.tau = tau
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for sl in _chunks(student):
            lt = (teacher[sl].float() / tau).log_softmax(-1)
            ls = (student[sl].float() / tau).log_softmax(-1)
            total = total + ((lt.exp() * (lt - ls)).sum(-1) * weight[sl]).sum()
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        student, teacher, weight = ctx.saved_tensors
        tau = ctx.tau
        out = torch.empty_like(student)
        for sl in _chunks(student):
            diff = (student[sl].float() / tau).softmax(-1) - (teacher[sl].float() / tau).softmax(-1)
            out[sl] = (diff * (weight[sl, None] * grad / tau)).to(out.dtype)
        return out, None, None, None


def _chunks(x: torch.Tensor):
    rows = max(1, CHUNK_ELEMENTS // max(x.shape[-1], 1))
    for i in range(0, x.shape[0], rows):
        yield slice(i, i + rows)


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau^2 * mean over the predicted positions (all but the last of each row) of the KL from the
    teacher's next-token distribution to the student's. Logits (B, T, V) -> scalar float32."""
    B, T, V = student_logits.shape
    weight = torch.ones(B, T, dtype=torch.float32, device=student_logits.device)
    weight[:, -1] = 0  # the last position predicts nothing inside the row
    total = ChunkedKL.apply(student_logits.reshape(B * T, V), teacher_logits.detach().reshape(B * T, V),
                            weight.view(-1), temperature)
    return total * (temperature**2 / max(B * (T - 1), 1))


@torch.no_grad()
def teacher_logits(model, batch: torch.Tensor, precision: str, device) -> torch.Tensor:
    """The base model's logits (B, T, V): ``model`` (a peft model) with adapters off, softmax attention."""
    with model.disable_adapter(), attention_mode(model, "teacher"), autocast_context(device, precision):
        return model(input_ids=batch, use_cache=False).logits


@torch.no_grad()
def kl_validate(model, val: torch.Tensor, cfg: FinetuneConfig, device, batch_size: int) -> float:
    """Mean KL to the teacher (``kl_to_teacher``, per predicted position) over the rows of ``val`` (N, T)."""
    total, n = 0.0, 0
    for i in range(0, len(val), batch_size):
        b = val[i:i + batch_size].to(device)
        with autocast_context(device, cfg.precision):
            s = model(input_ids=b, use_cache=False).logits
        positions = b.shape[0] * (b.shape[1] - 1)
        t = teacher_logits(model, b, cfg.precision, device)
        total += float(kl_to_teacher(s, t, cfg.kl_temperature)) * positions
        n += positions
    return total / max(n, 1)
