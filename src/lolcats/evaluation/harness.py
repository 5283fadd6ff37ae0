"""LM-Eval-Harness (lm_eval 0.4.x) on lolcats models, through its Python API.

``lm_eval`` is an optional extra (``pip install 'lolcats[eval]'``) and is imported only
inside the functions here. :func:`lolcats_lm_class` registers the model type ``lolcats``
with the harness: an ``HFLM`` built from an already loaded model, or from ``model_args``

    base=<hub name|dir|.gguf|smollm2-135m-instruct>,stage1=<dir>,stage2=<dir>,dtype=auto,device=cuda
    export=<dir>

Local task folders (``include_path``) may name their ``data_files`` relative to the
working directory the YAMLs were written for (``../shared/data/...``). They are copied to a
temporary folder with every ``data_files`` path made absolute: a relative path is looked up
from the working directory first, then from the YAML's folder and each of its parents. A
requested task ``piqa`` runs the local ``piqa_local`` when the include path has one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import yaml

from lolcats.config import UseSettings
from lolcats.models.trained import ModelSource, load_trained

LOCAL_SUFFIX = "_local"
OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
SKIPPED_KEYS = ("alias", "name", "sample_len")  # of lm_eval's per-task results


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ImportError("LM-Eval-Harness is not installed: pip install 'lolcats[eval]' "
                          "(or: pip install lm_eval)") from e
    return lm_eval


@functools.cache
def lolcats_lm_class() -> type:
    """The ``HFLM`` subclass registered with lm_eval as model type ``lolcats`` (created once)."""
    require_lm_eval()
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    @register_model("lolcats")
    class LolcatsLM(HFLM):
        """HFLM over a lolcats model: ``pretrained`` is a model instance, or it is loaded from
        ``base``/``stage1``/``stage2`` or ``export`` (``sparse_cache``: LoLA's cache on it). bf16 autocast on CUDA."""

        def __init__(self, pretrained: torch.nn.Module | None = None, tokenizer=None, base: str | None = None,
                     stage1: str | None = None, stage2: str | None = None, export: str | None = None,
                     dtype: str = "auto", device: str | None = None, batch_size: int | str = 1,
                     sparse_cache: int | None = None, **kwargs):
            if pretrained is None or isinstance(pretrained, str):
                source = ModelSource(checkpoint=stage2, stage1=stage1, export=export, base=base or pretrained,
                                     use=UseSettings(sparse_cache=None if sparse_cache is None else int(sparse_cache)))
                pretrained, tokenizer = load_trained(source, None if device in (None, "auto") else device, dtype)
            elif tokenizer is None:
                raise ValueError("a model instance needs its tokenizer (tokenizer=...)")
            if device not in (None, "auto"):
                pretrained.to(device)
            dev = next(pretrained.parameters()).device
            if dev.type == "cuda":
                kwargs.setdefault("mixed_precision_dtype", "bfloat16")
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=batch_size, **kwargs)

    return LolcatsLM


# ---------------------------------------------------------------- local task folders


def _candidates(rel: str, yaml_dir: Path) -> Iterator[Path]:
    yield Path.cwd() / rel
    for d in (yaml_dir, *yaml_dir.parents):
        yield d / rel


def resolve_data_path(path: str, yaml_file: Path) -> str:
    """Absolute form of a ``data_files`` entry: cwd, then the YAML's folder and its parents."""
    if "://" in path or Path(path).is_absolute():
        return path
    for cand in _candidates(path, yaml_file.resolve().parent):
        if cand.exists():
            return str(cand.resolve())
    raise FileNotFoundError(f"{yaml_file}: data file {path!r} not found from the working directory "
                            f"or from {yaml_file.parent} and its parents")


class _AnyTagLoader(yaml.SafeLoader):
    """Reads YAML with lm_eval's custom tags (``!function``) as plain values."""


_AnyTagLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def _data_file_strings(cfg: Any) -> list[str]:
    files = ((cfg or {}).get("dataset_kwargs") or {}).get("data_files") if isinstance(cfg, dict) else None
    if isinstance(files, str):
        return [files]
    if isinstance(files, list):
        return [f for f in files if isinstance(f, str)]
    if isinstance(files, dict):
        out = []
        for v in files.values():
            out += [v] if isinstance(v, str) else [f for f in (v or []) if isinstance(f, str)]
        return out
    return []


def rewrite_task_yaml(src: Path, dst: Path) -> bool:
    """Write ``src`` to ``dst`` with its ``data_files`` made absolute; True if any path changed."""
    text = src.read_text()
    try:
        cfg = yaml.load(text, Loader=_AnyTagLoader)
    except yaml.YAMLError:
        cfg = None
    mapping = {rel: resolve_data_path(rel, src) for rel in set(_data_file_strings(cfg))}
    mapping = {k: v for k, v in mapping.items() if k != v}
    if mapping:  # one pass over whole path tokens, longest first, so no path is rewritten twice
        alternatives = "|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True))
        text = re.sub(rf"(?<![\w./-])(?:{alternatives})(?![\w./-])", lambda m: mapping[m.group(0)], text)
    dst.write_text(text)
    return bool(mapping)


def is_task_yaml(path: Path) -> bool:
    return path.is_file() and (path.suffix in (".yaml", ".yml") or path.name.endswith("_yaml"))


@contextlib.contextmanager
def localized_include_path(include_path: str | Path) -> Iterator[Path]:
    """A temporary copy of the task folder ``include_path`` with absolute data paths."""
    src = Path(include_path)
    if not src.is_dir():
        raise FileNotFoundError(f"include path {include_path} is not a directory")
    with tempfile.TemporaryDirectory(prefix="lolcats_tasks_") as tmp:
        dst = Path(tmp) / src.resolve().name
        for f in sorted(src.rglob("*")):
            if not f.is_file():
                continue
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            if is_task_yaml(f):
                rewrite_task_yaml(f, target)
            else:  # copyfile, not copy2: no read-only mode bits from the source
                shutil.copyfile(f, target)
        yield dst


@contextlib.contextmanager
def hf_offline() -> Iterator[None]:
    """HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 (also in already imported modules), restored after."""
    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    patched: list[tuple[Any, str, Any]] = []
    for mod_name, attr in (("datasets.config", "HF_DATASETS_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                           ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, attr):
            patched.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, True)
    os.environ.update({k: "1" for k in OFFLINE_ENV})
    try:
        yield
    finally:
        for mod, attr, old in patched:
            setattr(mod, attr, old)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------- running


def resolve_task_names(tasks: Sequence[str], known: Sequence[str], local_first: bool) -> dict[str, str]:
    """Requested name -> harness name (``piqa`` -> ``piqa_local`` when local tasks are given)."""
    known_set = set(known)
    out = {}
    for t in tasks:
        if local_first and t + LOCAL_SUFFIX in known_set:
            out[t] = t + LOCAL_SUFFIX
        elif t in known_set:
            out[t] = t
        else:
            close = sorted(k for k in known_set if t in k)[:10]
            raise ValueError(f"unknown lm_eval task {t!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    return out


def _clean_number(v: Any) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return None if math.isnan(f) else f


def parse_results(results: dict[str, Any], names: dict[str, str]) -> dict[str, dict[str, Any]]:
    """lm_eval's ``results['results']`` -> ``{task: {"acc": .., "acc_stderr": .., ...}}``.

    Requested tasks keep the name they were asked by; sub-tasks (MMLU subjects) keep theirs.
    """
    back = {v: k for k, v in names.items()}
    n_samples = results.get("n-samples", {})
    out: dict[str, dict[str, Any]] = {}
    for task, metrics in results["results"].items():
        clean = {}
        for key, value in metrics.items():
            if key in SKIPPED_KEYS:
                continue
            metric, _, filt = key.partition(",")
            clean[metric if filt in ("", "none") else f"{metric},{filt}"] = _clean_number(value)
        if task in n_samples:
            clean["samples"] = n_samples[task].get("effective")
        out[back.get(task, task)] = clean
    return out


def run_harness(model: torch.nn.Module, tokenizer, tasks: Sequence[str], num_fewshot: int | None = None,
                batch_size: int | str = 8, limit: int | float | None = None, include_path: str | None = None,
                device: str | torch.device | None = None, **simple_evaluate_kwargs) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` on lm_eval ``tasks``; returns ``{task: {metric: value}}`` (acc, acc_norm,
    acc_stderr, ...). Tasks of a local ``include_path`` run offline."""
    require_lm_eval()
    if device not in (None, "auto"):
        model.to(device)
    with contextlib.ExitStack() as stack:
        if include_path:
            stack.enter_context(hf_offline())
            local = stack.enter_context(localized_include_path(include_path))
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        names = None
        if include_path:  # local tasks only, when they cover the request (no scan of lm_eval's own tasks)
            manager = TaskManager(include_path=str(local), include_defaults=False)
            with contextlib.suppress(ValueError):
                names = resolve_task_names(tasks, manager.all_tasks, local_first=True)
        if names is None:
            manager = TaskManager(include_path=str(local) if include_path else None)
            names = resolve_task_names(tasks, manager.all_tasks, local_first=bool(include_path))
        lm = lolcats_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        kwargs = {"log_samples": False, **simple_evaluate_kwargs}
        results = simple_evaluate(model=lm, tasks=list(names.values()), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=manager, **kwargs)
    return parse_results(results, names)
