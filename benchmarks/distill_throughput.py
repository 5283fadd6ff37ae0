"""Attention-transfer throughput (tokens/s) with each attention backend, same model, same run.

    python benchmarks/distill_throughput.py --model smollm2-135m-instruct --backends torch triton

Runs forward + backward of the stage-1 loss (all layers in distill mode) on random token ids
of --seq-len, --batch sequences per step, bf16 autocast on CUDA, and prints a table with the
card's name. Optionally also the stage-2 (LoRA next-token loss) step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lolcats.attention.convert import convert_model, set_attention_mode
from lolcats.config import Config, ModelConfig
from lolcats.models.loading import load_base_model
from lolcats.training.stages import add_lora, distill_loss, lm_loss
from lolcats.training.trainer import autocast_context


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


def measure(model_name: str, backend: str, stage: str, batch: int, seq_len: int, iters: int, device) -> dict:
    cfg = Config()
    cfg.model = ModelConfig(name=model_name)
    cfg.attention.backend = backend
    model = load_base_model(cfg.model, device)
    convert_model(model, cfg.attention)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    if stage == "distill":
        for n, p in model.named_parameters():
            p.requires_grad_(".feature_map_" in n or "window_factors" in n)
        set_attention_mode(model, "distill")

        def step():
            loss, _ = distill_loss(model, ids, cfg, device)
            loss.backward()
    else:
        model = add_lora(model, cfg)
        set_attention_mode(model, "student")

        def step():
            lm_loss(model, ids, "auto", device).backward()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec = _time(step, 2, iters, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"stage": stage, "backend": backend, "batch": batch, "seq_len": seq_len, "s_per_step": sec,
            "tokens_per_s": batch * seq_len / sec, "peak_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--backends", nargs="+", default=["torch", "triton"])
    ap.add_argument("--stages", nargs="+", default=["distill", "finetune"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rows = [measure(a.model, b, s, a.batch, a.seq_len, a.iters, device) for s in a.stages for b in a.backends]
    base = {r["stage"]: r["tokens_per_s"] for r in rows if r["backend"] == "torch"}
    lines = [f"card: {card}; model {a.model}; batch {a.batch} x {a.seq_len} tokens; bf16 autocast",
             "| stage | backend | tokens/s | s/step | peak GiB | vs torch |", "|---|---|---|---|---|---|"]
    for r in rows:
        rel = r["tokens_per_s"] / base[r["stage"]] if r["stage"] in base else float("nan")
        lines.append(f"| {r['stage']} | {r['backend']} | {r['tokens_per_s']:,.0f} | {r['s_per_step']:.3f} | "
                     f"{r['peak_gib']:.1f} | {rel:.2f}x |")
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"card": card, "rows": rows, "table": "\n".join(lines)}, f, indent=2)


if __name__ == "__main__":
    main()
