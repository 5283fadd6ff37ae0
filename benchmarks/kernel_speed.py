"""Benchmark the Triton attention kernels against PyTorch SDPA (flash) and the references.

    python -m benchmarks.kernel_speed --out kernels.md      # GPU: prefill, decode and feature-map tables
    python -m benchmarks.kernel_speed --quick               # tiny CPU smoke run (TRITON_INTERPRET=1)
    python -m benchmarks.kernel_speed --sections gate --out gate.md   # GPU: gated vs ungated kernels only
    python -m benchmarks.kernel_speed --sections sparse --out sparse.md   # GPU: the sparse-cache prefill

Prefill: forward and forward+backward milliseconds for SmolLM2 (H=9, Hk=3, D=64) and
Llama-3-8B (H=32, Hk=8, D=128) shapes, F=128 hedgehog features, window 64, T = 1K..32K with
B*T = 64K tokens, bf16. Baseline: causal SDPA with the flash backend (KV heads expanded, same
FLOPs as GQA). Speed-ups are SDPA time / kernel time. TFLOP/s of the kernels use a model count
(the dots the kernels issue), against a measured bf16 8192^3 matmul.
Decode: one step of the fused kernel (replayed from a CUDA graph) at batch 1..1024, with the bytes
of state it touches per step (window k, v, positions, kv/ks read and written) and GB/s against a
measured device copy.
Feature map: the Hedgehog map as PyTorch ops (the reference, what the torch backend runs: a
batched matmul, two softmaxes, concatenation, clamp) and as one fused Triton op
(``ops/triton/feature_map.py``, what the triton backend runs), on q and k, against the terraced
kernel on its outputs. Gate: the kernels with a forget gate on the linear part
(``attention.gate pooled_keys``, ``ops/gate.py``; log gates of Liger's scale, with their gradient)
against the same kernels ungated, prefill forward / forward+backward and the decode step (from a
CUDA graph), ratio = gated / ungated time.
Sparse: a prefill chunk through LoLA's sparse cache (256 pairs per KV head, sink 64, terraced window 64: the
SmolLM2 recipe as used) from an empty state, the fused kernel (``ops/triton/sparse.py``) against the chunk reference the
layer ran before it (``ops/sparse/naive.py``, in the layer's pieces) and causal SDPA flash, forward, with the
largest output difference between kernel and reference. Medians of triton.testing.do_bench. Writes markdown to
--out and JSON beside it; ``--sections`` picks sections (default all).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--quick" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from lolcats.ops.decode.state import DecodeState  # noqa: E402
from lolcats.ops.hybrid.naive import hybrid_attention_naive  # noqa: E402
from lolcats.ops.kinds import window_slots  # noqa: E402
from lolcats.ops.triton import hybrid_attention_triton, linear_attention_triton  # noqa: E402
from lolcats.ops.triton.chunked import CHUNK, explicit_chunks  # noqa: E402
from lolcats.ops.triton.decode import decode_step_triton  # noqa: E402
from lolcats.ops.triton.feature_map import hedgehog_triton  # noqa: E402
from benchmarks import common

MODELS = {"smollm2": dict(H=9, Hk=3, D=64, F=128), "llama3-8b": dict(H=32, Hk=8, D=128, F=128)}
TINY = dict(H=2, Hk=1, D=16, F=16)  # --quick (CPU, the Triton interpreter)
WINDOW = 64
SECTIONS = ("prefill", "decode", "feature_map", "gate", "sparse")
SPARSE = dict(G=256, sink=64)  # the SmolLM2 recipe's sparse cache


def bench_shapes(quick: bool) -> tuple[torch.dtype, dict[str, dict]]:
    """The dtype and the attention shapes of the sections: the models in bf16, or one tiny shape in fp32."""
    return (torch.float32, {"tiny": TINY}) if quick else (torch.bfloat16, MODELS)


def attention_inputs(B, H, Hk, T, D, Fd, dt, dev, g):
    """q (B, H, T, D), k, v (B, Hk, T, D) normal; phi(q) (B, H, T, F), phi(k) positive; window factors (H,);
    all leaf tensors that want gradients, drawn from ``g`` in that order."""
    q, k, v = (torch.randn(B, h, T, D, device=dev, generator=g).to(dt).requires_grad_() for h in (H, Hk, Hk))
    fq, fk = (torch.rand(B, h, T, Fd, device=dev, generator=g).to(dt).requires_grad_() for h in (H, Hk))
    return q, k, v, fq, fk, torch.rand(H, device=dev).requires_grad_()


def bench(fn, quick: bool) -> float:
    """Median milliseconds."""
    if not quick:
        return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")
    fn()
    ts = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def ceilings(dev: str, quick: bool) -> dict:
    n = 512 if quick else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    tflops = 2 * n**3 / bench(lambda: a @ a, quick) / 1e9
    x = torch.empty(2**20 if quick else 2**30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    gbs = 2 * x.numel() / bench(lambda: y.copy_(x), quick) / 1e6
    return {"matmul_tflops": tflops, "copy_gbs": gbs}


def _try(fn, quick):
    try:
        return bench(fn, quick)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def _fwd_bwd(fn, ins):
    """fn's forward and the backward of sum(outputs) into ``ins``; fn returns a tensor or a tuple."""
    def run():
        outs = fn()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, ins, [torch.ones_like(o) for o in outs])
    return run


def _tile_parts(cq: int, ck: int, kind: int, w: int, C: int) -> tuple[bool, bool]:
    """Python twin of chunked._tile_parts: does tile (query chunk cq, key chunk ck) hold window / linear entries."""
    i_lo, i_hi, j_lo, j_hi = cq * C, cq * C + C - 1, ck * C, ck * C + C - 1
    if kind == 1:
        return j_lo <= i_hi and i_lo - j_hi < w, i_hi - j_lo >= w
    if kind == 2:
        return j_lo <= i_hi and i_lo // w - j_hi // w <= 1, i_hi // w - j_lo // w >= 2
    return False, j_lo <= i_hi


def model_flops(B, H, Hk, T, D, F, kind) -> float:
    """Forward dots issued by the kernels (multiply-adds x 2), from the tiles they skip or compute."""
    C, nc = CHUNK, triton.cdiv(T, CHUNK)
    kid = {"linear": 0, "sliding_window": 1, "terraced_window": 2}[kind]
    nx = explicit_chunks(kid, WINDOW, C, nc)
    macs = 0  # per head, per sequence
    for cq in range(nc):
        c0 = max(cq - nx, 0)
        macs += C * F * D  # fq S
        for ck in range(c0, cq + 1):
            win, lin = _tile_parts(cq, ck, kid, WINDOW, C)
            macs += C * C * (D * win + F * lin + D * (win or lin) + D * (lin and ck != c0))
    return 2 * B * H * macs + 2 * B * Hk * T * F * D  # + chunk sums of the states


def prefill_rows(dev, quick, ceil, on_row=lambda rows: None):
    dt, models = bench_shapes(quick)
    lengths = [1024, 2048, 4096, 8192, 16384, 32768] if not quick else [64, 128]
    tokens = 65536 if not quick else 128
    rows = []
    for name, s in models.items():
        H, Hk, D, Fd = s["H"], s["Hk"], s["D"], s["F"]
        for T in lengths:
            B = max(1, tokens // T)
            q, k, v, fq, fk, wf = attention_inputs(B, H, Hk, T, D, Fd, dt, dev,
                                                   torch.Generator(device=dev).manual_seed(0))
            ke, ve = (x.detach().repeat_interleave(H // Hk, 1).requires_grad_() for x in (k, v))
            row = {"model": name, "T": T, "B": B}

            def sdpa():
                if quick:
                    return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
                from torch.nn.attention import SDPBackend, sdpa_kernel
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)

            row["sdpa_fwd"] = _try(sdpa, quick)
            row["sdpa_fwdbwd"] = _try(_fwd_bwd(sdpa, [q, ke, ve]), quick)
            sdpa_flops = 4 * B * H * T * T * D / 2
            row["sdpa_fwd_tflops"] = sdpa_flops / row["sdpa_fwd"] / 1e9 if row["sdpa_fwd"] else None
            for kind in ("sliding_window", "terraced_window"):
                def hyb(kind=kind):
                    return hybrid_attention_triton(q, k, v, fq, fk, wf, kind, WINDOW)
                tag = kind.split("_")[0]
                row[f"{tag}_fwd"] = _try(hyb, quick)
                row[f"{tag}_fwdbwd"] = _try(_fwd_bwd(hyb, [q, k, v, fq, fk, wf]), quick)
                row[f"{tag}_fwd_tflops"] = model_flops(B, H, Hk, T, D, Fd, kind) / row[f"{tag}_fwd"] / 1e9
            lin = lambda: linear_attention_triton(fq, fk, v)[0]  # noqa: E731
            row["linear_fwd"] = _try(lin, quick)
            row["linear_fwdbwd"] = _try(_fwd_bwd(lin, [fq, fk, v]), quick)
            if T <= 2048:
                ref = lambda: hybrid_attention_naive(q, k, v, fq, fk, wf, "sliding_window", WINDOW)[0]  # noqa: E731
                row["torch_ref_fwd"] = _try(ref, quick)
                row["torch_ref_fwdbwd"] = _try(_fwd_bwd(ref, [q, k, v, fq, fk, wf]), quick)
            row.update(_fla(fq, fk, v, quick))
            for tag in ("sliding", "terraced", "linear"):
                for m in ("fwd", "fwdbwd"):
                    base, mine = row.get(f"sdpa_{m}"), row.get(f"{tag}_{m}")
                    row[f"{tag}_{m}_speedup"] = base / mine if base and mine else None
            rows.append(row)
            on_row(rows)
            print(_fmt_prefill(row), flush=True)
            del q, k, v, fq, fk, ke, ve
            if dev == "cuda":
                torch.cuda.empty_cache()
    return rows


def feature_map_rows(dev, quick, on_row=lambda rows: None):
    """The Hedgehog feature map (separate PyTorch ops, as the torch backend runs it: bf16 autocast,
    float32 weights) on q and k, against the terraced kernel on its outputs, forward and forward+backward:
    the share of the layer's attention time a feature map fused into the kernel could save at most."""
    from lolcats.attention.feature_maps import HedgehogFeatureMap

    dt, models = bench_shapes(quick)
    lengths, tokens = ([1024, 16384], 65536) if not quick else ([64], 128)
    rows = []
    for name, s in models.items():
        H, Hk, D, Fd = s["H"], s["Hk"], s["D"], s["F"]
        for T in lengths:
            B = max(1, tokens // T)
            fmq, fmk = HedgehogFeatureMap(H, D, Fd // 2).to(dev), HedgehogFeatureMap(Hk, D, Fd // 2).to(dev)
            q, k, v = (torch.randn(B, h, T, D, device=dev, dtype=dt) for h in (H, Hk, Hk))
            wf = torch.full((H,), 0.1, device=dev)

            def phi():
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=not quick):
                    return fmq(q), fmk(k)

            def phi_triton():
                return hedgehog_triton(q, fmq.weight), hedgehog_triton(k, fmk.weight)

            weights = [fmq.weight, fmk.weight]
            with torch.no_grad():
                fq, fk = (x.requires_grad_() for x in phi())
            att = lambda: hybrid_attention_triton(q, k, v, fq, fk, wf, "terraced_window", WINDOW)  # noqa: E731
            row = {"model": name, "T": T, "B": B, "phi_fwd": _try(phi, quick),
                   "phi_fwdbwd": _try(_fwd_bwd(phi, weights), quick), "phi_triton_fwd": _try(phi_triton, quick),
                   "phi_triton_fwdbwd": _try(_fwd_bwd(phi_triton, weights), quick),
                   "attn_fwd": _try(att, quick), "attn_fwdbwd": _try(_fwd_bwd(att, [fq, fk]), quick)}
            for m in ("fwd", "fwdbwd"):
                a, b = row[f"phi_{m}"], row[f"attn_{m}"]
                row[f"phi_share_{m}"] = a / (a + b) if a and b else None
            rows.append(row)
            on_row(rows)
            print(f"feature map {name:10s} T={T:5d} B={B:3d}: phi fwd {_ms(row['phi_fwd'])} f+b "
                  f"{_ms(row['phi_fwdbwd'])} | fused phi fwd {_ms(row['phi_triton_fwd'])} f+b "
                  f"{_ms(row['phi_triton_fwdbwd'])} | terraced kernel fwd {_ms(row['attn_fwd'])} f+b "
                  f"{_ms(row['attn_fwdbwd'])} | phi share {100 * (row['phi_share_fwd'] or 0):.0f}% / "
                  f"{100 * (row['phi_share_fwdbwd'] or 0):.0f}%", flush=True)
    return rows


def _fla(fq, fk, v, quick):
    try:
        from lolcats.ops.fla_backend import fla_linear
    except ImportError:
        return {}
    fn = lambda: fla_linear(fq, fk, v)[0]  # noqa: E731
    out = {}
    for key, f in (("fla_fwd", fn), ("fla_fwdbwd", _fwd_bwd(fn, [fq, fk, v]))):
        try:  # a peer library's failure is reported, not fatal to our table
            out[key] = _try(f, quick)
        except Exception as e:  # noqa: BLE001
            print(f"fla {key}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            out[key] = None
    return out


def _ms(x):
    return "oom" if x is None else f"{x:8.3f}"


def _x(x):
    return "   -" if x is None else f"{x:5.2f}x"


PREFILL_HEAD = ("model      T      B | sdpa fwd  fwd+bwd TF/s | sliding fwd  fwd+bwd  (x fwd, x f+b) TF/s | "
                "terraced fwd fwd+bwd (x fwd, x f+b) | linear fwd fwd+bwd | torch-ref fwd fwd+bwd | fla fwd")


def _fmt_prefill(r):
    tf = lambda x: "   -" if x is None else f"{x:5.0f}"  # noqa: E731
    return (f"{r['model']:10s} {r['T']:5d} {r['B']:3d} | {_ms(r['sdpa_fwd'])} {_ms(r['sdpa_fwdbwd'])} "
            f"{tf(r['sdpa_fwd_tflops'])} | {_ms(r['sliding_fwd'])} {_ms(r['sliding_fwdbwd'])} "
            f"({_x(r['sliding_fwd_speedup'])}, {_x(r['sliding_fwdbwd_speedup'])}) {tf(r['sliding_fwd_tflops'])} | "
            f"{_ms(r['terraced_fwd'])} {_ms(r['terraced_fwdbwd'])} ({_x(r['terraced_fwd_speedup'])}, "
            f"{_x(r['terraced_fwdbwd_speedup'])}) | {_ms(r['linear_fwd'])} {_ms(r['linear_fwdbwd'])} | "
            f"{_ms(r.get('torch_ref_fwd')) if 'torch_ref_fwd' in r else ' skipped'} "
            f"{_ms(r.get('torch_ref_fwdbwd')) if 'torch_ref_fwdbwd' in r else ' skipped'} | "
            f"{_ms(r['fla_fwd']) if 'fla_fwd' in r else 'n/a'}")


def decode_rows(dev, quick, ceil, on_row=lambda rows: None):
    dt, models = bench_shapes(quick)
    s = models.get("llama3-8b", TINY)
    H, Hk, D, Fd = s["H"], s["Hk"], s["D"], s["F"]
    batches = [1, 4, 16, 64, 256, 1024] if not quick else [1, 4]
    rows = []
    for kind in ("sliding_window", "terraced_window", "linear"):
        for B in batches:
            S = window_slots(kind, WINDOW)
            st = DecodeState.empty(B, Hk, S, D, D, Fd, dt, dev)
            st.win_pos.copy_(torch.arange(S, device=dev).expand(B, S))  # a full window
            pos = torch.full((B,), S + 1, dtype=torch.long, device=dev)
            q, fq = torch.randn(B, H, D, device=dev, dtype=dt), torch.rand(B, H, Fd, device=dev, dtype=dt)
            k, v = torch.randn(B, Hk, D, device=dev, dtype=dt), torch.randn(B, Hk, D, device=dev, dtype=dt)
            fk = torch.rand(B, Hk, Fd, device=dev, dtype=dt)
            wf = torch.rand(H, device=dev) if kind != "linear" else None

            def step():
                return decode_step_triton(q, k, v, fq, fk, st, pos, wf, kind, WINDOW, D**-0.5)

            fn = step
            if dev == "cuda":
                step()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                fn = graph.replay
            ms = bench(fn, quick)
            el = st.win_k.element_size()
            touched = (B * Hk * S * 2 * D * el + st.win_pos.numel() * 8 * 2 + 2 * (st.kv.numel() + st.ks.numel()) * 4
                       + B * (2 * H + 3 * Hk) * D * el + B * H * D * el)
            gbs = touched / ms / 1e6
            row = {"kind": kind, "B": B, "ms": ms, "bytes": touched, "GB/s": gbs,
                   "pct_copy": 100 * gbs / ceil["copy_gbs"]}
            rows.append(row)
            on_row(rows)
            print(f"decode {kind:16s} B={B:5d}  {ms * 1e3:9.1f} us  {touched / 1e6:9.2f} MB  {gbs:8.0f} GB/s "
                  f"({row['pct_copy']:4.0f}% of copy)", flush=True)
    return rows


def _decode_state(kind, B, Hk, D, Fd, dt, dev):
    """A decode state with a full window, and the position of the next token (B,)."""
    S = window_slots(kind, WINDOW)
    st = DecodeState.empty(B, Hk, S, D, D, Fd, dt, dev)
    st.win_pos.copy_(torch.arange(S, device=dev).expand(B, S))
    return st, torch.full((B,), S + 1, dtype=torch.long, device=dev)


def _graphed(step, dev):
    """step, or the replay of a CUDA graph of it on CUDA."""
    if dev != "cuda":
        return step
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def gate_rows(dev, quick, on_row=lambda rows: None):
    """Gated kernels vs ungated ones at the same shapes: prefill fwd and fwd+bwd (the gate's gradient
    included, as in stage 2), and one decode step, for the three kinds."""
    dt, models = bench_shapes(quick)
    lengths, tokens = ([1024, 4096, 16384], 65536) if not quick else ([80], 80)
    batches = [1, 64, 256] if not quick else [2]
    kinds = ("linear", "sliding_window", "terraced_window")
    rows = []
    for name, s in models.items():
        H, Hk, D, Fd = s["H"], s["Hk"], s["D"], s["F"]
        for T in lengths:
            B = max(1, tokens // T)
            g = torch.Generator(device=dev).manual_seed(0)
            q, k, v, fq, fk, wf = attention_inputs(B, H, Hk, T, D, Fd, dt, dev, g)
            lg = (F.logsigmoid(torch.randn(B, Hk, T, device=dev, generator=g)) / 16).requires_grad_()
            for kind in kinds:
                row = {"section": "prefill", "model": name, "kind": kind, "T": T, "B": B}
                for tag, gate in (("ungated", None), ("gated", lg)):
                    if kind == "linear":
                        fn, ins = (lambda gate=gate: linear_attention_triton(fq, fk, v, log_gate=gate)[0]), [fq, fk, v]
                    else:
                        fn = lambda kind=kind, gate=gate: hybrid_attention_triton(  # noqa: E731
                            q, k, v, fq, fk, wf, kind, WINDOW, None, gate)
                        ins = [q, k, v, fq, fk, wf]
                    row[f"{tag}_fwd"] = _try(fn, quick)
                    row[f"{tag}_fwdbwd"] = _try(_fwd_bwd(fn, ins + ([lg] if gate is not None else [])), quick)
                for m in ("fwd", "fwdbwd"):
                    a, b = row[f"gated_{m}"], row[f"ungated_{m}"]
                    row[f"ratio_{m}"] = a / b if a and b else None
                rows.append(row)
                on_row(rows)
                print(f"gate prefill {name:10s} {kind:16s} T={T:5d} B={B:3d}: ungated {_ms(row['ungated_fwd'])} "
                      f"{_ms(row['ungated_fwdbwd'])} | gated {_ms(row['gated_fwd'])} {_ms(row['gated_fwdbwd'])} "
                      f"| x{row['ratio_fwd'] or 0:.2f} x{row['ratio_fwdbwd'] or 0:.2f}", flush=True)
            del q, k, v, fq, fk, lg
            if dev == "cuda":
                torch.cuda.empty_cache()
    s = MODELS["llama3-8b"] if not quick else dict(H=2, Hk=1, D=16, F=16)
    H, Hk, D, Fd = s["H"], s["Hk"], s["D"], s["F"]
    for kind in kinds:
        for B in batches:
            row = {"section": "decode", "model": "llama3-8b" if not quick else "tiny", "kind": kind, "B": B}
            for tag, gated in (("ungated", False), ("gated", True)):
                st, pos = _decode_state(kind, B, Hk, D, Fd, dt, dev)
                q, fq = torch.randn(B, H, D, device=dev, dtype=dt), torch.rand(B, H, Fd, device=dev, dtype=dt)
                k, v = torch.randn(B, Hk, D, device=dev, dtype=dt), torch.randn(B, Hk, D, device=dev, dtype=dt)
                fk = torch.rand(B, Hk, Fd, device=dev, dtype=dt)
                wf = torch.rand(H, device=dev) if kind != "linear" else None
                lg = -torch.rand(B, Hk, device=dev) / 16 if gated else None

                def step(st=st, pos=pos, q=q, k=k, v=v, fq=fq, fk=fk, wf=wf, lg=lg, kind=kind):
                    return decode_step_triton(q, k, v, fq, fk, st, pos, wf, kind, WINDOW, D**-0.5, None, lg)

                row[f"{tag}_ms"] = bench(_graphed(step, dev), quick)
            row["ratio"] = row["gated_ms"] / row["ungated_ms"]
            rows.append(row)
            on_row(rows)
            print(f"gate decode {kind:16s} B={B:5d}: ungated {row['ungated_ms'] * 1e3:8.1f} us, gated "
                  f"{row['gated_ms'] * 1e3:8.1f} us (x{row['ratio']:.2f})", flush=True)
    return rows


def gate_markdown(rows) -> list[str]:
    if not rows:
        return []
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    out = ["", "Forget gate on the linear part (attention.gate pooled_keys) vs the same kernel ungated, ms "
           "(x = gated / ungated; fwd+bwd includes the gate's gradient):", "",
           "| model | kind | T | B | ungated fwd | gated fwd | x fwd | ungated f+b | gated f+b | x f+b |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["section"] == "prefill":
            out.append(f"| {r['model']} | {r['kind']} | {r['T']} | {r['B']} | {f(r['ungated_fwd'])} | "
                       f"{f(r['gated_fwd'])} | {f(r['ratio_fwd'])} | {f(r['ungated_fwdbwd'])} | "
                       f"{f(r['gated_fwdbwd'])} | {f(r['ratio_fwdbwd'])} |")
    out += ["", "| decode kind | batch | ungated us/step | gated us/step | x |", "|---|---|---|---|---|"]
    for r in rows:
        if r["section"] == "decode":
            out.append(f"| {r['kind']} | {r['B']} | {r['ungated_ms'] * 1e3:.1f} | {r['gated_ms'] * 1e3:.1f} | "
                       f"{r['ratio']:.2f} |")
    return out


def feature_map_markdown(rows) -> list[str]:
    if not rows:
        return []
    out = ["", "Hedgehog feature map on q and k: PyTorch ops (the torch backend) and the fused Triton op "
           "(the triton backend), vs the terraced kernel on its outputs, ms (share = PyTorch map / (map + kernel)):", "",
           "| model | T | B | phi fwd | phi f+b | fused phi fwd | fused phi f+b | kernel fwd | kernel f+b (dfq, dfk) "
           "| phi share fwd | phi share f+b |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    pc = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    for r in rows:
        out.append(f"| {r['model']} | {r['T']} | {r['B']} | {f(r['phi_fwd'])} | {f(r['phi_fwdbwd'])} | "
                   f"{f(r['phi_triton_fwd'])} | {f(r['phi_triton_fwdbwd'])} | {f(r['attn_fwd'])} | {f(r['attn_fwdbwd'])} | {pc(r['phi_share_fwd'])} | "
                   f"{pc(r['phi_share_fwdbwd'])} |")
    return out


def sparse_rows(dev, quick, on_row=lambda rows: None):
    """Fused sparse-cache prefill vs the chunk reference (in pieces) vs SDPA flash, one layer, forward."""
    from lolcats.ops import BACKENDS, get_backend
    from lolcats.attention.mixers.base import piece_length

    dt, models = bench_shapes(quick)
    G, sink = (4, 2) if quick else (SPARSE["G"], SPARSE["sink"])
    w = 4 if quick else WINDOW
    rows = []
    for name, s in models.items():
        H, Hk, D, Fd = s["H"], s["Hk"], s["D"], s["F"]
        for T, B in ([(64, 1)] if quick else [(2048, 1), (8192, 1), (8192, 16), (32768, 1)]):
            with torch.no_grad():
                q, k, v, fq, fk, wf = (x.detach() for x in attention_inputs(
                    B, H, Hk, T, D, Fd, dt, dev, torch.Generator(device=dev).manual_seed(0)))
            pos = torch.arange(T, device=dev).expand(B, T)
            valid = torch.ones(B, T, dtype=torch.bool, device=dev)
            empty = lambda: DecodeState.for_layer(B, Hk, "terraced_window", w, D, D, Fd, dt, dev, sparse=G)  # noqa: E731
            fused = get_backend("triton", q).sparse_chunk
            piece = piece_length(B, H, G + 2 * w)  # the layer's pieces: its state's keys are the cache and window

            def run(op, piece):
                st, ys = empty(), []
                for a in range(0, T, piece):
                    sl = slice(a, a + piece)
                    y, st = op(st, q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl], fk[:, :, sl], pos[:, sl],
                               valid[:, sl], wf, "terraced_window", w, D**-0.5, "self_recall", sink)
                    ys.append(y)
                return torch.cat(ys, 2)

            ke, ve = (x.repeat_interleave(H // Hk, 1) for x in (k, v))
            row = {"model": name, "T": T, "B": B, "G": G, "sink": sink}
            with torch.no_grad():
                row["sdpa_fwd"] = _try(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True), quick)
                row["fused_fwd"] = _try(lambda: run(fused, T), quick)
                if T <= 8192 and B == 1:
                    ref = BACKENDS["torch"].sparse_chunk
                    t0 = time.perf_counter()
                    y_ref = run(ref, piece)
                    if dev == "cuda":
                        torch.cuda.synchronize()
                    row["reference_fwd"] = (time.perf_counter() - t0) * 1e3  # one run (its first): seconds
                    row["max_abs_diff"] = float((run(fused, T).float() - y_ref.float()).abs().max())
            rows.append(row)
            on_row(rows)
            print(sparse_markdown([row])[-1], flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
    return rows


def sparse_markdown(rows) -> list[str]:
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = ["", "| sparse prefill | T | B | sdpa fwd ms | fused ms | reference ms | reference / fused | "
             "fused / sdpa | max abs diff |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref, fu, sd = r.get("reference_fwd"), r.get("fused_fwd"), r.get("sdpa_fwd")
        lines.append(f"| {r['model']} | {r['T']} | {r['B']} | {f(sd)} | {f(fu)} | {f(ref)} | "
                     f"{f(ref / fu) if ref and fu else '-'} | {f(fu / sd) if fu and sd else '-'} | "
                     f"{r.get('max_abs_diff', '-')} |")
    return lines


def to_markdown(info, prefill, decode, fmap=(), gate=(), sparse=()) -> str:
    lines = [f"# Kernel benchmark on {info['gpu']}", "",
             f"Ceilings: bf16 matmul {info['matmul_tflops']:.0f} TFLOP/s, device copy {info['copy_gbs']:.0f} GB/s. "
             f"torch {torch.__version__}, triton {triton.__version__}. Times in ms (median).", "",
             "| model | T | B | sdpa fwd | sdpa f+b | sliding fwd | sliding f+b | x fwd | x f+b | terraced fwd | "
             "terraced f+b | linear fwd | linear f+b | torch ref fwd | fla fwd |", "|" + "---|" * 15]
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for r in prefill:
        lines.append(f"| {r['model']} | {r['T']} | {r['B']} | {f(r['sdpa_fwd'])} | {f(r['sdpa_fwdbwd'])} | "
                     f"{f(r['sliding_fwd'])} | {f(r['sliding_fwdbwd'])} | {f(r['sliding_fwd_speedup'])} | "
                     f"{f(r['sliding_fwdbwd_speedup'])} | {f(r['terraced_fwd'])} | {f(r['terraced_fwdbwd'])} | "
                     f"{f(r['linear_fwd'])} | {f(r['linear_fwdbwd'])} | "
                     f"{f(r.get('torch_ref_fwd')) if 'torch_ref_fwd' in r else 'skipped'} | "
                     f"{f(r.get('fla_fwd')) if 'fla_fwd' in r else 'n/a'} |")
    lines += ["", "| decode kind | batch | us/step | MB touched | GB/s | % of copy |", "|---|---|---|---|---|---|"]
    for r in decode:
        lines.append(f"| {r['kind']} | {r['B']} | {r['ms'] * 1e3:.1f} | {r['bytes'] / 1e6:.2f} | {r['GB/s']:.0f} | "
                     f"{r['pct_copy']:.0f}% |")
    lines += feature_map_markdown(list(fmap))
    lines += gate_markdown(list(gate))
    lines += sparse_markdown(list(sparse)) if sparse else []
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="markdown report path (JSON written beside it)")
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run through TRITON_INTERPRET=1")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        raise SystemExit(f"unknown --sections {sorted(sections - set(SECTIONS))}; known: {', '.join(SECTIONS)}")
    dev = "cpu" if args.quick else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --quick for the CPU smoke run)")
    info = {"gpu": common.card(dev, cpu="cpu (triton interpreter)")}
    print(f"device: {info['gpu']}", flush=True)
    info.update(ceilings(dev, args.quick))
    print(f"ceilings: bf16 matmul {info['matmul_tflops']:.0f} TFLOP/s, copy {info['copy_gbs']:.0f} GB/s", flush=True)
    res = {name: [] for name in SECTIONS}

    def save(key, rows):  # after every row: a run cut short keeps what it measured
        res[key] = rows
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(to_markdown(info, res["prefill"], res["decode"], res["feature_map"], res["gate"],
                                              res["sparse"]))
            args.out.with_suffix(".json").write_text(json.dumps({"info": info, **res}, indent=1))

    if "prefill" in sections:
        print(PREFILL_HEAD, flush=True)
        save("prefill", prefill_rows(dev, args.quick, info, lambda rows: save("prefill", rows)))
    if "decode" in sections:
        save("decode", decode_rows(dev, args.quick, info, lambda rows: save("decode", rows)))
    if "feature_map" in sections:
        save("feature_map", feature_map_rows(dev, args.quick, lambda rows: save("feature_map", rows)))
    if "gate" in sections:
        save("gate", gate_rows(dev, args.quick, lambda rows: save("gate", rows)))
    if "sparse" in sections:
        save("sparse", sparse_rows(dev, args.quick, lambda rows: save("sparse", rows)))
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
