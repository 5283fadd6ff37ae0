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
