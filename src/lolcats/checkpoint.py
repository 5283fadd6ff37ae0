"""Small checkpoints: stage 1 holds feature maps + window factors, stage 2 the LoRA weights.

A checkpoint directory holds ``weights.safetensors`` and ``meta.json`` (lolcats config, base
model name, a fingerprint of the base weights, library version, stage). Every file is
written atomically (temporary file, then ``os.replace``), so a killed run never leaves a
broken checkpoint. Loading checks the base-model fingerprint and every shape, and says
which one does not fit.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import lolcats

WEIGHTS, META = "weights.safetensors", "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that does not belong to this model or does not fit it."""


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then move the file into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str)))


def save_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Weights first, metadata last: a directory with meta.json is complete."""
    directory = Path(directory)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(directory / WEIGHTS, lambda p: save_file(flat, p))
    write_json(directory / META, {**meta, "lolcats_version": lolcats.__version__,
                                  "num_tensors": len(flat), "num_params": sum(t.numel() for t in flat.values())})


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    if not path.is_file():
        raise CheckpointError(f"no lolcats checkpoint at {directory} (missing {META})")
    return json.loads(path.read_text())


def load_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path} ({e}): the file is missing, truncated or not a safetensors file; "
                              "re-create the checkpoint (rerun the stage) or point to another one") from None


def check_base(meta: dict[str, Any], fingerprint: str, directory: str | Path) -> None:
    want = meta.get("base_fingerprint")
    if want is not None and want != fingerprint:
        raise CheckpointError(
            f"checkpoint {directory} was trained on base model {meta.get('base_model')!r} "
            f"(fingerprint {want}), but the loaded base model has fingerprint {fingerprint}: wrong base model")


def check_fits(shapes: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor], directory: str | Path) -> None:
    """Every expected name is in ``tensors`` with the expected shape, and nothing else is."""
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing or extra:
        raise CheckpointError(f"checkpoint {directory} does not fit this model: "
                              f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                              f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(f"checkpoint {directory}: {name} has shape {tuple(tensors[name].shape)}, "
                                  f"the model expects {tuple(shape)}")


def load_into(params: dict[str, torch.nn.Parameter] | dict[str, torch.Tensor],
              tensors: dict[str, torch.Tensor], directory: str | Path) -> None:
    """Copy ``tensors`` into ``params`` (same names); every key and shape must match."""
    check_fits({n: tuple(p.shape) for n, p in params.items()}, tensors, directory)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
