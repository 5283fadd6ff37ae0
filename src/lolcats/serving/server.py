"""``lolcats serve``: build the engine and scheduler for a loaded model, and run uvicorn.

    lolcats serve --checkpoint runs/.../best --port 8000 --max-batch 64
    lolcats serve --export DIR --attention-mode teacher          # softmax baseline, same weights
    lolcats serve --untrained --model.init random --model.name llama3-8b \\
        --model.tokenizer smollm2-135m-instruct                 # benchmark shapes, untrained maps

``lolcats.cli`` loads the model once (``models.trained.load_trained``) and calls :func:`serve`
with the :class:`~lolcats.serving.options.ServeOptions` its flags give.
SIGTERM or Ctrl-C ends the server: running requests end with an error event, then it exits.

Before the engine allocates its slots, :func:`check_memory` estimates what they take (computed on
the meta device): a layer kept as softmax attention (or every layer, in teacher mode) holds keys and
values for ``max_prompt_tokens + max_new_tokens + 1`` positions in every slot (a kept layer bounded by
``--softmax-window`` / ``--softmax-sink``: for that many), or in a pool of ``--kv-tokens`` positions.
Where the slots' rows would not fit in the device's free memory, it pages them in the largest pool that
does (without ``--kv-tokens``), else refuses to start, naming the flags.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from dataclasses import replace

import torch

from lolcats.generation.text import eos_ids
from lolcats.serving.options import ServeOptions

log = logging.getLogger("lolcats.serve")
EXTRA_HINT = "lolcats serve needs the serve extra: pip install 'lolcats[serve]'"


def build_engine(model, opts: ServeOptions):
    from lolcats.serving.engine import KVEngine, StateEngine

    cls = KVEngine if opts.attention_mode == "teacher" else StateEngine
    max_len = opts.max_prompt_tokens + opts.max_new_tokens + 1
    return cls(model, opts.max_batch, max_len, use_cuda_graph=None if opts.cuda_graph else False,
               prefill_chunk=opts.prefill_chunk, batch_step=opts.batch_bucket_step,
               prefill_step=opts.prefill_bucket_step, prefill_rows=opts.prefill_rows,
               prefill_tokens=opts.prefill_budget, kv_tokens=opts.kv_tokens)


def slot_bytes(model, opts: ServeOptions) -> int:
    """Bytes of one slot's preallocated buffers: every converted layer's state and the key/value rows of the
    layers kept as softmax attention (student), or every layer's key/value rows (teacher), for
    ``max_prompt_tokens + max_new_tokens + 1`` positions (none with ``--kv-tokens``: :func:`pool_bytes`); and the
    row's counts of generated tokens (penalties)."""
    from lolcats.attention.generate import make_cache
    from lolcats.attention.layers import decoder_stack

    max_len = opts.max_prompt_tokens + opts.max_new_tokens + 1
    emb = decoder_stack(model).embed_tokens.weight
    # the cache the engine allocates (KVEngine: every layer's key/value store), here on the meta device (no memory)
    pool, table = _meta_pool(model, opts), torch.zeros(1, 1, dtype=torch.long, device="meta")
    cache = make_cache(model, 1, device="meta", max_length=max_len, softmax=opts.attention_mode == "teacher",
                       kv_pool=pool, kv_table=table)
    return cache.state_nbytes() + 4 * emb.shape[0]


def _meta_pool(model, opts: ServeOptions):
    """The engine's key/value pool (``--kv-tokens``) on the meta device, or None."""
    from lolcats.attention.generate import make_kv_pool
    from lolcats.serving.engine import SlotEngine

    if not opts.kv_tokens:
        return None
    return make_kv_pool(model, opts.kv_tokens, SlotEngine.KV_PAGE, opts.attention_mode == "teacher", device="meta")


def pool_bytes(model, opts: ServeOptions) -> int:
    """Bytes of the key/value pool of ``--kv-tokens`` positions (0 without)."""
    pool = _meta_pool(model, opts)
    return 0 if pool is None else pool.nbytes()


def free_bytes(device: torch.device) -> int | None:
    """Memory still free on ``device``: CUDA's free memory and what PyTorch's allocator holds unused; the
    host's available memory on CPU (psutil if installed, else /proc/meminfo); None where unknown."""
    if device.type == "cuda":
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + unused
    if device.type != "cpu":
        return None
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024
    except (OSError, StopIteration, ValueError):
        return None


def check_memory(model, opts: ServeOptions) -> ServeOptions:
    """The options to build the engine with: ``opts`` where its slots fit in 90% of the free memory. Without
    ``--kv-tokens``, where every slot's key/value rows would not fit but a pool of them would (at least one longest
    sequence; a model on one device), ``opts`` with the largest such pool, and a warning that names it. Else
    refuse to start (one line naming the flags)."""
    from lolcats.attention.layers import decoder_stack

    device = decoder_stack(model).embed_tokens.weight.device
    free, need = free_bytes(device), _need(model, opts)
    if free is None or need <= 0.9 * free:
        return opts
    paged = None if opts.kv_tokens else _fitting_pool(model, opts, 0.9 * free)
    if paged is not None:
        log.warning("the slots' key/value rows for --max-prompt-tokens %d + --max-new-tokens %d positions do not "
                    "fit in %.2f GiB free: paging them, --kv-tokens %d (%.2f GiB)", opts.max_prompt_tokens,
                    opts.max_new_tokens, free / 2**30, paged.kv_tokens, pool_bytes(model, paged) / 2**30)
        return paged
    per_slot, staging, pool = slot_bytes(model, opts), _staging(opts), pool_bytes(model, opts)
    what = (f"states, and a key/value pool of --kv-tokens {opts.kv_tokens} positions ({pool / 2**30:.2f} GiB)"
            if opts.kv_tokens else f"states and key/value buffers for --max-prompt-tokens "
                                   f"{opts.max_prompt_tokens} + --max-new-tokens {opts.max_new_tokens} positions")
    raise ValueError(f"serve: the slots need an estimated {need / 2**30:.2f} GiB ({opts.max_batch} + "
                     f"{staging} staging x {per_slot / 2**20:.1f} MiB: {what}), but {device} has {free / 2**30:.2f} "
                     f"GiB free; lower --max-batch, --prefill-rows, --max-prompt-tokens or --kv-tokens")


def _staging(opts: ServeOptions) -> int:
    return min(opts.prefill_rows, opts.max_batch)  # the staging rows prompts are read into, beside the slots


def _need(model, opts: ServeOptions) -> int:
    """Bytes the engine allocates for its slots, staging rows and key/value pool."""
    return slot_bytes(model, opts) * (opts.max_batch + _staging(opts)) + pool_bytes(model, opts)


def _fitting_pool(model, opts: ServeOptions, budget: float) -> ServeOptions | None:
    """``opts`` with the largest key/value pool (``kv_tokens``, whole pages, at most what every slot and staging
    row would hold) that fits in ``budget`` bytes with the slots' states; None where none holds one longest
    sequence, the model holds no key/value store, or spans several devices (one page table per engine)."""
    from lolcats.serving.engine import SlotEngine

    page, longest = SlotEngine.KV_PAGE, opts.max_prompt_tokens + opts.max_new_tokens + 1
    if len({p.device for p in model.parameters()}) > 1:
        return None
    one, two = (pool_bytes(model, replace(opts, kv_tokens=n * page)) for n in (1, 2))
    if one == 0:
        return None
    states = _need(model, replace(opts, kv_tokens=page)) - one  # the slots' and staging rows' states alone
    most = (opts.max_batch + _staging(opts)) * longest
    tokens = min(int((budget - states - one) // (two - one)) * page + page, -(-most // page) * page)
    return replace(opts, kv_tokens=tokens) if tokens >= longest else None


def build_server(model, tokenizer, opts: ServeOptions):
    """Engine (graphs captured now), scheduler and the :class:`~lolcats.serving.api.Server` for ``model``."""
    try:
        from lolcats.serving.api import Server
    except ImportError as e:
        raise ValueError(f"{EXTRA_HINT} ({e})") from None
    from lolcats.serving.scheduler import Scheduler

    opts.check()
    model.eval()
    if opts.softmax_window:
        from lolcats.attention.use import set_softmax_window

        set_softmax_window(model, opts.softmax_window, opts.softmax_sink)  # before the slots are sized
    opts = check_memory(model, opts)
    engine = build_engine(model, opts)
    t0 = time.perf_counter()
    graphs = engine.warmup()
    capture_s = time.perf_counter() - t0
    if graphs:
        log.info("captured %d decode graphs in %.1f s", graphs, capture_s)
    scheduler = Scheduler(engine, eos_ids(model, tokenizer), opts.prefill_chunk, opts.max_queue,
                          prefill_budget=opts.prefill_budget)
    info = {**engine.describe(), "attention_mode": opts.attention_mode, "vocab_size": engine.vocab,
            "state_bytes_per_slot": engine.state_bytes_per_slot(), "created": int(time.time()),
            "graphs_at_start": graphs, "graph_capture_s": round(capture_s, 3)}
    return Server(scheduler, tokenizer, opts, info)


def _uvicorn_server(server, host: str, port: int, log_level: str):
    import uvicorn

    from lolcats.serving.api import create_app

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / SIGINT: end running requests first, then uvicorn
            server.scheduler.shutdown()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):  # as uvicorn's, without re-raising the signal at the end: exit status 0
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)

    config = uvicorn.Config(create_app(server), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=10, lifespan="on")
    return _Server(config)


def serve(model, tokenizer, opts: ServeOptions) -> None:
    """Serve ``model`` until SIGTERM or Ctrl-C."""
    opts.check()
    logging.basicConfig(level=opts.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    server = build_server(model, tokenizer, opts)
    log.info("serving %r (%s, %s) on http://%s:%d/v1", opts.served_model_name, opts.attention_mode,
             server.info["device"], opts.host, opts.port)
    try:
        _uvicorn_server(server, opts.host, opts.port, opts.log_level).run()
    except ImportError as e:
        raise ValueError(f"{EXTRA_HINT} ({e})") from None
    log.info("stopped")


def start_in_thread(server, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """Run ``server`` in a background thread (tests, benchmarks) -> (uvicorn server, thread, port).

    Stop it with ``uv.should_exit = True; thread.join()``.
    """
    uv = _uvicorn_server(server, host, port, log_level)
    thread = threading.Thread(target=uv.run, name="lolcats-uvicorn", daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > end:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    port = uv.servers[0].sockets[0].getsockname()[1]
    return uv, thread, port
