"""What every benchmark and experiment shares: the card's name, the repository root, a relaunch of a script
as a module, and writing a result file whose folder may not exist yet."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def card(device: torch.device | str | None = None, cpu: str | None = None) -> str:
    """The accelerator's name, as every table names it; on CPU ``cpu`` or ``CPU (<machine>)``."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu or f"CPU ({platform.machine()})"


def module_command(module: str, *args: str) -> list[str]:
    """``python -m <module> args``: run from :data:`REPO` (``cwd=REPO``) so the package imports."""
    return [sys.executable, "-m", module, *args]


def write_json(path: str | Path, data, indent: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent))
    return path


def add_model_args(p, model: str) -> None:
    """The flags of :func:`random_model` and of the served mode: --model (default ``model``), --tokenizer, --attn,
    --mode."""
    p.add_argument("--model", default=model, help="a configs/shapes name or config.json (random weights)")
    p.add_argument("--tokenizer", required=True, help="tokenizer name or directory (model.tokenizer)")
    p.add_argument("--attn", action="append", default=[], metavar="FLAG=VALUE",
                   help="an extra config flag, e.g. attention.window_size=8 (repeatable)")
    p.add_argument("--mode", choices=("student", "teacher"), default="student")


def random_model(name: str, tokenizer: str, attn: list[str], device: str = "auto"):
    """(model, tokenizer) of ``name``'s shapes (a configs/shapes name or config.json) with random weights and
    untrained feature maps, ``attn`` more config flags as ``KEY=VALUE``; bf16 on CUDA, fp32 on CPU."""
    from lolcats.config import load_config
    from lolcats.models.trained import ModelSource, load_trained

    flags = ["--model.init", "random", "--model.name", name, "--model.tokenizer", tokenizer]
    for item in attn:
        key, _, value = item.partition("=")
        flags += ["--" + key, value]
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    return load_trained(ModelSource(config=load_config(None, flags), untrained=True), "cuda" if cuda else "cpu",
                        "bfloat16" if cuda else "float32")

