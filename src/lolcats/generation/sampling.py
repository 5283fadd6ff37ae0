"""Picking tokens from logits: greedy, sampled (Gumbel-max, top-p), OpenAI's penalties and log-probabilities, and
the per-row seeded noise the serving engine samples with. All graph-safe (no host reads).

A request's sampling parameters are a :class:`Sampling`; a step serves a batch in one variant (``MODES``: greedy <
sample < top_p < full, :func:`batch_mode`), the cheapest that serves every row. ``generation/runner.py`` picks
with them over its per-row buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("greedy", "sample", "top_p", "full")  # sampling variants of a step (graphs are kept per variant)
TOP_LOGPROBS = 20  # most likely tokens a full step records per row (OpenAI's top_logprobs limit)


def pick_tokens(logits: torch.Tensor, temperature: float | torch.Tensor, top_p: float | torch.Tensor,
                uniform: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,): greedy when temperature <= 0, else sampled (graph-safe).

    ``temperature`` and ``top_p`` are floats, or (B,) tensors of per-row values (rows whose
    temperature is <= 0 take the argmax). ``uniform`` (B, V) in (0, 1) is the noise to sample with
    (default ``torch.rand_like``), e.g. drawn per row from a request's seed.
    """
    per_row = isinstance(temperature, torch.Tensor)
    if not per_row and temperature <= 0:
        return logits.argmax(-1)
    scaled = logits.float() / (temperature.float().clamp_min(1e-6)[:, None] if per_row else temperature)
    if isinstance(top_p, torch.Tensor) or top_p < 1.0:
        keep = top_p.float()[:, None] if isinstance(top_p, torch.Tensor) else top_p
        srt, idx = scaled.sort(-1, descending=True)
        p = srt.softmax(-1)
        drop = (p.cumsum(-1) - p) > keep  # keep the smallest prefix whose mass reaches top_p
        scaled = torch.full_like(scaled, float("-inf")).scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    u = torch.rand_like(scaled) if uniform is None else uniform
    picked = (scaled - torch.log(-torch.log(u.clamp(1e-20, 1.0)))).argmax(-1)
    return torch.where(temperature <= 0, logits.argmax(-1), picked) if per_row else picked


def penalize(logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor,
             presence: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: logits (B, V) - counts * frequency - (counts > 0) * presence, in float32.

    ``counts`` (B, V): how often each token was generated so far; ``frequency``, ``presence`` (B,). Rows
    whose penalties are 0 keep their logits exactly (only upcast), so their argmax does not move.
    """
    penalty = counts * frequency[:, None] + (counts > 0).float() * presence[:, None]  # (B, V)
    return logits.float() - penalty


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    """logits (B, V), the picked tokens (B,) -> (their log-probabilities (B,), the ``k`` most likely tokens'
    log-probabilities (B, k) in descending order, their ids (B, k)), all of the model's distribution."""
    lp = logits.float().log_softmax(-1)  # (B, V)
    top = lp.topk(k, dim=-1)
    return lp.gather(1, tokens[:, None])[:, 0], top.values, top.indices


# ---------------------------------------------------------------- per-row seeded noise

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) without overflowing int64 (c split in 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash with good avalanche (Wellons' lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seeded_uniform(seed: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """seed, counter (B,) int64 -> (B, V) float32 uniform in (0, 1), a pure function of its inputs.

    24 bits per draw, so no value rounds to 1.0 (which would give a Gumbel draw of +inf).
    """
    row = _mix32(_mix32(seed & _M32) ^ (counter & _M32))  # (B,)
    salt = _mix32(row ^ 0x5BD1E995)
    col = torch.arange(vocab, device=seed.device)
    x = _mix32(_mix32(row[:, None] ^ col[None, :]) ^ salt[:, None])  # (B, V)
    return ((x >> 8).float() + 0.5) * (1.0 / 2**24)


@dataclass
class Sampling:
    """One request's sampling parameters."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None  # most likely tokens to report with each token's log-probability; None: none

    @property
    def mode(self) -> str:
        if self.frequency_penalty or self.presence_penalty or self.logprobs is not None:
            return "full"
        return "greedy" if self.temperature <= 0 else ("top_p" if self.top_p < 1.0 else "sample")


def batch_mode(params: list[Sampling]) -> str:
    """The cheapest step variant that serves every row: greedy < sample < top_p < full."""
    return max((p.mode for p in params), key=MODES.index, default="greedy")
