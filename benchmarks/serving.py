"""Serving benchmark: what a user of the OpenAI API sees from ``lolcats serve`` (student, teacher) and from
``transformers serve --continuous-batching`` on the base weights, one after another in the same run.

Servers (``--modes``, in this order, each started, measured and stopped before the next):

* ``student``, ``teacher``: ``python -m lolcats.cli serve`` with ``--checkpoint DIR`` and/or ``--server-args``
  (the same model and limits), ``--attention-mode`` student (constant-size states) or teacher (the same weights
  with softmax over per-slot key/value buffers preallocated for the longest sequence: ``KVEngine``, the same
  scheduler, prefill chunking and CUDA graphs; no paging, no prefix sharing);
* ``hf``: ``transformers serve --continuous-batching`` (paged attention) on the base weights: ``--base NAME``,
  else the base the checkpoint records. A directory with ``architectures`` in its config.json is served as it
  is, a Hub name by name; anything else (a GGUF, a built-in name) is written once to ``OUT/hf-base`` (bf16
  safetensors + tokenizer) by the project's loader. Skipped, with the reason printed and reported, when there
  is no base model or ``transformers serve`` or its dependencies (fastapi, uvicorn, openai) are missing.

Every request goes through the ``openai`` client (``AsyncOpenAI``, streaming, temperature 0,
``stream_options.include_usage`` unless the server refuses it), sent from ``--client-procs`` processes (the
client parses each chunk in Python, ~0.1-0.3 ms: one process would cap the stream it can read). Loads
(``--load``, a comma list):

* ``chat``: closed loop: each of C clients (``--clients``, a comma list) sends the next Alpaca instruction of
  ``--chat-data`` (JSON/JSONL, .gz; the user message is the instruction, then its input) as a chat completion
  with ``max_tokens`` (default 256) as soon as its previous one finished, for ``--duration`` seconds (requests
  running then finish) or until ``--num-requests`` were sent;
* ``long``: the same with passages of ~``--doc-tokens`` tokens of ``--doc-data`` (natural text: .txt/.tokens,
  JSONL ``text`` records, .gz), consecutive documents joined and cut at a sentence end, each followed by
  "Summarize the text above."; ``max_tokens`` default 128. Cutting needs the tokenizer: ``--tokenizer``, else
  the base model's;
* ``random``: completions of random token ids (exact lengths ~ uniform(mean * (1 -+ spread))), ``ignore_eos``,
  Poisson arrivals at each of ``--rates`` (``inf``: all at once) for ``--duration`` s; requests still running
  ``--drain-timeout`` s after the last arrival count as failed. lolcats modes only (``ignore_eos``).

Every (mode, clients) row sends the same prompts (the data's first ones, in order). Metrics per row: output tokens/s (the
completion tokens of the requests served over the time from the first send to the last answer), time to
first token (TTFT: send -> first chunk with text), time per output token (TPOT: (last chunk - first chunk)
/ (tokens - 1), tokens from ``usage``, else chunks with text), p50 / p99 over requests; requests and
errors by kind (``HTTP 400``, ``APITimeoutError``, ``no output``, ...). Per load and mode the report gives
the best throughput whose p99 TPOT is within ``--tpot-bound`` and the ratios to the baselines.

Output: ``OUT/MODE.json`` per mode as rows finish (so modes may also run as separate commands into one
``OUT``), then ``OUT/serving.md`` (a table per load, the card, the command line), ``OUT/serving.json`` and
``OUT/serving.png`` (output tok/s and p99 TPOT against clients, a line per mode; needs matplotlib).

    # GPU: the trained SmolLM2 default; long documents (16, 64 clients), then short chat (64, 256)
    python -m benchmarks.serving --checkpoint RUN/finetune-*/best --modes student,teacher,hf --load long \\
        --doc-data ../shared/data/train/wikipedia_en_enwiki_chunk.jsonl.gz --doc-tokens 3500 --clients 16,64 \\
        --max-batch 256 --max-prompt-tokens 6000 --duration 60 --out runs/bench-serving-long
    python -m benchmarks.serving --checkpoint RUN/finetune-*/best --modes student,teacher,hf --load chat \\
        --chat-data ../shared/data/train/alpaca_52k_en.jsonl.gz --clients 64,256 \\
        --max-batch 256 --max-prompt-tokens 6000 --duration 60 --out runs/bench-serving-chat
    # GPU: Llama-3-8B shapes, random weights, untrained feature maps, Poisson arrivals
    python -m benchmarks.serving --out runs/bench-serving --modes student,teacher \\
        --server-args="--untrained --model.init random --model.name llama3-8b --model.tokenizer smollm2-135m-instruct" \\
        --max-batch 512 --rates 8,16,32,48,64 --duration 30 --prompt-len 512 --output-len 256
    # CPU smoke runs: tests/test_serving_benchmark.py
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import random
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.managers import SyncManager
from pathlib import Path

import httpx
import openai

from benchmarks import common

GPU_MODEL = "--untrained --model.init random --model.name llama3-8b --model.tokenizer smollm2-135m-instruct"
MODES = ("student", "teacher", "hf")
LOADS = ("random", "chat", "long")
MAX_TOKENS = {"chat": 256, "long": 128}
SUMMARIZE = "Summarize the text above."
SENTENCE_ENDS = (". ", "! ", "? ", ".\n", "!\n", "?\n", "\n\n")
PROMPT_MARGIN = 512  # prompt tokens the chat template and the instruction add to a passage (server limit)
HF_FLAGS = (("--model-timeout", "1000000"), ("--log-level", "warning"))  # the model stays loaded between rows


class BenchError(ValueError):
    """Bad input (a file, a flag): one line, exit status 2."""


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="DIR", help="the trained model: `lolcats serve --checkpoint DIR`")
    g.add_argument("--server-args", help="more flags for `lolcats serve` (write --server-args=\"--untrained ...\"); "
                                         f"alone they name the model (default without --checkpoint: {GPU_MODEL})")
    g.add_argument("--base", metavar="NAME", help="the hf mode's model and the tokenizer that cuts passages: a Hub "
                                                  "name, directory, .gguf or built-in (default: the checkpoint's base)")
    g.add_argument("--tokenizer", metavar="NAME", help="cuts --load long passages (default: the base model's)")
    g.add_argument("--hf-args", default="", help="more flags for `transformers serve` (e.g. \"--cb-num-blocks 512\")")
    g = p.add_argument_group("what to run")
    g.add_argument("--modes", default="student,teacher,hf", help="comma list of " + ", ".join(MODES))
    g.add_argument("--url", help="benchmark this running lolcats server instead of starting one (its mode from /health)")
    g.add_argument("--load", default="random", help="comma list of " + ", ".join(LOADS))
    g.add_argument("--clients", default="16,64", help="chat, long: concurrent clients, comma list")
    g.add_argument("--max-tokens", type=int, help=f"chat, long: max_tokens per request (default {MAX_TOKENS})")
    g.add_argument("--chat-data", metavar="FILE", help="chat: Alpaca records (.json/.jsonl, .gz)")
    g.add_argument("--doc-data", metavar="FILE", help="long: natural text (.txt/.tokens, .jsonl text records, .gz)")
    g.add_argument("--doc-tokens", type=int, default=3500, help="long: tokens per passage (cut at a sentence end)")
    g.add_argument("--max-prompts", type=int, default=2000, help="chat, long: distinct prompts (then they repeat)")
    g.add_argument("--rates", default="8,16,32,48,64", help="random: requests/s, comma list; inf = all at once")
    g.add_argument("--duration", type=float, default=30.0, help="seconds of sending per row")
    g.add_argument("--num-requests", type=int, help="requests per row (instead of --duration)")
    g.add_argument("--max-requests", type=int, default=20000, help="random: cap on requests per rate")
    g.add_argument("--prompt-len", type=int, default=512, help="random: mean prompt tokens")
    g.add_argument("--output-len", type=int, default=256, help="random: mean output tokens")
    g.add_argument("--spread", type=float, default=0.5, help="random: lengths ~ uniform(mean * (1 -+ spread))")
    g = p.add_argument_group("lolcats server")
    g.add_argument("--max-batch", type=int, default=256, help="server slots")
    g.add_argument("--max-prompt-tokens", type=int, help="the server's prompt limit (default: from the loads)")
    g.add_argument("--prefill-chunk", type=int, default=512)
    g.add_argument("--prefill-budget", type=int, default=2048,
                   help="prompt tokens per server iteration (0: one chunk; 2048 as lolcats serve's default)")
    g.add_argument("--prefill-rows", type=int, default=8, help="prompts the server reads together in one forward")
    g = p.add_argument_group("measuring")
    g.add_argument("--client-procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                   help="processes sending a row's requests (a row of C clients uses min(C, this)); default: "
                        "half the cores, at most 8")
    g.add_argument("--tpot-bound", type=float, default=0.050, help="seconds: the p99 TPOT bound of the summary")
    g.add_argument("--warmup-requests", type=int, default=4)
    g.add_argument("--warmup-seconds", type=float, default=5.0,
                   help="seconds of each row's load before it, not counted: either server captures the CUDA graphs "
                        "of the shapes it first meets then")
    g.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to start a server (and load hf's model)")
    g.add_argument("--request-timeout", type=float, default=1800.0)
    g.add_argument("--drain-timeout", type=float, default=60.0,
                   help="random: seconds to wait for the requests still running after the last arrival")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="runs/bench-serving")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args) -> None:
    for name, allowed in (("modes", MODES), ("load", LOADS)):
        bad = [x for x in _list(getattr(args, name)) if x not in allowed]
        if bad or not _list(getattr(args, name)):
            p.error(f"--{name} {getattr(args, name)!r}: give a comma list of {', '.join(allowed)}")
    loads = _list(args.load)
    for load, flag in (("chat", "chat_data"), ("long", "doc_data")):
        path = getattr(args, flag)
        if load in loads and not path:
            p.error(f"--load {load} needs --{flag.replace('_', '-')} FILE")
        if load in loads and not Path(path).is_file():
            p.error(f"--{flag.replace('_', '-')} {path}: no such file")
    try:
        args.client_counts = [int(c) for c in _list(args.clients)]
        args.rate_list = [float(r) for r in _list(args.rates)]
    except ValueError:
        p.error(f"--clients {args.clients!r} / --rates {args.rates!r}: give comma lists of numbers")
    if any(c < 1 for c in args.client_counts) or any(r <= 0 for r in args.rate_list):
        p.error("--clients and --rates must be positive")
    if args.num_requests is not None and args.num_requests < 1:
        p.error("--num-requests must be at least 1")


def lengths(mean: int, spread: float) -> tuple[int, int]:
    return max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))


def max_tokens(args, load: str) -> int:
    return args.max_tokens or MAX_TOKENS[load]


# ---------------------------------------------------------------- prompts


def chat_prompts(path: str, n: int) -> list[list[dict]]:
    """The user messages of the first ``n`` Alpaca records of ``path``."""
    from lolcats.data import read_documents, user_message

    records = read_documents(path, "alpaca")[:n]
    if not records:
        raise BenchError(f"--chat-data {path}: no records")
    return [[{"role": "user", "content": user_message(r)}] for r in records]


def token_starts(tokenizer, text: str) -> list[int]:
    """The character offset where each token of ``text`` starts."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [a for a, _ in enc["offset_mapping"]]


def sentence_end(text: str, limit: int) -> int:
    """The end of the last sentence that ends at or before ``limit`` (``limit`` itself if none does)."""
    best = max(text.rfind(end, 0, limit + 1) for end in SENTENCE_ENDS)
    return best + 1 if best > 0 else limit


def cut_passages(texts, tokenizer, doc_tokens: int, n: int) -> list[str]:
    """Up to ``n`` passages of ~``doc_tokens`` tokens: ``texts`` joined in order, cut at sentence ends."""
    out, parts, have = [], [], 0
    for text in texts:
        text = text.strip()
        while text and len(out) < n:
            starts = token_starts(tokenizer, text)
            if have + len(starts) <= doc_tokens:
                parts.append(text)
                have += len(starts)
                break
            end = sentence_end(text, starts[doc_tokens - have])
            out.append("\n\n".join(parts + [text[:end].strip()]).strip())
            parts, have, text = [], 0, text[end:].strip()
        if len(out) >= n:
            break
    return out


def long_prompts(path: str, tokenizer, doc_tokens: int, n: int) -> list[list[dict]]:
    from lolcats.data import read_documents

    docs = (r["text"] for r in read_documents(path, "text"))
    passages = cut_passages(docs, tokenizer, doc_tokens, n)
    if not passages:
        raise BenchError(f"--doc-data {path}: less than --doc-tokens {doc_tokens} tokens of text")
    return [[{"role": "user", "content": f"{p}\n\n{SUMMARIZE}"}] for p in passages]


# ---------------------------------------------------------------- the base model (hf mode, tokenizer)


def base_config(args):
    """The ``ModelConfig`` of the base model (``--base``, else the checkpoint's recorded one), or None."""
    from lolcats.models.trained import ModelSource, base_source

    if not args.base and not args.checkpoint:
        return None
    src = base_source(ModelSource(checkpoint=args.checkpoint, base=args.base))
    return src.base_config or _model_config(src.base)


def _model_config(name: str):
    from lolcats.config import ModelConfig

    return ModelConfig(name=name)


def load_tokenizer(args, cfg):
    from lolcats.models.loading import load_tokenizer as load

    if args.tokenizer:
        return load(_model_config(args.tokenizer))
    if cfg is None:
        raise BenchError("--load long cuts passages with a tokenizer: give --tokenizer NAME, --base NAME or "
                         "--checkpoint DIR")
    return load(cfg)


def _servable_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("architectures")) \
        and any(path.glob("*.safetensors"))


def hf_model(cfg, out: Path) -> str:
    """What ``transformers serve`` loads for ``cfg``: its directory, its Hub name, or a directory written once."""
    from lolcats.hub import is_repo_id
    from lolcats.models.loading import BUILTIN_MODELS

    path = Path(cfg.name)
    if path.is_dir() and _servable_dir(path):
        return str(path.resolve())
    if not path.exists() and cfg.name not in BUILTIN_MODELS and is_repo_id(cfg.name) and not cfg.gguf_file:
        return cfg.name
    target = out / "hf-base"
    if not (target / "config.json").is_file():
        print(f"[hf] writing {cfg.name} to {target} (bf16 safetensors + tokenizer) for transformers serve", flush=True)
        export_base(cfg, target)
    return str(target.resolve())


def export_base(cfg, target: Path) -> None:
    """``cfg``'s base model as a directory ``AutoModelForCausalLM.from_pretrained`` (and transformers serve) loads."""
    from lolcats.checkpoint import atomic_dir
    from lolcats.models.gguf_cache import save_model
    from lolcats.models.loading import load_base_model
    from lolcats.models.loading import load_tokenizer as load

    model = load_base_model(dataclasses.replace(cfg, dtype="bfloat16"), "cpu")
    model.config.architectures = [type(model).__name__]
    with atomic_dir(target) as tmp:
        save_model(model, tmp)
        load(cfg).save_pretrained(tmp)


def hf_missing() -> str | None:
    """Why ``transformers serve`` cannot run here, or None."""
    try:
        from transformers.utils.import_utils import is_serve_available
    except ImportError:
        return "this transformers has no `transformers serve`"
    if not is_serve_available():
        return "`transformers serve` needs fastapi, uvicorn, pydantic and openai: pip install 'transformers[serving]'"
    return None if hf_command() else "the `transformers` command is not on PATH"


def hf_command() -> list[str] | None:
    """``transformers serve`` of this interpreter's environment (its console script)."""
    here = Path(sys.executable).parent / "transformers"
    exe = str(here) if here.is_file() else shutil.which("transformers")
    return [exe, "serve"] if exe else None


# ---------------------------------------------------------------- servers


@dataclass
class Server:
    mode: str
    url: str
    model: str  # the requests' model field
    proc: subprocess.Popen | None = None
    health: dict = field(default_factory=dict)  # lolcats' /health at start (empty for transformers serve)
    usage: bool = True  # whether requests ask for stream_options.include_usage
    start_s: float = 0.0  # seconds from the server's launch to its first healthy answer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(mode: str, cmd: list[str], port: int, args, out: Path) -> tuple[subprocess.Popen, str, float]:
    """Start ``cmd`` (listening on ``port``) and wait for its ``/health``; (process, url, seconds it took)."""
    log = out / f"server-{mode}.log"
    print(f"[{mode}] {shlex.join(cmd)}", flush=True)
    with open(log, "w") as f:  # the server writes to its own copy
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    end = t0 + args.startup_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the {mode} server exited ({proc.returncode}); see {log}")
        if time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"the {mode} server did not start in {args.startup_timeout} s; see {log}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url, time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(1.0)


def server_limits(args) -> tuple[int, int]:
    """(max prompt tokens, max new tokens) the loads need from a lolcats server."""
    loads = _list(args.load)
    prompt = [lengths(args.prompt_len, args.spread)[1]] if "random" in loads else []
    prompt += [2048] if "chat" in loads else []
    prompt += [args.doc_tokens + PROMPT_MARGIN] if "long" in loads else []
    new = [lengths(args.output_len, args.spread)[1]] if "random" in loads else []
    new += [max_tokens(args, load) for load in loads if load != "random"]
    return args.max_prompt_tokens or max(prompt), max(new)


def lolcats_command(args, mode: str, port: int) -> list[str]:
    model = (["--checkpoint", args.checkpoint] if args.checkpoint else []) + shlex.split(
        args.server_args if args.server_args is not None else ("" if args.checkpoint else GPU_MODEL))
    max_prompt, max_new = server_limits(args)
    return [sys.executable, "-m", "lolcats.cli", "serve", *model, "--attention-mode", mode,
            "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(args.max_batch),
            "--max-prompt-tokens", str(max_prompt), "--max-new-tokens", str(max_new),
            "--max-queue", str(args.max_requests), "--prefill-chunk", str(args.prefill_chunk),
            "--prefill-budget", str(args.prefill_budget), "--prefill-rows", str(args.prefill_rows),
            "--log-level", "warning"]


def lolcats_server(url: str, proc: subprocess.Popen | None = None, start_s: float = 0.0) -> Server:
    health = httpx.get(url + "/health", timeout=30).json()
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    mode = health.get("attention_mode", "?")
    started = f"; ready in {start_s:.1f} s" if start_s else ""
    if health.get("graphs_at_start"):
        started += f" ({health['graphs_at_start']} graphs captured in {health['graph_capture_s']:.1f} s)"
    print(f"[{mode}] {health['engine']} on {health['device']}, {health['max_batch']} slots, "
          f"{health['state_bytes_per_slot'] / 2**20:.1f} MiB per slot{started}", flush=True)
    return Server(mode, url, model, proc, health, start_s=start_s)


def start_hf(args, model: str, out: Path) -> Server:
    port = _free_port()
    cmd = hf_command()
    flags = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=300, check=False).stdout
    if "--continuous-batching" not in flags:
        raise RuntimeError("this `transformers serve` has no --continuous-batching")
    from huggingface_hub import constants

    Path(constants.HF_HUB_CACHE).mkdir(parents=True, exist_ok=True)  # transformers serve 5.17 lists it
    cmd += ["--continuous-batching", "--host", "127.0.0.1", "--port", str(port)]
    for flag, value in HF_FLAGS:  # where this version has them
        cmd += [flag, value] if flag in flags else []
    cmd += shlex.split(args.hf_args)
    proc, url, start_s = spawn("hf", cmd, port, args, out)
    print(f"[hf] ready in {start_s:.1f} s", flush=True)
    return Server("hf", url, model, proc, start_s=start_s)


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# ---------------------------------------------------------------- one request


@dataclass
class Result:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0  # usage's completion tokens, else chunks with text
    ttft: float = 0.0
    tpot: float = 0.0
    error: str = ""  # the kind: "HTTP 400", "APITimeoutError", "no output", ...
    detail: str = ""
    chunks: int = 0  # streamed chunks with text
    latency: float = 0.0  # seconds from the call to the stream's end
    tail: float = 0.0  # seconds from the last chunk with text to the stream's end
    sent: float = 0.0  # seconds from the row's start to the call


def _text(chunk) -> str:
    if not chunk.choices:
        return ""
    choice = chunk.choices[0]
    delta = getattr(choice, "delta", None)
    return (delta.content if delta is not None else getattr(choice, "text", "")) or ""


async def timed(start) -> Result:
    """Run one streaming request (``start()`` makes it) and time its chunks."""
    t0 = time.perf_counter()
    first = last = usage = None
    chunks = 0
    try:
        async with await start() as stream:
            async for chunk in stream:
                if getattr(chunk, "usage", None) is not None:
                    usage = chunk.usage
                if _text(chunk):
                    last = time.perf_counter()
                    first = first or last
                    chunks += 1
    except openai.APIStatusError as e:
        return Result(False, error=f"HTTP {e.status_code}", detail=str(e.message)[:300])
    except Exception as e:  # noqa: BLE001  (any failure of one request is counted by its kind)
        return Result(False, error=type(e).__name__, detail=str(e)[:300])
    end = time.perf_counter()
    if first is None and usage is not None:  # an answer without text (an end-of-sequence token first): served
        return Result(True, usage.prompt_tokens, usage.completion_tokens, end - t0, 0.0, latency=end - t0)
    if first is None:
        return Result(False, error="no output", detail="the stream ended without text")
    n = usage.completion_tokens if usage is not None else chunks
    tpot = (last - first) / (n - 1) if n > 1 else 0.0
    return Result(True, usage.prompt_tokens if usage is not None else 0, n, first - t0, tpot, chunks=chunks,
                  latency=end - t0, tail=end - last)


async def chat_request(client, server: Server, messages: list[dict], max_tokens: int) -> Result:
    extra = {"stream_options": {"include_usage": True}} if server.usage else {}
    return await timed(lambda: client.chat.completions.create(model=server.model, messages=messages, stream=True,
                                                              temperature=0, max_tokens=max_tokens, **extra))


async def random_request(client, server: Server, prompt: list[int], max_tokens: int) -> Result:
    extra = {"stream_options": {"include_usage": True}} if server.usage else {}
    return await timed(lambda: client.completions.create(model=server.model, prompt=prompt, stream=True, temperature=0,
                                                         max_tokens=max_tokens, extra_body={"ignore_eos": True},
                                                         **extra))


def make_client(server: Server, args) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", timeout=args.request_timeout,
                              max_retries=0)


# ---------------------------------------------------------------- loads: a row's requests, over client processes

PROMPTS: dict[str, list] = {}  # load -> its prompts; set in the main process and in every client process


@dataclass(frozen=True)
class Share:
    """One client process's part of a row: the row's requests ``k``, ``k + procs``, ``k + 2 procs``, ..."""

    k: int = 0
    procs: int = 1


async def closed_loop(server: Server, load: str, clients: int, tokens: int, args, count: int | None, start: float,
                      share: Share = Share()) -> list[Result]:
    """This process's share of ``clients`` users, each sending the next prompt of ``load`` as soon as its previous
    answer ended, until ``count`` requests were sent (by all processes), else until ``start + --duration``."""
    prompts, results, mine = PROMPTS[load], [], itertools.count(share.k, share.procs)
    users = clients // share.procs + (share.k < clients % share.procs)
    async with make_client(server, args) as client:

        async def user():
            for i in mine:  # shared by this process's users
                if i >= (count or math.inf) or (count is None and time.perf_counter() > start + args.duration):
                    return
                results.append(await _sent(chat_request(client, server, prompts[i % len(prompts)], tokens), start))

        await asyncio.gather(*(user() for _ in range(users)))
    return results


def random_job(args, rate: float, i: int, vocab: int) -> tuple[list[int], int]:
    """(prompt token ids, output tokens) of request ``i`` of a random row."""
    rng = random.Random(f"{args.seed}-{rate}-{i}")
    (plo, phi), (olo, ohi) = lengths(args.prompt_len, args.spread), lengths(args.output_len, args.spread)
    return [rng.randrange(vocab) for _ in range(rng.randint(plo, phi))], rng.randint(olo, ohi)


async def poisson(server: Server, rate: float, n: int, args, vocab: int, start: float,
                  share: Share = Share()) -> list[Result]:
    """This process's share of ``n`` random-token completions arriving from ``start`` at exponential gaps of mean
    ``1 / rate`` (the same arrival times whatever the number of processes)."""
    rng = random.Random(f"{args.seed}-{rate}")
    arrivals = list(itertools.accumulate(0.0 if rate == math.inf else rng.expovariate(rate) for _ in range(n)))
    jobs = {i: random_job(args, rate, i, vocab) for i in range(share.k, n, share.procs)}
    async with make_client(server, args) as client:
        tasks = []
        for i, job in jobs.items():
            await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
            tasks.append(asyncio.create_task(_sent(random_request(client, server, *job), start)))
        if tasks:
            await asyncio.wait(tasks, timeout=args.drain_timeout)  # the server is overloaded if any remain
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    unfinished = Result(False, error="unfinished", detail="still running at --drain-timeout")
    return [t.result() if not t.cancelled() else unfinished for t in tasks]


async def _sent(request, start: float) -> Result:
    sent = time.perf_counter() - start
    return dataclasses.replace(await request, sent=sent)


def _client_start(prompts: dict) -> None:
    """A client process's start: the prompts, and the openai client's parts it imports when first used (seconds of
    imports, which would otherwise fall into the process's first row while the others already send)."""
    PROMPTS.update(prompts)

    async def touch():
        async with openai.AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="none") as client:
            return client.chat.completions, client.completions

    asyncio.run(touch())


def _ready(barrier) -> None:
    barrier.wait()


def _in_process(name: str, params: tuple, barrier, share: Share) -> tuple[float, list[Result]]:
    barrier.wait()  # every share of the row has its process: they start together
    start = time.perf_counter()  # CLOCK_MONOTONIC: the same clock in every process
    return start, asyncio.run(globals()[name](*params, start, share))


BARRIER_TIMEOUT = 300.0  # seconds a client process waits for the others of its row


@dataclass
class Clients:
    """``--client-procs`` processes that send a row's requests together: the openai client parses each streamed
    chunk in Python (~0.1-0.3 ms), so one process would hold back a server streaming 10,000 tokens/s. A row's
    shares wait for each other at a barrier, so each has its own process and all start sending at once."""

    pool: ProcessPoolExecutor
    manager: SyncManager

    def barrier(self, parties: int):
        return self.manager.Barrier(parties, timeout=BARRIER_TIMEOUT)

    def shutdown(self) -> None:
        self.pool.shutdown(cancel_futures=True)
        self.manager.shutdown()


def client_pool(args) -> Clients | None:
    """The client processes (started and ready now), or None for one process."""
    if args.client_procs <= 1:
        return None
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(args.client_procs, mp_context=ctx, initializer=_client_start, initargs=(PROMPTS,))
    manager = ctx.Manager()
    clients = Clients(pool, manager)
    list(pool.map(_ready, [clients.barrier(args.client_procs)] * args.client_procs))  # all started, each once
    return clients


def run_row(clients: Clients | None, procs: int, work, *params) -> tuple[list[Result], float]:
    """``work(*params, start, share)`` in this process, or split over ``procs`` processes of ``clients``, which
    start together; (results, seconds from the start to the last answer)."""
    if clients is None or procs <= 1:
        start = time.perf_counter()
        results = asyncio.run(work(*params, start))
        return results, time.perf_counter() - start
    barrier = clients.barrier(procs)
    futures = [clients.pool.submit(_in_process, work.__name__, params, barrier, Share(k, procs))
               for k in range(procs)]
    done = [f.result() for f in futures]
    return [r for _, rs in done for r in rs], time.perf_counter() - min(start for start, _ in done)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if q < 100 else max(xs)


def summarize(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft, tpot = [r.ttft for r in ok], [r.tpot for r in ok if r.output_tokens > 1]
    tokens = sum(r.output_tokens for r in ok)
    failed = [r for r in results if not r.ok]
    examples = {}
    for r in failed:
        examples.setdefault(r.error, r.detail)
    return {"requests": len(results), "completed": len(ok), "failed": len(failed),
            "errors": dict(Counter(r.error for r in failed)), "error_examples": examples, "seconds": wall,
            "output_tok_s": tokens / wall, "requests_s": len(ok) / wall,
            "prompt_tokens": statistics.mean([r.prompt_tokens for r in ok]) if ok else float("nan"),
            "output_tokens": tokens / len(ok) if ok else float("nan"),
            "tokens_per_chunk": tokens / max(sum(r.chunks for r in ok), 1),
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99),
            "latency_p50": pct([r.latency for r in ok], 50), "latency_p99": pct([r.latency for r in ok], 99),
            "tail_p50": pct([r.tail for r in ok], 50), "tail_p99": pct([r.tail for r in ok], 99),
            **timeline(results, wall)}


def timeline(results: list[Result], wall: float) -> dict:
    """When the row's requests were open: the mean number open (their seconds / the row's), the first and last
    calls and the last answer's end (seconds from the row's start), and each request's [sent, latency, TTFT,
    output tokens] (ms) in call order."""
    if not results:
        return {}
    rs = sorted(results, key=lambda r: r.sent)
    return {"open_mean": sum(r.latency for r in rs) / wall, "first_sent": rs[0].sent, "last_sent": rs[-1].sent,
            "last_end": max(r.sent + r.latency for r in rs),
            "timeline": [[round(1e3 * x) for x in (r.sent, r.latency, r.ttft)] + [r.output_tokens] for r in rs]}


# ---------------------------------------------------------------- one server


def health(server: Server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json() if server.health else {}


def wait_idle(server: Server, timeout: float = 120.0) -> None:
    """Until a lolcats server runs and queues nothing (cancelled requests leave at its next step)."""
    end = time.monotonic() + timeout
    while server.health and time.monotonic() < end:
        h = health(server)
        if not (h["running"] or h["waiting"] or h["prefilling"]):
            return
        time.sleep(0.2)


def loop_timing(before: dict, after: dict) -> dict:
    """The server loop's phases over one row (``/health``'s ``timing``, after - before): ms per iteration,
    decode rows per step, prompt tokens per iteration."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    it = max(d.get("iterations", 0), 1)
    out = {f"{k[:-2]}_ms": 1e3 * d.get(k, 0) / it for k in ("prefill_s", "launch_s", "read_s", "host_s")}
    out.update(iterations=d.get("iterations", 0), rows_per_step=d.get("step_rows", 0) / max(d.get("steps", 0), 1),
               prefill_tokens_per_iteration=d.get("prefill_tokens", 0) / it,
               busy_s=sum(d.get(k, 0) for k in ("prefill_s", "launch_s", "read_s", "host_s")),
               stalls=d.get("stalls", 0), stall_s=d.get("stall_s", 0))
    return out


def format_timing(t: dict) -> str:
    if not t.get("iterations"):
        return "(no timing from this server)"
    return (f"{t['iterations']} iterations; per iteration: prefill {t['prefill_ms']:.1f} ms "
            f"({t['prefill_tokens_per_iteration']:.0f} prompt tokens), launch {t['launch_ms']:.1f} ms, "
            f"read (device wait) {t['read_ms']:.1f} ms, host {t['host_ms']:.1f} ms; {t['rows_per_step']:.0f} rows per "
            f"step; busy {t.get('busy_s', 0):.1f} s, {t.get('stalls', 0)} iterations over 0.1 s "
            f"({t.get('stall_s', 0):.1f} s)")


def warm_up(server: Server, args, pool: Clients | None) -> None:
    """A first request (without ``include_usage`` if the server refuses it), then ``--warmup-requests`` at once
    (at least one from each client process)."""
    load = next((ld for ld in _list(args.load) if ld != "random"), None)
    if load is None:
        if args.warmup_requests:
            run_row(None, 1, poisson, server, math.inf, args.warmup_requests, args, server.health["vocab_size"])
        return

    def probe() -> Result:
        return run_row(None, 1, closed_loop, server, load, 1, min(8, max_tokens(args, load)), args, 1)[0][0]

    first = probe()
    if not first.ok and first.error in ("HTTP 400", "HTTP 422"):
        server.usage = False  # then tokens are counted from the chunks
        if probe().ok:
            print(f"[{server.mode}] refused stream_options.include_usage ({first.detail[:120]}): counting chunks",
                  flush=True)
            first = Result(True)
        else:
            server.usage = True
    if not first.ok:
        raise RuntimeError(f"the first request to the {server.mode} server failed: {first.error}: {first.detail}")
    procs = args.client_procs if pool is not None else 1
    n = max(args.warmup_requests, procs)
    if n > 1:
        run_row(pool, procs, closed_loop, dataclasses.replace(server, proc=None), load, n, max_tokens(args, load),
                args, n)


def warm_row(server: Server, args, pool: Clients | None, load: str, x: dict) -> None:
    """``--warmup-seconds`` of the row (``load`` at ``x``'s clients or rate), not counted."""
    wargs = argparse.Namespace(**{**vars(args), "duration": args.warmup_seconds, "num_requests": None})
    _, _, procs, work, params = next(plan for plan in row_plan(server, wargs, quiet=True) if plan[:2] == (load, x))
    results, wall = run_row(pool, procs, work, *params)
    wait_idle(server)
    where = ", ".join(f"{k} {v:g}" for k, v in x.items())
    print(f"[{server.mode}] warm-up, {load} at {where}: {sum(r.ok for r in results)}/{len(results)} served in "
          f"{wall:.1f} s (not counted)", flush=True)


def row_plan(server: Server, args, quiet: bool = False):
    """(load, {rate or clients: value}, processes, work, params) of each row of this server."""
    for load in _list(args.load):
        if load != "random":
            for c in args.client_counts:
                yield (load, {"clients": c}, min(c, args.client_procs), closed_loop,
                       (server, load, c, max_tokens(args, load), args, args.num_requests))
        elif server.mode == "hf":
            if not quiet:
                print("[hf] --load random skipped: transformers serve has no ignore_eos", flush=True)
        else:
            for rate in args.rate_list:
                planned = args.max_batch if rate == math.inf else max(1, int(rate * args.duration))
                n = min(args.num_requests or planned, args.max_requests)
                yield load, {"rate": rate}, args.client_procs, poisson, (server, rate, n, args, server.health["vocab_size"])


def bench_server(server: Server, args, out: Path, pool: Clients | None) -> list[dict]:
    warm_up(server, args, pool)
    server = dataclasses.replace(server, proc=None)  # goes to the client processes
    rows = []
    for load, x, procs, work, params in row_plan(server, args):
        if args.warmup_seconds > 0:
            warm_row(server, args, pool, load, x)
        before = health(server).get("timing", {})
        results, wall = run_row(pool, procs, work, *params)
        wait_idle(server)
        row = {"mode": server.mode, "load": load, **x, **summarize(results, wall), "client_procs": procs,
               "max_tokens": None if load == "random" else max_tokens(args, load), "usage": server.usage,
               "server_start_s": server.start_s}
        if server.health:
            row.update(device=server.health["device"], max_batch=server.health["max_batch"],
                       state_bytes_per_slot=server.health["state_bytes_per_slot"],
                       server_timing=loop_timing(before, health(server).get("timing", {})))
        rows.append(row)
        print(format_row(row), flush=True)
        if server.health:
            print(f"    server loop: {format_timing(row['server_timing'])}", flush=True)
        save_mode(out, server.mode, {"args": vars(args), "health": server.health, "rows": rows})
    return rows


def save_mode(out: Path, mode: str, data: dict) -> None:
    common.write_json(out / f"{mode}.json", data, indent=2)


# ---------------------------------------------------------------- report


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1000:.1f} ms" if x < 10 else f"{x:.1f} s"


def _errors(r: dict) -> str:
    return str(r["failed"]) + (f" ({', '.join(f'{k}: {v}' for k, v in r['errors'].items())})" if r["failed"] else "")


def format_row(r: dict) -> str:
    where = f"rate {r['rate']:g}/s" if "rate" in r else f"{r['clients']} clients"
    return (f"{r['mode']:8} {r['load']:6} {where:>14}: {r['completed']}/{r['requests']} served, errors {_errors(r)}; "
            f"{r['output_tok_s']:.1f} out tok/s; TTFT p50 {_ms(r['ttft_p50'])}; "
            f"TPOT p50 {_ms(r['tpot_p50'])}, p99 {_ms(r['tpot_p99'])}; request p50 {_ms(r['latency_p50'])}, "
            f"after its last text p50 {_ms(r['tail_p50'])}, p99 {_ms(r['tail_p99'])}" + _open(r))


def _open(r: dict) -> str:
    if "open_mean" not in r:
        return ""
    return (f"; {r['open_mean']:.1f} open on average, calls from {r['first_sent']:.2f} to {r['last_sent']:.2f} s, "
            f"last end {r['last_end']:.2f} s of {r['seconds']:.2f}")


def table(rows: list[dict]) -> list[str]:
    key = "rate" if rows and "rate" in rows[0] else "clients"
    head = "rate/s" if key == "rate" else "clients"
    lines = [f"| mode | {head} | requests | errors | prompt tok | out tok/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = "all at once" if r[key] == float("inf") else f"{r[key]:g}"
        lines.append(f"| {r['mode']} | {x} | {r['requests']} | {_errors(r)} | {r['prompt_tokens']:,.0f} | "
                     f"{r['output_tok_s']:,.1f} | {_ms(r['ttft_p50'])} | {_ms(r['ttft_p99'])} | {_ms(r['tpot_p50'])} | "
                     f"{_ms(r['tpot_p99'])} |")
    return lines


def best_lines(rows: list[dict], bound: float) -> list[str]:
    best, lines = {}, []
    for mode in [m for m in MODES if any(r["mode"] == m for r in rows)]:
        fit = [r for r in rows if r["mode"] == mode and r["failed"] == 0 and r["tpot_p99"] <= bound]
        best[mode] = max((r["output_tok_s"] for r in fit), default=0.0)
        lines.append(f"{mode}: best output tok/s with p99 TPOT <= {bound * 1000:g} ms: {best[mode]:,.1f}")
    for base in ("teacher", "hf"):
        if best.get(base) and "student" in best:
            lines.append(f"student / {base} at that bound: {best['student'] / best[base]:.2f}x")
    return lines


def chunk_notes(rows: list[dict]) -> list[str]:
    """Modes that stream several tokens per chunk: their TPOT is time between chunks over tokens."""
    out = []
    for mode in MODES:
        per = [r["tokens_per_chunk"] for r in rows if r["mode"] == mode and r.get("tokens_per_chunk", 1) > 1.2]
        if per:
            out.append(f"{mode} streams up to {max(per):.1f} tokens per chunk: its TPOT spreads a chunk's arrival "
                       "over its tokens, and the first chunk (TTFT) may hold several")
    return out


LOAD_TITLES = {"random": "random token ids, Poisson arrivals, ignore_eos",
               "chat": "short chat: Alpaca instructions, closed loop", "long": "long documents, closed loop"}


def load_note(load: str, args: dict) -> str:
    if load == "chat":
        return f"`{args.get('chat_data')}`, max_tokens {args.get('max_tokens') or MAX_TOKENS['chat']}"
    if load == "long":
        return (f"~{args.get('doc_tokens')}-token passages of `{args.get('doc_data')}` + \"{SUMMARIZE}\", "
                f"max_tokens {args.get('max_tokens') or MAX_TOKENS['long']}")
    return f"prompts ~{args.get('prompt_len')} tokens, outputs ~{args.get('output_len')} (spread {args.get('spread')})"


def read_modes(out: Path) -> tuple[list[dict], dict, dict]:
    """(rows, skipped modes and why, args of the last mode file) of every ``OUT/MODE.json``."""
    rows, skipped, args = [], {}, {}
    for mode in MODES:
        f = out / f"{mode}.json"
        if f.is_file():
            data = json.loads(f.read_text())
            rows += data.get("rows", [])
            args = data.get("args") or args
            if data.get("skipped"):
                skipped[mode] = data["skipped"]
    return rows, skipped, args


def report(out: Path, bound: float, command: str = "") -> str:
    """serving.md / .json / .png from the mode files in ``out``; the markdown."""
    rows, skipped, args = read_modes(out)
    card = common.card()
    lines = ["# Serving benchmark", "", f"Card: **{card}**. Command:", "", f"    {command}", "",
             ("Modes: student and teacher = `lolcats serve` (constant-size states; the same weights with softmax "
              "over preallocated KV slots), hf = `transformers serve --continuous-batching` on the base weights. "
              "Requests: the openai client, streaming, temperature 0.")]
    lines += [""] + [f"- {m}: skipped: {why}" for m, why in skipped.items()]
    for load in [ld for ld in LOADS if any(r.get("load", "random") == ld for r in rows)]:
        mine = [r for r in rows if r.get("load", "random") == load]
        lines += ["", f"## {load}: {LOAD_TITLES[load]}", "", load_note(load, args) + ".", ""] + table(mine)
        lines += [""] + [f"- {x}" for x in best_lines(mine, bound) + chunk_notes(mine)]
    md = "\n".join(lines) + "\n"
    (out / "serving.md").write_text(md)
    common.write_json(out / "serving.json", {"card": card, "command": command, "skipped": skipped, "rows": rows},
                      indent=2)
    why = plot(rows, out / "serving.png", card)
    print(f"wrote {out / 'serving.md'}, {out / 'serving.json'}" + (f"; no plot: {why}" if why else
                                                                      f", {out / 'serving.png'}"), flush=True)
    return md


def plot(rows: list[dict], path: Path, card: str) -> str | None:
    """Output tok/s and p99 TPOT against clients (rate for random), a line per mode; why not, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    loads = [ld for ld in LOADS if any(r.get("load", "random") == ld for r in rows)]
    if not loads:
        return "no rows"
    fig, axes = plt.subplots(len(loads), 2, figsize=(11, 3.8 * len(loads)), squeeze=False)
    for (ax_tok, ax_tpot), load in zip(axes, loads):
        key = "rate" if load == "random" else "clients"
        for mode in MODES:
            pts = sorted((r[key], r["output_tok_s"], r["tpot_p99"] * 1e3) for r in rows
                         if r.get("load", "random") == load and r["mode"] == mode and math.isfinite(r[key]))
            if pts:
                xs, tok, tpot = zip(*pts)
                ax_tok.plot(xs, tok, marker="o", label=mode)
                ax_tpot.plot(xs, tpot, marker="o", label=mode)
        for ax, what in ((ax_tok, "output tokens/s"), (ax_tpot, "p99 TPOT (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("requests/s" if key == "rate" else "concurrent clients")
            ax.set_ylabel(what)
            ax.set_title(f"{load}: {what}")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(f"Serving benchmark, {card}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------- main


def make_prompts(args, cfg) -> dict:
    loads = _list(args.load)
    prompts = {}
    if "chat" in loads:
        prompts["chat"] = chat_prompts(args.chat_data, args.max_prompts)
    if "long" in loads:
        prompts["long"] = long_prompts(args.doc_data, load_tokenizer(args, cfg), args.doc_tokens, args.max_prompts)
    for load, ps in prompts.items():
        print(f"{load}: {len(ps)} distinct prompts", flush=True)
    return prompts


def run_mode(mode: str, args, cfg, out: Path, pool: Clients | None) -> int:
    """Start, measure and stop one server; its exit status (0 when skipped)."""
    if mode == "hf":
        why = hf_missing() or (None if cfg is not None else "no base model: give --base NAME or --checkpoint DIR")
        if _list(args.load) == ["random"]:
            why = "transformers serve has no ignore_eos: give --load chat or long"
        if why:
            print(f"[hf] skipped: {why}", flush=True)
            save_mode(out, mode, {"args": vars(args), "skipped": why, "rows": []})
            return 0
        server = start_hf(args, hf_model(cfg, out), out)
    else:
        port = _free_port()
        proc, url, start_s = spawn(mode, lolcats_command(args, mode, port), port, args, out)
        server = lolcats_server(url, proc, start_s)
    try:
        bench_server(server, args, out, pool)
    finally:
        code = stop_server(server.proc)
    print(f"[{mode}] server stopped (exit status {code})", flush=True)
    return 0 if mode == "hf" and code == -signal.SIGTERM else code  # transformers serve dies of the signal


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one connection per open request
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = base_config(args) if ("hf" in _list(args.modes) or "long" in _list(args.load)) else None
        PROMPTS.update(make_prompts(args, cfg))
    except (ValueError, OSError) as e:  # DataError, BenchError, a missing checkpoint or base model
        print(f"serving benchmark: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    codes, pool = {}, client_pool(args)
    try:
        if args.url:
            bench_server(lolcats_server(args.url.rstrip("/")), args, out, pool)
        for mode in [] if args.url else _list(args.modes):
            try:
                codes[mode] = run_mode(mode, args, cfg, out, pool)
            except RuntimeError as e:  # a server that did not start or answer: the next mode still runs
                print(f"[{mode}] failed: {e}", flush=True)
                save_mode(out, mode, {"args": vars(args), "skipped": f"failed: {e}", "rows": []})
                codes[mode] = 1
    finally:
        if pool is not None:
            pool.shutdown()
    print(report(out, args.tpot_bound, shlex.join(["python", "-m", "benchmarks.serving", *argv])))
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
