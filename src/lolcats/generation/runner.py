"""The decode runner: one decode step over static buffers, replayed from a CUDA graph per key. FastGenerator and
the serving engines both decode through it.

A step feeds rows 0 .. b-1 of its buffers (``rows``) their next token (``ids``) at its position (``pos``) through
every decoder layer's own forward, which reads and writes the cache (:meth:`DecodeRunner.logits`: the logits of the
last position; fused layers through ``attention/fusion.py::run_layers``, the same steps with the residual carried
from one layer's MLP into the next one's input norm), picks the next tokens (:meth:`DecodeRunner.pick`: greedy,
sampled, top-p, or ``full``: penalties and log-probabilities, with per-row parameters from the same buffers), hands
them to the owner's ``emit`` (FastGenerator: stop tokens and its output columns; the engines: ``rows["out"]``) and
feeds what ``emit`` returns at the next positions. It reads and writes only static tensors, so on CUDA each *key* is
captured once (after a warm-up on a side stream, the buffers restored; one memory pool) and replayed.

A key (:class:`StepKey`) is what a captured step cannot change: its batch bucket b (:meth:`DecodeRunner.bucket`:
the smallest of 1, 2, 4, ..., ``rows`` holding the running rows; rows past those compute garbage nobody reads),
its sampling variant and its metadata, the ``StepMeta`` handed to every layer with the forward
(``attention/step.py``): the cache rows it runs on, a key/value store's length bucket, and whether a window slot
may leave. With a sparse cache on terraced windows a slot leaves only when a row's token starts a block
(position % w == 0), which the host knows from the rows' positions (``host_pos``, mirrored on the host): keyed
by :meth:`DecodeRunner.may_evict`, the eviction runs 1 step in w at batch 1 instead of every step.

With ``compile`` the step's forward (embedding to logits; the sampling stays eager) goes through
``torch.compile`` before it is captured: a small model's step is bound by kernel launches. The sampling noise is
``torch.rand_like``, or with ``seeded`` a hash of each row's (seed, token counter) (``generation/sampling.py``),
so that a seeded request samples the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lolcats.attention.fusion import carries_residual, run_layers
from lolcats.attention.generate import eviction_block, layer_cache_kwarg, may_evict
from lolcats.attention.layers import causal_lm, decoder_stack
from lolcats.attention.step import STEP_KWARG, StepMeta
from lolcats.generation.sampling import TOP_LOGPROBS, Sampling, penalize, pick_tokens, seeded_uniform, top_logprobs


@dataclass(frozen=True)
class StepKey:
    """What one captured step is made for."""

    batch: int  # the step runs over rows 0 .. batch - 1
    mode: str  # its sampling variant (``sampling.MODES``)
    meta: StepMeta  # what every layer is told about the call (fixed at capture)


def buckets(limit: int, start: int = 1, step: int = 0) -> list[int]:
    """Powers of two from ``start`` below ``limit``, then ``limit``: [1, 2, 4, ..., limit]; with ``step``, the
    powers of two only up to ``step``, then its multiples: step 64 gives [1, 2, ..., 64, 128, 192, ..., limit]."""
    out, b = [], start
    while b < limit and not (step and b > step):
        out.append(b)
        b *= 2
    if step:
        b = (out[-1] // step + 1) * step if out else -(-start // step) * step
        while b < limit:
            out.append(b)
            b += step
    return out + [limit]


def bucket_for(n: int, sizes: list[int]) -> int:
    return next(b for b in sizes if b >= n)


def row_buffers(n: int, vocab: int, device, full: bool = True) -> dict[str, torch.Tensor]:
    """Static per-row buffers of ``n`` rows; ``full``: also those of the full variant (counts (n, V))."""
    z = lambda dt: torch.zeros(n, dtype=dt, device=device)  # noqa: E731
    rows = {"ids": z(torch.long),  # token fed to the next step
            "pos": z(torch.long),  # its position
            "temperature": z(torch.float32), "top_p": torch.ones(n, device=device),
            "seed": z(torch.long), "counter": z(torch.long),  # the next token's index in its request
            "out": z(torch.long)}  # the token the step picked
    if full:  # penalties, counts of generated tokens (n, V), log-probabilities of the pick
        k = min(TOP_LOGPROBS, vocab)
        rows |= {"frequency_penalty": z(torch.float32), "presence_penalty": z(torch.float32),
                 "counts": torch.zeros(n, vocab, device=device), "logprob": z(torch.float32),
                 "top_lp": torch.zeros(n, k, device=device),
                 "top_ids": torch.zeros(n, k, dtype=torch.long, device=device)}
    return rows


def logprob_rows(rows: dict[str, torch.Tensor], n: int) -> tuple:
    """A full step's log-probabilities of rows 0 .. n-1: picked (n,), top (n, K), their ids (n, K)."""
    return rows["logprob"][:n], rows["top_lp"][:n], rows["top_ids"][:n]


def set_sampling(rows: dict[str, torch.Tensor], i: slice, p: Sampling) -> None:
    """Rows ``i`` sample with ``p`` from their first token on (their counts cleared).

    ``fill_`` takes the value as a kernel argument; ``t[i] = x`` copies it from pageable host memory, which waits
    for everything queued on the device (a running decode step) first."""
    for name, value in (("temperature", p.temperature), ("top_p", p.top_p), ("seed", p.seed), ("counter", 0),
                        ("frequency_penalty", p.frequency_penalty), ("presence_penalty", p.presence_penalty),
                        ("counts", 0)):
        if name in rows:
            rows[name][i].fill_(value)


class DecodeRunner:
    """The decode step of ``rows`` sequences over ``cache``, its CUDA graphs and its sampling.

    ``emit(tok (b,), b) -> (b,)``: what the owner does with a step's picked tokens; it returns the tokens the next
    step feeds (default: written to ``rows["out"]``, fed as they are). ``warmup``: eager steps before a capture.
    """

    def __init__(self, model: nn.Module, cache, rows: int, use_cuda_graph: bool | None = None,
                 compile: bool | str = False, full: bool = False, seeded: bool = False, batch_step: int = 0,
                 emit=None, warmup: int = 1):
        self.model = causal_lm(model)
        self.lm = decoder_stack(self.model)  # embed_tokens, layers, norm, rotary_emb
        self.cache, self.cache_key = cache, layer_cache_kwarg(self.model)
        emb = self.lm.embed_tokens.weight
        self.device, self.vocab = emb.device, emb.shape[0]
        self.rows = row_buffers(rows, self.vocab, self.device, full)
        self.sizes = buckets(rows, 1, batch_step)  # batch buckets
        self.host_pos = [0] * rows  # each row's next position, mirrored on the host
        self.block = eviction_block(self.model)  # w of a sparse cache on terraced windows, else 0
        self.seeded, self.warmup = seeded, warmup
        self.emit = emit or self.emit_out
        self.use_graph = (self.device.type == "cuda") if use_cuda_graph is None else use_cuda_graph
        self.graphs: dict[StepKey, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.step_logits = self.logits
        if compile:  # True: inductor; or a torch.compile backend name (tests: "eager")
            self.step_logits = torch.compile(self.logits, backend="inductor" if compile is True else compile,
                                             dynamic=False)

    # ------------------------------------------------------------ keys

    def bucket(self, n: int) -> int:
        """The smallest batch bucket holding ``n`` rows."""
        return bucket_for(n, self.sizes)

    def may_evict(self, n: int) -> bool:
        """Whether a window slot may leave at the next step of rows 0 .. n-1 (from the positions they feed)."""
        return may_evict(self.host_pos[:n], self.block)

    # ------------------------------------------------------------ the step

    def logits(self, ids: torch.Tensor, pos: torch.Tensor, cache, meta: StepMeta | None = None,
               mask: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """ids, pos (b, T) -> logits (b, V) of the last position (or of position ``index`` (b,) of each row),
        through the decoder layers' own forward (fused ones: ``run_layers``), which read and write ``cache`` as
        ``meta`` declares."""
        h = self.lm.embed_tokens(ids)  # (b, T, d)
        pe = self.lm.rotary_emb(h, pos)
        kw = {self.cache_key: cache, STEP_KWARG: meta, "attention_mask": mask, "position_ids": pos,
              "position_embeddings": pe, "use_cache": True}
        if carries_residual(self.lm.layers):  # fused layers: each residual add in the next norm's launch
            h = run_layers(self.lm.layers, h, **kw)
        else:
            for layer in self.lm.layers:
                h = layer(h, **kw)
                h = h[0] if isinstance(h, tuple) else h
        if index is None:
            h = h[:, -1]  # (b, d)
        else:
            h = h.gather(1, index.view(-1, 1, 1).expand(-1, 1, h.shape[-1]))[:, 0]
        return self.model.get_output_embeddings()(self.lm.norm(h))

    def pick(self, logits: torch.Tensor, rows: dict[str, torch.Tensor], b: int, mode: str) -> torch.Tensor:
        """logits (b, V) -> tokens (b,) in sampling variant ``mode`` with rows 0 .. b-1 of ``rows``' parameters; the
        full variant also records log-probabilities and counts the picks."""
        if mode == "greedy":
            return logits.argmax(-1)
        u = seeded_uniform(rows["seed"][:b], rows["counter"][:b], logits.shape[-1]) if self.seeded else None
        top_p = rows["top_p"][:b] if mode in ("top_p", "full") else 1.0
        if mode != "full":
            return pick_tokens(logits, rows["temperature"][:b], top_p, uniform=u)
        counts = rows["counts"][:b]
        scores = penalize(logits, counts, rows["frequency_penalty"][:b], rows["presence_penalty"][:b])
        tok = pick_tokens(scores, rows["temperature"][:b], top_p, uniform=u)
        for buf, value in zip(logprob_rows(rows, b), top_logprobs(logits, tok, rows["top_ids"].shape[1])):
            buf.copy_(value)
        counts.scatter_add_(1, tok[:, None], torch.ones_like(counts[:, :1]))
        return tok

    def emit_out(self, tok: torch.Tensor, b: int) -> torch.Tensor:
        self.rows["out"][:b].copy_(tok)
        return tok

    def feed(self, tok: torch.Tensor, b: int) -> None:
        """Rows 0 .. b-1 picked ``tok`` (b,): ``emit`` it; what it returns is fed at the next positions."""
        r = self.rows
        r["ids"][:b].copy_(self.emit(tok, b))
        r["pos"][:b] += 1
        r["counter"][:b] += 1

    def step(self, key: StepKey) -> None:
        """One token for rows 0 .. key.batch - 1, on static tensors only."""
        b, r = key.batch, self.rows
        logits = self.step_logits(r["ids"][:b, None], r["pos"][:b, None], self.cache, key.meta)  # (b, V)
        self.feed(self.pick(logits, r, b, key.mode), b)

    def run(self, key: StepKey, n: int) -> None:
        """The step ``key`` for rows 0 .. n-1 of its batch: its graph replayed if captured, else eager. The rows'
        host positions move on."""
        if key in self.graphs:
            self.graphs[key].replay()
        else:
            self.step(key)
        for i in range(n):
            self.host_pos[i] += 1

    # ------------------------------------------------------------ CUDA graphs

    def capture(self, key: StepKey, keep: list[torch.Tensor] = ()) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream, then record the step; the row buffers and the cache tensors in ``keep`` are
        restored (the rest of the cache is not)."""
        saved = [t.clone() for t in (*self.rows.values(), *keep)]
        self.side_run(lambda: [self.step(key) for _ in range(self.warmup)])
        for t, s in zip((*self.rows.values(), *keep), saved):
            t.copy_(s)
        return self.record(lambda: self.step(key))[0]

    def side_run(self, fn) -> None:
        """Run ``fn`` once on a side stream: the warm-up a capture needs."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def record(self, fn) -> tuple[torch.cuda.CUDAGraph, object]:
        """Capture ``fn`` in a graph (the runner's one memory pool): the graph and what ``fn`` returned."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph, out
