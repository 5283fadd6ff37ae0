"""Evaluation: perplexity, LM-Eval-Harness tasks, and base-vs-linearized reports.

``lolcats eval`` (``lolcats.cli``) calls :func:`eval_main` with the model a
:class:`~lolcats.models.trained.ModelSource` names. lm_eval (the optional extra
``lolcats[eval]``) is imported only when tasks are asked for.

    lolcats eval --checkpoint runs/x/finetune-XXXX/best \\
        --ppl ../shared/data/wikitext-2/wiki.test.tokens --ppl-mode document --seq-len 1024 \\
        --tasks piqa,arc_easy,arc_challenge,mmlu --include-path ../shared/data/lm_eval_local \\
        --compare-base --output results.json
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Sequence

import torch

from lolcats.evaluation.perplexity import (PPL_MODES, frame_documents, packed_perplexity, perplexity,
                                           token_perplexity)
from lolcats.evaluation.report import compare_table, save_results
from lolcats.models.trained import ModelSource, base_source, load_trained

__all__ = ["compare_table", "eval_main", "evaluate_model", "frame_documents", "packed_perplexity", "perplexity",
           "save_results", "split_tasks", "token_perplexity"]


def evaluate_model(model: torch.nn.Module, tokenizer, ppl: Sequence[str] = (), ppl_mode: str = "packed",
                   seq_len: int = 1024, ppl_stride: int | None = None, ppl_format: str = "auto",
                   ppl_template: str = "alpaca", max_documents: int | None = None, tasks: Sequence[str] = (),
                   num_fewshot: int | None = None, batch_size: int = 8, limit: int | float | None = None,
                   include_path: str | None = None) -> dict[str, dict[str, Any]]:
    """``{task: metrics}`` of one loaded model: ``ppl:<file name>`` entries, then lm_eval tasks."""
    out: dict[str, dict[str, Any]] = {}
    for path in ppl:
        out[f"ppl:{Path(path).name}"] = perplexity(model, tokenizer, path, ppl_mode, seq_len, batch_size,
                                                   fmt=ppl_format, template=ppl_template, stride=ppl_stride,
                                                   max_documents=max_documents)
    if tasks:
        from lolcats.evaluation.harness import run_harness

        out.update(run_harness(model, tokenizer, list(tasks), num_fewshot, batch_size, limit, include_path))
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
              dtype: str = "auto", print_table: bool = True) -> dict[str, Any]:
    """Evaluate the model ``source`` names (and with ``compare_base`` its base model too).

    Returns ``{label: {task: metrics}}`` with labels ``base`` and/or ``linearized``; writes it
    (with the settings and the table) to ``output`` as JSON and prints the table.
    """
    if ppl_mode not in PPL_MODES:
        raise ValueError(f"unknown perplexity mode {ppl_mode!r}; known: {', '.join(PPL_MODES)}")
    task_list = split_tasks(tasks)
    if not ppl and not task_list:
        raise ValueError("nothing to evaluate: give --ppl FILE and/or --tasks")
    runs = []
    if compare_base or not source.linearized:
        runs.append(("base", base_source(source)))
    if source.linearized:
        runs.append(("linearized", source))
    settings = dict(ppl=list(ppl), ppl_mode=ppl_mode, seq_len=seq_len, ppl_stride=ppl_stride, ppl_format=ppl_format,
                    ppl_template=ppl_template, max_documents=max_documents, tasks=task_list,
                    num_fewshot=num_fewshot, batch_size=batch_size, limit=limit, include_path=include_path)
    results: dict[str, Any] = {}
    for label, src in runs:
        model, tokenizer = load_trained(src, None if device == "auto" else device, dtype)
        results[label] = evaluate_model(model, tokenizer, **settings)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    shown = [f"ppl:{Path(p).name}" for p in ppl] + task_list
    table = compare_table(results, tasks=shown)
    if output:
        save_results(output, results, table=table, models={label: _describe(src) for label, src in runs},
                     settings=settings, versions=_versions())
    if print_table:
        print(table)
    return results


def _describe(source: ModelSource) -> dict[str, Any]:
    return {k: v for k, v in vars(source).items() if v is not None and k != "config"}


def _versions() -> dict[str, str]:
    import lolcats

    out = {"lolcats": lolcats.__version__, "torch": torch.__version__}
    try:
        import lm_eval

        out["lm_eval"] = getattr(lm_eval, "__version__", "?")
    except ImportError:
        pass
    return out
