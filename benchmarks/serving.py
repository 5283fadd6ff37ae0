"""Serving benchmark: ``lolcats serve`` under Poisson arrivals, student (constant-size states) vs teacher.

For each mode the benchmark starts ``python -m lolcats.cli serve <--server-args> --attention-mode MODE``
(the same model and limits), waits for ``/health``, then for each request rate sends requests with
exponential inter-arrival times (``inf``: all at once) through the HTTP API with an async client
(httpx), streaming, and stops the server with SIGTERM. The baseline is the same weights in
teacher mode: softmax attention over per-slot key/value buffers preallocated for the longest
sequence (``KVEngine``: continuous batching, CUDA-graph decode per batch and length bucket, the
same scheduler and prefill chunking); no paging and no prefix sharing.

Requests: prompts of random token ids (``prompt`` as a token list, so lengths are exact), lengths
drawn uniformly from ``mean * [1 - spread, 1 + spread]`` for the prompt and the output; greedy;
``ignore_eos`` so each request generates its drawn output length.

Metrics per (mode, rate): output tokens/s (all tokens over the time from the first send to the last
response), time to first token (TTFT: send -> first streamed chunk) and time per output token
(TPOT: (last chunk - first chunk) / (tokens - 1), per request), p50 and p99 over requests. The
summary gives, per mode, the best throughput whose p99 TPOT is within ``--tpot-bound``, and the
student / teacher ratio. Rows are saved as they finish (``OUT/MODE.json``); the summary reads
every mode file in ``OUT``, so the modes may also run as two commands.

    # GPU: Llama-3-8B shapes, random weights, untrained feature maps
    python benchmarks/serving.py --out runs/bench-serving \\
        --server-args="--untrained --model.init random --model.name llama3-8b --model.tokenizer smollm2-135m-instruct" \\
        --max-batch 512 --rates 8,16,32,48,64 --duration 30 --prompt-len 512 --output-len 256
    # CPU smoke run: tests/test_serving.py::test_serving_benchmark_smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

GPU_MODEL = "--untrained --model.init random --model.name llama3-8b --model.tokenizer smollm2-135m-instruct"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-args", default=GPU_MODEL,
                   help="flags for `lolcats serve` that name the model (write --server-args=\"--untrained ...\")")
    p.add_argument("--modes", default="student,teacher", help="comma list of student, teacher")
    p.add_argument("--url", help="benchmark this running server instead of starting one (its mode from /health)")
    p.add_argument("--rates", default="8,16,32,48,64", help="requests/s, comma list; inf = all at once")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per rate")
    p.add_argument("--num-requests", type=int, help="requests per rate (instead of rate x duration)")
    p.add_argument("--max-requests", type=int, default=20000, help="cap on requests per rate")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--spread", type=float, default=0.5, help="lengths ~ uniform(mean * (1 -+ spread))")
    p.add_argument("--max-batch", type=int, default=256, help="server slots")
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--prefill-budget", type=int, default=0, help="prompt tokens per server iteration (0: one chunk)")
    p.add_argument("--tpot-bound", type=float, default=0.050, help="seconds: the p99 TPOT bound of the summary")
    p.add_argument("--warmup-requests", type=int, default=4)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--request-timeout", type=float, default=1800.0)
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds to wait for the requests still running after the last arrival; later ones fail")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-serving")
    return p.parse_args(argv)


def lengths(mean: int, spread: float) -> tuple[int, int]:
    return max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))


# ---------------------------------------------------------------- the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, mode: str, out: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "lolcats.cli", "serve", *shlex.split(args.server_args), "--attention-mode", mode,
           "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(args.max_batch),
           "--max-prompt-tokens", str(lengths(args.prompt_len, args.spread)[1]),
           "--max-new-tokens", str(lengths(args.output_len, args.spread)[1]),
           "--max-queue", str(args.max_requests), "--prefill-chunk", str(args.prefill_chunk),
           "--prefill-budget", str(args.prefill_budget), "--log-level", "warning"]
    log = open(out / f"server-{mode}.log", "w")
    print(f"[{mode}] {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + args.startup_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the {mode} server exited ({proc.returncode}); see {log.name}")
        if time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"the {mode} server did not start in {args.startup_timeout} s; see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(1.0)


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# ---------------------------------------------------------------- the client


@dataclass
class Result:
    ok: bool
    prompt_len: int
    output_len: int  # tokens generated (usage)
    ttft: float = 0.0
    tpot: float = 0.0
    latency: float = 0.0
    error: str = ""


async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    usage_line = ""
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return Result(False, len(prompt), 0, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                last = time.perf_counter()
                if first is None:
                    first = last
                if '"usage"' in line or '"error"' in line:
                    usage_line = line
    except (httpx.HTTPError, OSError) as e:
        return Result(False, len(prompt), 0, error=f"{type(e).__name__}: {e}")
    if '"error"' in usage_line or not usage_line:
        return Result(False, len(prompt), 0, error=usage_line[:200] or "no usage chunk")
    n = json.loads(usage_line[6:])["usage"]["completion_tokens"]
    tpot = (last - first) / (n - 1) if n > 1 else 0.0
    return Result(True, len(prompt), n, first - t0, tpot, last - t0)


async def run_rate(url: str, model: str, rate: float, n: int, args, vocab: int) -> tuple[list[Result], float]:
    rng = random.Random(f"{args.seed}-{rate}")
    plo, phi = lengths(args.prompt_len, args.spread)
    olo, ohi = lengths(args.output_len, args.spread)
    jobs = [([rng.randrange(vocab) for _ in range(rng.randint(plo, phi))], rng.randint(olo, ohi)) for _ in range(n)]
    gaps = [0.0 if rate == float("inf") else rng.expovariate(rate) for _ in range(n)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as client:
        tasks = []
        t0 = time.perf_counter()
        for (prompt, out_len), gap in zip(jobs, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one_request(client, model, prompt, out_len)))
        await asyncio.wait(tasks, timeout=args.drain_timeout)  # the server is overloaded if any remain
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        results = [t.result() if not t.cancelled() else Result(False, 0, 0, error="unfinished at --drain-timeout")
                   for t in tasks]
        return results, time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if q < 100 else max(xs)


def summarize(mode: str, rate: float, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft, tpot = [r.ttft for r in ok], [r.tpot for r in ok if r.output_len > 1]
    tokens = sum(r.output_len for r in ok)
    return {"mode": mode, "rate": rate, "requests": len(results), "completed": len(ok),
            "failed": len(results) - len(ok), "errors": sorted({r.error for r in results if not r.ok})[:3],
            "seconds": wall, "output_tok_s": tokens / wall, "requests_s": len(ok) / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99)}


def wait_idle(url: str, timeout: float = 120.0) -> None:
    """Until the server runs and queues nothing (cancelled requests leave at its next step)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        h = httpx.get(url + "/health", timeout=10).json()
        if not (h["running"] or h["waiting"] or h["prefilling"]):
            return
        time.sleep(0.2)


def loop_timing(before: dict, after: dict) -> dict:
    """The server loop's phases over one rate (``/health``'s ``timing``, after - before): ms per iteration,
    decode rows per step, prompt tokens per iteration."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    it = max(d.get("iterations", 0), 1)
    out = {f"{k[:-2]}_ms": 1e3 * d.get(k, 0) / it for k in ("prefill_s", "launch_s", "read_s", "host_s")}
    out.update(iterations=d.get("iterations", 0), rows_per_step=d.get("step_rows", 0) / max(d.get("steps", 0), 1),
               prefill_tokens_per_iteration=d.get("prefill_tokens", 0) / it)
    return out


def format_timing(t: dict) -> str:
    if not t.get("iterations"):
        return "(no timing from this server)"
    return (f"{t['iterations']} iterations; per iteration: prefill {t['prefill_ms']:.1f} ms "
            f"({t['prefill_tokens_per_iteration']:.0f} prompt tokens), launch {t['launch_ms']:.1f} ms, "
            f"read (device wait) {t['read_ms']:.1f} ms, host {t['host_ms']:.1f} ms; {t['rows_per_step']:.0f} rows per step")


def bench_server(url: str, args, out: Path) -> list[dict]:
    health = httpx.get(url + "/health").json()
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    mode = health.get("attention_mode", "?")
    print(f"[{mode}] {health['engine']} on {health['device']}, {health['max_batch']} slots, "
          f"{health['state_bytes_per_slot'] / 2**20:.1f} MiB per slot", flush=True)
    vocab = health["vocab_size"]
    if args.warmup_requests:
        asyncio.run(run_rate(url, model, float("inf"), args.warmup_requests, args, vocab))
    rows = []
    for rate in [float(r) for r in args.rates.split(",")]:
        planned = args.max_batch if rate == float("inf") else max(1, int(rate * args.duration))
        n = min(args.num_requests or planned, args.max_requests)
        before = httpx.get(url + "/health", timeout=10).json().get("timing", {})
        results, wall = asyncio.run(run_rate(url, model, rate, n, args, vocab))
        wait_idle(url)
        after = httpx.get(url + "/health", timeout=10).json().get("timing", {})
        row = {**summarize(mode, rate, results, wall), "device": health["device"], "max_batch": health["max_batch"],
               "state_bytes_per_slot": health["state_bytes_per_slot"], "server_timing": loop_timing(before, after)}
        rows.append(row)
        print(format_row(row), flush=True)
        print(f"    server loop: {format_timing(row['server_timing'])}", flush=True)
        (out / f"{mode}.json").write_text(json.dumps({"args": vars(args), "health": health, "rows": rows}, indent=2))
    return rows


# ---------------------------------------------------------------- report

HEADER = (f"{'mode':8} {'rate/s':>7} {'done':>6} {'fail':>5} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9} {'TPOT p99':>9}")


def format_row(r: dict) -> str:
    ms = lambda x: f"{x * 1000:8.1f}ms"  # noqa: E731
    return (f"{r['mode']:8} {r['rate']:>7g} {r['completed']:>6} {r['failed']:>5} {r['output_tok_s']:>10.1f} "
            f"{ms(r['ttft_p50'])} {ms(r['ttft_p99'])} {ms(r['tpot_p50'])} {ms(r['tpot_p99'])}")


def report(out: Path, bound: float) -> str:
    rows = []
    for f in sorted(out.glob("*.json")):
        rows += json.loads(f.read_text())["rows"]
    if not rows:
        return "no results"
    lines = [f"device: {rows[0]['device']}; baseline: teacher mode (softmax over preallocated KV slots, same "
             "server, scheduler and CUDA graphs)", HEADER] + [format_row(r) for r in rows]
    best = {}
    for mode in sorted({r["mode"] for r in rows}):
        fit = [r for r in rows if r["mode"] == mode and r["failed"] == 0 and r["tpot_p99"] <= bound]
        best[mode] = max((r["output_tok_s"] for r in fit), default=0.0)
        lines.append(f"{mode}: best output tok/s with p99 TPOT <= {bound * 1000:g} ms: {best[mode]:.1f}")
    if best.get("teacher"):
        lines.append(f"student / teacher at that bound: {best.get('student', 0.0) / best['teacher']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one connection per open request
    codes = {}
    if args.url:
        bench_server(args.url.rstrip("/"), args, out)
    else:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        for mode in args.modes.split(","):
            proc, url = start_server(args, mode, out)
            try:
                bench_server(url, args, out)
            finally:
                codes[mode] = stop_server(proc)
            print(f"[{mode}] server stopped (exit status {codes[mode]})", flush=True)
    print(report(out, args.tpot_bound))
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
