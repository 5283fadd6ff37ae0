"""The one typed configuration schema of lolcats.

YAML files and command-line flags are both derived from these dataclasses: a YAML key
``distill: {lr: 0.003}`` and the flag ``--distill.lr 3e-3`` set the same field. Every field
carries a one-line docstring (the string under it) used for ``--help``. Unknown keys and
values of the wrong type or outside a ``Literal`` stop the program at start-up with the key
and the allowed values named.

A YAML file may list other files to start from under ``include:`` (paths relative to the
including file); later files and then the file's own keys override earlier ones.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad key or value in a config file or flag."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    "Hub name, local directory, path to a .gguf file, or a built-in name (smollm2-135m-instruct)."
    gguf_file: str | None = None
    "GGUF file inside `name` (a directory or hub repo), if the weights come as GGUF."
    revision: str | None = None
    "Hub revision (branch, tag or commit)."
    cache_dir: str | None = None
    "Where Hugging Face caches downloads."
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    "Weights dtype: auto = bfloat16 on GPU, float32 on CPU."
    device_map: str | None = None
    "Passed to from_pretrained (e.g. auto) for models larger than one device."
    hf_token: str | None = None
    "Token for gated models; defaults to the HF_TOKEN environment variable."
    trust_remote_code: bool = False
    "Allow model code from the Hub."
    init: Literal["pretrained", "random"] = "pretrained"
    "pretrained: load the weights; random: build `name`'s architecture with seeded random weights "
    "(`name` may then be a configs/shapes name such as llama3-8b or a config.json; for benchmarks)."
    tokenizer: str | None = None
    "Where the tokenizer comes from, if not from `name` (required with init random)."


@dataclass
class AttentionConfig:
    feature_map: Literal["hedgehog", "t2r", "elu", "relu"] = "hedgehog"
    "Feature map phi applied to queries and keys (after RoPE unless feature_rope is off)."
    feature_rope: bool = True
    ("The feature maps read queries and keys after RoPE (LoLCATs); off: before it, so the linear terms do not "
     "depend on positions (the softmax window and sparse cache keep RoPE), nor meet rotations past the trained "
     "length.")
    feature_dim: int = 64
    "Output size of the learned projection (hedgehog gives twice this many features)."
    feature_init: Literal["identity", "zero", "random"] = "identity"
    "Initialisation of the feature-map projections."
    kind: Literal["linear", "sliding_window", "terraced_window", "gated_delta"] = "terraced_window"
    ("linear attention only, or softmax over a window plus linear attention over the rest, or (gated_delta) softmax "
     "over a sliding window plus a gated delta-rule state over the rest (attention/mixers/gated_delta.py).")
    window_size: int = 64
    "Window (sliding) or block (terraced) size in tokens."
    init_window_factor: float = 0.1
    "Initial per-head window factor (sigmoid of a learned parameter), in (0, 1)."
    train_window_factor: bool = True
    "Learn the window factors in attention transfer."
    backend: Literal["auto", "triton", "torch", "fla"] = "auto"
    "Attention kernels: auto picks Triton on CUDA and PyTorch elsewhere."
    gate: Literal["none", "pooled_keys"] = "none"
    "Forget gate on the linear part (Liger): none, or pooled_keys = a parameter-free per-head gate "
    "logsigmoid(mean of the head's key projection)/16 that decays the linear state each token (ops/gate.py)."
    layers: list[int] | None = None
    "Indices of the layers to convert; all when empty. The others stay softmax attention (see softmax_layers)."
    softmax_layers: list[int] | None = None
    ("Indices of the layers kept as softmax attention (the base layer exactly, with a KV cache); the complement "
     "of `layers`, so give at most one of the two. None when empty. Every layer: the softmax model with the "
     "LoRA stage alone (no transfer: the control of a study).")
    softmax_count: int = 0
    ("Keep this many of the converted layers as softmax, picked after stage 1: every converted layer is transferred, "
     "then the ones with the largest validation MSE (mse/<layer> of the best stage-1 checkpoint) stay softmax for "
     "stage 2 and use (recorded in the stage-2 checkpoint; runs differing only in it share stage 1).")
    softmax_pick: Literal["mse", "retrieval", "kl"] = "mse"
    ("How softmax_count picks its layers: mse (the largest stage-1 validation MSE), retrieval (the layers whose "
     "best head puts the most softmax attention, from the last prompt token, on the key sentence of passkey prompts: "
     "the base model's retrieval heads; evaluation.recall.retrieval_scores) or kl (the layers whose restoring to "
     "softmax, one at a time after stage 1, lowers most the KL from the teacher on the answers of needle prompts "
     "in the run's own training text; evaluation.layer_pick). Only with softmax_count.")
    softmax_pick_lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    "Prompt lengths in tokens of the kl pick's needle prompts; those past the model's context are left out."
    softmax_pick_samples: int = 8
    ("Needle prompts per length of the kl pick: each costs (converted layers + 10) forwards of its length "
     "(a few on a CPU: the quickstart gives 2 of 512 tokens).")

    sparse_cache: int = 0
    "LoLA sparse global cache: key-value pairs per KV head kept beside the window (those the linear state "
    "recalls worst); pairs it pushes out fold into the linear state. 0 = off. Window kinds only; needs no "
    "training (apply it to a checkpoint with --sparse-cache N)."
    sparse_score: Literal["self_recall", "recency"] = "self_recall"
    "Which pairs the sparse cache keeps: self_recall (LoLA: largest ||v - phi(k)^T kv / phi(k)^T ks||, "
    "re-scored against the current state at each eviction) or recency (the latest to leave the window; an ablation)."
    sparse_sink: int = 0
    "The sparse cache always keeps the pairs of the first N positions of each sequence (attention sinks: the "
    "system prompt and instructions a model keeps reading), whatever their score; < sparse_cache. 0 = none."
    linear_scale: float = 1.0
    "Weight of the linear-attention terms against the softmax ones (window and sparse cache) in the hybrid's one "
    "normalised sum: phi(q) is multiplied by it, so every linear term, numerator and normaliser, is. 1 = the "
    "LoLCATs formula; below 1 the exact softmax part counts more (with a sparse cache: what it retrieves). Needs no "
    "training (apply it to a checkpoint with --linear-scale); window kinds only."

    def with_sparse_cache(self, size: int, score: str | None = None, sink: int | None = None) -> AttentionConfig:
        """These settings with a sparse cache of ``size`` put on at load time: ``score`` / ``sink`` None keep
        this config's own (the sink goes with the cache when it is turned off)."""
        return dataclasses.replace(self, sparse_cache=size, sparse_score=score or self.sparse_score,
                                   sparse_sink=(0 if size == 0 else self.sparse_sink) if sink is None else sink)

    def converted_layers(self, num_layers: int) -> list[int]:
        """Indices of the layers stage 1 converts (before a ``softmax_count`` pick), checked against the model."""
        for key in ("layers", "softmax_layers"):
            bad = [i for i in getattr(self, key) or [] if not 0 <= i < num_layers]
            if bad:
                raise ConfigError(f"attention.{key}: layer {bad[0]} does not exist (the model has {num_layers})")
        converted = sorted(set(self.layers or range(num_layers)) - set(self.softmax_layers or []))
        if self.softmax_count and self.softmax_count >= len(converted):
            raise ConfigError(f"attention.softmax_count: {self.softmax_count} must be below the number of converted "
                              f"layers ({len(converted)})")
        return converted


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=lambda: ["yahma/alpaca-cleaned"])
    "Training data: files (.json/.jsonl/.txt, optionally .gz) or Hub dataset names."
    format: Literal["auto", "alpaca", "text"] = "auto"
    "Record format: alpaca (instruction/input/output) or text; auto detects it."
    template: Literal["alpaca", "chat", "none"] = "alpaca"
    "Prompt template for Alpaca-style records: the Alpaca template or the tokenizer's chat template."
    seq_len: int = 1024
    "Tokens per packed training sequence."
    val_fraction: float = 0.02
    "Share of documents held out for validation (deterministic by content)."
    max_train_tokens: int | None = None
    "Cap on training tokens (after packing); all when empty."
    max_file_tokens: int | None = None
    "Take only the first records of each training file, up to this many tokens (before the train/validation "
    "split): balances a mix of files, and a file's prefix then gives the same data as the whole file."
    max_val_tokens: int | None = 262144
    "Cap on validation tokens."
    cache_dir: str = ".cache/lolcats"
    "Where tokenised data is cached (keyed by tokenizer and file contents)."
    hub_split: str = "train"
    "Split of a Hub dataset."


@dataclass
class TrainConfig:
    lr: float = 1e-2
    "Peak learning rate (AdamW)."
    weight_decay: float = 0.0
    "AdamW weight decay."
    epochs: int = 2
    "Passes over the training data."
    max_steps: int | None = None
    "Stop after this many optimiser steps; all epochs when empty."
    micro_batch_size: int = 1
    "Sequences per forward pass."
    grad_accum: int = 8
    "Micro-batches per optimiser step (batch = micro_batch_size * grad_accum * GPUs)."
    grad_clip: float = 1.0
    "Gradient-norm clipping."
    scheduler: Literal["plateau", "none"] = "plateau"
    "ReduceLROnPlateau on the validation loss, or a constant rate."
    plateau_factor: float = 0.1
    "Factor ReduceLROnPlateau multiplies the rate by."
    plateau_patience: int = 10
    "Evaluations without improvement before the rate drops."
    eval_every: int = 100
    "Optimiser steps between validations."
    early_stop_patience: int | None = None
    "Stop after this many evaluations without improvement; never when empty."
    save_every: int = 100
    "Optimiser steps between resumable checkpoints (also written at every evaluation)."
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    "Autocast: auto = bf16 on CUDA, fp32 on CPU."
    cuda_graph: bool | Literal["auto"] = "auto"
    "Capture each micro-batch's forward + backward in a CUDA graph and replay it: removes the host "
    "overhead that bounds small models' steps. auto: on for one process on a CUDA GPU; true: an error elsewhere."


@dataclass
class DistillConfig(TrainConfig):
    mse_factor: float = 1000.0
    "Weight of the per-layer MSE between student and teacher attention outputs."
    xent_factor: float = 0.0
    "Weight of the cross-entropy between teacher and student attention weights."
    block_size: int | None = None
    "Train layers in blocks of this many from hidden states stored on disk; jointly when empty."


@dataclass
class FinetuneConfig(TrainConfig):
    lr: float = 1e-4
    "Peak learning rate (AdamW)."
    lora_r: int = 8
    "LoRA rank."
    lora_alpha: float = 16.0
    "LoRA alpha."
    lora_dropout: float = 0.0
    "LoRA dropout."
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    "Modules that get LoRA adapters."
    loss: Literal["ce", "kl", "mix"] = "ce"
    ("Training loss: ce = next-token cross-entropy; kl = KL from the teacher's next-token distribution (the same "
     "weights, adapters off, softmax attention) to the student's; mix = (1 - kl_weight) * ce + kl_weight * kl.")
    kl_weight: float = 0.5
    "Weight of the KL term with loss mix, in [0, 1]."
    kl_temperature: float = 1.0
    "Temperature of both distributions in the KL (the term is scaled by its square)."


@dataclass
class RunConfig:
    output_dir: str = "runs"
    "Parent of the run directories (each named from the config)."
    name: str | None = None
    "Run directory name; derived from the config when empty."
    seed: int = 0
    "Random seed (data order, initialisation)."
    device: str = "auto"
    "cuda, cpu, or auto."
    progress: bool = True
    "Show progress bars."
    parallel: Literal["auto", "fsdp", "replicate"] = "auto"
    "Under torchrun: fsdp shards the frozen weights (FSDP2; for models too large for one GPU); replicate "
    "keeps a whole copy per GPU and averages only the trainable weights' gradients (data parallel); auto "
    "replicates when the bf16 weights take under a third of a GPU's memory (always on CPU)."


@dataclass(frozen=True)
class UseSettings:
    """How a trained linearized model is used: the attention settings it takes at load time, with no training
    (LoLA's sparse cache, the linear terms' weight). One type for the config's ``use`` section (recorded in a
    run's checkpoints and put on its model by every command that loads it, never trained with), the flags
    ``--sparse-cache`` ... of those commands (derived from these fields; they replace the recorded settings, a
    --sparse-cache its cache, score and sink together) and ``ModelSource.use``. Empty = as trained."""

    sparse_cache: int | None = None
    ("LoLA's sparse cache on the model as used (attention.sparse_cache): key-value pairs per KV head kept beside "
     "the window (those its linear state recalls worst); 0 = off; empty = as trained.")
    sparse_score: Literal["self_recall", "recency"] | None = None
    ("Which pairs the sparse cache keeps (attention.sparse_score), with sparse_cache only; empty = the model's own "
     "(self_recall unless trained otherwise).")
    sparse_sink: int | None = None
    ("The sparse cache always keeps the first N positions' pairs (attention.sparse_sink: attention sinks, the "
     "system prompt and instructions), N below the cache size, with sparse_cache only; empty = the model's own "
     "(0 unless trained otherwise).")
    linear_scale: float | None = None
    ("Weight of the linear-attention terms against the softmax ones (window, sparse cache) on the model as used "
     "(attention.linear_scale): below 1 favours what the softmax part reads; empty = as trained (1 unless trained "
     "otherwise).")

    def over(self, under: UseSettings) -> UseSettings:
        """These settings with ``under``'s where these are empty: a sparse cache replaces ``under``'s cache, score
        and sink together, a linear scale its scale."""
        cache = self if self.sparse_cache is not None else under
        return UseSettings(cache.sparse_cache, cache.sparse_score, cache.sparse_sink,
                           under.linear_scale if self.linear_scale is None else self.linear_scale)

    def on(self, attn: AttentionConfig) -> AttentionConfig:
        """``attn`` with these settings in place of the trained ones (the model as it is used)."""
        if self.sparse_cache is not None:
            attn = attn.with_sparse_cache(self.sparse_cache, self.sparse_score, self.sparse_sink)
        if self.linear_scale is not None:
            attn = dataclasses.replace(attn, linear_scale=self.linear_scale)
        return attn

    def check(self, name=lambda key: f"use.{key}") -> None:
        """What can be checked without a model: score and sink go with a cache size, the scale is a number >= 0
        (the rest, against the model's attention, by ``check_eval_settings``). ``name``: a field's key or flag."""
        for key in ("sparse_score", "sparse_sink"):
            if getattr(self, key) is not None and self.sparse_cache is None:
                raise ConfigError(f"{name(key)} needs {name('sparse_cache')} N (they replace the trained cache "
                                  "settings together)")
        if self.linear_scale is not None:
            check_linear_scale(self.linear_scale, name("linear_scale"))



def use_flag(key: str) -> str:
    """The command-line flag of a :class:`UseSettings` field: ``sparse_cache`` -> ``--sparse-cache``."""
    return "--" + key.replace("_", "-")


def use_flags(use: UseSettings) -> list[str]:
    """The flags that set ``use`` (one per set field): ``["--sparse-cache", "256", "--linear-scale", "0.3"]``."""
    return [a for k, v in asdict(use).items() if v is not None for a in (use_flag(k), str(v))]


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    run: RunConfig = field(default_factory=RunConfig)
    use: UseSettings = field(default_factory=UseSettings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def saved_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with the ``SECRETS`` fields emptied: what goes into files (config.yaml, meta.json)."""
        d = self.to_dict()
        for key in SECRETS:
            sec, name = key.split(".")
            d[sec][name] = None
        return d

    def fingerprint(self, *sections: str, leave_out: tuple[str, ...] = (), legacy: bool = False) -> str:
        """Short hash of the named sections (all when none) without the ``leave_out`` fields
        ("section.key"): identifies a stage's work. Fields of ``HASHED_WHEN_SET`` count only away from
        their default, so run directories made before they existed keep their names; ``NOT_HASHED`` fields
        count as their default (``legacy``: as set, the hash that run directories of earlier versions are
        named by)."""
        d = self.to_dict()
        defaults = Config().to_dict()
        for key in () if legacy else NOT_HASHED:
            sec, name = key.split(".")
            d[sec][name] = defaults[sec][name]
        for key in (*leave_out, *HASHED_WHEN_SET):
            sec, name = key.split(".")
            if key in leave_out or d[sec][name] == defaults[sec][name]:
                d[sec] = {k: v for k, v in d[sec].items() if k != name}
        picked = {s: d[s] for s in (sections or d.keys())}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:10]


HASHED_WHEN_SET = ("attention.gate", "attention.feature_rope", "attention.softmax_layers", "attention.softmax_count",
                   "attention.softmax_pick", "attention.softmax_pick_lengths", "attention.softmax_pick_samples",
                   "attention.sparse_cache", "attention.sparse_score", "attention.sparse_sink",
                   "attention.linear_scale", "data.max_file_tokens", "finetune.loss", "finetune.kl_weight",
                   "finetune.kl_temperature")
"Fields added after run directories existed: in a run's hash only when set away from their default."
NOT_HASHED = ("model.hf_token", "model.cache_dir", "data.cache_dir", "distill.save_every", "finetune.save_every")
"Fields that cannot change a run's result (access, cache places, how often state is saved): never in its hash."
SECRETS = ("model.hf_token",)
"Fields never written to a file, nor read from a config file (the environment or a flag gives them)."

SHORT_FLAGS = {"seed": "run.seed", "hf-token": "model.hf_token", "hf_token": "model.hf_token", "model": "model.name"}


# ---------------------------------------------------------------- validation


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float etc.)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: {value!r} is not {_describe(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value given for a list
        if not isinstance(value, list):
            raise bad
        return [_coerce(key, v, typing.get_args(tp)[0]) for v in value]
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad
        return str(value)
    raise bad


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; known keys{' of ' + prefix.rstrip('.') if prefix else ''}: "
            + ", ".join(sorted(types_))
        )
    kwargs = {}
    for name, value in data.items():
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, tp)
    return cls(**kwargs)


def _check_values(cfg: Config) -> None:
    """Range checks the type system does not express."""
    positive = {
        "attention.feature_dim": cfg.attention.feature_dim,
        "attention.window_size": cfg.attention.window_size,
        "data.seq_len": cfg.data.seq_len,
        "data.max_file_tokens": cfg.data.max_file_tokens,
    }
    for stage in ("distill", "finetune"):
        t = getattr(cfg, stage)
        positive.update({f"{stage}.epochs": t.epochs, f"{stage}.micro_batch_size": t.micro_batch_size,
                         f"{stage}.grad_accum": t.grad_accum, f"{stage}.eval_every": t.eval_every,
                         f"{stage}.save_every": t.save_every})
        if t.max_steps is not None and t.max_steps < 0:
            raise ConfigError(f"{stage}.max_steps: {t.max_steps} must be >= 0 (0 = no training)")
        if not t.lr > 0:
            raise ConfigError(f"{stage}.lr: {t.lr} must be > 0")
    positive["finetune.lora_r"] = cfg.finetune.lora_r
    for k, v in positive.items():
        if v is not None and v <= 0:
            raise ConfigError(f"{k}: {v} must be > 0")
    if cfg.data.seq_len < 2:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} must be >= 2 (a sequence predicts its next tokens)")
    layers = cfg.attention.layers
    if layers and (min(layers) < 0 or len(set(layers)) != len(layers)):
        raise ConfigError(f"attention.layers: {layers} must be distinct layer indices >= 0")
    if not 0 < cfg.attention.init_window_factor < 1:
        raise ConfigError(f"attention.init_window_factor: {cfg.attention.init_window_factor} must be in (0, 1)")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction: {cfg.data.val_fraction} must be in [0, 1)")
    if cfg.distill.block_size is not None and cfg.distill.block_size <= 0:
        raise ConfigError(f"distill.block_size: {cfg.distill.block_size} must be > 0")
    _check_softmax_layers(cfg.attention)
    if not 0 <= cfg.finetune.kl_weight <= 1:
        raise ConfigError(f"finetune.kl_weight: {cfg.finetune.kl_weight} must be in [0, 1]")
    if not cfg.finetune.kl_temperature > 0:
        raise ConfigError(f"finetune.kl_temperature: {cfg.finetune.kl_temperature} must be > 0")
    check_eval_settings(cfg.attention)
    cfg.use.check()
    check_eval_settings(cfg.use.on(cfg.attention), "use")
    if cfg.attention.sparse_cache and cfg.distill.xent_factor > 0:
        raise ConfigError("attention.sparse_cache: the attention cross-entropy (distill.xent_factor > 0) is not "
                          "available with a sparse cache; set distill.xent_factor 0 or attention.sparse_cache 0")
    if cfg.attention.kind == "gated_delta" and cfg.distill.xent_factor > 0:
        raise ConfigError("distill.xent_factor: the attention cross-entropy needs attention weights, which "
                          "attention.kind gated_delta does not have (its delta rule recalls values); set it to 0")
    for stage in ("distill", "finetune"):
        if cfg.attention.sparse_cache and getattr(cfg, stage).cuda_graph is True:
            raise ConfigError(f"{stage}.cuda_graph: a forward with the sparse cache cannot be captured in a CUDA "
                              "graph; set it to false")
    if cfg.attention.sparse_cache and cfg.attention.gate != "none":
        raise ConfigError("attention.sparse_cache: not with attention.gate (the self-recall score assumes a state "
                          "that does not decay); set one of them off")
    if cfg.model.init == "random" and not cfg.model.tokenizer:
        raise ConfigError("model.tokenizer: required with model.init random (random weights come without one)")
    check_device(cfg.run.device)


def check_device(name: str, key: str = "run.device") -> str:
    """``name`` is a device lolcats runs on: auto, cpu, cuda, cuda:N or mps (``key``: where it came from, for the
    message; empty: not named)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        where = f"{key}: " if key else ""
        raise ConfigError(f"{where}{name!r} is not a device; use auto (CUDA when available, else CPU), cpu, cuda, "
                          "cuda:N (GPU N) or mps")
    return name


def _check_softmax_layers(a: AttentionConfig) -> None:
    """Which layers stay softmax is said once: ``layers`` or ``softmax_layers``, and a count on top of
    ``layers`` only (indices are checked against the model by ``AttentionConfig.converted_layers``)."""
    if a.layers and a.softmax_layers:
        raise ConfigError("attention.softmax_layers: give it or attention.layers, not both (the layers not "
                          "converted are the softmax ones)")
    if a.softmax_count < 0:
        raise ConfigError(f"attention.softmax_count: {a.softmax_count} must be >= 0")
    if a.softmax_pick_samples < 1 or not a.softmax_pick_lengths or any(n < 1 for n in a.softmax_pick_lengths):
        raise ConfigError(f"attention.softmax_pick_samples / softmax_pick_lengths: {a.softmax_pick_samples} / "
                          f"{a.softmax_pick_lengths} must be >= 1")
    if a.softmax_pick != "mse" and not a.softmax_count:
        raise ConfigError(f"attention.softmax_pick: {a.softmax_pick!r} picks the layers of attention.softmax_count, "
                          "which is 0")
    if a.softmax_count and a.softmax_layers:
        raise ConfigError("attention.softmax_count: give it or attention.softmax_layers, not both")
    for key in ("layers", "softmax_layers"):
        idx = getattr(a, key) or []
        if any(i < 0 for i in idx) or len(set(idx)) != len(idx):
            raise ConfigError(f"attention.{key}: {idx} must be distinct layer indices >= 0")


def check_linear_scale(scale, name: str = "attention.linear_scale") -> None:
    """``scale`` is a finite number >= 0 (``name``: the key or flag it came from, for the message)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ConfigError(f"{name}: {scale!r} must be a finite number >= 0 (1 = the LoLCATs formula)")


def check_eval_settings(attn: AttentionConfig, where: str = "attention") -> None:
    """The settings a trained checkpoint takes at load time: the sparse cache (a size >= 0, on a window kind, a
    known score, a sink below its size) and the linear terms' weight (finite, >= 0, on a window kind).
    ``where``: the section the values came from (attention, or use), for the messages."""
    check_linear_scale(attn.linear_scale, f"{where}.linear_scale")
    if attn.linear_scale != 1 and attn.kind in ("linear", "gated_delta"):
        raise ConfigError(f"{where}.linear_scale: needs a window kind (sliding_window or terraced_window); "
                          f"{attn.kind} cancels it (linear attention's normaliser, the delta rule's L2-normalised "
                          "queries)")
    if attn.sparse_cache < 0:
        raise ConfigError(f"{where}.sparse_cache: {attn.sparse_cache} must be >= 0 (0 = off)")
    if attn.sparse_cache and attn.kind in ("linear", "gated_delta"):
        raise ConfigError(f"{where}.sparse_cache: needs a window kind (sliding_window or terraced_window); "
                          f"{attn.kind} has no linear state for the cache to fold into")
    _coerce(f"{where}.sparse_score", attn.sparse_score, _field_types(AttentionConfig)["sparse_score"])
    if attn.sparse_sink < 0 or (attn.sparse_sink and attn.sparse_sink >= attn.sparse_cache):
        raise ConfigError(f"{where}.sparse_sink: {attn.sparse_sink} must be >= 0 and below {where}.sparse_cache "
                          f"({attn.sparse_cache}): the cache keeps the sink's pairs and needs room for others")


# ---------------------------------------------------------------- loading


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config, resolving ``include:`` relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start}: {e.reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    merged: dict[str, Any] = {}
    for inc in data.pop("include", None) or []:
        merged = _merge(merged, read_yaml(path.parent / inc))
    return _merge(merged, data)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """``"could not find expected ':' at line 3, column 1"`` from a YAML error."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def redact_argv(argv: list[str]) -> list[str]:
    """``argv`` with the values of the ``SECRETS`` flags replaced by ``***`` (a command line that is recorded)."""
    out, hide = [], False
    for arg in argv:
        key, eq, _ = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        secret = SHORT_FLAGS.get(key, key).replace("-", "_") in SECRETS
        out.append("***" if hide else f"--{key}=***" if secret and eq else arg)
        hide = secret and not eq
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``['--distill.lr', '3e-3', '--seed=1']`` -> ``{'distill': {'lr': 0.003}, 'run': {'seed': 1}}``."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key VALUE")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"--{key} needs a value")
            val, i = args[i + 1], i + 1
        i += 1
        key = SHORT_FLAGS.get(key, key)
        parts = key.replace("-", "_").split(".")
        if len(parts) != 2:
            raise ConfigError(f"unknown flag --{key}; flags look like --section.key (sections: "
                              + ", ".join(f.name for f in fields(Config)) + ")")
        try:
            value = yaml.safe_load(val) if val != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--{key}: cannot read the value {val!r} ({_yaml_problem(e)})") from None
        if isinstance(value, str) and "," in value and parts[1] in _list_fields(parts[0]):
            value = [int(v) if v.strip().lstrip("-").isdigit() else v.strip() for v in value.split(",") if v.strip()]
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def _list_fields(section: str) -> set[str]:
    cls = _field_types(Config).get(section)
    if cls is None:
        return set()
    return {n for n, t in _field_types(cls).items() if "list" in str(t)}


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data)
    _check_values(cfg)
    return cfg


def load_config(path: str | Path | list[str | Path] | None = None,
                overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- YAML file(s) (with includes; later files override earlier ones) <- command-line
    overrides; validated."""
    data: dict = {}
    for p in ([path] if isinstance(path, (str, Path)) else path or []):
        data = _merge(data, read_yaml(p))
    for key in SECRETS:
        sec, name = key.split(".")
        if (data.get(sec) or {}).get(name) is not None:
            raise ConfigError(f"{key}: a secret is not read from config files (they get copied and shared); "
                              "set the HF_TOKEN environment variable or pass --hf-token")
    if overrides:
        data = _merge(data, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return config_from_dict(data)


@functools.lru_cache(maxsize=None)
def config_help() -> str:
    """One line per field: flag, type, default, docstring (built once: every subcommand's help shows it)."""
    lines = []
    for sec in fields(Config):
        cls = _field_types(Config)[sec.name]
        defaults = cls()
        for f in fields(cls):
            doc = field_docs(cls).get(f.name, "")
            tp = _describe(_field_types(cls)[f.name])
            flag = f"--{sec.name}.{f.name}"
            lines.append(f"  {flag:<32} {doc} [{tp}; default {getattr(defaults, f.name)!r}]")
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def _class_docs(module_file: str) -> dict[str, dict[str, str]]:
    """{class name: {field: the docstring written under it}} of every class in a source file (parsed once).
    A docstring may run over several string statements (lines not joined by parentheses): all of them count."""
    import ast

    try:
        tree = ast.parse(Path(module_file).read_text())
    except (OSError, SyntaxError):
        return {}
    out: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            docs, name = {}, None
            for stmt in node.body:
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and name:
                    docs[name] = docs.get(name, "") + str(stmt.value.value)
                else:  # a docstring belongs to the field right above it
                    target = stmt.target if isinstance(stmt, ast.AnnAssign) else None
                    name = target.id if isinstance(target, ast.Name) else None
            out[node.name] = docs
    return out


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields (read from the source), base classes' first."""
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            docs.update(_class_docs(inspect.getfile(klass)).get(klass.__name__, {}))
        except TypeError:
            continue
    return docs


def save_config(cfg: Config, path: str | Path) -> None:
    """``cfg`` as YAML, without its secrets (:meth:`Config.saved_dict`)."""
    Path(path).write_text(yaml.safe_dump(cfg.saved_dict(), sort_keys=False))
