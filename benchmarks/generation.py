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
import sys
import time
from pathlib import Path

import torch

from lolcats.attention.convert import convert_model, set_attention_mode
from lolcats.config import AttentionConfig, ModelConfig
from lolcats.generation import FastGenerator, enable_lolcats_generation

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
    p.add_argument("--sparse-cache", type=int, default=0,
                   help="LoLA sparse cache: pairs per KV head (0 = off; the decode step is then the PyTorch reference)")
    p.add_argument("--time-budget", type=float, default=300.0, help="seconds for the whole sweep")
    p.add_argument("--no-skip", action="store_true",
                   help="run every batch of --batches even when the time predictor says it will not fit")
    p.add_argument("--steps", type=int, default=64, help="fast: decode steps per timed window (early and late)")
    p.add_argument("--out", default="runs/bench-generation")
    return p.parse_args(argv)


# ---------------------------------------------------------------- models


def load_model(name: str, attn: AttentionConfig, device):
    """``llama3-8b``: random weights of that shape (configs/shapes); anything else: load_base_model."""
    from lolcats.models.loading import load_base_model

    init = "random" if name == "llama3-8b" else "pretrained"
    model = load_base_model(ModelConfig(name=name, dtype="bfloat16", init=init), device)
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


def time_steps(gen: FastGenerator, steps: int) -> float:
    """Seconds per decode step (graph replays) over ``steps`` steps."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    gen.decode(steps)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def jump_positions(gen: FastGenerator, to: int) -> None:
    """Move every row's position forward by a multiple of the window buffer, to about ``to``.

    The state has a fixed size, so a step's work cannot depend on the position; this jump (a
    multiple of S keeps each token's slot) lets the late window be timed without decoding the
    steps in between.
    """
    S = max([l.state.win_pos.shape[1] for l in gen.cache.layers if getattr(l, "state", None) is not None] + [1])
    now = int(gen.pos.max())
    gen.pos += max(0, (to - now) // S) * S
    gen.step_idx.fill_(1)  # keep writing inside the output buffer


def kernels_per_step(gen: FastGenerator) -> int:
    """CUDA kernels launched by one eager step (what the graph replays); -1 if the profiler fails."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            gen._step()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        print(f"kernel count failed: {type(e).__name__}: {e}")
        return -1


def _graph_seconds(run, steps: int) -> float:
    """Seconds per replay of a CUDA graph of ``run()``."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def attention_only_step(gen: FastGenerator, steps: int) -> tuple[float, float]:
    """Seconds per step of (1) only the decode-attention calls of every layer, (2) a floor for them:
    three cuBLAS batched products that read the state once (q K^T, p V, phi(q) kv), same states."""
    from lolcats.attention.convert import lolcats_attention_by_layer

    calls = []
    for i, m in sorted(lolcats_attention_by_layer(gen.model).items()):
        st, B, dt = gen.cache.layers[i].state, gen.B, m.q_proj.weight.dtype
        F = st.win_fk.shape[-1]
        q = torch.randn(B, m.num_heads, m.head_dim, device=gen.device, dtype=dt)
        k, v = (torch.randn(B, m.num_kv_heads, m.head_dim, device=gen.device, dtype=dt) for _ in range(2))
        fq = torch.rand(B, m.num_heads, F, device=gen.device).softmax(-1)  # the feature maps give float32
        fk = torch.rand(B, m.num_kv_heads, F, device=gen.device).softmax(-1)
        wf = None if m.cfg.kind == "linear" else m.window_factor().detach()
        calls.append((m, (q, k, v, fq, fk, st, gen.pos, wf, m.cfg.kind, m.cfg.window_size, m.scaling, None)))

    def run():
        for m, a in calls:
            m.decode_op(a[5])(*a)

    def floor():
        for m, (q, k, v, fq, fk, st, *_) in calls:
            n, S = st.kv.shape[0] * st.kv.shape[1], st.win_k.shape[2]
            G = m.num_heads // m.num_kv_heads
            torch.bmm(fq.view(n, G, -1), st.kv.view(n, *st.kv.shape[2:]))  # (n, G, Dv) float32
            if S:
                sc = torch.bmm(q.view(n, G, -1), st.win_k.view(n, S, -1).transpose(1, 2))  # (n, G, S)
                torch.bmm(sc, st.win_v.view(n, S, -1))  # (n, G, Dv)

    return _graph_seconds(run, steps), _graph_seconds(floor, steps)


def run_fast(model, batch: int, prompt_len: int, new_tokens: int, steps: int, warm: bool,
             diagnose: bool) -> dict:
    """Prefill timed alone (after an untimed one if ``warm``: kernel compilation); then ``steps``
    decode steps timed right after it (early window) and ``steps`` more at a position near
    ``prompt_len + new_tokens`` (late window); then the attention-only graph (attn_ms) and, if
    ``diagnose``, the kernel count of one step.
    tokens/s for ``new_tokens`` is extrapolated: batch * new_tokens / (prefill + new_tokens * step)."""
    dev = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=dev)
    mask = torch.ones_like(ids)
    gen = FastGenerator(model, batch, max(new_tokens, 2 * steps + 8), eos_token_ids=[], pad_token_id=0)
    gen.capture()  # untimed: two eager steps and the capture
    state = gen.state_nbytes() / batch
    if warm:
        gen.prefill(ids, mask)
    torch.cuda.synchronize()
    t = time.perf_counter()
    gen.prefill(ids, mask)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t
    gen.decode(4)  # first replays (lazy module loading etc.), untimed
    early = time_steps(gen, steps)
    row = dict(prefill_s=prefill, steps_timed=steps, step_ms_early=early * 1e3, state_bytes_per_seq=state)
    jump_positions(gen, prompt_len + new_tokens - steps)
    row["late_pos"] = int(gen.pos.max())
    late = time_steps(gen, steps)
    row["step_ms_late"] = late * 1e3
    step = (early + late) / 2
    seconds = prefill + new_tokens * step
    row.update(seconds=seconds, tokens_per_s=batch * new_tokens / seconds, decode_tokens_per_s=batch / step,
               step_ms=step * 1e3)
    attn, floor = attention_only_step(gen, max(4, steps // 4))
    row.update(attn_ms=attn * 1e3, attn_floor_ms=floor * 1e3)
    if diagnose:
        row["kernels_per_step"] = kernels_per_step(gen)
    return row


def run_generate(model, method: str, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """One timed HF generate() of ``new_tokens`` (``base``: teacher mode, softmax + DynamicCache)."""
    dev = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=dev)
    mask = torch.ones_like(ids)
    set_attention_mode(model, "teacher" if method == "base" else "student")
    try:
        with torch.no_grad():
            model.generate(ids[:, :8], attention_mask=mask[:, :8], max_new_tokens=2, do_sample=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
    finally:
        set_attention_mode(model, "student")
    assert out.shape == (batch, prompt_len + new_tokens), out.shape
    return dict(seconds=dt, tokens_per_s=batch * new_tokens / dt, steps_timed=new_tokens,
                step_ms=dt / new_tokens * 1e3)


def predict(last: dict | None, b: int, method: str, new_tokens: int, steps: int) -> float:
    """Seconds the next batch will take, from the last one's measured per-step (and prefill) time.

    Per-step time grows at most linearly with the batch (less while the weights dominate), so the
    linear scaling is an upper bound; ``fast`` costs the prefill, two windows of ``steps`` steps
    and a few untimed ones (capture).
    """
    if last is None:
        return 0.0
    r = b / last["batch"]
    if method == "fast":
        return (last["prefill_s"] + last["step_ms"] / 1e3 * (2 * steps + 12 + steps // 2)) * r + 5
    return last["step_ms"] / 1e3 * new_tokens * max(1.0, r**0.5) + 5  # host-bound at small batch


def sweep(model, name, method, batches, prompt_len, new_tokens, budget, bound, steps, on_row=None,
          skip: bool = True) -> list[dict]:
    rows, start, last = [], time.perf_counter(), None
    for i, b in enumerate(batches):
        spent = time.perf_counter() - start
        row = dict(model=name, method=method, batch=b, new_tokens=new_tokens)
        n_steps = steps  # shorter windows when the full ones would not fit
        while n_steps > 8 and spent + predict(last, b, method, new_tokens, n_steps) > budget:
            n_steps //= 2
        if skip and spent + predict(last, b, method, new_tokens, n_steps) > budget:
            rows.append(dict(row, status="skipped (time)",
                             predicted_s=predict(last, b, method, new_tokens, n_steps)))
            print(fmt_row(rows[-1]), f"(predicted {rows[-1]['predicted_s']:.0f} s, {budget - spent:.0f} s left)",
                  flush=True)
            if on_row:
                on_row(rows)
            break
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            if method == "fast":
                row.update(run_fast(model, b, prompt_len, new_tokens, n_steps, warm=i == 0, diagnose=i == 0),
                           status="ok")
            else:
                row.update(run_generate(model, method, b, prompt_len, new_tokens), status="ok")
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
        torch.cuda.empty_cache()
        if row["status"] == "ok" and bound is not None and method == "fast" and row["state_bytes_per_seq"]:
            step_min = (bound["weight_bytes"] + row["state_bytes_per_seq"] * b) / bound["bandwidth"]
            row["bound_tokens_per_s"] = b / step_min
            row["bound_fraction"] = row["decode_tokens_per_s"] / row["bound_tokens_per_s"]
        rows.append(row)
        print(fmt_row(row), flush=True)
        if on_row:
            on_row(rows)
        if row["status"] != "ok":
            break
        last = row
    return rows


# ---------------------------------------------------------------- reporting

COLS = ("model", "method", "new_tokens", "batch", "status", "prefill_s", "steps_timed", "step_ms_early",
        "step_ms_late", "late_pos", "attn_ms", "attn_floor_ms", "kernels_per_step", "decode_tokens_per_s", "tokens_per_s", "peak_gib",
        "state_mb_per_seq", "bound_fraction")


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"
    return str(v)


def fmt_row(r: dict) -> str:
    r = dict(r, state_mb_per_seq=r["state_bytes_per_seq"] / 1e6) if r.get("state_bytes_per_seq") else r
    return " | ".join(fmt(r.get(c)) for c in COLS)


def markdown(rows, meta) -> str:
    head = [f"# Generation benchmark on {meta['gpu']}", "",
            f"torch {meta['torch']}, transformers {meta['transformers']}; prompt {meta['prompt_len']} tokens; "
            f"attention {meta['attention']}; copy bandwidth {meta['bandwidth_gbs']:.0f} GB/s.", "",
            "fast = FastGenerator (CUDA graph); generate = converted model under HF generate(); "
            "base = same weights, teacher mode (SDPA + DynamicCache) under HF generate().", "",
            "fast: the prompt's prefill is timed alone (prefill_s); then `steps_timed` decode steps (graph "
            "replays) right after it (step_ms_early) and `steps_timed` steps at position late_pos (step_ms_late; "
            "reached by moving every row's position forward by a multiple of the window buffer, since the "
            "state has a constant size). decode_tokens_per_s = batch / mean step time; tokens_per_s = "
            "batch * new_tokens / (prefill_s + new_tokens * step), extrapolated from those windows. "
            "attn_ms: the decode-attention calls of all layers alone (a graph of them, same states); "
            "attn_floor_ms: three cuBLAS batched products per layer reading the state once (q K^T, p V, "
            "phi(q) kv; no softmax, no state update), a floor for attn_ms; "
            "kernels_per_step: CUDA kernels of one (eager) step, i.e. the nodes the graph replays. "
            "bound_fraction: decode tokens/s over batch * bandwidth / (weight bytes + state bytes * batch). "
            "generate/base: one full generate() of new_tokens, timed whole (prefill included).", "",
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
                           feature_init="random", sparse_cache=args.sparse_cache)
    bw = measure_bandwidth(dev)
    meta = dict(gpu=torch.cuda.get_device_name(dev), torch=torch.__version__, transformers=transformers.__version__,
                prompt_len=args.prompt_len, attention=f"{args.kind} w={args.window} hedgehog F={2 * args.feature_dim}"
                + (f" sparse cache {args.sparse_cache}" if args.sparse_cache else ""),
                bandwidth_gbs=bw / 1e9)
    print(f"GPU: {meta['gpu']}  copy bandwidth {bw / 1e9:.0f} GB/s")
    print(" | ".join(COLS))
    rows: list[dict] = []

    def save(current: list[dict] = ()) -> None:  # after every row: a run cut short still leaves its table
        (out / "generation.json").write_text(json.dumps(dict(meta=meta, rows=rows + list(current)), indent=1))
        (out / "generation.md").write_text(markdown(rows + list(current), meta))

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
                rows += sweep(model, name, method, batches, args.prompt_len, n, budget, bound, args.steps, save,
                              skip=not args.no_skip)
        del model
        torch.cuda.empty_cache()
    save()
    plot(rows, out / "generation.png")
    print(markdown(rows, meta))
    print(f"wrote {out}/generation.{{md,json,png}}")


if __name__ == "__main__":
    main()
