"""Where the time of the chunked hybrid kernels goes: per-kernel GPU times and launch-setting sweeps.

    python -m benchmarks.kernel_profile            # needs CUDA

Per-kernel device times (torch.profiler, mean over the calls) of the forward and forward+backward,
for the current kernels and, if ``benchmarks/_chunked_v1.py`` exists (an earlier version of
``ops/triton/chunked.py``), for that one too; then do_bench medians of the forward and backward
for a few (num_warps, num_stages) per kernel. Shapes: SmolLM2 / Llama-3-8B, 64K tokens, bf16.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import torch
import torch.nn.functional as Fn
import triton

from lolcats.ops.triton import chunked

SHAPES = {"smollm2": dict(H=9, Hk=3, D=64, F=128), "llama3-8b": dict(H=32, Hk=8, D=128, F=128)}


def _inputs(H, Hk, D, F, T, tokens=65536):
    B = tokens // T
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g).bfloat16().requires_grad_()  # noqa: E731
    p = lambda *s: torch.rand(*s, device="cuda", generator=g).bfloat16().requires_grad_()  # noqa: E731
    return (r(B, H, T, D), r(B, Hk, T, D), r(B, Hk, T, D), p(B, H, T, F), p(B, Hk, T, F),
            torch.rand(H, device="cuda").requires_grad_())


def _call(mod, ins, kind=1):
    q, k, v, fq, fk, wf = ins
    gate = (None,) if "lg" in inspect.signature(mod.ChunkedAttention.forward).parameters else ()  # v1: no gate
    return mod.ChunkedAttention.apply(q, k, v, fq, fk, wf, None, None, *gate, kind, 64, q.shape[-1] ** -0.5, 0.0,
                                      64)[0]


def _fb(mod, ins, kind=1):
    y = _call(mod, ins, kind)
    torch.autograd.grad(y, ins, torch.ones_like(y))


def per_kernel(fn, n=5):
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((t / n / 1e3, e.key[:60]))
    rows.sort(reverse=True)
    return rows


def main():
    mods = {"new": chunked}
    old = Path(__file__).with_name("_chunked_v1.py")
    if old.exists():
        spec = importlib.util.spec_from_file_location("chunked_v1", old)
        mods["v1"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods["v1"])
    print("device:", torch.cuda.get_device_name(), flush=True)
    for name, T in (("smollm2", 1024), ("smollm2", 16384), ("llama3-8b", 4096)):
        s = SHAPES[name]
        ins = _inputs(s["H"], s["Hk"], s["D"], s["F"], T)
        q, k, v = ins[:3]
        ke, ve = (x.detach().repeat_interleave(s["H"] // s["Hk"], 1) for x in (k, v))
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sd = triton.testing.do_bench(lambda: Fn.scaled_dot_product_attention(q, ke, ve, is_causal=True),
                                         return_mode="median")
        print(f"\n=== {name} T={T} B={65536 // T}  sdpa-flash fwd {sd:.3f} ms", flush=True)
        for mname, mod in mods.items():
            if mname == "v1" and s["D"] > 64:
                continue
            for what, fn in (("fwd", lambda: _call(mod, ins)), ("fwd+bwd", lambda: _fb(mod, ins))):
                tot = triton.testing.do_bench(fn, return_mode="median")
                print(f"-- {mname} {what}: {tot:.3f} ms (do_bench median); per kernel (profiler, ms):", flush=True)
                for t, key in per_kernel(fn):
                    print(f"   {t:8.3f}  {key}")
        for kern in ("fwd", "bwd_dq", "bwd_dkv", "sums"):
            big = 128 if s["D"] > 64 else 64  # LAUNCH is keyed by max(D, Dv)
            keep = chunked.LAUNCH[kern][big]
            res = []
            for cfg in ((4, 1), (4, 2), (4, 3), (8, 1), (8, 2)):
                chunked.LAUNCH[kern][big] = cfg
                fn = (lambda: _call(chunked, ins)) if kern == "fwd" else (lambda: _fb(chunked, ins))
                try:
                    res.append(f"{cfg}: {triton.testing.do_bench(fn, return_mode='median'):.3f}")
                except Exception as e:  # noqa: BLE001  (out of shared memory etc.)
                    res.append(f"{cfg}: {type(e).__name__}")
            chunked.LAUNCH[kern][big] = keep
            print(f"sweep {kern} ({'fwd' if kern == 'fwd' else 'fwd+bwd'} ms): " + "  ".join(res), flush=True)
        del ins
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
