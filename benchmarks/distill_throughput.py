"""Attention-transfer throughput (tokens/s) with each attention backend, same model, same run.

    python -m benchmarks.distill_throughput --model smollm2-135m-instruct --backends torch triton

Runs forward + backward of the stage-1 loss (all layers in distill mode) on random token ids
of --seq-len, --batch sequences per step, bf16 autocast on CUDA, and prints a table with the
card's name. Optionally also the stage-2 (LoRA next-token loss) step. ``--init random`` builds
a configs/shapes architecture (e.g. smollm2-135m, llama3-8b) with random weights instead of
loading one (speed does not depend on the weights); ``--profile`` adds, per row, the CUDA kernels
that took the most time over two steps (torch.profiler).

    python -m benchmarks.distill_throughput --model smollm2-135m --init random --stages distill --profile

A backend name ending in ``+torch-phi`` (e.g. ``triton+torch-phi``) is that backend with the
PyTorch Hedgehog map instead of its fused one: the feature-map comparison at the step level.

``--cuda-graph`` adds a row per backend with the forward + backward replayed from a CUDA graph
(``lolcats.training.cuda_graph``, what ``train.cuda_graph: true`` does in the trainer).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from lolcats.attention.convert import convert_model
from lolcats.attention.modes import set_attention_mode
from lolcats.config import Config, ModelConfig
from lolcats.models.loading import load_base_model
from lolcats.ops import get_backend, register_backend
from lolcats.training.cuda_graph import GraphedLoss, loss_and_backward
from lolcats.models.lora import add_lora
from lolcats.training.stages import distill_loss, lm_loss
from benchmarks import common


def _time(step, warmup: int, iters: int, device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def profile_table(step, device, top: int = 20) -> str:
    """The ``top`` CUDA kernels by total time over two steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize(device)
    return prof.key_averages().table(sort_by="device_time_total", row_limit=top, max_name_column_width=70)


TORCH_PHI = "+torch-phi"


def resolve_backend(name: str, device) -> str:
    """``X+torch-phi``: backend X without its fused Hedgehog map, registered for this run."""
    if name.endswith(TORCH_PHI):
        base = get_backend(name[: -len(TORCH_PHI)], torch.zeros(1, device=device))
        register_backend(replace(base, name=name, hedgehog=None), auto=False)
    return name


def measure(model_name: str, backend: str, stage: str, batch: int, seq_len: int, iters: int, device,
            init: str = "pretrained", profile: bool = False, graph: bool = False) -> dict:
    cfg = Config()
    cfg.model = ModelConfig(name=model_name, init=init)
    cfg.attention.backend = resolve_backend(backend, device)
    model = load_base_model(cfg.model, device)
    convert_model(model, cfg.attention)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    if stage == "distill":
        for n, p in model.named_parameters():
            p.requires_grad_(".feature_map_" in n or "window_factors" in n)
        set_attention_mode(model, "distill")

        def loss_fn(x):
            return distill_loss(model, x, cfg, device)
    else:
        model = add_lora(model, cfg.finetune)
        set_attention_mode(model, "student")

        def loss_fn(x):
            return lm_loss(model, x, "auto", device), {}
    if graph:  # the trainer's train.cuda_graph path
        graphed = GraphedLoss(loss_fn, [p for p in model.parameters() if p.requires_grad])

        def step():
            graphed(ids, 1.0)
    else:  # the trainer's eager path
        def step():
            loss_and_backward(loss_fn, ids, 1.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec = _time(step, 2, iters, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    if profile and device.type == "cuda":
        print(f"--- profile: {stage}, {backend} ---\n{profile_table(step, device)}", flush=True)
    return {"stage": stage, "backend": backend + (" + CUDA graph" if graph else ""), "batch": batch,
            "seq_len": seq_len, "s_per_step": sec,
            "tokens_per_s": batch * seq_len / sec, "peak_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--backends", nargs="+", default=["torch", "triton"],
                    help=f"attention backends; a name ending in {TORCH_PHI} keeps the PyTorch Hedgehog map")
    ap.add_argument("--stages", nargs="+", default=["distill", "finetune"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--init", default="pretrained", choices=["pretrained", "random"],
                    help="random: --model is a configs/shapes name, weights are random")
    ap.add_argument("--profile", action="store_true", help="print each row's top CUDA kernels (two steps)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="also measure each backend with the step captured in a CUDA graph (train.cuda_graph)")
    ap.add_argument("--out")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = common.card(device, cpu="cpu")
    graphs = [False, True] if a.cuda_graph and device.type == "cuda" else [False]
    rows = [measure(a.model, b, s, a.batch, a.seq_len, a.iters, device, a.init, a.profile, g)
            for s in a.stages for b in a.backends for g in graphs]
    base = {r["stage"]: r["tokens_per_s"] for r in rows if r["backend"] == "torch"}
    model = a.model + (" (random weights)" if a.init == "random" else "")
    lines = [f"card: {card}; model {model}; batch {a.batch} x {a.seq_len} tokens; bf16 autocast",
             "| stage | backend | tokens/s | s/step | peak GiB | vs torch |", "|---|---|---|---|---|---|"]
    for r in rows:
        rel = r["tokens_per_s"] / base[r["stage"]] if r["stage"] in base else float("nan")
        lines.append(f"| {r['stage']} | {r['backend']} | {r['tokens_per_s']:,.0f} | {r['s_per_step']:.3f} | "
                     f"{r['peak_gib']:.1f} | {rel:.2f}x |")
    print("\n".join(lines))
    if a.out:
        common.write_json(a.out, {"card": card, "rows": rows, "table": "\n".join(lines)}, indent=2)


if __name__ == "__main__":
    main()
