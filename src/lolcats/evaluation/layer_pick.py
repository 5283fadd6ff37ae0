"""Which converted layers to keep as softmax attention: the KL drop when one layer is restored.

The stage-1 MSE pick keeps the layers attention transfer fits worst, which need not be the layers a converted
model loses its retrieval in. This pick measures that loss directly, on recall prompts (``evaluation.recall``):

1. the teacher (every layer softmax) answers each prompt greedily (``answer_tokens`` new tokens);
2. with prompt + answer teacher-forced, KL(teacher || model) is summed over the answer's tokens, once with every
   converted layer in student mode (``KL_all``) and once per converted layer ``l`` with only ``l`` restored to
   softmax (``KL_l``);
3. a layer's score is its drop ``KL_all - KL_l`` averaged over the prompts: the layers whose restoration brings
   the converted model's answer closest to the teacher's score highest.

This is the KL-guided selection of fla-org/hybrid-distillation (arXiv 2512.20569), scored where retrieval happens
(the answer tokens of needle prompts) rather than over whole documents. Cost: one short greedy answer per prompt,
then (converted layers + 1) forwards per prompt. Shapes: ids (1, T); log-probs (1, A, V) for A answer tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from lolcats.attention.layers import lolcats_attention_by_layer
from lolcats.attention.modes import attention_mode
from lolcats.evaluation.recall import RecallSample
from lolcats.evaluation.perplexity import model_device
from lolcats.runtime import autocast_context


def _answer_logprobs(model: torch.nn.Module, ids: torch.Tensor, answer_len: int) -> torch.Tensor:
    """ids (1, T) with the answer's ``answer_len`` tokens last -> log-probs (1, answer_len, V) of the positions
    that predict them (float32)."""
    with autocast_context(ids.device, "auto"):
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=answer_len + 1).logits
    return logits[:, :-1].float().log_softmax(-1)


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> float:
    """Sum over positions of KL(teacher || student) between log-probs (1, A, V)."""
    return float(F.kl_div(student, teacher, log_target=True, reduction="sum"))


@torch.no_grad()
def teacher_answers(model: torch.nn.Module, samples: Sequence[RecallSample], answer_tokens: int = 8
                    ) -> list[torch.Tensor]:
    """Each prompt with the teacher's greedy answer appended: (1, T + answer_tokens) ids per sample."""
    device, out = model_device(model), []
    for s in samples:
        ids = torch.tensor([s.ids], device=device)
        for _ in range(answer_tokens):  # greedy, no cache: the probe's prompts are few and the answers short
            with autocast_context(device, "auto"):
                nxt = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        out.append(ids)
    return out


@torch.no_grad()
def restore_kl_scores(model: torch.nn.Module, samples: Sequence[RecallSample], answer_tokens: int = 8
                      ) -> dict[int, float]:
    """{converted layer: mean KL drop when it alone is restored to softmax} on ``samples`` (see the module
    docstring). The layers' modes are put back as they were; the model is left in its training state."""
    mods = {i: m for i, m in lolcats_attention_by_layer(model).items() if m.converted}
    if not mods or not samples:
        raise ValueError("restore_kl_scores needs converted layers and at least one recall prompt")
    was_training = model.training
    model.eval()
    drops = dict.fromkeys(mods, 0.0)
    try:
        with attention_mode(model, "teacher"):
            forced = teacher_answers(model, samples, answer_tokens)
            teachers = [_answer_logprobs(model, ids, answer_tokens) for ids in forced]  # (1, A, V) each
        with attention_mode(model, "student"):
            for ids, teacher in zip(forced, teachers):
                base = _kl(teacher, _answer_logprobs(model, ids, answer_tokens))
                for i, m in mods.items():
                    m.mode = "teacher"
                    drops[i] += base - _kl(teacher, _answer_logprobs(model, ids, answer_tokens))
                    m.mode = "student"
    finally:
        model.train(was_training)
    return {i: d / len(forced) for i, d in sorted(drops.items())}
