"""A training micro-batch's loss and backward, captured once in a CUDA graph and replayed.

The attention-transfer step of a small model is bound by the host, not the GPU: SmolLM2-135M at
8 x 1024 tokens with the Triton kernels keeps the GPU busy ~40 ms per step while Python and the
kernel launches take ~210 ms (H200, ``benchmarks/distill_throughput.py --profile``). Replaying a graph of the forward and backward removes that overhead.

What a captured loss needs: CUDA, one process (no collectives inside the graph), a fixed
micro-batch shape (others run eagerly), no padding mask (the trainer's micro-batches are packed;
``LolcatsAttention`` drops the causal mask transformers builds while capturing), no host syncs inside ``loss_fn`` (its logs stay
tensors until after the replay), and gradients that stay allocated between steps: the graph
adds into the ``.grad`` tensors that existed when it was captured, so the optimiser must zero
them in place (``zero_grad(set_to_none=False)``). Parameters are read from their storage at
every replay, so in-place optimiser updates and checkpoint loads are seen.
"""

from __future__ import annotations

from typing import Callable

import torch

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict]]
MAX_SHAPES = 2  # graphs kept (the full micro-batch and an epoch's last, shorter one); others run eagerly


def loss_and_backward(loss_fn: LossFn, batch: torch.Tensor, scale: float | torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The eager step: ``loss_fn(batch)``, then ``(loss * scale).backward()``; returns (loss, logs)."""
    loss, logs = loss_fn(batch)
    (loss * scale).backward()
    return loss, logs


class GraphedLoss:
    """``(batch, scale) -> (loss, logs)``, with ``(loss * scale).backward()`` done, as one graph replay."""

    def __init__(self, loss_fn: LossFn, params: list[torch.nn.Parameter], warmup: int = 2):
        self.loss_fn, self.params, self.warmup = loss_fn, params, warmup
        self.graphs: dict[tuple, tuple] = {}  # shape -> (graph, static batch, static scale, loss, logs)

    def __call__(self, batch: torch.Tensor, scale: float) -> tuple[torch.Tensor, dict]:
        key = tuple(batch.shape)
        if key not in self.graphs:
            if len(self.graphs) >= MAX_SHAPES:
                return loss_and_backward(self.loss_fn, batch, scale)
            self.graphs[key] = self._capture(batch)
        graph, x, s, loss, logs = self.graphs[key]
        x.copy_(batch, non_blocking=True)
        s.fill_(scale)
        graph.replay()
        return loss, logs

    def _capture(self, batch: torch.Tensor) -> tuple:
        x = batch.detach().clone()
        s = torch.ones((), dtype=torch.float32, device=x.device)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        before = [p.grad.clone() for p in self.params]
        side = torch.cuda.Stream(x.device)  # warm-up (Triton compiles, autograd buffers) off the main stream
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                loss_and_backward(self.loss_fn, x, s)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, logs = loss_and_backward(self.loss_fn, x, s)
        with torch.no_grad():  # undo the warm-up's gradients (capturing computes nothing)
            for p, g in zip(self.params, before):
                p.grad.copy_(g)
        return graph, x, s, loss, logs


def graphs_wanted(setting: bool | str, device: torch.device, world_size: int) -> bool:
    """``train.cuda_graph``: "auto" is on for one process on CUDA; true checks that it can work."""
    if setting == "auto":
        return device.type == "cuda" and world_size == 1
    if setting:
        check_graph_support(device, world_size)
    return bool(setting)


def check_graph_support(device: torch.device, world_size: int) -> None:
    """A clear error where ``cuda_graph: true`` cannot work."""
    if device.type != "cuda":
        raise ValueError(f"cuda_graph: true needs a CUDA device (this run is on {device.type}); set it to false")
    if world_size > 1:
        raise ValueError(f"cuda_graph: true needs one process (this run has {world_size}); set it to false")
