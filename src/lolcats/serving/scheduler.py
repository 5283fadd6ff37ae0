"""Continuous batching: requests join and leave the running batch between decode steps.

One thread runs the loop; the HTTP side only calls :meth:`Scheduler.submit` and
:meth:`Scheduler.cancel` and receives events through ``deliver`` (called once per iteration with
every event produced in it). One iteration:

1. take new requests and cancellations from the inbox;
2. retire the requests that ended (stop, length, cancelled): the last running slot's row is
   copied into the freed slot, so running sequences stay in slots 0 .. n-1, and the row is reset;
3. read prompts into the engine's staging rows, in one forward: the oldest waiting prompts that each fit
   in one chunk (``prefill_chunk`` tokens) together as a *group*, as many as one forward takes
   (``SlotEngine.group_fits``; a CUDA graph per bucket); or, where a longer prompt is being read, the next
   chunk of every prompt being read (up to ``prefill_rows`` of them, topped up from the queue, within the
   engine's ``group_tokens``); after a prompt's last chunk its first token is picked on the device and its
   row joins the running batch (slots n, n + 1, ...);
4. launch one decode step for slots 0 .. n-1;
5. process the previous step's tokens while the device runs this one (a request that ended
   there wastes one token of this step, which no one reads): text, stop strings, limits.

Prompts therefore never stall running streams for more than one bounded chunk, and a
request's tokens do not depend on what else runs (per-row positions and seeded sampling).
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

from lolcats.generation.sampling import Sampling, batch_mode
from lolcats.serving.engine import Pending, SlotEngine

log = logging.getLogger("lolcats.serve")


class QueueFull(RuntimeError):
    """More requests are waiting than the server accepts."""


class ServerStopping(RuntimeError):
    """The server is shutting down and takes no new requests."""


@dataclass
class Delta:
    """New text of one generated token (may be empty: held back for a stop string, or a partial character),
    with the request's ``logprobs``: (the token, its log-probability, the top ones' (id, log-probability))."""

    text: str
    logprobs: tuple[int, float, list[tuple[int, float]]] | None = None


@dataclass
class Done:
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str
    stopping: bool = False  # the server shut down before the request ended


Event = Delta | Done | Failed


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """``ids -> tokenizer.decode(ids, skip_special_tokens=True)``, straight from the Rust tokenizer where that is
    all ``decode`` does (transformers' fast tokenizer, no space clean-up): a fifth of the Python wrapper's cost,
    which the serving loop pays twice per generated token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    cleans = getattr(tokenizer, "clean_up_tokenization_spaces", True)
    if backend is not None and not cleans and _plain_decode(type(tokenizer)):
        return functools.partial(backend.decode, skip_special_tokens=True)
    return functools.partial(tokenizer.decode, skip_special_tokens=True)


def _plain_decode(cls) -> bool:
    """Whether ``cls`` decodes as transformers' ``TokenizersBackend`` does (neither method overridden)."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    return cls.decode is PreTrainedTokenizerBase.decode and cls._decode is TokenizersBackend._decode


class TextStream:
    """Generated token ids -> text deltas: incremental detokenization, stop strings cut off.

    Text is decoded from a moving window of ids (the new token with the tokens since the last
    emitted piece), and a piece that ends in an incomplete character waits for the next token.
    Up to ``len(longest stop) - 1`` characters are held back while they could start a stop
    string. :meth:`finish` replaces the text by a decode of all ids when that agrees with what
    was sent, so the concatenated deltas equal ``tokenizer.decode(ids)`` cut at the first stop,
    less the U+FFFD of an incomplete character at the end (a sequence cut by max_tokens in the
    middle of a multi-byte character drops those bytes).
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self._decode = text_decoder(tokenizer)  # ids -> text
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] were decoded into the text already
        self.text, self.sent, self.scanned = "", 0, 0

    def add(self, token: int) -> tuple[str, bool]:
        """-> (text to send now, whether a stop string ended the text)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._emit(final=False)

    def finish(self) -> str:
        """The rest of the text (the sequence ended without a stop string so far)."""
        full = self._decode(self.ids)
        if self.read < len(self.ids):  # the last tokens end in an incomplete character: not sent
            full = full.rstrip("\ufffd")
        if full.startswith(self.text[:self.sent]):
            self.text = full
        return self._emit(final=True)[0]

    def _emit(self, final: bool) -> tuple[str, bool]:
        cut = self._find_stop()
        stopped = cut is not None
        if stopped:
            self.text = self.text[:cut]
        upto = len(self.text) if (final or stopped) else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:upto], upto
        return delta, stopped

    def _find_stop(self) -> int | None:
        if not self.stop:
            return None
        start = max(0, self.scanned - self.hold)  # a stop string ends in the new text
        self.scanned = len(self.text)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None


_ids = itertools.count()


class Request:
    """One sequence to generate: prompt ids, limits, sampling, stop strings, and where its events go."""

    def __init__(self, prompt_ids: list[int], max_tokens: int, sampling: Sampling, tokenizer,
                 stop: list[str] | None = None, ignore_eos: bool = False, sink=None):
        self.id = next(_ids)
        self.prompt_ids, self.max_tokens, self.sampling = list(prompt_ids), max_tokens, sampling
        self.text = TextStream(tokenizer, stop)
        self.ignore_eos, self.sink = ignore_eos, sink
        self.prefilled = self.generated = 0
        self.slot: int | None = None
        self.state = "new"  # waiting | prefill | running | done
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.state == "done"


def queue_deliver(events: list[tuple[Request, Event]]) -> None:
    """Default delivery: ``request.sink`` is a ``queue.Queue``."""
    for req, ev in events:
        req.sink.put(ev)


class Scheduler:
    STALL_S = 0.1  # an iteration longer than this counts as a stall in ``timing``

    def __init__(self, engine: SlotEngine, eos_ids: list[int], prefill_chunk: int = 512, max_queue: int = 256,
                 deliver: Callable[[list[tuple[Request, Event]]], None] = queue_deliver, prefill_budget: int = 0):
        self.engine, self.eos = engine, set(eos_ids)
        self.prefill_chunk, self.max_queue, self.deliver = prefill_chunk, max_queue, deliver
        self.prefill_budget = prefill_budget  # prompt tokens per iteration: chunks until reached; 0: one chunk
        self.inbox: deque = deque()
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.n_waiting = 0  # submitted, not yet prefilling (guarded by lock)
        self.waiting: deque[Request] = deque()
        self.staging: list[Request] = []  # prompts being read, staging row i holding staging[i]
        self.running: list[Request] = []  # index = slot
        self.pending: deque[Pending] = deque()
        self.retiring: list[Request] = []
        self.outbox: list[tuple[Request, Event]] = []
        self.finished: Counter = Counter()
        self.tokens_out = 0
        self.timing: Counter = Counter()  # seconds spent per phase of the loop, and counts (stats()["timing"])
        self._stop = threading.Event()
        self.stopping = False
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------ called from other threads

    def submit(self, req: Request) -> None:
        with self.lock:
            if self.stopping:
                raise ServerStopping("the server is shutting down")
            if self.n_waiting >= self.max_queue:
                raise QueueFull(f"{self.n_waiting} requests are already waiting (--max-queue {self.max_queue})")
            self.n_waiting += 1
        req.state = "waiting"
        self.inbox.append(("submit", req))
        self.wake.set()

    def cancel(self, req: Request) -> None:
        """Stop generating for ``req`` (its client went away); its slot is freed at the next iteration."""
        self.inbox.append(("cancel", req))
        self.wake.set()

    def stats(self) -> dict:
        return {"running": len(self.running), "prefilling": len(self.staging),
                "waiting": self.n_waiting, "finished": dict(self.finished), "tokens_generated": self.tokens_out,
                "kv_free_tokens": self.engine.free_positions(), "timing": dict(self.timing)}

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="lolcats-scheduler", daemon=True)
        self.thread.start()

    def shutdown(self) -> None:
        """Take no more requests; the loop finishes its iteration, fails what is left (``Failed``) and ends."""
        with self.lock:
            self.stopping = True
        self._stop.set()
        self.wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """:meth:`shutdown`, then wait for the loop to end."""
        self.shutdown()
        if self.thread is not None:
            self.thread.join(timeout)

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        while not self._stop.is_set():
            busy = self.iteration()
            if not busy:
                self.wake.wait(0.05)
                self.wake.clear()
        self._ingest()
        for req in list(self.waiting) + self.staging + self.running:
            if not req.done:
                self._fail(req, "the server is shutting down", stopping=True)
        self._flush()

    def iteration(self) -> bool:
        """One pass of the loop; returns whether there was anything to do.

        ``timing`` adds up the wall seconds of its phases: ``prefill_s`` (queueing a prompt chunk, and any
        wait for the device inside it), ``launch_s`` (queueing the decode step), ``read_s`` (reading the
        previous step's tokens: mostly waiting for the device), ``host_s`` (the rest: detokenizing,
        stop strings, events), with ``iterations``, ``steps`` (decode steps), ``step_rows`` (their rows),
        ``prefill_tokens``, and ``stalls`` / ``stall_s``: the iterations longer than ``STALL_S`` and their seconds
        (a graph captured or a kernel compiled while serving)."""
        t0 = time.perf_counter()
        self._ingest()
        self._retire()
        t1 = time.perf_counter()
        busy = self._guard(self._prefill_some, self._fail_staging)
        t2 = time.perf_counter()
        if self.running:
            self.timing["steps"] += 1
            self.timing["step_rows"] += len(self.running)
            busy = self._guard(self._launch, self._fail_running) or busy
        t3 = time.perf_counter()
        keep = 1 if self.running else 0  # the step just launched runs while its predecessor is read
        read = 0.0
        while len(self.pending) > keep:
            p = self.pending.popleft()
            t = time.perf_counter()
            self._guard(p.result, self._fail_running)  # the device sync (Pending keeps the tokens for _process)
            read += time.perf_counter() - t
            self._guard(lambda: self._process(p), self._fail_running)
        self._flush()
        if busy:
            tm, t4 = self.timing, time.perf_counter()
            tm["iterations"] += 1
            tm["prefill_s"] += t2 - t1
            tm["launch_s"] += t3 - t2
            tm["read_s"] += read
            tm["host_s"] += (t4 - t0) - (t3 - t1) - read
            if t4 - t0 > self.STALL_S:
                tm["stalls"] += 1
                tm["stall_s"] += t4 - t0
        return busy or bool(self.pending) or bool(self.waiting)

    def _guard(self, fn, on_error) -> bool:
        """Run ``fn``; an exception fails the requests ``on_error`` names instead of the server."""
        try:
            return bool(fn())
        except Exception as e:  # noqa: BLE001 - one request's failure must not end the loop
            log.exception("serving step failed")
            on_error(f"{type(e).__name__}: {e}")
            return True

    def _ingest(self) -> None:
        while self.inbox:
            kind, req = self.inbox.popleft()
            if kind == "submit":
                if req.done:  # cancelled before it arrived
                    self._left_queue()
                    continue
                self.waiting.append(req)
            elif not req.done:
                if req.state == "waiting":
                    self.waiting.remove(req)
                    self._left_queue()
                elif req.state == "prefill":
                    self._unstage(req)
                self._finish(req, "cancelled")

    def _left_queue(self) -> None:
        with self.lock:
            self.n_waiting -= 1

    def _retire(self) -> None:
        for req in self.retiring:
            slot, last = req.slot, len(self.running) - 1
            if slot != last:
                self.engine.move(last, slot)
                moved = self.running[last]
                moved.slot, self.running[slot] = slot, moved
            self.engine.release(last)  # before the slot leaves ``running``: stats() then shows its pages back
            self.running.pop()
            req.slot = None
        self.retiring.clear()

    def _prefill_some(self) -> bool:
        """Prompt chunks until ``prefill_budget`` tokens were read this iteration (one chunk with budget 0)."""
        read = 0
        while read == 0 or read < self.prefill_budget:
            n = self._prefill_step()
            if not n:
                break
            read += n
        return read > 0

    def _prefill_step(self) -> int:
        """One forward of prompt tokens: a group of waiting prompts that each fit in one chunk, or the next chunk of
        every prompt being read (topped up from the queue). Returns the tokens read, 0 if none."""
        free = self.engine.max_batch - len(self.running) - len(self.staging)
        if not self.staging:
            if not self.waiting or free <= 0:
                return 0
            group = self._take_group(free)
            if group:
                return self._prefill_group(group)
        self._top_up(free)
        return self._prefill_chunks() if self.staging else 0

    def _take_group(self, free: int) -> list[Request]:
        """The oldest waiting prompts, each within one chunk, that one forward reads together (at most ``free``)."""
        group: list[Request] = []
        longest = 0
        while self._next_fits():
            req, n = self.waiting[0], len(self.waiting[0].prompt_ids)
            if len(group) == free or n > self.prefill_chunk or not self.engine.group_fits(len(group) + 1,
                                                                                          max(longest, n)):
                break
            if not self._stage_next():
                break
            group.append(req)
            longest = max(longest, n)
        return group

    def _next_fits(self) -> bool:
        """Whether a prompt waits that can be given its key/value pages once enough are free; the oldest ones that
        never can (more than the pool holds) fail."""
        while self.waiting and not self.engine.fits(self._reach(self.waiting[0])):
            req = self.waiting.popleft()
            self._left_queue()
            self._fail(req, f"the request needs {self._reach(req)} key/value positions; the server's pool holds "
                            f"{self.engine.pool.capacity} (--kv-tokens)")
        return bool(self.waiting)

    @staticmethod
    def _reach(req: Request) -> int:
        """Positions a request's row may write: its prompt, its new tokens and the step launched before its last
        token is read."""
        return len(req.prompt_ids) + req.max_tokens + 1

    def _stage_next(self) -> bool:
        """The oldest waiting prompt takes the next staging row, if the row can be given the key/value pages of
        its whole sequence (paged stores; else it waits: False)."""
        req = self.waiting[0]
        if not self.engine.reserve(len(self.staging), self._reach(req)):
            return False
        self.waiting.popleft()
        req.state = "prefill"
        self._left_queue()
        self.staging.append(req)
        return True

    def _chunk(self, req: Request) -> list[int]:
        return req.prompt_ids[req.prefilled:req.prefilled + self.prefill_chunk]

    def _top_up(self, free: int) -> None:
        """Waiting prompts join the ones being read while staging rows, slots and the forward's tokens allow."""
        tokens = sum(len(self._chunk(r)) for r in self.staging)
        while self.waiting and free > 0 and len(self.staging) < self.engine.prefill_rows and self._next_fits():
            n = len(self._chunk(self.waiting[0]))
            if self.staging and tokens + n > self.engine.group_tokens or not self._stage_next():
                break
            tokens, free = tokens + n, free - 1

    def _prefill_group(self, group: list[Request]) -> int:
        pending = self.engine.prefill_group([r.prompt_ids for r in group], [r.sampling for r in group], group)
        for r in group:
            r.prefilled = len(r.prompt_ids)
        self._admit(list(range(len(group))), pending)
        return self._read(sum(len(r.prompt_ids) for r in group))

    def _prefill_chunks(self) -> int:
        """The next chunk of every prompt being read, in one forward; the prompts that ended join the batch."""
        reqs = self.staging
        chunks = [self._chunk(r) for r in reqs]
        last = [r.prefilled + len(c) >= len(r.prompt_ids) for r, c in zip(reqs, chunks)]
        pending = self.engine.prefill_chunks(chunks, [r.prefilled for r in reqs],
                                             [r.sampling if e else None for r, e in zip(reqs, last)],
                                             [r if e else None for r, e in zip(reqs, last)])
        for r, c in zip(reqs, chunks):
            r.prefilled += len(c)
        if any(last):
            self._admit([i for i, e in enumerate(last) if e], pending)
        return self._read(sum(len(c) for c in chunks))

    def _read(self, tokens: int) -> int:
        self.timing["prefill_tokens"] += tokens
        return tokens

    def _admit(self, rows: list[int], pending: Pending) -> None:
        """Staging rows ``rows`` (their prompts read, first tokens in ``pending``) join the running batch in the next
        slots; the rows still reading move down to the first staging rows."""
        first = len(self.running)
        done = [self.staging[i] for i in rows]
        self.engine.admit_rows(rows, first, [len(r.prompt_ids) for r in done])
        for i, r in enumerate(done):
            r.slot, r.state = first + i, "running"
        self.running += done
        self.pending.append(pending)
        self._compact([r for r in self.staging if r not in done])

    def _compact(self, keep: list[Request]) -> None:
        """Staging rows of ``keep`` (in their order) move to rows 0, 1, ..."""
        for dst, req in enumerate(keep):  # rows only move down, into rows of prompts that left or moved already
            src = self.staging.index(req)
            if src != dst:
                self.engine.move_stage(src, dst, req.prefilled)
        self.staging = keep

    def _unstage(self, req: Request) -> None:
        """A prompt being read leaves (cancelled): the others keep their rows, moved down."""
        self._compact([r for r in self.staging if r is not req])

    def _launch(self) -> bool:
        mode = batch_mode([r.sampling for r in self.running])
        self.pending.append(self.engine.launch(len(self.running), mode, owners=list(self.running)))
        return True

    def _process(self, pending: Pending) -> None:
        logprobs = pending.logprobs() or [None] * len(pending.owners)
        for req, tok, lp in zip(pending.owners, pending.result(), logprobs):
            if req is not None and not req.done:  # None: a staging row still reading
                self._on_token(req, tok, lp)

    def _on_token(self, req: Request, tok: int, lp: tuple | None = None) -> None:
        """``lp``: (its log-probability, the top ones, their ids) of a full step."""
        req.generated += 1
        self.tokens_out += 1
        if tok in self.eos and not req.ignore_eos:
            self._send(req, Delta(req.text.finish()))
            return self._finish(req, "stop")
        delta, stopped = req.text.add(tok)
        if not stopped and req.generated >= req.max_tokens:
            delta += req.text.finish()
        k = req.sampling.logprobs  # top tokens asked for (None: no log-probabilities)
        self._send(req, Delta(delta, None if lp is None or k is None else (tok, lp[0], list(zip(lp[2], lp[1]))[:k])))
        if stopped:
            self._finish(req, "stop")
        elif req.generated >= req.max_tokens:
            self._finish(req, "length")

    def _send(self, req: Request, ev: Event) -> None:
        self.outbox.append((req, ev))

    def _finish(self, req: Request, reason: str) -> None:
        was_running = req.state == "running"
        req.state, req.finish_reason = "done", reason
        self.finished[reason] += 1
        self._send(req, Done(reason, len(req.prompt_ids), req.generated))
        if was_running:
            self.retiring.append(req)

    def _fail(self, req: Request, message: str, stopping: bool = False) -> None:
        was_running = req.state == "running"
        req.state, req.finish_reason = "done", "error"
        self.finished["error"] += 1
        self._send(req, Failed(message, stopping))
        if was_running:
            self.retiring.append(req)

    def _fail_staging(self, message: str) -> None:
        """A prefill failed: the prompts being read fail."""
        for req in self.staging:
            if not req.done and req.state != "running":
                self._fail(req, message)
        self.staging = []

    def _fail_running(self, message: str) -> None:
        """A decode step failed: every running request fails and the pending tokens are dropped."""
        self.pending.clear()
        for req in self.running:
            if not req.done:
                self._fail(req, message)

    def _flush(self) -> None:
        if self.outbox:
            events, self.outbox = self.outbox, []
            try:
                self.deliver(events)
            except Exception:  # noqa: BLE001
                log.exception("delivering events failed")


def wait_idle(scheduler: Scheduler, timeout: float = 30.0) -> bool:
    """Block until nothing runs or waits (tests, benchmarks)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = scheduler.stats()
        if not s["running"] and not s["waiting"] and not s["prefilling"]:
            return True
        time.sleep(0.01)
    return False
