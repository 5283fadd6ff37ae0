"""The host's share of serving: CPU time per streamed token of ``lolcats serve``, by thread, under a real load.

Builds the server ``lolcats serve`` would (random weights of ``--model``'s shapes, untrained feature maps; the
tokenizer, chat template, scheduler, API and uvicorn as served) in this process, with the device's work taken
out: each decode step and prompt read returns random token ids at once (``--device-wait-ms``: after waiting that
long with the GIL released, as a device sync does). Then ``benchmarks/serving.py --url`` sends its closed-loop
chat load through the ``openai`` client from other processes, and this process's threads' CPU time (Linux:
``/proc/self/task``) is divided by the tokens the scheduler streamed. What is left is what a token costs the
host: the scheduler thread's (detokenizing, stop strings, events) and the event loop's (SSE chunks, HTTP writes).
Both share one GIL, so their sum bounds the tokens/s one server streams, whatever the card.

Before the load, the two per-token paths are timed alone in one thread (best of 5; steadier than the load on a
busy machine): the scheduler's handling of a generated token (``_on_token``: detokenizing, stop strings, limits)
and the API's (the request's event through its queue to its SSE chunk), over 128 tokens of the 200 longest
Alpaca answers.

    # CPU: SmolLM2's tokenizer, 256 chat clients (docs/SERVING.md, 2026-12-08)
    python -m benchmarks.serving_host --tokenizer TOKENIZER --chat-data ../shared/data/train/alpaca_52k_en.jsonl.gz \\
        --clients 256 --duration 60
    # CPU smoke run: tests/test_serving_benchmark.py::test_serving_host_benchmark_smoke
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

import torch
from benchmarks import common


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(p, "smollm2-135m")
    p.add_argument("--chat-data", required=True, metavar="FILE", help="Alpaca records (.json/.jsonl, .gz)")
    p.add_argument("--clients", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--client-procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    p.add_argument("--device-wait-ms", type=float, default=0.0,
                   help="each step's stand-in waits this long with the GIL released (a device sync)")
    p.add_argument("--out", default="runs/bench-serving-host")
    return p.parse_args(argv)


def build_server(args):
    from lolcats.serving.options import ServeOptions
    from lolcats.serving.server import build_server

    model, tok = common.random_model(args.model, args.tokenizer, args.attn, "cpu")
    opts = ServeOptions(attention_mode=args.mode, max_batch=args.max_batch, max_prompt_tokens=1024,
                        max_new_tokens=args.max_tokens, max_queue=4 * args.clients, cuda_graph=False,
                        log_level="warning", served_model_name="lolcats")
    server = build_server(model, tok, opts)
    without_device(server.scheduler.engine, args.device_wait_ms / 1e3)
    return server


def without_device(engine, wait_s: float) -> None:
    """The engine's forwards replaced by random token ids (the slots' admission, moves and releases stay)."""
    from lolcats.serving.engine import Pending

    g = torch.Generator().manual_seed(0)
    vocab = engine.vocab

    def tokens(n: int, owners) -> Pending:
        if wait_s:
            time.sleep(wait_s)  # releases the GIL, as the device sync of reading a step's tokens does
        return Pending(torch.randint(1, vocab, (n,), generator=g), owners)

    engine.launch = lambda n, mode, owners=None: tokens(n, owners)
    engine.prefill_group = lambda prompts, samplings, owners=None: tokens(len(prompts), owners)
    engine.prefill_chunks = lambda chunks, starts, samplings, owners=None: tokens(len(chunks), owners)


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of this process's threads, by thread name; {} where /proc is missing."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(tid), "other")
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_name() -> str:
    """The CPU's model name and this machine's cores, as the table names the host."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = common.card("cpu")
    return f"{name}, {os.cpu_count()} cores"


def loop_and_parser() -> str:
    """The event loop and HTTP parser uvicorn picks here (uvloop / httptools when installed)."""
    import importlib.util as u

    loop = "uvloop" if u.find_spec("uvloop") else "asyncio"
    return f"{loop}, {'httptools' if u.find_spec('httptools') else 'h11'}"


def answers(path: str, tok, n: int = 200, length: int = 128) -> list[list[int]]:
    """Token ids of the ``n`` longest Alpaca answers, all cut to the same length (at most ``length``)."""
    from lolcats.data import read_documents

    ids = [tok(r["output"], add_special_tokens=False)["input_ids"] for r in read_documents(path, "alpaca")]
    ids = sorted((row for row in ids if row), key=len, reverse=True)[:n]
    if not ids:
        raise SystemExit(f"serving_host: --chat-data {path}: no answers to time")
    cut = min(length, len(ids[-1]))
    return [row[:cut] for row in ids]


def per_token_paths(tok, ids: list[list[int]]) -> tuple[float, float]:
    """Microseconds per token of the scheduler's token handling and of the API's SSE path, one thread each."""
    import asyncio

    from lolcats.generation.sampling import Sampling
    from lolcats.serving.api import Server
    from lolcats.serving.options import ServeOptions
    from lolcats.serving.scheduler import Delta, Request, Scheduler

    steps, n = len(ids[0]), len(ids)

    def scheduler_side() -> float:
        sched = Scheduler(None, [], deliver=lambda events: None)
        reqs = [Request([1], steps + 1, Sampling(), tok) for _ in ids]
        t = time.perf_counter()
        for i in range(steps):
            for req, row in zip(reqs, ids):
                sched._on_token(req, row[i])
            sched._flush()
        return (time.perf_counter() - t) / (steps * n) * 1e6

    class Idle:  # the scheduler the API's generator cancels through on exit
        def cancel(self, req):
            pass

    api = Server.__new__(Server)
    api.scheduler, api.opts = Idle(), ServeOptions()
    texts = [[tok.decode([t]) for t in row] for row in ids]

    async def api_side() -> float:
        reqs = [Request([1], steps + 1, Sampling(), tok, sink=asyncio.Queue()) for _ in ids]
        meta = {"id": "chatcmpl-0", "created": 0, "model": "lolcats", "object": "chat.completion.chunk"}
        gens = [api._sse(req, meta, True, False) for req in reqs]
        for g in gens:
            await g.__anext__()  # the role chunk
        t = time.perf_counter()
        for i in range(steps):
            for req, g, row in zip(reqs, gens, texts):
                req.sink.put_nowait(Delta(row[i]))
                await g.__anext__()
        return (time.perf_counter() - t) / (steps * n) * 1e6

    return min(scheduler_side() for _ in range(5)), min(asyncio.run(api_side()) for _ in range(5))


def main(argv=None) -> None:
    from lolcats.serving.server import start_in_thread

    args = parse_args(argv)
    server = build_server(args)
    sched_us, api_us = per_token_paths(server.tok, answers(args.chat_data, server.tok))
    print(f"per token, one thread: scheduler {sched_us:.2f} us, API (event -> SSE chunk) {api_us:.2f} us", flush=True)
    uv, thread, port = start_in_thread(server)
    sched = server.scheduler
    cmd = common.module_command("benchmarks.serving", "--url", f"http://127.0.0.1:{port}", "--load", "chat",
                                "--chat-data", args.chat_data, "--clients", str(args.clients), "--max-tokens",
                                str(args.max_tokens), "--duration", str(args.duration), "--client-procs",
                                str(args.client_procs), "--tokenizer", args.tokenizer, "--warmup-seconds", "0",
                                "--out", args.out)
    cpu0, tok0, tm0, t0 = thread_cpu(), sched.tokens_out, dict(sched.timing), time.perf_counter()
    load = subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True, check=False)
    cpu1, tokens, wall = thread_cpu(), sched.tokens_out - tok0, time.perf_counter() - t0
    uv.should_exit = True
    thread.join(30)
    if load.returncode != 0 or not tokens:
        sys.exit(f"serving_host: the load failed (exit {load.returncode}): {(load.stderr or load.stdout)[-2000:]}")
    tm = {k: v - tm0.get(k, 0) for k, v in sched.timing.items()}
    it = max(tm.get("iterations", 0), 1)
    print(f"host: {cpu_name()}; {loop_and_parser()}; {args.mode}, {args.model} shapes, "
          f"{args.clients} chat clients, max_tokens {args.max_tokens}, device wait {args.device_wait_ms} ms")
    print(f"{tokens} tokens in {wall:.1f} s ({tokens / wall:,.0f} tok/s); {it} iterations, "
          f"{tm.get('step_rows', 0) / max(tm.get('steps', 0), 1):.0f} rows per step; per iteration: host "
          f"{tm.get('host_s', 0) / it * 1e3:.2f}, launch {tm.get('launch_s', 0) / it * 1e3:.2f}, device wait "
          f"{tm.get('read_s', 0) / it * 1e3:.2f}, prefill {tm.get('prefill_s', 0) / it * 1e3:.2f} ms")
    spent = {k: v - cpu0.get(k, 0.0) for k, v in cpu1.items()}
    print("| thread | CPU us per token |\n|---|---|")
    for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {s / tokens * 1e6:.1f} |")
    print(f"| all | {sum(spent.values()) / tokens * 1e6:.1f} |")
    rows = [line for line in load.stdout.splitlines() if line.startswith("| ")]
    print("\nthe clients saw:\n" + "\n".join(rows[-3:]))


if __name__ == "__main__":
    main()
