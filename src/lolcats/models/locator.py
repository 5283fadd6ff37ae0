"""Where a checkpoint's base model came from, and finding it again on another machine.

Each checkpoint records a locator of its base model (``meta["base"]``, from :func:`base_locator`)::

    {"kind": "local",                         # builtin, local (a path), hub, or random (a shape)
     "name": "/root/stage/smollm2.gguf",      # model.name as trained
     "gguf_file": null, "revision": null, "tokenizer": null,
     "builtin": "smollm2-135m-instruct",      # the built-in model with these weights (GGUF hash), if any
     "hub": null, "hub_revision": null,       # a Hub repo id, also for a path inside the Hugging Face cache
     "gguf": {"file": "smollm2.gguf", "sha256": "..."},   # a local GGUF file's name and hash
     "fingerprint": "..."}                    # base_fingerprint of the weights (checked when they load)

:func:`locate_base` turns it back into the :class:`~lolcats.config.ModelConfig` to load: the recorded
path when it exists here, else the built-in with the same weights (the GGUF's hash, the base
fingerprint, or for checkpoints that recorded no hash the GGUF's file name), else the recorded
Hub name; otherwise an error naming ``--base`` and the fingerprint it must match. Only where the weights are is taken from a checkpoint: never
``trust_remote_code`` (that comes from the command line), a token, a cache directory or a device map.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from lolcats.checkpoint import CheckpointError, file_sha256
from lolcats.config import ModelConfig
from lolcats.hub import is_repo_id
from lolcats.models.loading import BUILTIN_MODELS, resolve_source

KINDS = ("builtin", "local", "hub", "random")
# base_fingerprint of each built-in's weights (measured with transformers 5.24; the same in float32 and bf16):
# a checkpoint trained on a copy of them (another path, another GGUF file) finds the built-in by it
BUILTIN_FINGERPRINTS = {"d8c70ff903195bd2": "smollm2-135m-instruct"}
_HF_CACHE = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<rev>[0-9a-f]{40})(/|$)")


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def gguf_sha256(path: str | Path) -> str:
    """sha256 of a file, computed once per file version (path, size and time)."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def installed_builtins() -> dict[str, Path]:
    """{built-in name: its GGUF file} for the built-ins whose package is installed."""
    out = {}
    for name in BUILTIN_MODELS:
        try:
            src, gguf = resolve_source(ModelConfig(name=name))
        except ImportError:
            continue
        out[name] = Path(src) / gguf
    return out


def _gguf_path(cfg: ModelConfig) -> Path | None:
    path = Path(cfg.name)
    if path.suffix == ".gguf":
        return path
    if cfg.gguf_file and path.is_dir():
        return path / cfg.gguf_file
    return None


def _hub_of(path: Path) -> tuple[str, str] | None:
    """(repo id, revision) of a path inside the Hugging Face cache (models--org--name/snapshots/<sha>)."""
    m = _HF_CACHE.search(path.resolve().as_posix())
    return (f"{m['org']}/{m['name']}", m["rev"]) if m else None


def _kind(cfg: ModelConfig) -> str:
    if cfg.init == "random":
        return "random"
    if cfg.name in BUILTIN_MODELS:
        return "builtin"
    path = Path(cfg.name)
    return "local" if path.exists() or path.suffix == ".gguf" or not is_repo_id(cfg.name) else "hub"


def _plain_locator(cfg: ModelConfig, fingerprint: str | None) -> dict[str, Any]:
    kind = _kind(cfg)
    return {"kind": kind, "name": cfg.name, "gguf_file": cfg.gguf_file, "revision": cfg.revision,
            "tokenizer": cfg.tokenizer, "builtin": cfg.name if kind == "builtin" else None,
            "hub": cfg.name if kind == "hub" else None, "hub_revision": None, "gguf": None, "fingerprint": fingerprint}


def base_locator(cfg: ModelConfig, fingerprint: str | None) -> dict[str, Any]:
    """What a checkpoint records to find its base model ``cfg`` again (see the module docstring)."""
    loc = _plain_locator(cfg, fingerprint)
    if loc["kind"] == "local":
        gguf = _gguf_path(cfg)
        if gguf is not None and gguf.is_file():
            sha = gguf_sha256(gguf)
            loc["gguf"] = {"file": gguf.name, "sha256": sha}
            loc["builtin"] = next((n for n, p in installed_builtins().items() if gguf_sha256(p) == sha), None)
        loc["builtin"] = loc["builtin"] or BUILTIN_FINGERPRINTS.get(fingerprint)
        hub = _hub_of(Path(cfg.name))
        if hub:
            loc["hub"], loc["hub_revision"] = hub
    return loc


def recorded_locator(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's locator; for checkpoints older than locators, built from its config's model section."""
    if isinstance(meta.get("base"), dict):
        return meta["base"]
    model = (meta.get("config") or {}).get("model") or {}
    cfg = ModelConfig(name=str(model.get("name") or meta.get("base_model")), gguf_file=model.get("gguf_file"),
                      revision=model.get("revision"), init=model.get("init", "pretrained"),
                      tokenizer=model.get("tokenizer"))
    loc = _plain_locator(cfg, meta.get("base_fingerprint"))
    gguf = _gguf_path(cfg)
    if gguf is not None:
        loc["gguf"] = {"file": gguf.name, "sha256": None}
    return loc


def _same_builtin(loc: dict[str, Any]) -> str | None:
    """The installed built-in with the recorded weights: by name, base fingerprint, GGUF hash, or the GGUF's
    file name when no hash was recorded."""
    installed = installed_builtins()
    for name in (loc.get("builtin"), BUILTIN_FINGERPRINTS.get(loc.get("fingerprint"))):
        if name in installed:
            return name
    gguf = loc.get("gguf") or {}
    for name, path in installed.items():
        if gguf.get("sha256") and gguf_sha256(path) == gguf["sha256"]:
            return name
        if not gguf.get("sha256") and gguf.get("file") == path.name:
            return name
    return None


def locate_base(meta: dict[str, Any], where: str | Path, dtype: str = "auto",
                trust_remote_code: bool = False) -> ModelConfig:
    """The base model a checkpoint (``meta``, read from ``where``) was trained on, found on this machine."""
    loc = recorded_locator(meta)
    kind, name = loc.get("kind"), str(loc.get("name"))
    if kind not in KINDS:
        raise CheckpointError(f"{where}: unknown base-model kind {kind!r} in meta.json; known: {', '.join(KINDS)}")
    fields = dict(name=name, gguf_file=loc.get("gguf_file"), revision=loc.get("revision"),
                  tokenizer=loc.get("tokenizer"), init="random" if kind == "random" else "pretrained",
                  dtype=dtype, trust_remote_code=trust_remote_code)
    if kind in ("builtin", "hub", "random") or Path(name).exists():
        return ModelConfig(**fields)
    builtin = _same_builtin(loc)
    if builtin:
        return ModelConfig(**{**fields, "name": builtin, "gguf_file": None})
    if loc.get("hub"):
        return ModelConfig(**{**fields, "name": loc["hub"], "revision": loc.get("hub_revision") or loc.get("revision")})
    gguf = loc.get("gguf") or {}
    file = f"; GGUF file {gguf['file']}" + (f", sha256 {gguf['sha256'][:16]}" if gguf.get("sha256") else "") \
        if gguf.get("file") else ""
    raise CheckpointError(f"checkpoint {where} was trained on base model {name!r}, which is not on this machine"
                          f"{file}: pass --base NAME_OR_PATH with the same weights (base fingerprint "
                          f"{loc.get('fingerprint')}, checked when they load)")
