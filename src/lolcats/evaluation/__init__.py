"""Evaluation: perplexity, LM-Eval-Harness tasks, long-context recall, and base-vs-linearized reports.

``lolcats eval`` (``lolcats.cli``) calls :func:`eval_main` with the model a
:class:`~lolcats.models.trained.ModelSource` names. lm_eval (the optional extra
``lolcats[eval]``) is imported only when tasks are asked for.

    lolcats eval --checkpoint runs/x/finetune-XXXX/best \\
        --ppl ../shared/data/wikitext-2/wiki.test.tokens --ppl-mode document --seq-len 1024 \\
        --tasks piqa,arc_easy,arc_challenge,mmlu --include-path ../shared/data/lm_eval_local \\
        --recall passkey,multikey --recall-lengths 1024,2048,4096 --compare-base --output results.json

Recall (``--recall``, :mod:`lolcats.evaluation.recall`): passkey and RULER-style needle-in-a-haystack
retrieval (natural text, ``--recall-haystack FILE``) at exact token lengths.
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from lolcats.config import UseSettings
from lolcats.evaluation.perplexity import (PPL_MODES, frame_documents, packed_perplexity, perplexity,
                                           token_perplexity)
from lolcats.evaluation.recall import RecallSettings, build_all, evaluate_recall
from lolcats.evaluation.report import DEFAULT_METRICS, compare_table, save_results
from lolcats.models.trained import ModelSource, base_source, load_trained

__all__ = ["EvalSettings", "RecallSettings", "compare_table", "eval_main", "evaluate_model", "evaluate_recall",
           "frame_documents", "packed_perplexity", "perplexity", "save_results", "split_tasks", "token_perplexity"]


@dataclass
class EvalSettings:
    """What ``lolcats eval`` measures, on which device, and where it writes: one field per flag of the command."""

    compare_base: bool = False  # also evaluate the base model (the recorded one, or --base), side by side
    ppl: list[str] = field(default_factory=list)  # files to measure perplexity on (text or Alpaca-style)
    ppl_mode: str = "packed"  # packed: chunks of seq_len as in training; document: each document alone
    seq_len: int = 1024  # chunk length (packed) or window length (document)
    ppl_stride: int | None = None  # document mode: new tokens per window of a long document (seq_len - 1)
    ppl_format: str = "auto"  # auto, alpaca or text
    ppl_template: str = "alpaca"  # alpaca, chat or none
    max_documents: int | None = None  # perplexity on the first N documents only
    tasks: list[str] = field(default_factory=list)  # lm_eval tasks ("piqa,arc_easy" is split)
    num_fewshot: int | None = None
    batch_size: int = 8  # sequences per forward (perplexity and lm_eval)
    limit: int | float | None = None  # documents per lm_eval task, and windows per perplexity file (or a fraction)
    include_path: str | None = None  # folder of local lm_eval task YAMLs
    recall: RecallSettings | None = None  # long-context recall tasks (lolcats.evaluation.recall)
    recall_depth_rows: bool = False  # per-depth recall accuracies as table rows too
    output: str | None = None  # write the results (with these settings and the table) here as JSON
    device: str = "auto"
    dtype: str = "auto"
    print_table: bool = True

    def __post_init__(self):
        self.ppl = list(self.ppl)
        self.tasks = split_tasks(self.tasks)
        if self.recall is not None and not self.recall.tasks:
            self.recall = None

    def check(self) -> None:
        """Everything that can be checked before a model loads."""
        if self.ppl_mode not in PPL_MODES:
            raise ValueError(f"unknown perplexity mode {self.ppl_mode!r}; known: {', '.join(PPL_MODES)}")
        if not self.ppl and not self.tasks and self.recall is None:
            raise ValueError("nothing to evaluate: give --ppl FILE, --tasks and/or --recall")
        for path in self.ppl:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--ppl: no such file: {path}")
        if self.include_path and not Path(self.include_path).is_dir():
            raise FileNotFoundError(f"--include-path: no such directory: {self.include_path}")

    def saved(self) -> dict[str, Any]:
        """These settings as they go into the output JSON."""
        return {k: v for k, v in asdict(self).items() if k not in ("print_table", "output")}


def evaluate_model(model: torch.nn.Module, tokenizer, settings: EvalSettings | None = None,
                   **changes) -> dict[str, dict[str, Any]]:
    """``{task: metrics}`` of one loaded model: ``ppl:<file name>`` entries, lm_eval tasks, then
    ``task@length`` recall entries (their prompts are built first, so a bad length fails at once).
    ``changes``: fields of :class:`EvalSettings` in place of ``settings``' (``evaluate_model(m, tok, ppl=[f])``)."""
    s = dataclasses.replace(settings or EvalSettings(), **changes)
    prompts = build_all(tokenizer, s.recall, model) if s.recall is not None else {}  # lengths checked at once
    out: dict[str, dict[str, Any]] = {}
    for path in s.ppl:
        out[f"ppl:{Path(path).name}"] = perplexity(model, tokenizer, path, s.ppl_mode, s.seq_len, s.batch_size,
                                                   fmt=s.ppl_format, template=s.ppl_template, stride=s.ppl_stride,
                                                   max_documents=s.max_documents, limit=s.limit,
                                                   progress=f"ppl {Path(path).name}")
    if s.tasks:
        from lolcats.evaluation.harness import run_harness

        out.update(run_harness(model, tokenizer, s.tasks, s.num_fewshot, s.batch_size, s.limit, s.include_path))
    if prompts:
        out.update(evaluate_recall(model, tokenizer, s.recall, prompts))
    return out


def split_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """``"piqa,arc_easy"`` or ``["piqa", "arc_easy,mmlu"]`` -> a list of task names."""
    if not tasks:
        return []
    items = tasks.split(",") if isinstance(tasks, str) else [p for t in tasks for p in t.split(",")]
    return [t.strip() for t in items if t.strip()]


def eval_main(source: ModelSource, settings: EvalSettings | None = None, **changes) -> dict[str, Any]:
    """Evaluate the model ``source`` names (and with ``settings.compare_base`` its base model too).
    ``changes``: fields of :class:`EvalSettings` in place of ``settings``' (``eval_main(source, ppl=[f])``).

    Returns ``{label: {task: metrics}}`` with labels ``base`` and/or ``linearized``; writes it
    (with the settings and the table) to ``settings.output`` as JSON and prints the table.
    """
    s = dataclasses.replace(settings or EvalSettings(), **changes)
    s.check()
    runs = []
    if s.compare_base or not source.linearized:
        runs.append(("base", base_source(source)))
    if source.linearized:
        runs.append(("linearized", source))
    results: dict[str, Any] = {}
    models = {label: _describe(src) for label, src in runs}
    for label, src in runs:
        model, tokenizer = load_trained(src, None if s.device == "auto" else s.device, s.dtype)
        models[label].update(_settings_used(model))
        results[label] = evaluate_model(model, tokenizer, s)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    shown = [f"ppl:{Path(p).name}" for p in s.ppl] + s.tasks + (s.recall.names() if s.recall else [])
    metrics = DEFAULT_METRICS + tuple(s.recall.depth_metrics() if s.recall and s.recall_depth_rows else ())
    table = compare_table(results, metrics=metrics, tasks=shown)
    if s.output:
        save_results(s.output, results, table=table, models=models, settings=s.saved(), versions=_versions())
    if s.print_table:
        print(table)
    return results


def _describe(source: ModelSource) -> dict[str, Any]:
    """The source's given fields, its use flags among them (``sparse_cache``: what the command asked for)."""
    given = {**vars(source), **asdict(source.use)}
    return {k: v for k, v in given.items() if v not in (None, False) and k not in ("config", "base_config", "use")}


USE_KEYS = tuple(f.name for f in fields(UseSettings))  # the settings a trained model is used with


def _settings_used(model) -> dict[str, Any]:
    """A linearized model's load-time settings as it ran (``config.lolcats_attention``: trained, recorded or flags)
    and the layers it keeps as softmax attention (the checkpoint's pick)."""
    attn = getattr(model.config, "lolcats_attention", None) or {}
    if not attn:
        return {}
    return {"use": {k: attn[k] for k in USE_KEYS if k in attn}, "softmax_layers": attn.get("softmax_layers") or []}


def _versions() -> dict[str, str]:
    import lolcats

    out = {"lolcats": lolcats.__version__, "torch": torch.__version__}
    try:
        import lm_eval

        out["lm_eval"] = getattr(lm_eval, "__version__", "?")
    except ImportError:
        pass
    return out
