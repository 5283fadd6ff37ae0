"""A stage's resumable state in one safetensors file: tensors, plus plain JSON in its header.

Nothing in the file can run code when it is read (no pickle): the weights, the optimiser's
moments and the RNG states are tensors; counters, the scheduler, the optimiser's parameter
groups and the Python RNG state are JSON in the header's ``lolcats_state`` entry. The file is
written atomically (a killed run leaves the previous state).

    tensors: param/<name>, optim/<name>/<key>, rng/torch, rng/cuda/<i>, rng/numpy
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lolcats.checkpoint import CheckpointError, atomic_write

HEADER_KEY = "lolcats_state"
FORMAT = 1


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON) of the Python, numpy, torch and CUDA generators."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"rng/torch": torch.get_rng_state(), "rng/numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    plain = {"python": [version, list(internal), gauss], "numpy": [name, int(pos), int(has_gauss), float(cached)]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k[9:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_state(path: str | Path, params: dict[str, torch.Tensor], optim: dict, plain: dict[str, Any]) -> None:
    """``params`` {name: tensor}, ``optim`` a full optimizer state dict keyed by parameter name
    (``state``, ``param_groups``), ``plain`` anything JSON can hold."""
    tensors = {f"param/{n}": t for n, t in params.items()}
    extra = {}
    for name, st in optim["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{name}/{key}"] = v
            else:
                extra.setdefault(name, {})[key] = v
    rng_t, rng_p = rng_state()
    tensors.update(rng_t)
    header = {"format": FORMAT, "param_groups": optim["param_groups"], "optim_plain": extra, "rng": rng_p, **plain}
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(flat, p, metadata={HEADER_KEY: json.dumps(header)}))


def _read(path: str | Path, with_tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON header) of a state file; anything else than a state file is a CheckpointError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
        header = json.loads(meta[HEADER_KEY])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"cannot read the resume state {path} ({type(e).__name__}: {e}); delete it to "
                              "restart this stage from its beginning") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise CheckpointError(f"{path}: resume state format {found!r}, this lolcats reads {FORMAT}; "
                              "delete it to restart this stage")
    return tensors, header


def check_state(path: str | Path) -> None:
    """A resume state file is one :func:`load_state` reads (its header only: checked at start-up)."""
    _read(path, with_tensors=False)


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, Any]]:
    """(params, optimizer state dict, plain JSON) written by :func:`save_state`; sets the RNG states."""
    tensors, header = _read(path, with_tensors=True)
    params = {k[len("param/"):]: t for k, t in tensors.items() if k.startswith("param/")}
    state: dict[str, dict] = {n: dict(v) for n, v in header.pop("optim_plain").items()}
    for k, t in tensors.items():
        if k.startswith("optim/"):
            name, _, key = k[len("optim/"):].rpartition("/")
            state.setdefault(name, {})[key] = t
    set_rng_state(tensors, header.pop("rng"))
    return params, {"state": state, "param_groups": header.pop("param_groups")}, header
