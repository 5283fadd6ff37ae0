"""Start-up time of ``lolcats generate`` / ``lolcats chat``: time to the first token, and where it goes.

Two measurements of the same command (a trained checkpoint, a short prompt, streamed):

* ``--runs N``: the CLI in a fresh subprocess N times: wall seconds to its first streamed output
  (the first word a user sees) and to its exit, and the CPU seconds it used. The first run
  starts with an empty converted-GGUF cache (``--cold``, the default: a fresh
  ``LOLCATS_CACHE_DIR``, and on GPU a fresh Triton cache), the later ones find it.
* ``--phases``: the CLI once in this process with timers around its steps (imports, argument
  parser, base model load and the number of GGUF parses, tokenizer, fingerprint, stage-1 and
  LoRA loading and merging, CUDA-graph capture, prefill, first streamed word).

    python -m benchmarks.startup --checkpoint RUN/finetune-.../best --runs 3 --phases
    python -m benchmarks.startup --checkpoint ... --command chat --runs 2
    python -m benchmarks.startup --checkpoint ... --fast      # generate --fast (CUDA graphs on GPU)

The machine is named in the output: wall times on a shared CPU move with its load (the CPU
seconds move less). So is whether Python can reuse compiled bytecode for torch and transformers
(``bytecode caching``): with ``PYTHONDONTWRITEBYTECODE`` set and no ``.pyc`` files, every process compiles
them from source.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from benchmarks import common

REPO = common.REPO


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a stage checkpoint directory (.../best)")
    p.add_argument("--base", help="the base model, where the checkpoint's recorded one is not found here (--base)")
    p.add_argument("--command", default="generate", choices=["generate", "chat"])
    p.add_argument("--prompt", default="Hi")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--fast", action="store_true", help="generate --fast (FastGenerator; CUDA graphs on GPU)")
    p.add_argument("--runs", type=int, default=2, help="subprocess runs (0: none)")
    p.add_argument("--warm", action="store_true",
                   help="keep the current caches for the first run (default: the first run starts cold)")
    p.add_argument("--phases", action="store_true",
                   help="also the in-process breakdown (one more, warm run, in a fresh process)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the runs (default: torch's, one per core)")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # the --phases child
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args(argv)


def cli_args(args) -> list[str]:
    a = [args.command, "--checkpoint", args.checkpoint, "--max-new-tokens", str(args.max_new_tokens)]
    a += ["--base", args.base] if args.base else []
    if args.command == "generate":
        a += ["--prompt", args.prompt, "--stream"] + (["--fast"] if args.fast else [])
    return a


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (+ {os.cpu_count()} CPU cores)"
    except ImportError:
        pass
    return f"CPU only: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def bytecode() -> dict:
    """Whether Python can reuse compiled bytecode for the big imports: without it every process compiles torch
    and transformers from source (PYTHONDONTWRITEBYTECODE set, or a read-only site-packages without .pyc files)."""
    import importlib.util

    out = {"dont_write_bytecode": bool(sys.flags.dont_write_bytecode), "pycache_prefix": sys.pycache_prefix}
    for name in ("torch", "transformers"):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            continue
        pkg = Path(spec.origin).parent
        sources = [f for f in (pkg / "modeling_utils.py", pkg / "__init__.py") if f.is_file()]
        out[name] = {"pyc": all(Path(importlib.util.cache_from_source(str(f))).is_file() for f in sources),
                     "writable": os.access(pkg, os.W_OK)}
    return out


# ---------------------------------------------------------------- subprocess runs


def run_once(args, env: dict) -> dict:
    """Wall seconds to the first byte of streamed output (after chat's prompt) and to the exit."""
    cmd = [sys.executable, "-m", "lolcats.cli", *cli_args(args)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    if args.command == "chat":
        proc.stdin.write(f"{args.prompt}\n".encode())
    proc.stdin.close()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    out, err, first = b"", b"", None
    marker = b"> " if args.command == "chat" else b""  # chat: the reply starts after its input prompt
    while sel.get_map():
        if time.perf_counter() - t0 > args.timeout:
            proc.kill()
            break
        for key, _ in sel.select(timeout=1.0):
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                sel.unregister(key.fileobj)
            elif key.data == "out":
                out += chunk
                reply = out if not marker else out.split(marker, 1)[1] if marker in out else b""
                if first is None and reply.strip():
                    first = time.perf_counter() - t0
            else:
                err += chunk
    rc = proc.wait()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if rc != 0:
        print(err.decode(errors="replace")[-3000:], file=sys.stderr)
    return dict(rc=rc, first_output_s=first, exit_s=wall, cpu_s=cpu,
                converted=b"converted" in err, output=out.decode(errors="replace")[-200:])


def child_env(args, cache: str | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in [env.get("PYTHONPATH")] if p])
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if cache:  # a fresh folder: the first run finds no converted copy and no compiled kernels
        env["LOLCATS_CACHE_DIR"] = str(Path(cache) / "lolcats")
        env["TRITON_CACHE_DIR"] = str(Path(cache) / "triton")
    return env


def subprocess_runs(args, env: dict) -> list[dict]:
    rows = []
    for i in range(args.runs):
        r = dict(run=i + 1, cache="cold" if (i == 0 and not args.warm) else "warm", **run_once(args, env))
        rows.append(r)
        print(f"run {r['run']} ({r['cache']}): first output {fmt(r['first_output_s'])} s, exit {r['exit_s']:.1f} s, "
              f"CPU {r['cpu_s']:.1f} s, rc {r['rc']}", flush=True)
    return rows


def fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


# ---------------------------------------------------------------- in-process phases


class Timers:
    """Inclusive wall and CPU seconds per wrapped call, in call order."""

    def __init__(self):
        self.t0, self.rows, self.counts, self.first = time.perf_counter(), [], {}, None

    def mark(self, name: str, start: float, cpu0: float) -> None:
        self.rows.append((name, start - self.t0, time.perf_counter() - start, time.process_time() - cpu0))

    def wrap(self, owner, attr: str, name: str | None = None, count_only: bool = False) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            return
        name = name or attr

        def timed(*a, **kw):
            self.counts[name] = self.counts.get(name, 0) + 1
            if count_only:
                return fn(*a, **kw)
            start, cpu0 = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                self.mark(name, start, cpu0)

        setattr(owner, attr, timed)


def phases(args) -> dict:
    """Run the CLI command in this process with timers; returns the phases in call order."""
    tm = Timers()
    start, cpu0 = time.perf_counter(), time.process_time()
    import torch  # noqa: F401

    tm.mark("import torch", start, cpu0)
    start, cpu0 = time.perf_counter(), time.process_time()
    import transformers
    from transformers import AutoModelForCausalLM, TextStreamer  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    tm.mark("import transformers (+ llama)", start, cpu0)
    start, cpu0 = time.perf_counter(), time.process_time()
    from lolcats import cli
    from lolcats.generation import fast
    from lolcats.models import trained

    tm.mark("import lolcats", start, cpu0)
    try:
        import gguf

        tm.wrap(gguf, "GGUFReader", "GGUF parse", count_only=True)
    except ImportError:
        pass
    tm.wrap(cli, "build_parser", "argument parser")
    tm.wrap(trained, "load_trained", "load the trained model (all below)")
    for name in ("load_base_model", "load_tokenizer", "base_fingerprint", "load_stage1", "add_lora", "load_stage2",
                 "merge_stage2"):
        tm.wrap(trained, name)
    tm.wrap(fast.FastGenerator, "capture", "CUDA-graph capture")
    tm.wrap(fast.FastGenerator, "prefill", "prefill (FastGenerator)")
    try:
        from peft import PeftModel

        tm.wrap(PeftModel, "merge_and_unload", "merge LoRA")
    except ImportError:
        pass

    def first_word(self, text, stream_end=False, _orig=TextStreamer.on_finalized_text):
        if text.strip() and tm.first is None:
            tm.first = time.perf_counter() - tm.t0
        return _orig(self, text, stream_end)

    TextStreamer.on_finalized_text = first_word
    inputs = iter([args.prompt])
    if args.command == "chat":
        import builtins

        builtins.input = lambda prompt="": next(inputs)  # one turn, then EOF
    start, cpu0 = time.perf_counter(), time.process_time()
    rc = cli.main(cli_args(args))
    tm.mark("lolcats.cli.main (all)", start, cpu0)
    total = time.perf_counter() - tm.t0
    print()
    print(f"in-process phases ({args.command}, {machine()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}); GGUF parses: {tm.counts.get('GGUF parse', 0)}")
    print("| phase | starts at s | wall s | CPU s |\n|---|---|---|---|")
    for name, at, wall, cpu in sorted(tm.rows, key=lambda r: r[1]):
        print(f"| {name} | {at:.2f} | {wall:.2f} | {cpu:.2f} |")
    print(f"| first streamed word | {fmt(tm.first)} | | |\n| exit | {total:.2f} | | |")
    return dict(rc=rc, phases=[dict(name=n, at=a, wall=w, cpu=c) for n, a, w, c in tm.rows],
                gguf_parses=tm.counts.get("GGUF parse", 0), first_word_s=tm.first, total_s=total)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not Path(args.checkpoint, "meta.json").is_file():
        sys.exit(f"no lolcats checkpoint at {args.checkpoint} (missing meta.json)")
    if args.in_process:
        print("PHASES " + json.dumps(phases(args)))
        return
    print(f"machine: {machine()}; command: lolcats {' '.join(cli_args(args))}; OMP_NUM_THREADS "
          f"{args.threads or os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    print(f"bytecode caching: {json.dumps(bytecode())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lolcats-startup-") as tmp:
        env = child_env(args, None if args.warm else tmp)
        result = dict(machine=machine(), command=cli_args(args), threads=args.threads, bytecode=bytecode(),
                      runs=subprocess_runs(args, env) if args.runs else [])
        if args.phases:  # a fresh process, so that its imports are timed too
            child = [a for a in (argv if argv is not None else sys.argv[1:])] + ["--in-process"]
            out = subprocess.run(common.module_command("benchmarks.startup", *child), env=env, capture_output=True,
                                 text=True, timeout=args.timeout, cwd=REPO)
            print(out.stdout.split("PHASES ")[0])
            if out.returncode != 0 or "PHASES " not in out.stdout:
                print(out.stderr[-3000:], file=sys.stderr)
            else:
                result["phases"] = json.loads(out.stdout.split("PHASES ", 1)[1])
    if args.out:
        common.write_json(args.out, result)


if __name__ == "__main__":
    main()
