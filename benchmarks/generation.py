"""Generation throughput and peak memory vs batch size, on one GPU, in one run.

Methods, for each model:
  fast      FastGenerator: LolcatsCache states preallocated, one CUDA graph per token;
  generate  the converted model (student mode) under plain HF ``generate()`` with a LolcatsCache;
  base      the same weights in teacher mode (SDPA softmax attention, HF DynamicCache) under
            ``generate()``: the base model's baseline.
Models: a real checkpoint through ``load_base_model`` (e.g. ``smollm2-135m-instruct`` or a .gguf path),
and ``llama3-8b``: Llama-3-8B shapes with random bf16 weights (built on meta, materialised on the GPU).
Feature maps are untrained (throughput does not depend on them). Stop tokens are ignored so every
row generates exactly ``new_tokens``.

For llama3-8b the decode step must at least stream the weights once and each sequence's state once:
    t_step >= (weight bytes + state bytes x batch) / bandwidth,
with the bandwidth measured here by a device-to-device copy; the table gives the achieved fraction.

    python benchmarks/generation.py --models smollm2-135m-instruct,llama3-8b --new-tokens 1024 \
        --time-budget 300 --out runs/bench-generation
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from lolcats.attention.convert import convert_model, set_attention_mode
from lolcats.config import AttentionConfig, ModelConfig
from lolcats.generation import FastGenerator, enable_lolcats_generation

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
METHODS = ("fast", "generate", "base")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m-instruct,llama3-8b",
                   help="comma list: llama3-8b (random weights) or anything load_base_model accepts")
    p.add_argument("--model", action="append", default=[], help="add one model (repeatable)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {METHODS}")
    p.add_argument("--batches", default="1,4,16,64,256,1024,4096,16384")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", default="1024", help="comma list, e.g. 1024,4096")
    p.add_argument("--kind", default="terraced_window", choices=["linear", "sliding_window", "terraced_window"])
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--time-budget", type=float, default=300.0, help="seconds for the whole sweep")
    p.add_argument("--out", default="runs/bench-generation")
    return p.parse_args(argv)


# ---------------------------------------------------------------- models


def random_llama3_8b(device):
    """Llama-3-8B shapes, bf16, random weights, converted (feature maps float32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**LLAMA3_8B, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    return model, cfg


def materialise(model, device) -> None:
    """to_empty on ``device`` and a quick random init (RoPE tables rebuilt)."""
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "feature_map" in name:
                p.normal_(std=p.shape[-2] ** -0.5)
            elif name.endswith("window_factors"):
                p.fill_(math.log(0.1 / 0.9))
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(std=0.02)
    rope = type(model.model.rotary_emb)
    model.model.rotary_emb = rope(model.config).to(device)


def load_model(name: str, attn: AttentionConfig, device):
    if name == "llama3-8b":
        model, _ = random_llama3_8b(device)
        convert_model(model, attn)
        materialise(model, device)
    else:
        from lolcats.models.loading import load_base_model

        model = load_base_model(ModelConfig(name=name, dtype="bfloat16"), device)
        convert_model(model, attn)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    set_attention_mode(model, "student")
    return enable_lolcats_generation(model)


# ---------------------------------------------------------------- measuring


def measure_bandwidth(device, gib: float = 2.0) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    n = int(gib * 2**30) // 4
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 5 * 2 * n * 4 / (time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return bw


def run_once(model, method: str, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """One timed generation; returns seconds, tokens/s, peak memory, state bytes per sequence."""
    dev = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=dev)
    mask = torch.ones_like(ids)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    state = None
    set_attention_mode(model, "teacher" if method == "base" else "student")
    try:
        if method == "fast":
            gen = FastGenerator(model, batch, new_tokens, eos_token_ids=[], pad_token_id=0)
            gen.generate(ids[:, :8], mask[:, :8], max_new_tokens=4)  # capture + warm-up, untimed
            state = gen.state_nbytes() / batch
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = gen.generate(ids, mask)
        else:
            with torch.no_grad():
                model.generate(ids[:, :8], attention_mask=mask[:, :8], max_new_tokens=2, do_sample=False)
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False)
            out = out[:, prompt_len:]
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
    finally:
        set_attention_mode(model, "student")
    assert out.shape == (batch, new_tokens), out.shape
    return dict(seconds=dt, tokens_per_s=batch * new_tokens / dt,
                peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30, state_bytes_per_seq=state)


def sweep(model, name, method, batches, prompt_len, new_tokens, budget, bound) -> list[dict]:
    rows, start, last = [], time.perf_counter(), None
    for b in batches:
        spent = time.perf_counter() - start
        if last is not None:
            guess = last["seconds"] * max(1.5, (b / last["batch"]) ** 0.7) + 10
            if spent + guess > budget:
                rows.append(dict(model=name, method=method, batch=b, new_tokens=new_tokens, status="skipped (time)"))
                break
        row = dict(model=name, method=method, batch=b, new_tokens=new_tokens)
        try:
            row.update(run_once(model, method, b, prompt_len, new_tokens), status="ok")
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
        torch.cuda.empty_cache()
        if row["status"] == "ok" and bound is not None and method == "fast" and row["state_bytes_per_seq"]:
            step_min = (bound["weight_bytes"] + row["state_bytes_per_seq"] * b) / bound["bandwidth"]
            row["bound_tokens_per_s"] = b / step_min
            row["bound_fraction"] = row["tokens_per_s"] / row["bound_tokens_per_s"]
        rows.append(row)
        print(fmt_row(row), flush=True)
        if row["status"] != "ok":
            break
        last = row
    return rows


# ---------------------------------------------------------------- reporting

COLS = ("model", "method", "new_tokens", "batch", "status", "seconds", "tokens_per_s", "peak_gib",
        "state_bytes_per_seq", "bound_fraction")


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"
    return str(v)


def fmt_row(r: dict) -> str:
    return " | ".join(fmt(r.get(c)) for c in COLS)


def markdown(rows, meta) -> str:
    head = [f"# Generation benchmark on {meta['gpu']}", "",
            f"torch {meta['torch']}, transformers {meta['transformers']}; prompt {meta['prompt_len']} tokens; "
            f"attention {meta['attention']}; copy bandwidth {meta['bandwidth_gbs']:.0f} GB/s.", "",
            "fast = FastGenerator (CUDA graph); generate = converted model under HF generate(); "
            "base = same weights, teacher mode (SDPA + DynamicCache) under HF generate().", "",
            "| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    return "\n".join(head + ["| " + fmt_row(r) + " |" for r in rows]) + "\n"


def plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = sorted({(r["model"], r["method"], r["new_tokens"]) for r in rows})
    for key in keys:
        ok = [r for r in rows if (r["model"], r["method"], r["new_tokens"]) == key and r["status"] == "ok"]
        if ok:
            label = f"{key[0]} {key[1]} +{key[2]}"
            axes[0].plot([r["batch"] for r in ok], [r["tokens_per_s"] for r in ok], "o-", label=label)
            axes[1].plot([r["batch"] for r in ok], [r["peak_gib"] for r in ok], "o-", label=label)
    for ax, yl in zip(axes, ("tokens / s", "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(yl)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    import transformers

    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    dev = torch.device("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = [m for m in args.models.split(",") if m] + args.model
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        sys.exit(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    batches = [int(b) for b in args.batches.split(",")]
    new_tokens = [int(n) for n in args.new_tokens.split(",")]
    attn = AttentionConfig(kind=args.kind, window_size=args.window, feature_dim=args.feature_dim,
                           feature_init="random")
    bw = measure_bandwidth(dev)
    meta = dict(gpu=torch.cuda.get_device_name(dev), torch=torch.__version__, transformers=transformers.__version__,
                prompt_len=args.prompt_len, attention=f"{args.kind} w={args.window} hedgehog F={2 * args.feature_dim}",
                bandwidth_gbs=bw / 1e9)
    print(f"GPU: {meta['gpu']}  copy bandwidth {bw / 1e9:.0f} GB/s")
    print(" | ".join(COLS))
    rows: list[dict] = []
    deadline = time.perf_counter() + args.time_budget
    slots = len(models) * len(new_tokens) * len(methods)
    for name in models:
        try:
            model = load_model(name, attn, dev)
        except Exception as e:  # a missing package or file: report and go on
            print(f"{name}: could not load ({type(e).__name__}: {e})")
            slots -= len(new_tokens) * len(methods)
            continue
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        bound = dict(weight_bytes=weight_bytes, bandwidth=bw) if name == "llama3-8b" else None
        for n in new_tokens:
            for method in methods:
                budget = max(0.0, deadline - time.perf_counter()) / max(1, slots)
                slots -= 1
                rows += sweep(model, name, method, batches, args.prompt_len, n, budget, bound)
        del model
        torch.cuda.empty_cache()
    (out / "generation.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (out / "generation.md").write_text(markdown(rows, meta))
    plot(rows, out / "generation.png")
    print(markdown(rows, meta))
    print(f"wrote {out}/generation.{{md,json,png}}")


if __name__ == "__main__":
    main()
