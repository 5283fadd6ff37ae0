"""Where one serving iteration's time goes, without HTTP: the engine and scheduler of ``lolcats serve``.

Builds the engine ``lolcats serve`` would (random-weight shapes, untrained feature maps), fills
``--running`` slots with long-running requests, then measures on that batch:

* the host time of each engine call the loop makes (prefill of a ``--prompt-len`` prompt, admit,
  move, release, launch), with the device idle and, for prefill, queued behind a decode step: a call
  that takes longer behind a step waits for the device (a host sync), which stalls the loop;
* the device time of one decode step over the running rows' bucket and of one prefill;
* ``--iterations`` iterations of the scheduler loop with one new request per iteration: wall time
  per iteration and the loop's own timing (prefill, launch, device wait, host), under the PyTorch
  profiler; the table of the calls with the most self CPU time follows (``cudaStreamSynchronize``
  there is a sync), and ``--trace FILE`` keeps the trace (open it in Perfetto).

    # GPU: Llama-3-8B shapes, 200 running rows (the profile behind docs/SERVING.md's run 2 -> 3)
    python -m benchmarks.serving_engine --model llama3-8b --tokenizer TOKENIZER --mode student --running 200
    # GPU: SmolLM2 at chat shapes with the default's settings as used (docs/SERVING.md, 2026-12-06)
    python -m benchmarks.serving_engine --model smollm2-135m --tokenizer TOKENIZER --mode student \
        --attn attention.softmax_layers=5,15,18,23 --attn use.sparse_cache=256 --attn use.sparse_sink=64 \
        --attn use.linear_scale=0.3 --max-batch 256 --running 256 --prompt-len 200 --prefill-chunk 512 \
        --max-new-tokens 456 --iterations 20 --repeats 3
    # CPU smoke run: tests/test_serving.py::test_serving_engine_benchmark_smoke
"""

from __future__ import annotations

import argparse
import queue
import time

import torch
from benchmarks import common


DRIVEN = 32  # at least the decode steps Bench.calls() launches (3 + 3 + 10)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(p, "llama3-8b")
    p.add_argument("--max-batch", type=int, default=512)
    p.add_argument("--running", type=int, default=200, help="slots filled before measuring")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--max-new-tokens", type=int, default=640, help="with the prompt: the slots' length")
    p.add_argument("--kv-tokens", type=int, default=0,
                   help="page the full key/value stores: a pool of N positions (lolcats serve --kv-tokens)")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5, help="timings per engine call")
    p.add_argument("--device", default="auto")
    p.add_argument("--trace", help="write the profiler's trace (JSON) here")
    return p.parse_args(argv)


def build(args):
    from lolcats.serving.engine import KVEngine, StateEngine

    model, tok = common.random_model(args.model, args.tokenizer, args.attn, args.device)
    cls = KVEngine if args.mode == "teacher" else StateEngine
    # + the decode steps calls() launches itself (outside the scheduler, which does not count them as tokens)
    max_len = args.prompt_len + args.max_new_tokens + 1 + DRIVEN
    return cls(model, args.max_batch, max_len, prefill_chunk=args.prefill_chunk, kv_tokens=args.kv_tokens), tok


class Bench:
    def __init__(self, engine, tok, args):
        from lolcats.serving.scheduler import Scheduler

        self.engine, self.tok, self.args = engine, tok, args
        self.cuda = engine.device.type == "cuda"
        self.g = torch.Generator().manual_seed(0)
        self.sched = Scheduler(engine, [], prefill_chunk=args.prefill_chunk, max_queue=1 << 20,
                               deliver=lambda events: None)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.engine.device)

    def prompt(self) -> list[int]:
        return torch.randint(1, self.engine.vocab, (self.args.prompt_len,), generator=self.g).tolist()

    def request(self, new: int):
        from lolcats.generation.sampling import Sampling
        from lolcats.serving.scheduler import Request

        return Request(self.prompt(), new, Sampling(), self.tok, ignore_eos=True, sink=queue.Queue())

    def fill(self, n: int) -> None:
        """Admit ``n`` requests that outlive the measurement."""
        for _ in range(n):
            self.sched.submit(self.request(self.args.max_new_tokens))
        s = self.sched
        while s.inbox or s.waiting or s.staging:
            s.iteration()
        self.sync()

    def host_ms(self, fn, behind_step: bool = False) -> list[float]:
        """Host milliseconds of ``fn()``, the device idle before (or running a decode step)."""
        out = []
        for _ in range(self.args.repeats):
            self.sync()
            if behind_step:
                self.engine.launch(len(self.sched.running), "greedy")
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
            self.sync()
        return out

    def device_ms(self, fn, repeats: int = 10) -> float:
        self.sync()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        self.sync()
        return (time.perf_counter() - t) / repeats * 1e3

    def calls(self) -> list[tuple[str, str]]:
        from lolcats.generation.sampling import Sampling

        e, n, ids = self.engine, len(self.sched.running), self.prompt()
        prefill = lambda: e.prefill(ids, 0, Sampling())  # noqa: E731
        fmt = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        rows = [(f"prefill {len(ids)} tokens, device idle", fmt(self.host_ms(prefill))),
                (f"prefill {len(ids)} tokens, behind a decode step", fmt(self.host_ms(prefill, True)))]
        prefill()  # the staging row holds a prompt: admit copies it
        rows += [("admit", fmt(self.host_ms(lambda: e.admit(n, len(ids))))),
                 ("move", fmt(self.host_ms(lambda: e.move(n - 1, n)))),
                 ("release", fmt(self.host_ms(lambda: e.release(n)))),
                 ("launch", fmt(self.host_ms(lambda: e.launch(n, "greedy"))))]
        rows += [(f"decode step, {n} rows (device ms)", f"{self.device_ms(lambda: e.launch(n, 'greedy')):.2f}"),
                 (f"prefill {len(ids)} tokens (device ms)", f"{self.device_ms(prefill):.2f}")]
        return rows

    def loop(self):
        """``iterations`` loop iterations, one new short request each, under the profiler."""
        from torch.profiler import ProfilerActivity, profile

        s, k = self.sched, self.args.iterations
        for _ in range(min(k, 10)):  # warm: a few requests join and leave first
            s.submit(self.request(8))
            s.iteration()
        s.timing.clear()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=acts) as prof:
            t = time.perf_counter()
            for _ in range(k):
                s.submit(self.request(8))
                s.iteration()
            self.sync()
            wall = time.perf_counter() - t
        return wall / k * 1e3, dict(s.timing), prof


def main(argv=None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    engine, tok = build(args)
    graphs = engine.warmup(("greedy",))
    bench = Bench(engine, tok, args)
    bench.sync()
    card = common.card(engine.device, cpu="cpu")
    print(f"device: {card}; {args.mode} engine, {args.model}, {graphs} graphs; built in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    bench.fill(min(args.running, args.max_batch - 1))
    print("| call | host ms (each repeat) |\n|---|---|")
    for name, value in bench.calls():
        print(f"| {name} | {value} |", flush=True)
    wall, tm, prof = bench.loop()
    it = max(tm.get("iterations", 0), 1)
    per = {k: tm.get(k, 0.0) / it * 1e3 for k in ("prefill_s", "launch_s", "read_s", "host_s")}
    print(f"loop: {wall:.1f} ms per iteration ({tm.get('prefill_tokens', 0) / it:.0f} prompt tokens each); prefill "
          f"{per['prefill_s']:.1f}, launch {per['launch_s']:.1f}, device wait {per['read_s']:.1f}, host "
          f"{per['host_s']:.1f} ms; {tm.get('step_rows', 0) / max(tm.get('steps', 0), 1):.0f} rows per step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50))
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"wrote {args.trace}")


if __name__ == "__main__":
    main()
