"""Evaluation results as JSON and as a markdown table with models side by side; the table
``lolcats linearize`` prints.

``results`` maps a label (``base``, ``linearized``) to ``{task: {metric: value}}``, where a
task is an lm_eval task name or ``ppl:<file>``; a metric ``m`` may come with ``m_stderr``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

DEFAULT_METRICS = ("acc", "acc_partial", "acc_norm", "ppl", "loss")  # acc_partial: recall with several values


def _fmt(value: Any, stderr: Any = None) -> str:
    if value is None:
        return "–"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = f"{value:.4f}" if abs(value) < 100 else f"{value:.2f}"
    if isinstance(stderr, (int, float)) and not isinstance(stderr, bool) and math.isfinite(stderr):
        text += f" ± {stderr:.4f}"
    return text


def compare_table(results: dict[str, dict[str, dict[str, Any]]], metrics: Sequence[str] = DEFAULT_METRICS,
                  tasks: Sequence[str] | None = None) -> str:
    """Markdown table: one row per (task, metric), one column per label (plus Δ for two labels).

    ``tasks`` picks and orders the rows' tasks (default: every task, in first-seen order);
    a metric appears for a task if any label has it.
    """
    labels = list(results)
    if tasks is None:
        tasks = list(dict.fromkeys(t for r in results.values() for t in r))
    head = ["task", "metric", *labels] + (["Δ"] if len(labels) == 2 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for task in tasks:
        for m in metrics:
            cells = [results[lab].get(task, {}) for lab in labels]
            if not any(m in c for c in cells):
                continue
            row = [task, m] + [_fmt(c.get(m), c.get(f"{m}_stderr")) for c in cells]
            if len(labels) == 2:
                a, b = cells[0].get(m), cells[1].get(m)
                both = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
                row.append(f"{b - a:+.4f}" if both else "–")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def save_results(path: str | Path, results: dict[str, Any], **extra: Any) -> None:
    """Write ``{"results": results, **extra}`` as JSON (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results, **extra}, indent=2, sort_keys=False, default=str))


def format_report(report: dict) -> str:
    """The table ``lolcats linearize`` prints: validation loss and perplexity before and after each stage."""
    lines = ["", "| model | val loss | val ppl | stage time (s) | tokens | trainable params |",
             "|---|---|---|---|---|---|"]
    for k, label in (("base", "base (softmax)"), ("stage1", "after attention transfer"),
                     ("stage2", "after LoRA (linearized)")):
        r = report[k]
        tr = f"{r['trainable']:,} ({100 * r['trainable'] / max(r['total'], 1):.3f}%)" if "trainable" in r else "-"
        secs = f"{r['seconds']:.0f}" + (" (done earlier)" if r.get("skipped") else "") if "seconds" in r else "-"
        tok = f"{r['tokens']:,}" if "tokens" in r else "-"
        lines.append(f"| {label} | {r['val_loss']:.4f} | {r['ppl']:.2f} | {secs} | {tok} | {tr} |")
    lines.append(f"\nrun directories: {', '.join(report['run_dirs'])}; total {report['seconds']:.0f} s")
    return "\n".join(lines)
