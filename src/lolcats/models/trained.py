"""The one way to load a model for use: a trained linearized model, an export, or a base model.

Every command that uses a model (export, generate, chat, eval, serve) describes it as a
:class:`ModelSource` and calls :func:`load_trained`:

    load_trained(ModelSource(checkpoint="runs/x/finetune-ab12-s0/best"))   # stage 2 finds its stage 1
    load_trained(ModelSource(checkpoint="runs/x/distill-cd34-s0/best"))    # stage 1 only (no LoRA)
    load_trained(ModelSource(export="exported_dir"))                       # a `lolcats export` directory
    load_trained(ModelSource(config=cfg))                                  # the finished stages cfg names
    load_trained(ModelSource(base="smollm2-135m-instruct"))                # the base model itself
    load_trained(ModelSource(config=cfg, untrained=True))                  # cfg's base, untrained maps (benchmarks)
    load_trained(ModelSource(checkpoint=..., use=UseSettings(sparse_cache=64)))  # with LoLA's sparse cache on

A trained model is used with the settings its run's ``use`` section recorded (a sparse cache, the linear
terms' weight, :class:`~lolcats.config.UseSettings`); ``ModelSource.use`` (the command's flags) replaces them.
:func:`load_linearized`, the Python API, loads checkpoints the same way and puts the same settings on
(:func:`apply_use`), so it gives the model ``lolcats eval --checkpoint`` measures.

``base`` with checkpoints replaces the base model the checkpoint records; without it the recorded
one is found on this machine (:mod:`lolcats.models.locator`). A checkpoint's metadata only says
where its base weights are: ``trust_remote_code`` comes from ``ModelSource`` (the command line).
Checkpoints are checked against the base they were trained on (its fingerprint), and every tensor
name and shape; a stage-2 checkpoint against its stage 1 (the hash of the stage-1 weights it was
trained on), before any model loads.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from lolcats import distributed as dist
from lolcats.attention.convert import convert_model, keep_softmax
from lolcats.attention.generate import enable_lolcats_generation
from lolcats.attention.modes import set_attention_mode
from lolcats.attention.params import stage1_checkpoint_names
from lolcats.attention.use import set_linear_scale, set_sparse_cache
from lolcats.checkpoint import (WEIGHTS, CheckpointError, check_base, check_fits, check_readable, file_sha256,
                                load_tensors, read_meta)
from lolcats.config import (Config, ConfigError, FinetuneConfig, ModelConfig, UseSettings, config_from_dict,
                            use_flag)
from lolcats.models.gguf_cache import shared_gguf_reads
from lolcats.models.loading import base_fingerprint, load_base_model, load_tokenizer
from lolcats.models.locator import locate_base
from lolcats.models.lora import add_lora, lora_checkpoint_names, merge_lora, merge_shapes
from lolcats.runs import finished_checkpoints
from lolcats.runtime import resolve_device, resolve_dtype


@dataclass(frozen=True)
class ModelSource:
    """Which model a command means: a checkpoint, an export, the run a config names, or a base model."""

    checkpoint: str | None = None  # a stage-1 or stage-2 checkpoint directory (.../best)
    stage1: str | None = None  # the stage 1 to pair with a stage-2 checkpoint (default: the one it records)
    export: str | None = None  # a directory written by `lolcats export`
    base: str | None = None  # base model: the checkpoint's recorded one when empty; alone, the model itself
    config: Config | None = None  # a config whose run has finished stages
    untrained: bool = False  # with config: its base model converted by its attention section, maps untrained
    trust_remote_code: bool = False  # allow the base model's own Python code (never taken from a checkpoint)
    base_config: ModelConfig | None = None  # alone: the base model in full (a checkpoint's recorded one)
    use: UseSettings = UseSettings()  # put on a linearized model in place of the ones its run recorded (the flags)

    def __post_init__(self):
        given = [k for k in ("checkpoint", "export", "config") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of --checkpoint, --export or a config, not {' and '.join(given)}")
        if self.export and (self.base or self.stage1):
            raise ValueError("an exported model needs no --base or --stage1 (it holds the whole model)")
        if self.untrained and (self.config is None or len(given) > 1):
            raise ValueError("--untrained converts the base model a config names; it takes no --checkpoint or --export")
        if not given and not self.base and not self.stage1 and self.base_config is None:
            raise ValueError("no model given: pass --checkpoint DIR (a stage checkpoint), --export DIR, "
                             "--base NAME, or --config FILE of a finished run")
        for key, value in dataclasses.asdict(self.use).items():
            if value is not None and not self.linearized:
                raise ValueError(f"{use_flag(key)} needs a linearized model (--checkpoint, --export or --config)")
        self.use.check(use_flag)

    @property
    def linearized(self) -> bool:
        return any((self.checkpoint, self.stage1, self.export, self.config))


def checkpoint_pair(source: ModelSource) -> tuple[str, str | None]:
    """(stage-1 directory, stage-2 directory or None) that ``source`` names."""
    if source.config is not None:
        s1, s2 = finished_checkpoints(source.config)
        return str(s1), (str(s2) if s2 else None)
    if source.checkpoint is None:
        return source.stage1, None
    stage = read_meta(source.checkpoint).get("stage")
    if stage == "distill":
        return source.checkpoint, None
    if stage != "finetune":
        raise CheckpointError(f"{source.checkpoint} is a {stage!r} checkpoint; give a stage-1 (distill) or "
                              "stage-2 (finetune) checkpoint")
    return source.stage1 or recorded_stage1(source.checkpoint), source.checkpoint


def recorded_stage1(stage2: str | Path) -> str:
    """The stage-1 checkpoint a stage-2 one records (relative to the stage-2 run directory)."""
    meta = read_meta(stage2)
    if not meta.get("stage1"):
        raise CheckpointError(f"{stage2}: meta.json names no stage-1 checkpoint; pass --stage1 DIR")
    path = (Path(stage2).resolve().parent / meta["stage1"]).resolve()
    if not path.is_dir():
        raise CheckpointError(f"stage-2 checkpoint {stage2} records its stage 1 at {path}, which does not exist: "
                              "copy the whole run directory, or pass --stage1 DIR")
    return str(path)


def base_model_config(stage1: str | Path, base: str | None = None, dtype: str = "auto",
                      trust_remote_code: bool = False) -> ModelConfig:
    """The base model to load a stage-1 checkpoint onto: ``base`` when given, else the recorded one."""
    if base:
        return ModelConfig(name=base, dtype=dtype, trust_remote_code=trust_remote_code)
    return locate_base(read_meta(stage1), stage1, dtype, trust_remote_code)


def base_source(source: ModelSource) -> ModelSource:
    """The base model of ``source``: ``--base`` when given, else the one its stage-1 checkpoint records."""
    if source.base or not source.linearized:
        return ModelSource(base=source.base, trust_remote_code=source.trust_remote_code,
                           base_config=source.base_config)
    if source.export:
        raise ValueError("comparing an exported model with its base needs --base NAME")
    stage1, _ = checkpoint_pair(source)
    cfg = base_model_config(stage1, trust_remote_code=source.trust_remote_code)
    return ModelSource(base=cfg.name, trust_remote_code=source.trust_remote_code, base_config=cfg)


def load_trained(source: ModelSource, device=None, dtype: str = "auto", merge: bool = True):
    """(model, tokenizer) in eval mode, student attention for linearized models, generation enabled; the
    load-time settings (the run's recorded ``use`` section, or the command's flags) set on a linearized model."""
    if not source.linearized and not source.untrained:
        cfg = source.base_config or ModelConfig(name=source.base, trust_remote_code=source.trust_remote_code)
        cfg = dataclasses.replace(cfg, dtype=dtype)
        return load_base_model(cfg, device), load_tokenizer(cfg)
    if source.untrained:
        model, tok = _load_untrained(source.config, device)
        apply_use(model, recorded_and(source.use, source.config.use))
    elif source.export:  # an export holds its settings in its config
        model, tok = _load_export(source.export, device, dtype)
        apply_use(model, source.use)
    else:
        stage1, stage2 = checkpoint_pair(source)
        trust = source.trust_remote_code or bool(source.config and source.config.model.trust_remote_code)
        recorded = source.config.use if source.config is not None else checkpoint_use(stage2 or stage1)
        model, tok = load_linearized(source.base, stage1, stage2, device, dtype, merge, trust,
                                     use=recorded_and(source.use, recorded))
    return model, tok


def checkpoint_use(directory: str | Path) -> UseSettings:
    """The ``use`` section a checkpoint's run recorded (empty for checkpoints made before it existed)."""
    return _meta_section(read_meta(directory).get("config") or {}, "use", directory)


def recorded_and(flags: UseSettings, recorded: UseSettings) -> UseSettings:
    """The settings a model is used with: ``recorded`` (its run's ``use`` section) with ``flags`` in their place
    (:meth:`UseSettings.over`); says which recorded settings stay."""
    kept = {k: v for k, v in dataclasses.asdict(recorded).items() if v is not None
            and (flags.linear_scale if k == "linear_scale" else flags.sparse_cache) is None}
    if kept:
        print("lolcats: used with the settings its run recorded (use: "
              + ", ".join(f"{k} {v}" for k, v in kept.items()) + ")", file=sys.stderr)
    return flags.over(recorded)


def apply_use(model, use: UseSettings) -> None:
    """Put the load-time settings ``use`` on a linearized ``model`` (its empty fields leave the model as it is):
    the one place every loader sets them."""
    if use.sparse_cache is not None:
        set_sparse_cache(model, use.sparse_cache, use.sparse_score, use.sparse_sink)
    if use.linear_scale is not None:
        set_linear_scale(model, use.linear_scale)


def _load_untrained(cfg: Config, device):
    """``cfg``'s base model converted by ``cfg.attention``: feature maps as initialised, not trained."""
    model = load_base_model(cfg.model, resolve_device(device))
    convert_model(model, cfg.attention)
    set_attention_mode(model, "student")
    enable_lolcats_generation(model)
    return model.eval(), load_tokenizer(cfg.model)


def _load_export(directory: str, device, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lolcats.hf  # noqa: F401  (registers the lolcats_* model types)

    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=resolve_dtype(dtype, dev)).to(dev).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def check_pair(stage1: str | Path, stage2: str | Path | None = None) -> None:
    """Everything about a checkpoint (pair) that can be checked without the model: the stages, the
    weights files, and that the stage 2 was trained on this stage 1 and the same base model."""
    meta1 = read_meta(stage1)
    if meta1.get("stage") != "distill":
        raise CheckpointError(f"{stage1} is a {meta1.get('stage')!r} checkpoint, not stage 1 (distill)")
    check_readable(stage1)
    if stage2 is None:
        return
    meta2 = read_meta(stage2)
    if meta2.get("stage") != "finetune":
        raise CheckpointError(f"{stage2} is a {meta2.get('stage')!r} checkpoint, not stage 2 (finetune)")
    check_readable(stage2)
    want = meta2.get("stage1_sha256")
    if want is not None:
        got = file_sha256(Path(stage1) / WEIGHTS)
        if got != want:
            raise CheckpointError(f"stage-2 checkpoint {stage2} was trained on another stage 1 than {stage1} (stage-1 "
                                  f"weights sha256 {want[:16]}, this one {got[:16]}): pass the --stage1 it was "
                                  "trained on (by default the one it records)")
    for key in ("base_fingerprint", "num_layers"):
        a, b = meta1.get(key), meta2.get(key)
        if a is not None and b is not None and a != b:
            raise CheckpointError(f"stage-2 checkpoint {stage2} does not belong to stage 1 {stage1}: {key} {b} vs {a}")


def _meta_section(meta: dict, section: str, where: str | Path):
    """``meta[section]`` as the typed config section (attention, finetune), validated like a config file."""
    try:
        return getattr(config_from_dict({section: meta.get(section) or {}}), section)
    except ConfigError as e:
        raise CheckpointError(f"{where}/meta.json: {e}") from None


def load_linearized(base: str | None, stage1: str | None, stage2: str | None = None, device=None,
                    dtype: str = "auto", merge: bool = True, trust_remote_code: bool = False,
                    use: UseSettings | None = None):
    """(model, tokenizer) of a linearized model from its checkpoints; ``base`` defaults to the
    checkpoint's recorded base model. With ``merge``, LoRA is merged into the weights.

    ``use``: the load-time settings it is used with; None = those its run recorded (the ``use`` section in
    the checkpoint's meta.json), as ``lolcats eval --checkpoint`` uses it; ``UseSettings()`` = as trained;
    ``recorded_and(UseSettings(linear_scale=1.0), checkpoint_use(stage2))`` changes one recorded setting."""
    if stage1 is None and stage2 is not None:
        stage1 = recorded_stage1(stage2)
    if stage1 is None:
        raise ValueError("load_linearized needs a stage-1 checkpoint (or a stage-2 one that names it)")
    if use is None:
        use = recorded_and(UseSettings(), checkpoint_use(stage2 or stage1))
    model, tok = _load_stages(base, stage1, stage2, device, dtype, merge, trust_remote_code)
    apply_use(model, use)
    return model, tok


def _load_stages(base: str | None, stage1: str, stage2: str | None, device, dtype: str, merge: bool,
                 trust_remote_code: bool):
    """(model, tokenizer) as trained: the base model converted and loaded with both stages' weights."""
    check_pair(stage1, stage2)
    finetune = _meta_section(read_meta(stage2), "finetune", stage2) if stage2 else None
    mcfg = base_model_config(stage1, base, dtype, trust_remote_code)
    with shared_gguf_reads():  # one parse of a GGUF base for its weights and tokenizer
        model = load_base_model(mcfg, resolve_device(device))
        tok = load_tokenizer(mcfg)
    fp = base_fingerprint(model)
    load_stage1(model, stage1, fp)
    if stage2:
        keep_softmax(model, read_meta(stage2).get("softmax_layers") or [])  # the layers stage 2 kept as softmax
        if merge:  # the adapters straight into the weights (peft's merge_and_unload, without building peft)
            merge_stage2(model, stage2, finetune, fp)
        else:
            model = add_lora(model, finetune)
            load_stage2(model, stage2, fp)
    set_attention_mode(model, "student")
    enable_lolcats_generation(model)
    return model.eval(), tok


def load_stage1(model, directory: str | Path, fingerprint: str | None = None) -> dict:
    """Convert ``model`` as the checkpoint says (if not yet) and load phi and window factors."""
    meta = read_meta(directory)
    if meta.get("stage") != "distill":
        raise CheckpointError(f"{directory} is a {meta.get('stage')!r} checkpoint, not stage 1 (distill)")
    check_base(meta, fingerprint or base_fingerprint(model), directory)
    attn_cfg = _meta_section(meta, "attention", directory)
    if meta.get("num_layers") not in (None, model.config.num_hidden_layers):
        raise CheckpointError(f"checkpoint {directory} is for {meta['num_layers']} layers; "
                              f"the model has {model.config.num_hidden_layers}")
    convert_model(model, attn_cfg)
    _load_named(model, stage1_checkpoint_names(model, attn_cfg.train_window_factor), directory)
    return meta


def load_stage2(peft_model, directory: str | Path, fingerprint: str | None = None) -> dict:
    """Load a stage-2 checkpoint's LoRA weights into ``peft_model`` (made by ``add_lora``)."""
    meta = _stage2_meta(directory, fingerprint)
    _load_named(peft_model, lora_checkpoint_names(peft_model), directory)
    return meta


def merge_stage2(model, directory: str | Path, finetune: FinetuneConfig, fingerprint: str | None = None) -> dict:
    """Merge a stage-2 checkpoint's LoRA weights into ``model`` (not wrapped by peft): every name and shape
    checked first, as ``load_stage2`` checks them."""
    meta = _stage2_meta(directory, fingerprint)
    tensors = load_tensors(directory)
    check_fits(merge_shapes(model, finetune), tensors, directory)
    merge_lora(model, tensors, finetune)
    return meta


def _stage2_meta(directory: str | Path, fingerprint: str | None) -> dict:
    meta = read_meta(directory)
    if meta.get("stage") != "finetune":
        raise CheckpointError(f"{directory} is a {meta.get('stage')!r} checkpoint, not stage 2 (finetune)")
    if fingerprint is not None:
        check_base(meta, fingerprint, directory)
    return meta


def _load_named(model, names: dict[str, str], directory: str | Path) -> None:
    """Load ``directory``'s tensors ({checkpoint name: parameter name}) into ``model``: every name and
    shape checked, then copied (into this rank's shards when FSDP-sharded)."""
    params = dict(model.named_parameters())
    tensors = load_tensors(directory)
    check_fits({k: tuple(params[n].shape) for k, n in names.items()}, tensors, directory)
    dist.load_full_state_dict(model, {names[k]: t.to(params[names[k]].dtype) for k, t in tensors.items()})

