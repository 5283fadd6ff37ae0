"""One GPU against several: the same `lolcats linearize` run, once per GPU count, same global batch.

    python benchmarks/scaling.py --gpus 1 2 --out OUT --label smollm2 -- \
        --config configs/smollm2-135m.yaml --data.train ../shared/data/train/alpaca_52k_en.jsonl.gz \
        --distill.max_steps 200 --finetune.max_steps 100

Each count runs in its own output directory (``OUT/LABEL/gpus-N``): one process for N = 1,
``torchrun --nproc_per_node N`` (FSDP2) otherwise. From each stage's ``train_log.jsonl`` it
prints a table: tokens/s (median over steps, the first few and those after a validation left
out), tokens/s per GPU, scaling efficiency, and how far the loss curves are from the one-GPU
run's (largest relative difference of the training loss at the same step, and the last
validation losses). A random-weights model of any shape runs the same way:
``--model.name llama3-8b --model.init random --model.tokenizer smollm2-135m-instruct``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("distill", "finetune")
SKIP_FIRST = 3  # warm-up steps (kernel compilation, allocator) left out of the rate


def read_log(path: Path) -> tuple[dict[int, dict], list[dict]]:
    """(steps by number, the last record per step wins after a resume; eval records)."""
    steps, evals = {}, []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "step":
            steps[rec["step"]] = rec
        elif rec.get("event") == "eval":
            evals.append(rec)
    return steps, evals


def rate(steps: dict[int, dict], evals: list[dict]) -> float:
    """Median tokens/s over steady steps (not the first few, not the one after a validation)."""
    after_eval = {e["step"] + 1 for e in evals}
    tps = [r["tok_s"] for s, r in steps.items() if s > SKIP_FIRST and s not in after_eval]
    return statistics.median(tps) if tps else float("nan")


def run_one(n: int, flags: list[str], out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m"]
                if n > 1 else [sys.executable, "-m"])
    cmd = launcher + ["lolcats.cli", "linearize", *flags, "--run.output_dir", str(out), "--run.progress", "false"]
    t = time.time()
    with open(out / "run.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{n} GPU run failed (exit {rc}); see {out / 'run.log'}")
    return time.time() - t


def stage_logs(out: Path) -> dict[str, tuple[dict, list]]:
    found = {}
    for stage in STAGES:
        logs = sorted(out.glob(f"*/{stage}-*/train_log.jsonl"))
        if logs:
            found[stage] = read_log(logs[0])
    return found


def compare(ref: tuple[dict, list], other: tuple[dict, list]) -> tuple[float, int, float, float]:
    """(max relative train-loss difference over the steps both ran, the last validation step both
    ran, and the two validation losses there)."""
    common = sorted(set(ref[0]) & set(other[0]))
    diff = max((abs(other[0][s]["loss"] - ref[0][s]["loss"]) / abs(ref[0][s]["loss"]) for s in common),
               default=float("nan"))
    v_ref, v_other = ({e["step"]: e["val_loss"] for e in evals} for evals in (ref[1], other[1]))
    both = sorted(set(v_ref) & set(v_other))
    if not both:
        return diff, -1, float("nan"), float("nan")
    return diff, both[-1], v_ref[both[-1]], v_other[both[-1]]


def table(label: str, card: str, results: dict[int, dict[str, tuple]], walls: dict[int, float]) -> str:
    lines = [f"{label}; card: {card}",
             "| stage | GPUs | steps | tokens/s | tokens/s per GPU | efficiency | max rel. train-loss diff vs 1 GPU "
             "| val loss at step (1 GPU -> N) | wall s (whole run) |",
             "|---|---|---|---|---|---|---|---|---|"]
    ref_n = min(results)
    for stage in STAGES:
        if stage not in results[ref_n]:
            continue
        base = rate(*results[ref_n][stage])
        for n, logs in sorted(results.items()):
            if stage not in logs:
                continue
            r = rate(*logs[stage])
            eff = r / (base * n / ref_n)
            diff, at, v0, v1 = compare(results[ref_n][stage], logs[stage])
            lines.append(f"| {stage} | {n} | {len(logs[stage][0])} | {r:,.0f} | {r / n:,.0f} | {eff:.0%} | {diff:.2e} | "
                         f"{v0:.4f} -> {v1:.4f} (step {at}) | {walls.get(n, float('nan')):.0f} |")
    return "\n".join(lines)


def plot(results: dict[int, dict[str, tuple]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(STAGES), figsize=(10, 3.5))
    for ax, stage in zip(axes, STAGES):
        for n, logs in sorted(results.items()):
            if stage in logs:
                steps = sorted(logs[stage][0])
                ax.plot(steps, [logs[stage][0][s]["loss"] for s in steps], label=f"{n} GPU", lw=1)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", required=True)
    ap.add_argument("--label", default="run")
    ap.add_argument("--report-only", action="store_true", help="only read the logs of earlier runs in OUT/LABEL")
    ap.add_argument("flags", nargs=argparse.REMAINDER, help="after --: flags for lolcats linearize")
    a = ap.parse_args()
    flags = a.flags[1:] if a.flags[:1] == ["--"] else a.flags
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = Path(a.out) / a.label
    results, walls = {}, {}
    for n in a.gpus:
        if not a.report_only:
            walls[n] = run_one(n, flags, out / f"gpus-{n}")
        results[n] = stage_logs(out / f"gpus-{n}")
    text = table(a.label, card, results, walls)
    print(text)
    (out / "scaling.md").write_text(text + "\n")
    plot(results, out / "loss_curves.png")


if __name__ == "__main__":
    main()
