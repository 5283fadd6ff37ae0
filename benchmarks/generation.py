"""Generation speed, end to end, against HF generate() at its best, in one run on one GPU.

Methods (each row generates exactly ``new`` tokens per sequence: min = max new tokens, no stop):
  fast        ours: FastGenerator (states preallocated, one CUDA graph per token), converted model;
  generate    ours: the converted model under plain HF ``generate()`` with a LolcatsCache;
  hf-static   the same base weights, unconverted (softmax, SDPA), under ``generate(...,
              cache_implementation="static")``: transformers then compiles the forward itself
              (torch.compile, mode reduce-overhead = CUDA graphs; on CUDA only; --no-compile turns
              it off, --hf-compile-backend picks the backend and then compiles on CPU too);
  hf-dynamic  the same, with HF's default DynamicCache (no compilation).
A row: one untimed first call (``first_call_s``: for fast and hf-static the same whole generation,
which captures / compiles; for the others the prompt and two new tokens), then the timed whole
generation (``e2e_s``, prefill included: the headline ``tokens_per_s`` = batch * new / e2e_s),
then the prefill alone (``prefill_s``: a call that makes one token, best of 3 when under 0.5 s);
``decode_ms`` = (e2e_s - prefill_s) / (new - 1). hf-static's ``recompiles_timed`` counts graphs
compiled during the timed call (0 expected). Peak memory per row (reset before it). A row that
runs out of memory is recorded as OOM and its group (larger batches, longer prompts) stops.

Rows: ``short`` (prompt --short-prompt, --short-new new tokens, each of --batches) and ``long``
(each of --prompt-lens, --long-new new tokens, each of --long-batches); ``--find-oom`` doubles the
largest short batch until a method runs out of memory. Models: anything ``load_base_model`` loads
(``smollm2-135m-instruct``, a .gguf) or a configs/shapes name or config.json path (random weights:
``llama3-8b``; speed does not depend on the values). A pretrained model's long rows stop at its
context length (SmolLM2: 8,192) unless --beyond-context; random-weight shapes run every length.
Feature maps untrained. Baselines run first (on the unconverted model), then the model is
converted in place for ours. --time-budget: a row predicted not to fit is recorded as skipped.

Results go to --out after every row (generation.json, generation.md; the PNGs at the end); rows
already in --out/generation.json are kept (a row measured again replaces its old one) unless
--fresh, so several calls add up to one table. ``--plot FILE.json ...`` only redraws table and
plots (generation-<model>.png) from saved JSON, on a CPU too.

    python -m benchmarks.generation --models llama3-8b --rows short --batches 1,16,256 --out runs/gen
    python -m benchmarks.generation --models llama3-8b --rows long --prompt-lens 4096,16384 --out runs/gen
    python -m benchmarks.generation --plot runs/gen/generation.json --out runs/gen
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml
from benchmarks import common

METHODS = ("fast", "fast-compiled", "generate", "hf-static", "hf-dynamic")
OURS, BASELINES = ("fast", "fast-compiled", "generate"), ("hf-static", "hf-dynamic")
ROW_KINDS = ("short", "long")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m-instruct,llama3-8b",
                   help="comma list: configs/shapes names or config.json paths (random weights), or anything "
                        "load_base_model accepts")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--rows", default="short,long", help=f"comma list of {', '.join(ROW_KINDS)}")
    p.add_argument("--batches", default="1,16,64,256,1024", help="short rows' batch sizes")
    p.add_argument("--short-prompt", type=int, default=128)
    p.add_argument("--short-new", type=int, default=1024)
    p.add_argument("--prompt-lens", default="4096,16384,32768,65536", help="long rows' prompt lengths")
    p.add_argument("--long-new", type=int, default=256)
    p.add_argument("--long-batches", default="1,16")
    p.add_argument("--find-oom", action="store_true",
                   help="short rows: after --batches, double the batch until each method runs out of memory")
    p.add_argument("--max-batch", type=int, default=65536, help="largest batch --find-oom tries")
    p.add_argument("--beyond-context", action="store_true",
                   help="run a pretrained model's long rows past its max_position_embeddings too")
    p.add_argument("--no-compile", action="store_true", help="hf-static without torch.compile")
    p.add_argument("--hf-compile-backend",
                   help="hf-static: torch.compile backend (default transformers': inductor); given, it compiles on "
                        "CPU too (e.g. eager: the CPU tests run the compiled path this way)")
    p.add_argument("--no-fuse", action="store_true",
                   help="fast / fast-compiled: FastGenerator(fuse=False), without the inference fusions (one q/k/v "
                        "GEMM; RoPE + Hedgehog in one op; RMSNorm in one op; one gate/up GEMM and SiLU product "
                        "op): the A/B baseline (label the rows with --variant)")
    p.add_argument("--kind", default="terraced_window", choices=["linear", "sliding_window", "terraced_window"])
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--attn", action="append", default=[], metavar="KEY=VALUE",
                   help="another attention.* field for ours (repeatable), e.g. sparse_cache=64, gate=pooled_keys, "
                        "softmax_layers=0,15, window_size=128")
    p.add_argument("--variant", default="", help="a label for these rows (added to the model's name in the table)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu (tiny tests only)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="seconds for the whole run; a row predicted not to fit is recorded as skipped")
    p.add_argument("--no-skip", action="store_true", help="run every row whatever the time predictor says")
    p.add_argument("--diagnose", action="store_true",
                   help="fast rows on CUDA: kernels per eager step, their device time and the largest of them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-generation")
    p.add_argument("--fresh", action="store_true", help="drop the rows already in --out/generation.json")
    p.add_argument("--plot", nargs="+", metavar="JSON", help="only write table and plots from saved JSON files")
    args = p.parse_args(argv)
    for name, allowed in (("methods", METHODS), ("rows", ROW_KINDS)):
        bad = [m for m in getattr(args, name).split(",") if m and m not in allowed]
        if bad:
            p.error(f"unknown --{name} {', '.join(bad)}; known: {', '.join(allowed)}")
    return args


# ---------------------------------------------------------------- device helpers


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error, also when wrapped (inductor and dynamo re-raise with the cause attached)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower():
            return True
        e, seen = (e.__cause__ or e.__context__), seen + 1
    return False


def free_memory(model=None) -> None:
    """Between rows: compiled graphs (and their CUDA-graph pools), HF's remembered static-cache length."""
    if model is not None:
        for attr in ("_compiled_call", "_last_compile_config", "_previous_max_cache_length", "_cache"):
            if attr in vars(model):
                delattr(model, attr)
    if "torch._dynamo" in sys.modules:  # not imported: nothing was compiled
        try:
            torch._dynamo.reset()
        except Exception:  # noqa: BLE001 - a reset that fails leaves the next row to recompile anyway
            pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def measure_bandwidth(dev: torch.device, gib: float = 2.0) -> float | None:
    """Bytes/s of a device-to-device copy (read + write counted); None on CPU."""
    if dev.type != "cuda":
        return None
    n = int(gib * 2**30) // 4
    a, b = torch.empty(n, device=dev), torch.empty(n, device=dev)
    b.copy_(a)
    sync(dev)
    t = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    sync(dev)
    bw = 5 * 2 * n * 4 / (time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return bw


# ---------------------------------------------------------------- models


def is_random(name: str) -> bool:
    from lolcats.models.loading import known_shapes

    return name in known_shapes() or name.endswith(".json")


def load_model(name: str, dev: torch.device, dtype: str):
    """The unconverted model (the baselines run first; ``convert`` turns it into ours in place)."""
    from lolcats.config import ModelConfig
    from lolcats.models.loading import load_base_model

    init = "random" if is_random(name) else "pretrained"
    model = load_base_model(ModelConfig(name=name, dtype=dtype, init=init), dev)
    model.generation_config.eos_token_id = None  # with min_new_tokens = max: exactly N tokens per row
    model.generation_config.pad_token_id = 0
    return model.eval()


def convert(model, args):
    from lolcats.attention.convert import convert_model
    from lolcats.attention.modes import set_attention_mode
    from lolcats.config import config_from_dict
    from lolcats.generation import enable_lolcats_generation

    fields = dict(kind=args.kind, window_size=args.window, feature_dim=args.feature_dim, feature_init="random")
    for item in args.attn:
        key, _, value = item.partition("=")
        fields[key] = yaml.safe_load(value) if "," not in value else [yaml.safe_load(v) for v in value.split(",")]
    attn = config_from_dict({"attention": fields}).attention  # checked like any config
    convert_model(model, attn)
    set_attention_mode(model, "student")
    return enable_lolcats_generation(model.eval())


def attention_backend(model) -> str:
    """The kernel set the converted model's prefill and decode use ("auto" resolved)."""
    from lolcats import ops

    like = next(model.parameters())
    try:
        return ops.get_backend("auto", like).name
    except Exception as e:  # noqa: BLE001 - a report, not a requirement
        return f"? ({type(e).__name__})"


# ---------------------------------------------------------------- one row


def prompt(model, batch: int, length: int, seed: int):
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=g).to(dev)
    return ids, torch.ones_like(ids)


def timed(dev, fn) -> float:
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def best_of(dev, fn, quick_s: float = 0.5) -> float:
    """Seconds of ``fn()``: the least of three runs when one is quicker than ``quick_s`` (less noise)."""
    t = timed(dev, fn)
    return min([t] + [timed(dev, fn) for _ in range(2)]) if t < quick_s else t


def run_fast(model, ids, mask, new: int, diagnose: bool, compile: bool = False, fuse: bool = True) -> dict:
    """FastGenerator; ``compile``: its step's forward through torch.compile (inductor) before capture;
    ``fuse``: its inference fusions."""
    from lolcats.generation import FastGenerator

    dev, B = ids.device, ids.shape[0]
    out = {}
    sync(dev)
    t0 = time.perf_counter()
    gen = FastGenerator(model, B, new, eos_token_ids=[], pad_token_id=0, compile=compile and dev.type == "cuda",
                        fuse=fuse)
    gen.generate(ids, mask)  # the states' allocation, the graph capture, kernels' first use
    sync(dev)
    first = time.perf_counter() - t0
    e2e = timed(dev, lambda: out.__setitem__("toks", gen.generate(ids, mask)))
    if tuple(out["toks"].shape) != (B, new):
        raise RuntimeError(f"fast made {tuple(out['toks'].shape)} tokens, expected {(B, new)}")
    prefill = best_of(dev, lambda: gen.prefill(ids, mask))
    row = dict(first_call_s=first, e2e_s=e2e, prefill_s=prefill, state_bytes_per_seq=gen.state_nbytes() / B)
    if diagnose and dev.type == "cuda":
        row.update(diagnostics(gen))
    return row


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (since its last reset)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"].get("unique_graphs", 0))
    except Exception:  # noqa: BLE001 - a check, not a requirement
        return 0


def hf_kwargs(method: str, dev: torch.device, args) -> dict:
    kw = dict(do_sample=False, pad_token_id=0)
    if method == "hf-static":
        kw["cache_implementation"] = "static"
        if args.no_compile:
            kw["disable_compile"] = True
        elif args.hf_compile_backend:
            from transformers import CompileConfig

            cc = CompileConfig(backend=args.hf_compile_backend)
            cc._compile_all_devices = dev.type != "cuda"  # transformers compiles by itself on CUDA only
            kw["compile_config"] = cc
    return kw


def run_hf(model, method: str, ids, mask, new: int, args) -> dict:
    """One HF ``generate()`` row (hf-static, hf-dynamic, or ours under it: generate)."""
    dev = ids.device
    kw = hf_kwargs(method, dev, args)
    out = {}

    def gen(n, i=ids, m=mask):
        with torch.no_grad():
            out["toks"] = model.generate(i, attention_mask=m, max_new_tokens=n, min_new_tokens=n, **kw)

    if method == "hf-static":  # compiles for these shapes (the cache length included): the same call
        first = timed(dev, lambda: gen(new))
    else:  # the prompt's prefill and two decode steps: every kernel's first use (Triton's JIT for ours)
        first = timed(dev, lambda: gen(2))
    graphs = graphs_compiled()
    e2e = timed(dev, lambda: gen(new))
    if tuple(out["toks"].shape) != (ids.shape[0], ids.shape[1] + new):
        raise RuntimeError(f"{method} made {tuple(out['toks'].shape)}, expected {(ids.shape[0], ids.shape[1] + new)}")
    row = dict(first_call_s=first, e2e_s=e2e, prefill_s=best_of(dev, lambda: gen(1)))
    if method == "hf-static":
        row["compiled"] = "_compiled_call" in vars(model)
        row["recompiles_timed"] = graphs_compiled() - graphs  # 0: the timed call ran what the first compiled
        if row["recompiles_timed"]:
            print(f"warning: hf-static compiled {row['recompiles_timed']} graph(s) again after the first call: "
                  "its e2e_s includes compilation", file=sys.stderr)
    return row


def run_row(model, method: str, batch: int, prompt_len: int, new: int, args) -> dict:
    dev = next(model.parameters()).device
    ids, mask = prompt(model, batch, prompt_len, args.seed)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    if method in ("fast", "fast-compiled"):
        row = run_fast(model, ids, mask, new, args.diagnose, compile=method == "fast-compiled",
                       fuse=not args.no_fuse)
    else:
        row = run_hf(model, method, ids, mask, new, args)
    row.update(status="ok", peak_gib=peak_gib(dev), row_s=time.perf_counter() - start,
               tokens_per_s=batch * new / row["e2e_s"],
               decode_ms=(row["e2e_s"] - row["prefill_s"]) / max(1, new - 1) * 1e3)
    row["decode_tokens_per_s"] = batch / (row["decode_ms"] / 1e3) if row["decode_ms"] > 0 else None
    if row.get("compiled"):
        row["compile_s"] = max(0.0, row["first_call_s"] - row["e2e_s"])
    return row


def diagnostics(gen, top: int = 12) -> dict:
    """Kernels one eager step launches (what the graph replays: without autograd, as ``generate`` runs it), their
    device time and the ``top`` largest by time (name, us, launches): a graphed step of a small model takes about
    the sum of its kernels' times. Only device activity is recorded, so no time is counted twice (an aten op and
    its kernel)."""
    out = {}
    try:
        from torch.profiler import ProfilerActivity, profile

        key = gen.step_key()
        out["step_may_evict"] = bool(key.meta.may_evict)  # the variant profiled (a block's first token evicts)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            gen.runner.step(key)
            torch.cuda.synchronize()
        out["kernels_per_step"] = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        kernels = [(e.key, getattr(e, "device_time_total", 0) or 0, e.count) for e in prof.key_averages()]
        kernels = sorted((k for k in kernels if k[1] > 0), key=lambda k: -k[1])
        out["device_us_per_step"] = sum(k[1] for k in kernels)
        out["top_kernels"] = [[name[:80], round(us, 1), n] for name, us, n in kernels[:top]]
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        out["diagnose_error"] = f"{type(e).__name__}: {e}"
    return out


# ---------------------------------------------------------------- the plan and the sweep


def plan(args, name: str, context: int | None) -> list[dict]:
    """Rows for one model, baselines first (they need the unconverted model), in sweep groups."""
    methods = [m for m in args.methods.split(",") if m]
    methods = [m for m in BASELINES if m in methods] + [m for m in OURS if m in methods]
    kinds = [k for k in args.rows.split(",") if k]
    rows = []
    for method in methods:
        if "short" in kinds:
            batches = _ints(args.batches)
            if args.find_oom:
                b = max(batches)
                while b * 2 <= args.max_batch:
                    b *= 2
                    batches.append(b)
            group = f"{name}|{method}|short"
            rows += [dict(model=name, method=method, rows="short", batch=b, prompt_len=args.short_prompt,
                          new_tokens=args.short_new, group=group) for b in batches]
        if "long" in kinds:
            for b in _ints(args.long_batches):
                for T in _ints(args.prompt_lens):
                    r = dict(model=name, method=method, rows="long", batch=b, prompt_len=T,
                             new_tokens=args.long_new, group=f"{name}|{method}|long|b{b}")
                    if context is not None and T + args.long_new > context and not args.beyond_context:
                        r["status"] = f"skipped (beyond the model's context, {context})"
                    rows.append(r)
    return rows


def predict(done: list[dict], row: dict) -> float:
    """Seconds ``row`` will take, from the last finished row of its group (0 when there is none).

    Short rows scale with sqrt(batch) (an upper bound seen on the H200: batch 1 -> 256 took 1.6x the
    time for fast, 5.7x for hf-static; linear scaling made the sweep skip rows that would have taken
    seconds); long rows with the prompt length; a compile costs what the last one did.
    """
    ok = [r for r in done if r.get("status") == "ok" and r["method"] == row["method"]]
    last = next((r for r in reversed(ok) if r["group"] == row["group"]), None)
    if last is None:  # the group's first row: as long as the method's last row (its compile included)
        return ok[-1]["row_s"] if ok else 0.0
    if row["rows"] == "long":
        return last["row_s"] * row["prompt_len"] / last["prompt_len"]
    r = row["batch"] / last["batch"]
    compile_s = last.get("compile_s") or 0.0
    return compile_s + (last["row_s"] - compile_s) * max(1.0, r**0.5)


def sweep(model, rows: list[dict], args, deadline: float, done: list[dict], save) -> None:
    """Run ``rows`` (one method's groups) in order; after an OOM or a time skip the group stops."""
    stopped: set[str] = set()
    for row in rows:
        if row["group"] in stopped:
            continue
        if "status" in row:  # planned as skipped (beyond the context)
            done.append(row)
            save()
            print(fmt_row(row), flush=True)
            continue
        left = deadline - time.perf_counter()
        guess = predict(done, row)
        if not args.no_skip and (guess > left or left < 5):
            done.append(dict(row, status="skipped (time)", predicted_s=guess))
            stopped.add(row["group"])
            save()
            print(fmt_row(done[-1]), f"(predicted {guess:.0f} s, {left:.0f} s left)", flush=True)
            continue
        free_memory(model)
        try:
            row.update(run_row(model, row["method"], row["batch"], row["prompt_len"], row["new_tokens"], args))
        except Exception as e:  # noqa: BLE001 - an OOM is a result; anything else is reported and the group ends
            row["status"] = "OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:200]}"
            if row["status"] != "OOM":
                traceback.print_exc(limit=-6)
            row["peak_gib"] = peak_gib(next(model.parameters()).device)
            stopped.add(row["group"])
        free_memory(model)
        done.append(row)
        save()
        print(fmt_row(row), flush=True)


# ---------------------------------------------------------------- reporting

COLS = ("model", "method", "rows", "prompt_len", "new_tokens", "batch", "status", "tokens_per_s", "e2e_s",
        "prefill_s", "decode_ms", "decode_tokens_per_s", "first_call_s", "compiled", "compile_s", "recompiles_timed", "peak_gib",
        "state_mb_per_seq", "kernels_per_step")


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def fmt_row(r: dict) -> str:
    r = dict(r, model=model_label(r["model"]))
    if r.get("state_bytes_per_seq"):
        r["state_mb_per_seq"] = r["state_bytes_per_seq"] / 1e6
    return " | ".join(fmt(r.get(c)) for c in COLS)


def comparison(rows: list[dict]) -> list[str]:
    """One line per (model, prompt, new, batch): end-to-end tokens/s per method and ours / hf-static."""
    keys = sorted({(r["model"], r["prompt_len"], r["new_tokens"], r["batch"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2], k[3]))
    out = ["| model | prompt | new | batch | " + " | ".join(METHODS)
           + " | fast / hf-static | fast-compiled / hf-static | fast / hf-dynamic |", "|" + "---|" * (7 + len(METHODS))]

    def val(r):
        if r is None:
            return None
        return r["tokens_per_s"] if r.get("status") == "ok" else r.get("status", "").split(" (")[0]

    for k in keys:
        by = {r["method"]: r for r in rows if (r["model"], r["prompt_len"], r["new_tokens"], r["batch"]) == k}
        v = {m: val(by.get(m)) for m in METHODS}

        def ratio(a, b):
            return f"{v[a] / v[b]:.2f}x" if all(isinstance(v[x], float) for x in (a, b)) else "-"

        runs = {by[m].get("run") for m in ("fast", "hf-static") if m in by}
        mark = " (two runs)" if len(runs) > 1 else ""
        out.append(f"| {model_label(k[0])} | {k[1]} | {k[2]} | {k[3]} | " + " | ".join(fmt(v[m]) for m in METHODS)
                   + f" | {ratio('fast', 'hf-static')}{mark} | {ratio('fast-compiled', 'hf-static')}"
                   + f" | {ratio('fast', 'hf-dynamic')} |")
    return out


def oom_lines(rows: list[dict]) -> list[str]:
    lines = []
    for group in sorted({r["group"] for r in rows}):
        g = [r for r in rows if r["group"] == group]
        ok = [r["batch"] for r in g if r.get("status") == "ok"]
        oom = [r["batch"] for r in g if r.get("status") == "OOM"]
        if oom:
            r0 = g[0]
            lines.append(f"- {model_label(r0['model'])} {r0['method']} (prompt {r0['prompt_len']}, "
                         f"+{r0['new_tokens']}): **OOM at batch {min(oom)}**"
                         + (f"; largest that ran: {max(ok)}" if ok else ""))
    return lines


def markdown(data: dict) -> str:
    runs, rows = data["runs"], data["rows"]
    head = ["# Generation benchmark", ""]
    for i, m in enumerate(runs):
        g = lambda k: m.get(k, "?")  # noqa: E731
        head.append(f"- run {i}: **{g('device')}**, torch {g('torch')}, transformers {g('transformers')}"
                    + (f", triton {m['triton']}" if m.get("triton") else "")
                    + f", {g('dtype')}; attention {g('attention')} (kernels: {g('backend')}); "
                    f"hf-static compile: {g('hf_compile')}"
                    + (f"; copy bandwidth {m['bandwidth_gbs']:.0f} GB/s" if m.get("bandwidth_gbs") else "")
                    + f"; {g('date')}")
    head += ["", "fast = FastGenerator (ours, CUDA graph per token); generate = ours under HF generate() with a "
             "LolcatsCache; hf-static = the unconverted model under generate(cache_implementation=\"static\"), "
             "compiled by transformers on CUDA (row column `compiled`); hf-dynamic = the same with HF's "
             "DynamicCache. tokens_per_s = batch x new / e2e_s, one whole generate() (prefill included) after an "
             "untimed first call (first_call_s; hf-static's compile_s = first call - e2e). prefill_s: a call "
             "making one token; decode_ms = (e2e_s - prefill_s) / (new - 1). Random-weight models (configs/shapes "
             "names) measure speed only.", "", "## End to end tokens/s, ours vs the baselines", ""]
    head += comparison(rows) + [""]
    ooms = oom_lines(rows)
    if ooms:
        head += ["## Out of memory", ""] + ooms + [""]
    head += ["## All rows", "", "| run | " + " | ".join(COLS) + " |", "|" + "---|" * (len(COLS) + 1)]
    return "\n".join(head + [f"| {r.get('run', '-')} | " + fmt_row(r) + " |" for r in rows]) + "\n"


def plot(rows: list[dict], out: Path) -> list[Path]:
    """One PNG per model: tokens/s vs batch (short rows), vs prompt length (long rows), peak memory."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install matplotlib)")
        return []
    paths = []
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
        for method in METHODS:
            short = sorted((r for r in mine if r["method"] == method and r["rows"] == "short"),
                           key=lambda r: r["batch"])
            ok = [r for r in short if r.get("status") == "ok"]
            if ok:
                line, = axes[0].plot([r["batch"] for r in ok], [r["tokens_per_s"] for r in ok], "o-", label=method)
                mem = [r for r in ok if r.get("peak_gib")]
                if mem:
                    axes[2].plot([r["batch"] for r in mem], [r["peak_gib"] for r in mem], "o-", label=method)
                oom = [r["batch"] for r in short if r.get("status") == "OOM"]
                if oom:
                    axes[0].plot([min(oom)], [ok[-1]["tokens_per_s"]], "x", ms=10, color=line.get_color())
                    axes[0].annotate("OOM", (min(oom), ok[-1]["tokens_per_s"]), fontsize=7)
            for b in sorted({r["batch"] for r in mine if r["rows"] == "long"}):
                lr = sorted((r for r in mine if r["method"] == method and r["rows"] == "long" and r["batch"] == b
                             and r.get("status") == "ok"), key=lambda r: r["prompt_len"])
                if lr:
                    axes[1].plot([r["prompt_len"] for r in lr], [r["tokens_per_s"] for r in lr],
                                 "o-" if b == 1 else "s--", label=f"{method} batch {b}")
        short_new = {r["new_tokens"] for r in mine if r["rows"] == "short"}
        long_new = {r["new_tokens"] for r in mine if r["rows"] == "long"}
        titles = (f"{model_label(model)}: tokens/s end to end (+{'/'.join(map(str, sorted(short_new)))} new)",
                  f"long prompts (+{'/'.join(map(str, sorted(long_new)))} new)", "peak memory (short rows)")
        for ax, xl, yl, title in zip(axes, ("batch", "prompt tokens", "batch"),
                                     ("tokens / s (prefill included)", "tokens / s (prefill included)", "GiB"),
                                     titles):
            ax.set_xscale("log", base=2)
            if ax.has_data():
                ax.set_yscale("log")
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.set_title(title, fontsize=9)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        slug = "".join(c if c.isalnum() or c in "-." else "-" for c in model_label(model))
        path = out / f"generation-{slug}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def model_label(name: str) -> str:
    """A model's short name: a path's file stem (.gguf, .json) or folder name; other names as given."""
    p = Path(name)
    return p.stem if p.suffix in (".gguf", ".json") else p.name


def load_results(paths: list[Path]) -> dict:
    """Rows of several saved runs, their run numbers renumbered; a later row replaces an earlier one."""
    data = {"runs": [], "rows": []}
    for p in paths:
        d = json.loads(Path(p).read_text())
        base = len(data["runs"])
        data["runs"] += d.get("runs", [])
        for r in d.get("rows", []):
            add_row(data["rows"], dict(r, run=r.get("run", 0) + base))
    return data


def key(r: dict) -> tuple:
    return (r["model"], r["method"], r["batch"], r["prompt_len"], r["new_tokens"])


def add_row(rows: list[dict], row: dict) -> None:
    rows[:] = [r for r in rows if key(r) != key(row)] + [row]


def write(data: dict, out: Path, png: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "generation.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out / "generation.json")
    (out / "generation.md").write_text(markdown(data))
    if png:
        plot(data["rows"], out)


# ---------------------------------------------------------------- main


def run_meta(args, dev: torch.device, dtype: torch.dtype, bw: float | None) -> dict:
    import transformers

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    name = common.card(dev)
    return dict(device=name, torch=torch.__version__, transformers=transformers.__version__, triton=tv,
                dtype=str(dtype).removeprefix("torch."), bandwidth_gbs=bw / 1e9 if bw else None,
                attention=f"{args.kind} w={args.window} hedgehog F={2 * args.feature_dim}",
                hf_compile="off" if args.no_compile else args.hf_compile_backend or "transformers' default (inductor, "
                "reduce-overhead; CUDA only)",
                fuse=not args.no_fuse, date=time.strftime("%Y-%m-%d %H:%M"), argv=" ".join(sys.argv[1:]))


def main(argv=None) -> None:
    try:
        from lolcats.runtime import resolve_device, resolve_dtype
    except ImportError:
        from lolcats.models.loading import resolve_device, resolve_dtype

    args = parse_args(argv)
    out = Path(args.out)
    if args.plot:
        data = load_results([Path(p) for p in args.plot])
        write(data, out)
        print(markdown(data))
        print(f"wrote {out}/generation.md and the plots")
        return
    dev = resolve_device(args.device)
    if dev.type != "cuda":
        print("no CUDA: a CPU run (tiny models only; hf-static is not compiled on CPU)")
    dtype = resolve_dtype(args.dtype, dev)
    prev = out / "generation.json"
    data = load_results([prev]) if prev.is_file() and not args.fresh else {"runs": [], "rows": []}
    run = len(data["runs"])
    data["runs"].append(run_meta(args, dev, dtype, measure_bandwidth(dev)))
    deadline = time.perf_counter() + args.time_budget
    print(f"device: {data['runs'][-1]['device']}; torch {torch.__version__}\n" + " | ".join(COLS), flush=True)
    mine: list[dict] = []

    def save() -> None:  # after every row: a run cut short keeps what it measured
        for r in mine:
            add_row(data["rows"], dict(r, run=run))
        write(data, out, png=False)

    for name in [m for m in args.models.split(",") if m]:
        try:
            model = load_model(name, dev, args.dtype)
        except Exception as e:  # noqa: BLE001 - a missing package or file: report and go on
            print(f"{name}: could not load ({type(e).__name__}: {e})")
            continue
        context = None if is_random(name) else getattr(model.config, "max_position_embeddings", None)
        rows = plan(args, name + (f" [{args.variant}]" if args.variant else ""), context)
        converted = False
        for method in dict.fromkeys(r["method"] for r in rows):
            if method in OURS and not converted:
                model, converted = convert(model, args), True
                data["runs"][run]["backend"] = attention_backend(model)
            sweep(model, [r for r in rows if r["method"] == method], args, deadline, mine, save)
        del model
        free_memory()
    save()
    write(data, out)
    print()
    print("\n".join(comparison([r for r in data["rows"] if r.get("run") == run])))
    print(f"wrote {out}/generation.{{json,md}} and generation-<model>.png")


if __name__ == "__main__":
    main()
