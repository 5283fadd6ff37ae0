"""One code path for one GPU and many: torchrun detection, FSDP2 sharding, gathering, reductions.

    info = init_distributed()                 # no-op outside torchrun
    model = shard_model(model, mixed_precision=True, activation_checkpointing=False, info=info)
    for micro in micro_batches:               # the same global batch as one process
        mine = micro[distributed_sampler_slice(len(micro), info.rank, info.world_size)]
        loss = step(mine); loss.backward()    # FSDP averages gradients over ranks
    state = gather_trainable_state_dict(model, trainable_names)   # full CPU tensors on rank 0 (DCP)
    if info.is_main: save(state)
    cleanup()

Inside ``with alone():`` a rank acts as one process (no collectives): block-wise transfer trains
each rank's own blocks so. A model too large for one process is built sharded
(``models.loading.Build``: on the meta device, then each rank reads its rows).

Sharding is FSDP2 (``fully_shard``): one unit per decoder layer, then the root. FSDP2 shards
each parameter on dim 0 (a DTensor); frozen and trainable parameters may share a unit (only the
trainable ones must share one dtype; frozen bf16 weights next to fp32 feature maps are fine).
Gradients are reduce-scattered and divided by the world size, so a loss that is a mean over
each rank's equal share of the global batch gives the gradient of the mean over the global batch.
CPU runs use the same code with the ``gloo`` backend.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from lolcats.attention.layers import decoder_layers


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); no-op outside it.

    ``device``: auto (cuda:LOCAL_RANK when CUDA is there, else cpu), cuda or cpu.
    Backend: nccl on CUDA, gloo on CPU. Calling it twice returns the same answer.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if use_cuda:
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return DistInfo(rank, world, local_rank, dev, rank == 0)


_ALONE = False  # inside `alone()`: this process acts as one process


@contextlib.contextmanager
def alone():
    """Inside, this process acts as one process even under torchrun: :func:`dist_info` says rank 0
    of 1 and every helper here skips its collectives. Block-wise transfer trains each rank's
    own blocks so, side by side, as one-process stages (the model must not be FSDP-sharded)."""
    global _ALONE
    before, _ALONE = _ALONE, True
    try:
        yield
    finally:
        _ALONE = before


def dist_info() -> DistInfo:
    """The current process's place, from the initialised process group (or one process)."""
    if dist.is_available() and dist.is_initialized() and not _ALONE:
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return DistInfo(rank, world, local_rank, dev, rank == 0)


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and not _ALONE


def barrier() -> None:
    if _is_dist():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj=None):
    """Rank 0's ``obj`` (any picklable value) on every rank; identity on one process."""
    if not _is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(x: torch.Tensor | float) -> torch.Tensor | float:
    """Mean over ranks of a tensor or a number (returned as the same kind); identity on one process."""
    if not _is_dist():
        return x
    t = x.detach().clone().float() if isinstance(x, torch.Tensor) else torch.tensor(float(x))
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t = t / dist.get_world_size()
    return t.to(x.device, x.dtype) if isinstance(x, torch.Tensor) else float(t)


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) from every rank -> (world * b, ...) in rank order, on every rank; identity on one.

    Every rank must pass the same shape (e.g. equal shares of a micro-batch). Used to bring
    the hidden states each rank collected to the rank that writes the store.
    """
    if not _is_dist():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def distributed_sampler_slice(n_items: int, rank: int, world: int) -> slice:
    """This rank's contiguous share of ``n_items`` (e.g. the sequences of one micro-batch).

    Shares differ by at most one item (the first ``n_items % world`` ranks take one more);
    together they cover every item once, in order. With equal shares (n_items divisible by
    world) the mean loss per rank, averaged by FSDP, equals one process's mean over all items.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    base, extra = divmod(n_items, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


# ---------------------------------------------------------------- replicating


def auto_strategy(weight_bytes: float, device_bytes: float) -> str:
    """``run.parallel auto``: replicate when the weights take under a third of a device's memory
    (room for activations and states), else shard with FSDP2. ``lolcats plan`` applies it too."""
    return "replicate" if weight_bytes < device_bytes / 3 else "fsdp"


def choose_strategy(weights: nn.Module | int | Callable[[], int], requested: str, device: torch.device) -> str:
    """fsdp or replicate for ``requested`` (auto: :func:`auto_strategy`; always replicate on CPU).

    ``weights``: the model, or its weights' bytes, or a function giving them (called only when
    auto needs them; the pipeline counts them from the config, before loading anything).
    """
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "replicate"
    if isinstance(weights, nn.Module):
        nbytes = sum(p.numel() * p.element_size() for p in weights.parameters())
    else:
        nbytes = weights() if callable(weights) else weights
    return auto_strategy(nbytes, torch.cuda.get_device_properties(device).total_memory)


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Mean of the gradients over ranks, in place, in one all-reduce; no-op on one process and for
    FSDP-sharded parameters (FSDP reduces those itself). Replicated training calls it after
    backward: together with the loss weights of ``_my_share`` it gives the gradient of the
    mean over the global batch, as FSDP does."""
    if not _is_dist():
        return
    grads = [p.grad for p in params if p.grad is not None and not hasattr(p, "device_mesh")]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])  # (n,) one message
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g).to(g.dtype))
        i += g.numel()


# ---------------------------------------------------------------- sharding


def _checkpointed_forward(forward: Callable, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(layers: Iterable[nn.Module]) -> None:
    """Recompute each layer's activations in backward (non-reentrant checkpoint).

    The layer's ``forward`` is wrapped in place, so parameter names do not change (unlike
    ``checkpoint_wrapper``) and hooks on the layer still fire once per forward.
    """
    for layer in layers:
        if getattr(layer, "_lolcats_checkpointed", False):
            continue
        layer.forward = functools.partial(_checkpointed_forward, layer.forward)
        layer._lolcats_checkpointed = True


def shard_model(model: nn.Module, mixed_precision: bool = True, activation_checkpointing: bool = False,
                info: DistInfo | None = None, reshard_after_forward: bool = True,
                separate_trainable: bool = True, strategy: str = "fsdp") -> nn.Module:
    """FSDP2 ``fully_shard`` per decoder layer, then the root; no-op on one process.

    ``strategy="replicate"`` leaves the model whole on every rank (only activation checkpointing
    applies); the trainer then averages the trainable gradients (:func:`average_gradients`).

    ``mixed_precision``: compute in bf16 (parameters all-gathered as bf16), reduce gradients in
    fp32; the sharded (stored) parameters keep their dtype, so fp32 trainables stay fp32.
    ``separate_trainable``: give each trainable-only submodule of a layer (the feature maps) its
    own unit. Attention transfer needs it: its loss does not flow through the layers' outputs,
    so FSDP would otherwise never unshard those parameters in backward nor reduce their
    gradients (FSDP2 hooks backward on module outputs that require grad).
    ``activation_checkpointing`` applies on one process too; use it only where the loss flows
    through the layer outputs (finetuning), never in attention transfer.
    Call the root module (the CausalLM) in forward, not ``model.model``: FSDP2 unshards the
    root's own parameters (embeddings, final norm) in the root's forward hook. For attention
    transfer pass ``logits_to_keep=1`` to skip most of the LM head. Returns the same module (now an
    ``FSDPModule``); trainable parameters become DTensors: build the optimiser after this call.
    """
    info = info or dist_info()
    layers = decoder_layers(model)
    if activation_checkpointing:
        apply_activation_checkpointing(layers)
    if info.world_size <= 1 or strategy == "replicate":
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
          else MixedPrecisionPolicy())
    kw = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for layer in layers:
        if separate_trainable:
            for sub in trainable_submodules(layer):
                fully_shard(sub, **kw)
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def trainable_submodules(layer: nn.Module) -> list[nn.Module]:
    """Maximal proper submodules of ``layer`` whose parameters all require grad (none frozen)."""
    found: list[nn.Module] = []

    def visit(mod: nn.Module) -> None:
        for child in mod.children():
            params = list(child.parameters())
            if params and all(p.requires_grad for p in params):
                found.append(child)
            else:
                visit(child)

    visit(layer)
    return found


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


# ---------------------------------------------------------------- full state dicts


def _full_options(**kw):
    """Full state dicts, CPU-offloaded (rank 0 only). Alone under torchrun (:func:`alone`) not
    offloaded: DCP would hand ranks other than 0 an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=not _ALONE, **kw)


def gather_trainable_state_dict(model: nn.Module, names: set[str] | Callable[[str], bool] | None = None,
                                ) -> dict[str, torch.Tensor]:
    """Full CPU tensors of trainable parameters on rank 0 (an empty dict on other ranks).

    ``names``: a set of parameter names (as ``model.named_parameters()`` gives them), a predicate
    on the name, or None for every parameter with ``requires_grad``. Through
    ``torch.distributed.checkpoint``'s ``get_model_state_dict`` (full, CPU-offloaded, frozen
    parameters left out: the frozen base weights are never gathered); every rank must call this.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if names is None:
        wanted = trainable
    elif callable(names):
        wanted = [n for n in trainable if names(n)]
    else:
        missing = sorted(set(names) - set(trainable))
        if missing:
            raise KeyError(f"no trainable parameters named {missing[:5]}; e.g. {trainable[:5]}")
        wanted = [n for n in trainable if n in names]
    sd = get_model_state_dict(model, options=_full_options(ignore_frozen_params=True))
    return {n: sd[n].cpu() for n in wanted} if sd else {}


def load_full_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the parameters of those names (shards of them when FSDP-sharded).

    Sharded: through ``set_model_state_dict`` (full state dict; every rank passes the same
    tensors). Whole: copied in place (the model may hold meta weights, as while it is built).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not is_sharded(model):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)
        return

    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


def get_training_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                       names: set[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """(parameters ``names``, optimizer state keyed by parameter name): full CPU tensors on rank 0.

    ``get_state_dict`` of torch.distributed.checkpoint; collective under FSDP.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_full_options(ignore_frozen_params=True))
    return {n: t for n, t in msd.items() if n in names}, osd


def set_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor],
                       optim_state: dict) -> None:
    """Load what :func:`get_training_state` returned (every rank passes the full state).

    Parameters through :func:`load_full_state_dict` (in place: the optimiser keeps its
    parameters, also in a model that holds meta weights), the optimiser state through
    ``set_optimizer_state_dict`` of torch.distributed.checkpoint.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    load_full_state_dict(model, params)
    set_optimizer_state_dict(model, optimizer, optim_state,
                             options=StateDictOptions(full_state_dict=True, strict=False))
