"""Evaluation: perplexity, LM-Eval-Harness tasks, long-context recall, and base-vs-linearized reports.

``lolcats eval`` (``lolcats.cli``) calls :func:`eval_main` with the model a
:class:`~lolcats.models.trained.ModelSource` names. lm_eval (the optional extra
``lolcats[eval]``) is imported only when tasks are asked for.

    lolcats eval --checkpoint runs/x/finetune-XXXX/best \\
        --ppl ../shared/data/wikitext-2/wiki.test.tokens --ppl-mode document --seq-len 1024 \\
        --tasks piqa,arc_easy,arc_challenge,mmlu --include-path ../shared/data/lm_eval_local \\
        --recall passkey,multikey --recall-lengths 1024,2048,4096 --compare-base --output results.json

Recall (``--recall``, :mod:`lolcats.evaluation.recall`): passkey retrieval at exact token lengths.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from lolcats.config import UseConfig
from lolcats.evaluation.perplexity import (PPL_MODES, frame_documents, packed_perplexity, perplexity,
                                           token_perplexity)
from lolcats.evaluation.recall import RecallSettings, build_all, evaluate_recall
from lolcats.evaluation.report import DEFAULT_METRICS, compare_table, save_results
from lolcats.models.trained import ModelSource, base_source, load_trained

__all__ = ["RecallSettings", "compare_table", "eval_main", "evaluate_model", "evaluate_recall", "frame_documents",
           "packed_perplexity", "perplexity", "save_results", "split_tasks", "token_perplexity"]


def evaluate_model(model: torch.nn.Module, tokenizer, ppl: Sequence[str] = (), ppl_mode: str = "packed",
                   seq_len: int = 1024, ppl_stride: int | None = None, ppl_format: str = "auto",
                   ppl_template: str = "alpaca", max_documents: int | None = None, tasks: Sequence[str] = (),
                   num_fewshot: int | None = None, batch_size: int = 8, limit: int | float | None = None,
                   include_path: str | None = None, recall: RecallSettings | None = None) -> dict[str, dict[str, Any]]:
    """``{task: metrics}`` of one loaded model: ``ppl:<file name>`` entries, lm_eval tasks, then
    ``task@length`` recall entries (their prompts are built first, so a bad length fails at once)."""
    prompts = build_all(tokenizer, recall) if recall is not None else {}
    out: dict[str, dict[str, Any]] = {}
    for path in ppl:
        out[f"ppl:{Path(path).name}"] = perplexity(model, tokenizer, path, ppl_mode, seq_len, batch_size,
                                                   fmt=ppl_format, template=ppl_template, stride=ppl_stride,
                                                   max_documents=max_documents)
    if tasks:
        from lolcats.evaluation.harness import run_harness

        out.update(run_harness(model, tokenizer, list(tasks), num_fewshot, batch_size, limit, include_path))
    if prompts:
        out.update(evaluate_recall(model, tokenizer, recall, prompts))
    return out


def split_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """``"piqa,arc_easy"`` or ``["piqa", "arc_easy,mmlu"]`` -> a list of task names."""
    if not tasks:
        return []
    items = tasks.split(",") if isinstance(tasks, str) else [p for t in tasks for p in t.split(",")]
    return [t.strip() for t in items if t.strip()]


def eval_main(source: ModelSource, compare_base: bool = False, ppl: Sequence[str] = (), ppl_mode: str = "packed",
              seq_len: int = 1024, ppl_stride: int | None = None, ppl_format: str = "auto",
              ppl_template: str = "alpaca", max_documents: int | None = None, tasks: str | Sequence[str] | None = None,
              num_fewshot: int | None = None, batch_size: int = 8, limit: int | float | None = None,
              include_path: str | None = None, output: str | None = None, device: str = "auto",
              dtype: str = "auto", print_table: bool = True, recall: RecallSettings | None = None,
              recall_depth_rows: bool = False) -> dict[str, Any]:
    """Evaluate the model ``source`` names (and with ``compare_base`` its base model too).

    ``recall``: long-context recall tasks (:mod:`lolcats.evaluation.recall`); ``recall_depth_rows``
    adds their per-depth accuracies to the table.

    Returns ``{label: {task: metrics}}`` with labels ``base`` and/or ``linearized``; writes it
    (with the settings and the table) to ``output`` as JSON and prints the table.
    """
    if ppl_mode not in PPL_MODES:
        raise ValueError(f"unknown perplexity mode {ppl_mode!r}; known: {', '.join(PPL_MODES)}")
    task_list = split_tasks(tasks)
    recall = recall if recall is not None and recall.tasks else None
    if not ppl and not task_list and recall is None:
        raise ValueError("nothing to evaluate: give --ppl FILE, --tasks and/or --recall")
    for path in ppl:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--ppl: no such file: {path}")
    if include_path and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path: no such directory: {include_path}")
    runs = []
    if compare_base or not source.linearized:
        runs.append(("base", base_source(source)))
    if source.linearized:
        runs.append(("linearized", source))
    settings = dict(ppl=list(ppl), ppl_mode=ppl_mode, seq_len=seq_len, ppl_stride=ppl_stride, ppl_format=ppl_format,
                    ppl_template=ppl_template, max_documents=max_documents, tasks=task_list,
                    num_fewshot=num_fewshot, batch_size=batch_size, limit=limit, include_path=include_path,
                    recall=recall)
    results: dict[str, Any] = {}
    models = {label: _describe(src) for label, src in runs}
    for label, src in runs:
        model, tokenizer = load_trained(src, None if device == "auto" else device, dtype)
        models[label].update(_settings_used(model))
        results[label] = evaluate_model(model, tokenizer, **settings)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    shown = [f"ppl:{Path(p).name}" for p in ppl] + task_list + (recall.names() if recall else [])
    metrics = DEFAULT_METRICS + tuple(recall.depth_metrics() if recall and recall_depth_rows else ())
    table = compare_table(results, metrics=metrics, tasks=shown)
    if output:
        save_results(output, results, table=table, models=models,
                     settings={**settings, "recall": asdict(recall) if recall else None}, versions=_versions())
    if print_table:
        print(table)
    return results


def _describe(source: ModelSource) -> dict[str, Any]:
    return {k: v for k, v in vars(source).items() if v not in (None, False) and k not in ("config", "base_config")}


USE_KEYS = tuple(f.name for f in fields(UseConfig))  # the settings a trained model is used with


def _settings_used(model) -> dict[str, Any]:
    """A linearized model's load-time settings as it ran (``config.lolcats_attention``: trained, recorded or flags)."""
    attn = getattr(model.config, "lolcats_attention", None) or {}
    return {"use": {k: attn[k] for k in USE_KEYS if k in attn}} if attn else {}


def _versions() -> dict[str, str]:
    import lolcats

    out = {"lolcats": lolcats.__version__, "torch": torch.__version__}
    try:
        import lm_eval

        out["lm_eval"] = getattr(lm_eval, "__version__", "?")
    except ImportError:
        pass
    return out
