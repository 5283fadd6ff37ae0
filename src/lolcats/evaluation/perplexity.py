"""Perplexity of a causal LM: packed chunks (as in training) or one document at a time.

Both modes reduce to scoring *windows*: a window is a token list whose last ``n_target``
tokens are predicted from everything before them in the window. The loss is the mean
negative log-likelihood per predicted token over all windows (token-weighted, not a mean
of per-window means), and ``ppl = exp(loss)``.

* packed: documents are concatenated and cut into chunks of ``seq_len`` tokens (the last,
  shorter chunk is kept); every position but the first of a chunk is predicted, exactly the
  training loss. ``packed_perplexity`` does this for an already packed ``(N, T)`` tensor.
* document: each document is scored on its own. A document longer than ``max_length`` is
  either truncated to its first ``max_length`` tokens, or split into windows that each
  predict ``stride`` new tokens with up to ``max_length - stride`` tokens of context
  (``stride = max_length - 1``, the default, scores every token once with disjoint
  windows, like lm_eval's rolling log-likelihood).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from lolcats.runtime import autocast_context

PplMode = Literal["packed", "document"]
PPL_MODES = ("packed", "document")


@dataclass
class Window:
    """Tokens fed to the model; the last ``n_target`` of them are scored."""

    ids: list[int]
    n_target: int


# ---------------------------------------------------------------- windows


def packed_windows(docs: Sequence[Sequence[int]], seq_len: int) -> list[Window]:
    """Concatenate ``docs`` and cut into chunks of ``seq_len`` (last chunk may be shorter)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    stream = [t for d in docs for t in d]
    chunks = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
    return [Window(c, len(c) - 1) for c in chunks if len(c) >= 2]


def document_windows(doc: Sequence[int], max_length: int, stride: int | None = None,
                     truncate: bool = False) -> list[Window]:
    """Windows that score tokens 1..L-1 of one document once each (see the module docstring)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    doc = list(doc)
    if truncate:
        doc = doc[:max_length]
    if len(doc) < 2:
        return []
    stride = max_length - 1 if stride is None else stride
    if not 1 <= stride <= max_length - 1:
        raise ValueError(f"stride must be in [1, max_length - 1] = [1, {max_length - 1}], got {stride}")
    first_end = min(len(doc), max_length)
    windows = [Window(doc[:first_end], first_end - 1)]
    for start in range(first_end, len(doc), stride):  # start: first token this window predicts
        end = min(start + stride, len(doc))
        ctx = max(0, end - max_length)
        windows.append(Window(doc[ctx:end], end - start))
    return windows


# ---------------------------------------------------------------- scoring


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def first_windows(windows: list[Window], limit: int | float | None) -> list[Window]:
    """The first ``limit`` windows (an int), or that share of them (a float < 1, at least one); all when None."""
    if limit is None:
        return windows
    if isinstance(limit, float) and limit < 1:
        limit = max(1, math.ceil(limit * len(windows)))
    if limit < 1:
        raise ValueError(f"--limit must be > 0, got {limit}")
    return windows[:int(limit)]


@torch.no_grad()
def score_windows(model: torch.nn.Module, windows: Sequence[Window], batch_size: int = 8,
                  device: torch.device | str | None = None, pad_id: int = 0,
                  precision: str = "auto", progress: str | None = None) -> tuple[float, int]:
    """(sum of NLL over scored tokens, number of scored tokens).

    Windows are sorted by length and right-padded into batches (B, T); padding sits after
    every scored token, so a causal model needs no attention mask. ``precision``: as the
    trainer's (auto = bf16 autocast on CUDA). ``progress``: a bar of that name on stderr, in windows.
    """
    from tqdm.auto import tqdm

    device = model_device(model) if device is None else torch.device(device)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].ids))
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: one sync at the end
    count = 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(windows), desc=progress, unit="window", disable=progress is None, file=sys.stderr,
               dynamic_ncols=True)
    try:
        for b in range(0, len(order), batch_size):
            batch = [windows[i] for i in order[b:b + batch_size]]
            ids = torch.full((len(batch), len(batch[0].ids)), pad_id, dtype=torch.long)  # (B, T)
            for r, w in enumerate(batch):
                ids[r, :len(w.ids)] = torch.tensor(w.ids)
            ids = ids.to(device)
            with autocast_context(device, precision):
                logits = model(input_ids=ids).logits  # (B, T, V)
            for r, w in enumerate(batch):  # row by row: one (n_target, V) float32 slice at a time
                first = len(w.ids) - 1 - w.n_target  # logits at first..len-2 predict the targets
                pred = logits[r, first:len(w.ids) - 1].float()  # (n_target, V)
                total += F.cross_entropy(pred, ids[r, first + 1:len(w.ids)], reduction="sum").double()
                count += w.n_target
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return float(total), count


def _result(total: float, count: int) -> dict[str, float | int]:
    if count == 0:
        raise ValueError("no tokens to score (every document/chunk has fewer than 2 tokens)")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": count}


def packed_perplexity(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 8,
                      device: torch.device | str | None = None, precision: str = "auto") -> dict[str, float | int]:
    """Mean next-token loss over all positions of packed sequences ``tokens: (N, T)`` LongTensor.

    Returns ``{"loss", "ppl", "tokens"}`` with ``tokens = N * (T - 1)``. The trainer's
    validation (``training.stages.lm_validate``) is this.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (N, T), got shape {tuple(tokens.shape)}")
    windows = [Window(row.tolist(), tokens.shape[1] - 1) for row in tokens]
    return _result(*score_windows(model, windows, batch_size, device, precision=precision))


def token_perplexity(model: torch.nn.Module, docs: Sequence[Sequence[int]], mode: PplMode = "packed",
                     seq_len: int = 1024, batch_size: int = 8, device: torch.device | str | None = None,
                     stride: int | None = None, truncate: bool = False, pad_id: int = 0,
                     limit: int | float | None = None, progress: str | None = None) -> dict[str, float | int]:
    """Perplexity of tokenised documents ``docs: list of token-id lists``.

    ``mode='packed'`` chunks the concatenation into ``seq_len`` tokens; ``mode='document'``
    scores each document alone with ``seq_len`` as the maximum window length. ``limit``: only the
    first windows (:func:`first_windows`); ``progress``: a progress bar's name (stderr).
    """
    if mode == "packed":
        windows = packed_windows(docs, seq_len)
    elif mode == "document":
        windows = [w for d in docs for w in document_windows(d, seq_len, stride, truncate)]
    else:
        raise ValueError(f"unknown perplexity mode {mode!r}; known: {', '.join(PPL_MODES)}")
    windows = first_windows(windows, limit)
    out = _result(*score_windows(model, windows, batch_size, device, pad_id, progress=progress))
    return {**out, "documents": len(docs), "windows": len(windows)}


def read_texts(path: str | Path, fmt: str = "auto", template: str = "alpaca", tokenizer=None,
               hub_split: str = "train") -> list[str]:
    """Documents of a text / Alpaca-style file as strings (through ``lolcats.data``)."""
    from lolcats.data import format_record, read_documents

    return [format_record(r, fmt, template, tokenizer) for r in read_documents(str(path), fmt, hub_split=hub_split)]


def frame_documents(texts: Sequence[str], tokenizer) -> list[list[int]]:
    """Token ids of each text framed as in training: ``[bos if the tokenizer adds one] + ids + [eos]``."""
    from lolcats.data import framing, tokenize_documents

    prefix, eos = framing(tokenizer)
    out = []
    for ids in tokenize_documents(list(texts), tokenizer):
        head = prefix if prefix and ids[:len(prefix)] != prefix else []
        out.append(head + list(ids) + ([] if ids and ids[-1] == eos else [eos]))
    return out


def perplexity(model: torch.nn.Module, tokenizer, source: str | Path | Sequence[str] | Sequence[Sequence[int]],
               mode: PplMode = "packed", seq_len: int = 1024, batch_size: int = 8,
               device: torch.device | str | None = None, fmt: str = "auto", template: str = "alpaca",
               stride: int | None = None, truncate: bool = False, max_documents: int | None = None,
               limit: int | float | None = None, progress: str | None = None) -> dict[str, float | int]:
    """Perplexity on a file (text or Alpaca records), a list of strings, or token-id lists.

    Texts are framed as in training (see :func:`frame_documents`); token-id lists are used
    as they are, and ``tokenizer`` may then be None. ``max_documents``: the first documents only;
    ``limit``: the first windows only (an int, or a share < 1); ``progress``: a progress bar's name.
    Returns ``{"loss": mean NLL per predicted token, "ppl", "tokens", "documents", "windows"}``.
    """
    if isinstance(source, (str, Path)):
        texts: Sequence = read_texts(source, fmt, template, tokenizer)
    else:
        texts = list(source)
    if max_documents is not None:
        texts = texts[:max_documents]
    if texts and isinstance(texts[0], str):
        docs = frame_documents(list(texts), tokenizer)
    else:
        docs = [list(d) for d in texts]
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    return token_perplexity(model, docs, mode, seq_len, batch_size, device, stride, truncate, pad_id, limit, progress)
