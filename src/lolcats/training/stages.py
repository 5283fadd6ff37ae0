"""The two LoLCATs stages as :class:`Stage` objects for the shared trainer.

Stage 1, attention transfer: only feature maps and window factors train; each converted layer
matches its softmax teacher (MSE x mse_factor, plus optional attention cross-entropy), and the
teacher's output is passed on, so layers learn independently. The LM head is never run.

Stage 2, low-rank adjusting: feature maps frozen; LoRA (peft) on q/k/v/o; next-token loss, KL to
the teacher's logits, or a mix (``finetune.loss``, :mod:`lolcats.training.kl`); validated by the
next-token loss either way (so stages compare), plus the KL when it is trained.

Between them, ``attention.softmax_count`` keeps some converted layers as softmax attention: those
stage 1 transferred worst (:func:`layer_mse`) or another score's best, picked by :func:`top_layers`.
"""

from __future__ import annotations

from typing import Callable

import torch

from lolcats.attention.modes import collect_distill_outputs, set_attention_mode
from lolcats.attention.params import attention_parameters, set_attention_trainable, stage1_checkpoint_names
from lolcats.config import Config, FinetuneConfig
from lolcats.models.lora import lora_checkpoint_names, lora_parameters
from lolcats.runtime import autocast_context
from lolcats.training.kl import kl_to_teacher, kl_validate, teacher_logits
from lolcats.training.trainer import Stage

MSE_LOG = "mse/"  # + layer index: a layer's attention-transfer MSE in the stage-1 logs and metrics


def _batches(data: torch.Tensor, size: int):
    for i in range(0, len(data), size):
        yield data[i:i + size]


def distill_loss(model, batch: torch.Tensor, cfg: Config, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over layers of (mse_factor * MSE + xent_factor * xent); per-layer MSE in the logs."""
    d = cfg.distill
    with collect_distill_outputs(model, xent=d.xent_factor > 0) as outs, autocast_context(device, d.precision):
        model(input_ids=batch, use_cache=False, logits_to_keep=1)  # the root call, so FSDP units run; LM head on 1 token
    return aggregate_distill_outputs(outs, cfg)


def aggregate_distill_outputs(outs: list, cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The stage-1 loss from the layers' DistillOutputs: mean over layers, per-layer MSE logged.

    Logs are 0-dim tensors (no host sync here, so the step can be captured in a CUDA graph)."""
    d = cfg.distill
    if not outs:
        raise RuntimeError("no converted attention layer reported a distillation loss")
    mse = torch.stack([o.mse for o in outs])
    loss = d.mse_factor * mse.mean()
    logs = {f"{MSE_LOG}{o.layer_idx}": o.mse.detach() for o in outs}
    if d.xent_factor > 0:
        xent = torch.stack([o.xent for o in outs])
        loss = loss + d.xent_factor * xent.mean()
        logs["xent"] = xent.mean().detach()
    return loss, logs


def distill_validate(model, val: torch.Tensor, cfg: Config, device, batch_size: int,
                     loss_fn: Callable | None = None) -> tuple[float, dict]:
    """Mean stage-1 loss and per-layer logs over ``val`` rows (token ids (M, T), or whatever
    ``loss_fn(batch) -> (loss, logs)`` takes; default :func:`distill_loss`)."""
    loss_fn = loss_fn or (lambda b: distill_loss(model, b, cfg, device))
    set_attention_mode(model, "distill")
    model.eval()
    tot, per_layer, n = 0.0, {}, 0
    with torch.no_grad():
        for b in _batches(val, batch_size):
            loss, logs = loss_fn(b.to(device))
            tot += float(loss) * len(b)
            for k, v in logs.items():
                per_layer[k] = per_layer.get(k, 0.0) + float(v) * len(b)
            n += len(b)
    n = max(n, 1)
    return tot / n, {k: v / n for k, v in per_layer.items()}


def lm_loss(model, batch: torch.Tensor, precision: str, device) -> torch.Tensor:
    with autocast_context(device, precision):
        out = model(input_ids=batch, labels=batch, use_cache=False)
    return out.loss.float()


def finetune_loss(model, batch: torch.Tensor, f: FinetuneConfig, device) -> tuple[torch.Tensor, dict]:
    """The stage-2 loss ``f.loss`` on token ids (B, T): ce, kl (to the teacher's logits) or
    (1 - kl_weight) * ce + kl_weight * kl; the terms logged as 0-dim tensors."""
    if f.loss == "ce":
        return lm_loss(model, batch, f.precision, device), {}
    teacher = teacher_logits(model, batch, f.precision, device)  # first: the student pass is what backward sees
    with autocast_context(device, f.precision):
        out = model(input_ids=batch, labels=batch if f.loss == "mix" else None, use_cache=False)
    kl = kl_to_teacher(out.logits, teacher, f.kl_temperature)
    if f.loss == "kl":
        return kl, {"kl": kl.detach()}
    ce = out.loss.float()
    return (1 - f.kl_weight) * ce + f.kl_weight * kl, {"kl": kl.detach(), "ce": ce.detach()}


def lm_validate(model, val: torch.Tensor, precision: str, device, batch_size: int) -> tuple[float, dict]:
    """Mean next-token loss over all predicted positions of the packed rows ``val: (N, T)``, and its
    perplexity (evaluation's ``packed_perplexity``, in the stage's precision)."""
    from lolcats.evaluation.perplexity import packed_perplexity

    r = packed_perplexity(model, val, batch_size, device, precision)
    return r["loss"], {"ppl": r["ppl"]}


def distill_stage(model, cfg: Config, val: torch.Tensor, device, meta: dict) -> Stage:
    set_attention_trainable(model, True, cfg.attention.train_window_factor)
    params = {n: p for n, p in attention_parameters(model).items() if p.requires_grad}

    def loss(batch):
        set_attention_mode(model, "distill")
        model.train()
        return distill_loss(model, batch, cfg, device)

    return Stage("distill", model, params, loss,
                 lambda: distill_validate(model, val, cfg, device, cfg.distill.micro_batch_size),
                 cfg.distill, stage1_checkpoint_names(model, cfg.attention.train_window_factor), meta,
                 sum(p.numel() for p in model.parameters()))


def layer_mse(metrics: dict) -> dict[int, float]:
    """{layer: stage-1 validation MSE} from a stage-1 checkpoint's metrics (``mse/<layer>``)."""
    return {int(k[len(MSE_LOG):]): float(v) for k, v in metrics.items() if k.startswith(MSE_LOG)}


def top_layers(scores: dict[int, float], count: int, what: str = "scores") -> list[int]:
    """The ``count`` layers with the largest ``scores``, sorted; ties go to the lower index."""
    if count > len(scores):
        raise ValueError(f"attention.softmax_count: {count} layers asked for, but there are {what} for "
                         f"{len(scores)} layers")
    return sorted(sorted(scores, key=lambda i: (-scores[i], i))[:count])


def finetune_stage(model, cfg: Config, val: torch.Tensor, device, meta: dict) -> Stage:
    set_attention_mode(model, "student")
    f = cfg.finetune

    def loss(batch):
        model.train()
        return finetune_loss(model, batch, f, device)

    def validate():
        val_loss, metrics = lm_validate(model, val, f.precision, device, f.micro_batch_size)
        if f.loss != "ce":
            metrics["kl"] = kl_validate(model, val, f, device, f.micro_batch_size)
        return val_loss, metrics

    return Stage("finetune", model, lora_parameters(model), loss, validate,
                 f, lora_checkpoint_names(model), meta, sum(p.numel() for p in model.parameters()))
