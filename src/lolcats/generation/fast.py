"""Fast decoding: static buffers and one CUDA graph per token.

The prompt is prefilled by the ordinary HF forward into a :class:`LolcatsCache` whose per-layer
states were allocated up front for the batch (prefill writes them in place, so their addresses
never change). One decoding step (embedding, every decoder layer with its projections, feature
maps and decode step, MLP, final norm, LM head, greedy or sampled pick, finished mask, writing
the token into the output buffer) reads and writes only static tensors, so on CUDA it is captured
once in a ``torch.cuda.CUDAGraph`` and replayed per token: the step is the decode runner's
(``generation/runner.py``, the serving engines' too), the finished mask and the output columns this
module's (its ``emit``). The host looks at the finished mask
every ``check_every`` steps only (never when there are no stop tokens). On CPU the same step
runs eagerly (that is what the tests compare with ``generate()``).

The prompt is prefilled in groups of rows (at most ``prefill_tokens`` prompt tokens at a time):
each group's call declares its rows of the preallocated states (``StepMeta.rows``), which the prefill
writes in place, so a large batch never holds the activations of the whole prompt batch at once. The bound is
large (128K tokens: 16 rows of 8K in one group) because a group's sparse-cache prefill costs about as much for one
row as for many (its eviction runs block after block, ``ops/triton/sparse.py``): fewer groups, fewer such chains.
A group of 128K tokens holds about 12 GB of MLP activations at Llama-3-8B's sizes, 0.4 GB at SmolLM2's.

With ``compile`` the model's forward of the step (embedding to logits; the sampling stays eager) is
``torch.compile``d before it is captured: the compiler fuses norms, RoPE, casts and residual adds
around the attention kernels, so a step launches far fewer kernels (a small model's step is bound
by launches, not bytes). The first capture then compiles (tens of seconds on a GPU).

With ``fuse`` (the default) every inference fusion is turned on (``set_inference_fusion``): per attention layer
one q/k/v GEMM and RoPE with the Hedgehog maps in one op; per decoder layer each RMSNorm (the final one too) in
one op, and the MLP's gate and up projections in one GEMM with the SiLU product in one op (``attention/fusion.py``);
each op one launch with the triton backend. ``fuse=False`` turns them off on the model (the A/B baseline of a
benchmark).

Layers kept as softmax attention (``attention.softmax_layers`` / ``softmax_count``) hold their keys
and values in stores preallocated for the longest row (prompt + ``max_new_tokens`` positions;
sized at the first prompt, enlarged and the graph captured again for a longer one), or for their bound
(``--softmax-window`` / ``--softmax-sink``): the decode step writes each row's key at its position's slot
and attends over the positions that row keeps (``attention/cache.py``).

With a sparse cache on terraced windows (``attention.sparse_cache``) a window slot leaves only when a row's
token starts a block (position % w == 0), and the host knows every row's position (its prompt length + the
step). Two steps are captured, with and without the eviction through the cache (``StepMeta.may_evict``), and
each token replays the one it needs: the eviction (a top-k over the cache and the leaving block, in PyTorch)
runs 1 step in w at batch 1 instead of every step.

Sampling uses the Gumbel-max trick (argmax of logits / T plus Gumbel noise), with top-p applied
by sorting; both are graph-safe (``generation/sampling.py``). Stop *strings* are the caller's business
(see ``cli.run_generate``); stop token ids are handled on device.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lolcats.attention.cache import LolcatsLayer, SoftmaxLayer, kv_slots
from lolcats.attention.generate import make_cache
from lolcats.attention.layers import causal_lm, decoder_stack, lolcats_attention_by_layer
from lolcats.attention.step import STEP_KWARG, StepMeta
from lolcats.attention.use import set_inference_fusion
from lolcats.generation.runner import DecodeRunner, StepKey, set_sampling
from lolcats.generation.sampling import Sampling


class FastGenerator:
    """Batch-first generation with a fixed-size state and (on CUDA) one graph replay per token.

    ``generate(input_ids (b, T), attention_mask (b, T) left-padded, b <= batch_size)``
    returns ``(b, n)`` new token ids, ``n <= max_new_tokens``; after a stop token a row holds
    ``pad_token_id``.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, eos_token_ids: list[int] | int | None = None, pad_token_id: int | None = None,
                 use_cuda_graph: bool | None = None, check_every: int = 16, prefill_tokens: int = 131072,
                 compile: bool | str = False, fuse: bool = True):
        self.model = causal_lm(model)
        self.lm = decoder_stack(self.model)  # embed_tokens, layers, norm, rotary_emb
        mods = lolcats_attention_by_layer(self.model)
        n_layers = len(self.lm.layers)
        if len(mods) != n_layers or any(m.converted and m.mode != "student" for m in mods.values()):
            raise ValueError("FastGenerator needs every layer a LolcatsAttention (converted, or kept as softmax) and "
                             f"the converted ones in student mode ({len(mods)} of {n_layers} are LolcatsAttention); "
                             "use model.generate() otherwise")
        set_inference_fusion(self.model, fuse)
        self.B, self.max_new = batch_size, max_new_tokens
        self.temperature, self.top_p, self.check_every = temperature, top_p, check_every
        self.prefill_tokens = prefill_tokens
        eos = self._default_eos() if eos_token_ids is None else eos_token_ids
        eos = [eos] if isinstance(eos, int) else list(eos)
        pad = pad_token_id if pad_token_id is not None else getattr(self.model.generation_config, "pad_token_id", None)
        self.pad = int(pad if pad is not None else (eos[0] if eos else 0))
        self.cache = make_cache(self.model, batch_size, max_length=max_new_tokens + 1)
        # the step is the runner's (its first call compiles with ``compile``: warmed up twice before a capture)
        self.runner = DecodeRunner(self.model, self.cache, batch_size, use_cuda_graph, compile, emit=self._emit,
                                   warmup=2)
        self.device, self.cache_key = self.runner.device, self.runner.cache_key
        self.eos = torch.tensor(eos if eos else [-1], dtype=torch.long, device=self.device)
        self.has_stop = bool(eos)
        B, dev = batch_size, self.device
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.out = torch.full((B, max_new_tokens + 2), self.pad, dtype=torch.long, device=dev)  # 2 scratch columns
        self.step_idx = torch.zeros(1, dtype=torch.long, device=dev)
        sampling = Sampling(temperature, top_p)
        set_sampling(self.runner.rows, slice(None), sampling)
        self.mode = sampling.mode  # greedy, sample or top_p
        # one step with and one without the eviction (terraced sparse layers evict only at a block's first token)
        self.keys = {e: StepKey(B, self.mode, StepMeta(may_evict=e)) for e in (True, False)}
        self.slots = [l for l in self.cache.layers if isinstance(l, LolcatsLayer)]  # SoftmaxLayers too

    def _default_eos(self) -> list[int]:
        e = getattr(self.model.generation_config, "eos_token_id", None)
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    # ------------------------------------------------------------ the step

    def step_key(self) -> StepKey:
        """The next decode step's key: whether a window slot may leave at it (always, but on terraced sparse
        layers), from the positions the rows feed."""
        return self.keys[self.runner.may_evict(self.B)]

    def _emit(self, tok: torch.Tensor, b: int) -> torch.Tensor:
        """The runner's ``emit``: tok (B,) -> the tokens fed next, padding after a row's stop token, written to
        the next output column."""
        nxt = torch.where(self.finished, self.pad, tok)
        self.finished |= torch.isin(nxt, self.eos)
        self.out.index_copy_(1, self.step_idx, nxt[:, None])
        self.step_idx += 1
        return nxt

    def capture(self) -> None:
        """Record the step once (no-op on CPU or when already captured): one graph, or two (with and without the
        eviction) on terraced sparse layers, in the runner's memory pool.

        The state contents are garbage afterwards; :meth:`prefill` resets them.
        """
        r = self.runner
        if not r.use_graph or r.graphs:
            return
        for evicts in (True, False) if r.block else (True,):
            self.step_idx.zero_()  # the warm-up steps write output columns 0 and 1
            r.graphs[self.keys[evicts]] = r.capture(self.keys[evicts])

    # ------------------------------------------------------------ generate

    def _pad_batch(self, input_ids, attention_mask):
        b, T = input_ids.shape
        if b > self.B:
            raise ValueError(f"batch {b} is larger than the FastGenerator's batch_size {self.B}")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if b < self.B:  # extra rows: all padding, finished from the start
            input_ids = torch.cat([input_ids, input_ids.new_full((self.B - b, T), self.pad)])
            mask = torch.cat([mask, mask.new_zeros(self.B - b, T)])
        return input_ids.to(self.device), mask.to(self.device).long()

    def _prefill_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, T) -> last-token logits (B, V); fills the states in groups of rows, in place."""
        B, T = ids.shape
        rows = max(1, self.prefill_tokens // max(T, 1))
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = []
        for r0 in range(0, B, rows):
            sl = slice(r0, min(B, r0 + rows))
            meta = StepMeta(start=0, rows=None if rows >= B else range(sl.start, sl.stop))  # fresh rows, in place
            out = self.model(input_ids=ids[sl], attention_mask=mask[sl], position_ids=position_ids[sl],
                             use_cache=True, logits_to_keep=1, **{self.cache_key: self.cache, STEP_KWARG: meta})
            logits.append(out.logits[:, -1])  # (rows, V)
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    def _fit_softmax_layers(self, length: int) -> None:
        """Enlarge kept softmax layers' stores to ``length`` positions (at most their bound) if smaller (the graph is
        captured again)."""
        mods = lolcats_attention_by_layer(self.model)
        for i, layer in enumerate(self.cache.layers):
            if isinstance(layer, SoftmaxLayer) and layer.state.max_length < kv_slots(length, layer.window, layer.sink):
                st = layer.state
                layer.state = mods[i].empty_kv_state(self.B, length, st.k.dtype, st.k.device)
                self.runner.graphs.clear()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """input_ids, attention_mask (b, T), left-padded: reset the states, read the prompt, emit token 1."""
        r = self.runner
        if r.block:  # read on the host once (the caller's mask, before it moves to the device)
            b, T = input_ids.shape
            lens = [T] * b if attention_mask is None else attention_mask.sum(-1).tolist()
            r.host_pos[:] = lens + [0] * (self.B - len(lens))  # decode step k feeds position len + k
        ids, mask = self._pad_batch(input_ids, attention_mask)
        self._fit_softmax_layers(ids.shape[1] + self.max_new)
        self.capture()
        for layer in self.cache.layers:
            layer.reset()
        logits = self._prefill_logits(ids, mask)
        self.finished.copy_(mask.sum(-1) == 0)
        self.step_idx.zero_()
        r.rows["pos"].copy_(mask.sum(-1) - 1)  # feed() moves it to the first new token's position
        r.feed(r.pick(logits, r.rows, self.B, self.mode), self.B)

    @torch.no_grad()
    def decode(self, steps: int) -> None:
        """``steps`` more tokens for every row (one graph replay each on CUDA), no host synchronisation."""
        for _ in range(steps):
            self.runner.run(self.step_key(), self.B)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 streamer=None, max_new_tokens: int | None = None) -> torch.Tensor:
        """input_ids, attention_mask (b, T), left-padded -> new tokens (b, n), n <= max_new_tokens.

        ``streamer`` (e.g. ``TextStreamer(tok, skip_prompt=False)``) gets row 0's new tokens every
        ``check_every`` steps (``put``) and ``end()`` at the end.
        """
        b = input_ids.shape[0]
        self.prefill(input_ids, attention_mask)
        n, shown, limit = 1, 0, min(self.max_new, max_new_tokens or self.max_new)
        watch = self.has_stop or streamer is not None
        while n < limit:
            k = min(limit - n, self.check_every - n % self.check_every) if watch else limit - n
            self.decode(k)
            n += k
            if watch and n % self.check_every == 0:
                shown = self._stream(streamer, shown, n)
                if self.has_stop and bool(self.finished.all()):
                    break
        if streamer is not None:
            self._stream(streamer, shown, n)
            streamer.end()
        return self.out[:b, :n].clone()

    def _stream(self, streamer, start: int, n: int) -> int:
        """Hand row 0's tokens [start, n) (up to its first stop token) to ``streamer``; return the new start."""
        if streamer is None or start >= n:
            return start
        toks = self.out[0, start:n].cpu()
        stop = torch.isin(toks, self.eos.cpu()).nonzero()
        end = int(stop[0]) + 1 if len(stop) else len(toks)
        if end > 0:
            streamer.put(toks[:end])
        return n if not len(stop) else self.max_new + 2

    def state_nbytes(self) -> int:
        """Bytes of the per-layer states: constant for converted layers, the preallocated buffers for kept ones."""
        return sum(l.state.nbytes() for l in self.slots)
