"""Building a model without a whole copy in every process: on the meta device, then only what a
process needs, read from the safetensors files (or drawn at random for ``init random``).

    model = build_model(config, source, device, dtype)                        # the whole model, one copy
    model = build_model(config, source, device, dtype, edit=convert, shard=fsdp)   # FSDP2: each rank its shards
    model = build_model(config, source, device, dtype, edit=convert, layers={4, 5})  # decoder layers 4, 5 only

In order: the architecture is built on the meta device (no memory); ``edit`` changes its
structure there (swaps in LoLCATs attention, adds LoRA): parameters it creates are small and
real (on the CPU), and their values are kept; ``shard`` (``distributed.shard_model``) wraps it
in FSDP2 units, whose parameters are DTensors sharded on dim 0, still on meta; then each rank
allocates only its local shards and fills them: rows ``[start, start + n)`` of each weight,
read from the files with ``safe_open(...).get_slice`` (the bytes of one rank's rows, one file
open at a time), the kept values sliced the same way. Without ``shard`` the parameters wanted
(all, or those of the decoder layers ``layers``) are allocated whole; the rest stay on meta.
RoPE tables (buffers) are rebuilt on the device. ``LoadReport`` counts what was read and
allocated per process.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

from lolcats.attention.convert import check_architecture
from lolcats.attention.layers import decoder_stack

INDEX = "model.safetensors.index.json"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def checkpoint_name(param_name: str) -> str:
    """A parameter's name in the base model's files (PEFT's wrapper prefix and ``.base_layer`` dropped)."""
    return param_name.replace("base_model.model.", "").replace(".base_layer", "")


@dataclass
class LoadReport:
    """What one process read and allocated while building a model."""

    bytes_read: int = 0  # from the weight files (or drawn at random), this process
    bytes_allocated: int = 0  # parameter storage this process holds after the build
    model_bytes: int = 0  # every parameter of the model, whole, at the build dtype
    files_opened: int = 0

    def to_dict(self) -> dict:
        return vars(self).copy()


# ---------------------------------------------------------------- where the weights come from


class WeightSource:
    """Rows of the base model's weights by checkpoint name: ``read(name, shape, dtype, rows)``."""

    def __init__(self):
        self.report = LoadReport()

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def read(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, rows: slice | None,
             device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def order(self, names: Iterable[str]) -> list[str]:
        """``names`` in the order the source reads best (file by file)."""
        return list(names)

    def close(self) -> None:
        pass


def safetensors_files(directory: str | Path) -> dict[str, Path]:
    """{tensor name: file} of a model directory's safetensors weights (indexed or single file); {} if none."""
    directory = Path(directory)
    index = directory / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / f for name, f in weight_map.items()}
    from safetensors import safe_open

    found: dict[str, Path] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            found.update({k: path for k in f.keys()})
    return found


class SafetensorsSource(WeightSource):
    """A directory's safetensors files; reads only the requested rows, one file open at a time."""

    def __init__(self, directory: str | Path):
        super().__init__()
        self.files = safetensors_files(directory)
        if not self.files:
            raise FileNotFoundError(f"no safetensors weights in {directory}")
        self._open: tuple[Path, object] | None = None

    def has(self, name: str) -> bool:
        return name in self.files

    def order(self, names: Iterable[str]) -> list[str]:
        return sorted(names, key=lambda n: str(self.files.get(n, "")))

    def _handle(self, path: Path):
        from safetensors import safe_open

        if self._open is None or self._open[0] != path:
            self.close()
            self._open = (path, safe_open(str(path), framework="pt"))
            self.report.files_opened += 1
        return self._open[1]

    def read(self, name, shape, dtype, rows, device):
        sl = self._handle(self.files[name]).get_slice(name)
        stored = tuple(sl.get_shape())
        if stored != tuple(shape):
            raise ValueError(f"{self.files[name]}: tensor {name} is {stored}, the model wants {tuple(shape)}")
        t = sl[rows] if rows is not None else sl[:]
        self.report.bytes_read += t.numel() * t.element_size()
        return t.to(device=device, dtype=dtype)

    def close(self) -> None:
        self._open = None  # the handle unmaps its file when collected


class RandomSource(WeightSource):
    """Seeded random weights (``model.init random``): linear and embedding weights ~ N(0, 0.02), norms 1.

    Each tensor has its own generator seeded from (seed, name), drawn whole on the device and
    sliced, so a rank's rows are those of the whole tensor: the same weights in every process
    and for any sharding (on one device type).
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed

    def has(self, name: str) -> bool:
        return True

    def read(self, name, shape, dtype, rows, device):
        if "norm" in name:
            full = torch.ones(shape, dtype=dtype, device=device)
        else:
            digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
            gen = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            full = torch.empty(shape, dtype=dtype, device=device).normal_(std=0.02, generator=gen)
        t = full if rows is None else full[rows]
        self.report.bytes_read += t.numel() * t.element_size()
        return t


# ---------------------------------------------------------------- a rank's rows


def local_rows(param: torch.Tensor) -> tuple[torch.Tensor, slice | None]:
    """(the storage this process holds for ``param``, the rows of dim 0 it holds; None = all).

    FSDP2 shards dim 0 as ``torch.chunk`` does: rank r holds rows [r c, r c + n) with
    c = ceil(rows / world) (the last ranks fewer, or none).
    """
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return param, None
    local = param.to_local()
    placements = tuple(param.placements)
    if placements == () or all(not isinstance(p, Shard) for p in placements):
        return local, None
    if len(placements) != 1 or placements[0] != Shard(0):
        raise NotImplementedError(f"sharded loading handles dim-0 shards on a 1-D mesh, not {placements}")
    n, world = param.shape[0], param.device_mesh.size()
    start = min(param.device_mesh.get_local_rank() * math.ceil(n / world), n)
    if local.shape[0] != min(math.ceil(n / world), n - start):
        raise RuntimeError(f"unexpected shard of {tuple(param.shape)}: local {tuple(local.shape)} from row {start}")
    return local, slice(start, start + local.shape[0])


# ---------------------------------------------------------------- building


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _unique_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())  # shared (tied) parameters once, under their first name


def _allocate(model: nn.Module, wanted: Callable[[str], bool], device: torch.device) -> None:
    """Give the meta parameters ``wanted(name)`` selects empty storage on ``device``, the others'
    real ones move there; shared parameters stay shared."""
    done: dict[int, nn.Parameter] = {}
    for mod_name, mod in model.named_modules():
        for key, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) in done:
                mod._parameters[key] = done[id(p)]
                continue
            name = f"{mod_name}.{key}" if mod_name else key
            if p.is_meta and not wanted(name):
                continue
            data = torch.empty_like(p, device=device) if p.is_meta else p.detach().to(device)
            done[id(p)] = mod._parameters[key] = nn.Parameter(data, requires_grad=p.requires_grad)


def _rebuild_rope(model: nn.Module, device: torch.device) -> None:
    inner = decoder_stack(model)
    rope = type(inner.rotary_emb)
    inner.rotary_emb = rope(inner.config).to(device)
    stale = [n for n, b in model.named_buffers() if b.is_meta and "rotary_emb" not in n]
    if stale:
        raise NotImplementedError(f"buffers {stale[:4]} would stay on the meta device; only RoPE is rebuilt")


@torch.no_grad()
def build_model(config, source: WeightSource, device: torch.device | str, dtype: torch.dtype,
                edit: Callable[[nn.Module], nn.Module] | None = None,
                shard: Callable[[nn.Module], nn.Module] | None = None,
                layers: Iterable[int] | None = None) -> nn.Module:
    """``config``'s causal LM in eval mode, its base weights from ``source`` (see the module docstring).

    ``edit(model) -> model``: structural changes on the meta model before sharding; parameters it
    creates must be real (small) and keep their values. ``shard(model) -> model``: FSDP2
    wrapping; each rank then holds its rows only. ``layers``: without ``shard``, allocate only
    these decoder layers' weights (and everything ``edit`` created). The build's report is
    ``model.lolcats_load_report`` (a :class:`LoadReport`).
    """
    from transformers import AutoModelForCausalLM

    if shard is not None and layers is not None:
        raise ValueError("build_model: give shard or layers, not both")
    check_architecture(config)
    device = torch.device(device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    if edit is not None:
        model = edit(model)
    kept = {n: p.detach().cpu().clone() for n, p in _unique_params(model).items() if not p.is_meta}
    model_bytes = sum(_nbytes(p) for p in _unique_params(model).values())
    model, wanted = _place(model, set(kept), shard, layers, device)
    _fill_all(model, wanted, kept, source, device)
    _rebuild_rope(model, device)
    source.report.model_bytes = model_bytes
    source.report.bytes_allocated = sum(_nbytes(t) for t in (local_rows(p)[0] for p in model.parameters())
                                        if not t.is_meta)
    model.lolcats_load_report = source.report
    return model.eval()


def _place(model: nn.Module, kept: set[str], shard, layers, device) -> tuple[nn.Module, set[str]]:
    """Storage for what this process holds: with ``shard``, its FSDP2 shards of every parameter;
    else the whole parameters of ``layers`` (every one when None) and the ``kept`` ones. Returns
    (the model, the names to fill)."""
    if shard is not None:
        model = shard(model)
        model.to_empty(device=device)  # FSDP2 allocates the local shards and re-registers them
        return model, set(_unique_params(model))
    keep = None if layers is None else set(layers)
    wanted = {n for n in _unique_params(model) if n in kept or keep is None or layer_index(n) in keep}
    _allocate(model, wanted.__contains__, device)
    return model, wanted


def _fill_all(model: nn.Module, wanted: set[str], kept: dict[str, torch.Tensor], source: WeightSource,
              device: torch.device) -> None:
    """Each wanted parameter's rows: the kept values, or the source's (file by file)."""
    params = _unique_params(model)
    from_source = {checkpoint_name(n): n for n in wanted if n not in kept}
    missing = [n for ck, n in from_source.items() if not source.has(ck)]
    if missing:
        raise KeyError(f"the weight files lack {len(missing)} parameters of the model, e.g. {sorted(missing)[:4]}")
    for ck in source.order(from_source):
        p = params[from_source[ck]]
        _fill(p, lambda rows: source.read(ck, tuple(p.shape), p.dtype, rows, device))
    source.close()
    for n in wanted & kept.keys():
        p, t = params[n], kept[n]
        _fill(p, lambda rows: (t if rows is None else t[rows]).to(device, p.dtype))


def _fill(param: torch.Tensor, rows_of: Callable[[slice | None], torch.Tensor]) -> None:
    """Copy ``rows_of(rows)`` into the part of ``param`` this process holds (now, not later)."""
    local, rows = local_rows(param)
    if local.numel():
        local.copy_(rows_of(rows))


def layer_index(name: str) -> int | None:
    """The decoder layer a parameter name is in (``...layers.<i>....``), or None."""
    m = _LAYER.search(name)
    return None if m is None else int(m.group(1))

