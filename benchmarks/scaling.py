"""One GPU against several: the same recipe once per (variant, GPU count), same global batch.

    python -m benchmarks.scaling --gpus 1 2 --out OUT --label smollm2 -- \\
        --config configs/smollm2-135m.yaml --data.train ../shared/data/train/alpaca_52k_en.jsonl.gz \\
        --distill.max_steps 200 --finetune.max_steps 100

    # 70B shapes, random weights, a few steps; joint and block-wise transfer, sharded and replicated
    python -m benchmarks.scaling --gpus 4 8 --variants joint-fsdp blockwise-fsdp --block-size 8 \\
        --out OUT --label llama3.1-70b-random -- --config configs/smollm2-135m.yaml \\
        --model.name llama3.1-70b --model.init random --model.tokenizer smollm2-135m-instruct ...

Variants (``--variants``): ``joint-fsdp``, ``joint-replicate``, ``blockwise-fsdp``,
``blockwise-replicate`` (``--run.parallel`` and ``--distill.block_size``, the block size from
``--block-size``), or ``as-given`` (the flags alone, the default). Each run has its own output
directory ``OUT/LABEL/VARIANT/gpus-N``: one process for N = 1, ``torchrun --nproc_per_node N``
otherwise, every rank running this file's ``--rank`` mode: the recipe's stages (load, stage 1,
stage 2) with, per rank and stage, the peak GPU memory (allocated and reserved, reset at each
stage), the peak host memory (``ru_maxrss``, the process's peak so far) and the wall time, in
``mem-rank<r>.json``.

From the stages' ``train_log.jsonl`` (block-wise: every block's) it prints a table: tokens/s
(median over steps, the first few and those after a validation left out; block-wise: the
median step of the blocks, times the GPUs training blocks side by side), per GPU, scaling
efficiency against the fewest GPUs run of the variant, the loss curves against that run
(largest relative difference of the training loss at the same step, joint only; the final
validation losses), and per rank the peak GPU and host memory next to ``lolcats plan``'s
prediction for that stage and GPU count; then how each run loaded the model (sharded builds:
bytes read and held per rank against the whole model).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from benchmarks import common

STAGES = ("distill", "finetune")
SKIP_FIRST = 3  # warm-up steps (kernel compilation, allocator) left out of the rate
GIB = 1024**3
VARIANTS = {
    "as-given": [],
    "joint-fsdp": ["--run.parallel", "fsdp"],
    "joint-replicate": ["--run.parallel", "replicate"],
    "blockwise-fsdp": ["--run.parallel", "fsdp", "--distill.block_size", "{k}"],
    "blockwise-replicate": ["--run.parallel", "replicate", "--distill.block_size", "{k}"],
}


# ---------------------------------------------------------------- one rank (the --rank mode)


def _memory(device) -> dict:
    import torch

    out = {"host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
    if device.type == "cuda":
        out["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        out["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        torch.cuda.reset_peak_memory_stats(device)
    return out


def rank_main(out: Path, configs: list[str] | None, flags: list[str], stages: list[str]) -> None:
    """The recipe's stages in this process (one rank), with memory and time per stage."""
    from lolcats.config import load_config
    from lolcats.distributed import cleanup
    from lolcats.pipeline import prepare, run_distill, run_finetune

    cfg = load_config(configs, flags)
    record: dict = {"stages": {}}
    t = time.time()
    ctx = prepare(cfg)
    info = ctx.info
    record.update(rank=info.rank if info else 0, world=info.world_size if info else 1, strategy=ctx.strategy)
    report = getattr(ctx.model, "lolcats_load_report", None)
    record["load_report"] = report.to_dict() if report else None
    record["stages"]["load"] = {"seconds": time.time() - t, **_memory(ctx.device)}
    for stage, run in (("distill", run_distill), ("finetune", run_finetune)):
        if stage in stages:
            t = time.time()
            run(ctx)
            record["stages"][stage] = {"seconds": time.time() - t, **_memory(ctx.device)}
    common.write_json(out / f"mem-rank{record['rank']}.json", record, indent=2)
    cleanup()


# ---------------------------------------------------------------- launching


def run_one(n: int, flags: list[str], out: Path, stages: list[str]) -> float:
    out.mkdir(parents=True, exist_ok=True)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
                if n > 1 else [sys.executable])
    cmd = launcher + ["-m", "benchmarks.scaling", "--rank", str(out), "--stages", *stages, "--", *flags,
                      "--run.output_dir", str(out), "--run.progress", "false"]
    t = time.time()
    with open(out / "run.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=common.REPO).returncode
    if rc != 0:
        raise SystemExit(f"{n} GPU run failed (exit {rc}); see {out / 'run.log'}")
    return time.time() - t


def variant_flags(variant: str, block_size: int | None) -> list[str]:
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    if "blockwise" in variant and block_size is None:
        raise SystemExit(f"variant {variant} needs --block-size K")
    return [f.format(k=block_size) for f in VARIANTS[variant]]


# ---------------------------------------------------------------- reading the logs


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


def steady_rates(steps: dict[int, dict], evals: list[dict]) -> list[float]:
    """tokens/s of the steady steps (not the first few, not the one after a validation)."""
    after_eval = {e["step"] + 1 for e in evals}
    return [r["tok_s"] for s, r in steps.items() if s > SKIP_FIRST and s not in after_eval]


def rate(steps: dict[int, dict], evals: list[dict]) -> float:
    tps = steady_rates(steps, evals)
    return statistics.median(tps) if tps else float("nan")


class StageRun:
    """One stage of one run: its logs (joint: one; block-wise: one per block) and final validation loss."""

    def __init__(self, stage_dir: Path):
        blocks = sorted(stage_dir.glob("block-*/train_log.jsonl"))
        self.blockwise = bool(blocks)
        self.logs = [read_log(p) for p in (blocks or [stage_dir / "train_log.jsonl"])]
        summary = stage_dir / "summary.json"
        self.final_val = json.loads(summary.read_text())["best_val"] if summary.is_file() else float("nan")

    @property
    def steps(self) -> int:
        return sum(len(s) for s, _ in self.logs)

    def rate(self, gpus: int) -> float:
        """tokens/s of the whole run: block-wise, a block's median step rate times the GPUs busy."""
        if not self.blockwise:
            return rate(*self.logs[0])
        tps = [r for log in self.logs for r in steady_rates(*log)]
        return (statistics.median(tps) if tps else float("nan")) * min(gpus, len(self.logs))


def stage_runs(out: Path) -> dict[str, StageRun]:
    found = {}
    for stage in STAGES:
        dirs = sorted(d for d in out.glob(f"*/{stage}-*") if (d / "train_log.jsonl").is_file()
                      or any(d.glob("block-*/train_log.jsonl")))
        if dirs:
            found[stage] = StageRun(dirs[0])
    return found


def rank_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("mem-rank*.json"))]


def loss_diff(ref: StageRun, other: StageRun) -> float:
    """Largest relative train-loss difference at the steps both ran (joint runs; nan block-wise)."""
    if ref.blockwise or other.blockwise:
        return float("nan")
    a, b = ref.logs[0][0], other.logs[0][0]
    common = sorted(set(a) & set(b))
    return max((abs(b[s]["loss"] - a[s]["loss"]) / abs(a[s]["loss"]) for s in common), default=float("nan"))


# ---------------------------------------------------------------- the plan's prediction


def predicted_gib(flags: list[str], configs: list[str] | None, gpus: int, gpu_gib: float) -> dict[str, float]:
    """``lolcats plan``'s total per GPU (GiB) for the distill and finetune stages of these flags."""
    from lolcats.config import load_config
    from lolcats.plan import plan

    p = plan(load_config(configs, flags), None, gpus, gpu_memory_gib=gpu_gib)
    by = {s.name: s.total_bytes / GIB for s in p.stages}
    block = [v for k, v in by.items() if "block-wise" in k]
    distill = max(block[0], by["collect hidden states"]) if block else by["attention transfer (joint)"]
    return {"distill": distill, "finetune": by["LoRA finetune"]}


def _peak(records: list[dict], stage: str, key: str) -> float:
    vals = [r["stages"].get(stage, {}).get(key) for r in records]
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else float("nan")


# ---------------------------------------------------------------- the table


def table(label: str, card: str, runs: dict[tuple[str, int], dict], walls: dict, plans: dict) -> str:
    lines = [f"{label}; card: {card}",
             "| variant | stage | GPUs | steps | tokens/s | tokens/s per GPU | efficiency | max rel. train-loss diff "
             "| final val loss (ref -> this) | stage s | peak GPU GiB/rank (plan) | peak host GiB/rank | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant in dict.fromkeys(v for v, _ in runs):
        counts = sorted(n for v, n in runs if v == variant)
        ref = runs[(variant, counts[0])]
        for stage in STAGES:
            if stage not in ref["stages"]:
                continue
            base = ref["stages"][stage].rate(counts[0])
            for n in counts:
                run = runs[(variant, n)]
                if stage not in run["stages"]:
                    continue
                st, recs = run["stages"][stage], run["ranks"]
                r = st.rate(n)
                eff = r / (base * n / counts[0])
                gpu = _peak(recs, stage, "gpu_peak_allocated_gib")
                lines.append(
                    f"| {variant} | {stage} | {n} | {st.steps} | {r:,.0f} | {r / n:,.0f} | {eff:.0%} | "
                    f"{loss_diff(ref['stages'][stage], st):.2e} | {ref['stages'][stage].final_val:.4f} -> "
                    f"{st.final_val:.4f} | {_peak(recs, stage, 'seconds'):.0f} | {gpu:.2f} "
                    f"({plans.get((variant, n), {}).get(stage, float('nan')):.2f}) | "
                    f"{_peak(recs, stage, 'host_peak_gib'):.2f} | {walls.get((variant, n), float('nan')):.0f} |")
    return "\n".join(lines + [""] + load_table(runs))


def load_table(runs: dict[tuple[str, int], dict]) -> list[str]:
    """How each run loaded the model, per rank (the largest over ranks): sharded builds read and hold ~1/N."""
    lines = ["Loading, per rank (largest over the ranks):", "",
             "| variant | GPUs | strategy | load s | GiB read | GiB held | model GiB | peak GPU GiB | peak host GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (variant, n), run in runs.items():
        recs = run["ranks"]
        reps = [r["load_report"] for r in recs if r.get("load_report")]
        big = {k: max(x[k] for x in reps) / GIB if reps else float("nan")
               for k in ("bytes_read", "bytes_allocated", "model_bytes")}
        strategy = (recs[0]["strategy"] or "one process") if recs else "-"
        lines.append(f"| {variant} | {n} | {strategy} | {_peak(recs, 'load', 'seconds'):.0f} | "
                     f"{big['bytes_read']:.2f} | {big['bytes_allocated']:.2f} | {big['model_bytes']:.2f} | "
                     f"{_peak(recs, 'load', 'gpu_peak_allocated_gib'):.2f} | "
                     f"{_peak(recs, 'load', 'host_peak_gib'):.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--variants", nargs="+", default=["as-given"], help=", ".join(VARIANTS))
    ap.add_argument("--block-size", type=int, help="k of the blockwise variants")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--out")
    ap.add_argument("--label", default="run")
    ap.add_argument("--report-only", action="store_true", help="only read the logs of earlier runs in OUT/LABEL")
    ap.add_argument("--rank", metavar="DIR", help=argparse.SUPPRESS)  # one rank of one run (internal)
    ap.add_argument("flags", nargs=argparse.REMAINDER, help="after --: lolcats config flags (--config FILE too)")
    a = ap.parse_args()
    flags = a.flags[1:] if a.flags[:1] == ["--"] else a.flags
    configs, rest = split_configs(flags)
    if a.rank:
        return rank_main(Path(a.rank), configs, rest, a.stages)
    if not a.out:
        ap.error("--out is required")
    import torch

    cuda = torch.cuda.is_available()
    card = common.card(None, cpu="cpu (gloo)")
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if cuda else 80.0
    root = Path(a.out) / a.label
    runs, walls, plans = {}, {}, {}
    for variant in a.variants:
        vflags = flags + variant_flags(variant, a.block_size)
        for n in a.gpus:
            out = root / variant / f"gpus-{n}"
            if not a.report_only:
                walls[(variant, n)] = run_one(n, vflags, out, a.stages)
            runs[(variant, n)] = {"stages": stage_runs(out), "ranks": rank_records(out)}
            vconfigs, vrest = split_configs(vflags)
            plans[(variant, n)] = predicted_gib(vrest, vconfigs, n, gpu_gib)
    text = table(a.label, card, runs, walls, plans)
    print(text)
    (root / "scaling.md").write_text(text + "\n")
    (root / "scaling.json").write_text(json.dumps(
        {f"{v}/gpus-{n}": r["ranks"] for (v, n), r in runs.items()}, indent=2))
    plot(runs, root / "loss_curves.png")


def split_configs(flags: list[str]) -> tuple[list[str] | None, list[str]]:
    """(the --config files, the other flags) of a flag list."""
    configs, rest, i = [], [], 0
    while i < len(flags):
        if flags[i] == "--config" and i + 1 < len(flags):
            configs.append(flags[i + 1])
            i += 2
        elif flags[i].startswith("--config="):
            configs.append(flags[i].split("=", 1)[1])
            i += 1
        else:
            rest.append(flags[i])
            i += 1
    return configs or None, rest


def plot(runs: dict, path: Path) -> None:
    """Training-loss curves of the joint runs (block-wise runs have one curve per block)."""
    if not any(not st.blockwise for run in runs.values() for st in run["stages"].values()):
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(STAGES), figsize=(10, 3.5))
    for ax, stage in zip(axes, STAGES):
        for (variant, n), run in sorted(runs.items()):
            st = run["stages"].get(stage)
            if st is None or st.blockwise:
                continue
            steps = sorted(st.logs[0][0])
            ax.plot(steps, [st.logs[0][0][s]["loss"] for s in steps], label=f"{variant} {n} GPU", lw=1)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
