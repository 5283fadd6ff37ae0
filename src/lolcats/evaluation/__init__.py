"""Evaluation: perplexity, LM-Eval-Harness tasks, long-context recall, and base-vs-linearized reports.

``lolcats eval`` calls :func:`eval_main`; its flags come from :func:`add_eval_arguments`.
lm_eval (the optional extra ``lolcats[eval]``) is imported only when tasks are asked for.

    lolcats eval --base smollm2-135m-instruct --stage1 runs/x/distill/best --stage2 runs/x/finetune/best \\
        --ppl ../shared/data/wikitext-2/wiki.test.tokens --ppl-mode document --seq-len 1024 \\
        --tasks piqa,arc_easy,arc_challenge,mmlu --include-path ../shared/data/lm_eval_local \\
        --recall passkey,multikey --recall-lengths 1024,2048,4096 --compare-base --output results.json

Recall (``--recall``, :mod:`lolcats.evaluation.recall`): passkey retrieval at exact token lengths.
"""

from __future__ import annotations

import argparse
import gc
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from lolcats.evaluation.perplexity import (PPL_MODES, frame_documents, packed_perplexity, perplexity,
                                           token_perplexity)
from lolcats.evaluation.recall import RECALL_TASKS, RecallSettings, build_all, evaluate_recall, recall_settings
from lolcats.evaluation.report import DEFAULT_METRICS, compare_table, save_results

__all__ = ["RecallSettings", "add_eval_arguments", "compare_table", "eval_from_args", "eval_main", "evaluate_model",
           "evaluate_recall", "frame_documents", "packed_perplexity", "perplexity", "save_results", "token_perplexity"]


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


def _split_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    if not tasks:
        return []
    items = tasks.split(",") if isinstance(tasks, str) else [p for t in tasks for p in t.split(",")]
    return [t.strip() for t in items if t.strip()]


def eval_main(base: str | None = None, stage1: str | None = None, stage2: str | None = None,
              export: str | None = None, ppl: Sequence[str] = (), ppl_mode: str = "packed", seq_len: int = 1024,
              ppl_stride: int | None = None, ppl_format: str = "auto", ppl_template: str = "alpaca",
              max_documents: int | None = None, tasks: str | Sequence[str] | None = None,
              num_fewshot: int | None = None, batch_size: int = 8, limit: int | float | None = None,
              include_path: str | None = None, output: str | None = None, compare_base: bool = False,
              device: str = "auto", dtype: str = "auto", print_table: bool = True,
              recall: str | Sequence[str] | None = None, recall_lengths: str | Sequence[int] | None = None,
              recall_depths: str | Sequence[float] | None = None, recall_samples: int | None = None,
              recall_keys: int | None = None, recall_seed: int | None = None, recall_batch_size: int | None = None,
              recall_chat_template: bool = True, recall_max_new_tokens: int | None = None,
              recall_depth_rows: bool = False) -> dict[str, Any]:
    """Evaluate the linearized model (and with ``compare_base`` the base model too).

    ``recall*``: fields of :class:`~lolcats.evaluation.recall.RecallSettings` (None: its default),
    parsed by ``recall_settings`` (``recall_depths="random"`` for random depths);
    ``recall_depth_rows`` adds the per-depth accuracies to the table.

    Returns ``{label: {task: metrics}}`` with labels ``linearized`` and/or ``base``; writes
    it (with the settings and the table) to ``output`` as JSON and prints the table.
    """
    from lolcats.evaluation.harness import load_model

    if ppl_mode not in PPL_MODES:
        raise ValueError(f"unknown perplexity mode {ppl_mode!r}; known: {', '.join(PPL_MODES)}")
    task_list = _split_tasks(tasks)
    rs = recall_settings(recall, recall_lengths, recall_depths, samples=recall_samples, keys=recall_keys,
                         seed=recall_seed, batch_size=recall_batch_size, chat_template=recall_chat_template,
                         max_new_tokens=recall_max_new_tokens)
    if not ppl and not task_list and not rs.tasks:
        raise ValueError("nothing to evaluate: give --ppl FILE, --tasks and/or --recall")
    linearized = bool(stage1 or stage2 or export)
    if compare_base and not base:
        raise ValueError("--compare-base needs --base")
    runs = ([("base", dict(base=base))] if compare_base or not linearized else [])
    if linearized:
        runs.append(("linearized", dict(base=base, stage1=stage1, stage2=stage2, export=export)))
    settings = dict(ppl=list(ppl), ppl_mode=ppl_mode, seq_len=seq_len, ppl_stride=ppl_stride, ppl_format=ppl_format,
                    ppl_template=ppl_template, max_documents=max_documents, tasks=task_list,
                    num_fewshot=num_fewshot, batch_size=batch_size, limit=limit, include_path=include_path,
                    recall=rs if rs.tasks else None)
    results: dict[str, Any] = {}
    for label, spec in runs:
        model, tokenizer = load_model(**spec, device=device, dtype=dtype)
        results[label] = evaluate_model(model, tokenizer, **settings)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    shown = [f"ppl:{Path(p).name}" for p in ppl] + task_list + rs.names()
    metrics = DEFAULT_METRICS + tuple(rs.depth_metrics() if recall_depth_rows else ())
    table = compare_table(results, metrics=metrics, tasks=shown)
    if output:
        save_results(output, results, table=table, models={label: spec for label, spec in runs},
                     settings={**settings, "recall": asdict(rs) if rs.tasks else None}, versions=_versions())
    if print_table:
        print(table)
    return results


def eval_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`eval_main` on parsed flags of :func:`add_eval_arguments` (other attributes ignored)."""
    import inspect

    wanted = inspect.signature(eval_main).parameters
    return eval_main(**{k: v for k, v in vars(args).items() if k in wanted})


def _versions() -> dict[str, str]:
    import lolcats

    out = {"lolcats": lolcats.__version__, "torch": torch.__version__}
    try:
        import lm_eval

        out["lm_eval"] = getattr(lm_eval, "__version__", "?")
    except ImportError:
        pass
    return out


def _limit(text: str) -> int | float:
    """``--limit 100`` (documents per task) or ``--limit 0.1`` (a fraction)."""
    return float(text) if any(c in text for c in ".eE") else int(text)


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of ``lolcats eval``; run them with :func:`eval_from_args` (dest names = eval_main's)."""
    g = parser.add_argument_group("model")
    g.add_argument("--base", help="base model: hub name, directory, .gguf file or built-in name")
    g.add_argument("--stage1", help="stage-1 (attention transfer) checkpoint directory")
    g.add_argument("--stage2", help="stage-2 (LoRA) checkpoint directory")
    g.add_argument("--export", help="exported model directory (instead of --base/--stage1/--stage2)")
    g.add_argument("--compare-base", action="store_true", help="also evaluate the base model, side by side")
    g.add_argument("--device", default="auto", help="cuda, cpu or auto")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    g = parser.add_argument_group("perplexity")
    g.add_argument("--ppl", nargs="+", default=[], metavar="FILE", help="text or Alpaca-style files")
    g.add_argument("--ppl-mode", default="packed", choices=PPL_MODES,
                   help="packed: chunks of --seq-len as in training; document: each document alone")
    g.add_argument("--seq-len", type=int, default=1024, help="chunk length (packed) or window length (document)")
    g.add_argument("--ppl-stride", type=int, default=None,
                   help="document mode: new tokens per window for long documents (default seq-len - 1)")
    g.add_argument("--ppl-format", default="auto", choices=("auto", "alpaca", "text"))
    g.add_argument("--ppl-template", default="alpaca", choices=("alpaca", "chat", "none"))
    g.add_argument("--max-documents", type=int, default=None, help="score only the first N documents")
    g = parser.add_argument_group("LM-Eval-Harness")
    g.add_argument("--tasks", default=None, help="comma-separated, e.g. piqa,arc_easy,arc_challenge,mmlu")
    g.add_argument("--num-fewshot", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--limit", type=_limit, default=None, help="documents per task (or a fraction < 1)")
    g.add_argument("--include-path", default=None,
                   help="folder of local task YAMLs (run offline; 'piqa' picks 'piqa_local' there)")
    _add_recall_arguments(parser)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    return parser


def _joined(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def _add_recall_arguments(parser: argparse.ArgumentParser) -> None:
    d = RecallSettings()
    g = parser.add_argument_group("long-context recall (lolcats.evaluation.recall)")
    g.add_argument("--recall", default=None, help=f"comma-separated recall tasks: {', '.join(RECALL_TASKS)}")
    g.add_argument("--recall-lengths", default=None,
                   help=f"prompt lengths in tokens, template and question included (default {_joined(d.lengths)})")
    g.add_argument("--recall-depths", default=None, help="depths of the asked key in the filler, fractions in "
                   f"[0, 1], cycled over the samples, or 'random' (default {_joined(d.depths)})")
    g.add_argument("--recall-samples", type=int, default=None, help=f"prompts per task and length ({d.samples})")
    g.add_argument("--recall-keys", type=int, default=None, help=f"keys per multikey prompt ({d.keys})")
    g.add_argument("--recall-seed", type=int, default=None, help=f"seed: same seed, same prompts ({d.seed})")
    g.add_argument("--recall-batch-size", type=int, default=None, help=f"prompts per generate call ({d.batch_size})")
    g.add_argument("--recall-max-new-tokens", type=int, default=None,
                   help=f"greedy tokens per answer ({d.max_new_tokens})")
    g.add_argument("--no-recall-chat-template", dest="recall_chat_template", action="store_false",
                   help="plain prompts even if the tokenizer has a chat template")
    g.add_argument("--recall-depth-rows", action="store_true", help="per-depth accuracies as table rows too")
