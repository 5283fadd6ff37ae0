"""The LoLCATs recipe end to end: load, swap, attention transfer, LoRA, checkpoints, export.

Run directories are derived from the config: ``<output_dir>/<name>/distill-<hash>`` where the
hash covers everything stage 1 depends on (model, attention, data, distill, seed), and
``.../finetune-<hash>`` likewise (plus the finetune section). A finished stage (its
``summary.json`` exists) with the same config is not run again; an unfinished one resumes.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lolcats import distributed as dist
from lolcats.attention.convert import (attention_parameters, convert_model, set_attention_mode,
                                       set_attention_trainable)
from lolcats.checkpoint import (CheckpointError, check_base, check_fits, load_into, load_tensors, read_meta,
                               save_checkpoint)
from lolcats.config import AttentionConfig, Config, ModelConfig, save_config
from lolcats.models.loading import base_fingerprint, load_base_model, load_tokenizer, resolve_device
from lolcats.training.blockwise import train_blockwise
from lolcats.training.stages import add_lora, distill_stage, finetune_stage, lm_validate, lora_parameters
from lolcats.training.trainer import SUMMARY, StageResult, train_stage

STAGE1_SECTIONS = ("model", "attention", "data", "distill")


@dataclass
class Context:
    cfg: Config
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    fingerprint: str
    train: torch.Tensor  # (N, T)
    val: torch.Tensor  # (M, T)
    info: dist.DistInfo | None = None  # this process's place under torchrun (None: one process)

    @property
    def distributed(self) -> bool:
        return self.info is not None and self.info.distributed

    @property
    def is_main(self) -> bool:
        return self.info is None or self.info.is_main


def run_name(cfg: Config) -> str:
    if cfg.run.name:
        return cfg.run.name
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", Path(cfg.model.name).name.removesuffix(".gguf")).strip("-").lower()
    return f"{slug}-{cfg.attention.kind.replace('_window', '')}-{cfg.attention.feature_map}"


def stage_dirs(cfg: Config) -> tuple[Path, Path]:
    root = Path(cfg.run.output_dir) / run_name(cfg)
    fp1 = cfg.fingerprint(*STAGE1_SECTIONS) + f"-s{cfg.run.seed}"
    fp2 = cfg.fingerprint(*STAGE1_SECTIONS, "finetune") + f"-s{cfg.run.seed}"
    return root / f"distill-{fp1}", root / f"finetune-{fp2}"


def stage_done(directory: Path) -> bool:
    return (directory / SUMMARY).is_file() and (directory / "best" / "meta.json").is_file()


def prepare(cfg: Config) -> Context:
    """Load the base model, tokenizer and packed data (from the tokenised cache when present)."""
    from lolcats.data import build_data

    info = dist.init_distributed(_dist_device(cfg.run.device))  # no-op outside torchrun
    device = info.device if info.distributed else resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    tok = load_tokenizer(cfg.model)
    if not info.is_main:
        dist.barrier()  # rank 0 tokenises and writes the cache first
    data = build_data(cfg.data, tok, seed=cfg.run.seed)
    if info.is_main:
        dist.barrier()
    model = load_base_model(cfg.model, device)
    return Context(cfg, model, tok, device, base_fingerprint(model), data.train, data.val, info)


def _dist_device(name: str) -> str:
    """init_distributed's device kind (auto, cuda or cpu) for a run.device value."""
    return "cuda" if name.startswith("cuda") else name if name in ("cpu", "auto") else "auto"


def _bf16(ctx: Context) -> bool:
    return ctx.model.get_input_embeddings().weight.dtype == torch.bfloat16


def _save(ctx: Context, directory: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Rank 0 writes; ``tensors`` are full (gathered on every rank before this call)."""
    if ctx.is_main:
        save_checkpoint(directory, tensors, meta)
    dist.barrier()


def _shard_for_distill(ctx: Context) -> None:
    """Under torchrun: FSDP2 over the converted model, feature maps in their own units."""
    if not ctx.distributed:
        return
    if ctx.cfg.distill.block_size:
        raise NotImplementedError("block-wise attention transfer runs one process per block, not under "
                                  "torchrun: start one process per GPU with LOLCATS_BLOCKS=<blocks>")
    set_attention_trainable(ctx.model, True, ctx.cfg.attention.train_window_factor)  # before sharding
    dist.shard_model(ctx.model, mixed_precision=_bf16(ctx), activation_checkpointing=False, info=ctx.info,
                     strategy=_strategy(ctx))


def _strategy(ctx: Context) -> str:
    return dist.choose_strategy(ctx.model, ctx.cfg.run.parallel, ctx.device)


def _meta(ctx: Context, stage: str, metrics: dict) -> dict:
    return {"stage": stage, "base_model": ctx.cfg.model.name, "base_fingerprint": ctx.fingerprint,
            "attention": asdict(ctx.cfg.attention), "finetune": asdict(ctx.cfg.finetune),
            "config": ctx.cfg.to_dict(), "metrics": metrics,
            "num_layers": ctx.model.config.num_hidden_layers}


def base_perplexity(ctx: Context) -> float:
    """Validation loss of the unconverted model (teacher mode if converted)."""
    set_attention_mode(ctx.model, "teacher")
    loss, _ = lm_validate(ctx.model, ctx.val, ctx.cfg.finetune.precision, ctx.device,
                          ctx.cfg.finetune.micro_batch_size)
    return loss


def student_perplexity(ctx: Context, model=None) -> float:
    model = ctx.model if model is None else model
    set_attention_mode(model, "student")
    loss, _ = lm_validate(model, ctx.val, ctx.cfg.finetune.precision, ctx.device, ctx.cfg.finetune.micro_batch_size)
    return loss


def run_distill(ctx: Context, on_step=None, blocks: list[int] | None = None) -> StageResult | None:
    """Stage 1 (skipped when already done); leaves ctx.model converted with the best weights.

    With ``distill.block_size`` set, layers train block by block from stored teacher states
    (:mod:`lolcats.training.blockwise`); ``blocks`` (or $LOLCATS_BLOCKS) picks the blocks this
    call trains. Returns None when the stage was done already, or, block-wise, while other
    blocks are still to train (the model then keeps its untrained feature maps).
    """
    d1, _ = stage_dirs(ctx.cfg)
    convert_model(ctx.model, ctx.cfg.attention)
    result = None
    if not stage_done(d1):
        d1.mkdir(parents=True, exist_ok=True)
        if ctx.is_main:
            save_config(ctx.cfg, d1 / "config.yaml")
        _shard_for_distill(ctx)
        if ctx.cfg.distill.block_size:
            result = train_blockwise(ctx.model, ctx.cfg, ctx.train, ctx.val, d1, ctx.fingerprint, ctx.device,
                                     lambda stage, metrics: _meta(ctx, stage, metrics), on_step, blocks)
            if result is None:
                return None
        else:
            def save(directory, metrics):
                names = set(attention_parameters(ctx.model))
                tensors = dist.gather_trainable_state_dict(ctx.model, names)  # collective
                _save(ctx, directory, tensors, _meta(ctx, "distill", metrics))

            stage = distill_stage(ctx.model, ctx.cfg, ctx.val, ctx.device, save)
            result = train_stage(stage, ctx.train, d1, ctx.cfg.run.seed, ctx.device, ctx.cfg.run.progress, on_step)
    load_stage1(ctx.model, d1 / "best", ctx.fingerprint)
    set_attention_mode(ctx.model, "student")
    return result


def run_finetune(ctx: Context, on_step=None):
    """Stage 2 (after stage 1); returns (peft model with the best LoRA weights, result or None)."""
    d1, d2 = stage_dirs(ctx.cfg)
    if not stage_done(d1):
        raise RuntimeError(f"stage 1 has not finished: {d1} (run `lolcats distill` first)")
    if dist.is_sharded(ctx.model):  # sharded for stage 1: LoRA goes into a fresh, unsharded copy
        ctx.model = load_base_model(ctx.cfg.model, ctx.device)
        load_stage1(ctx.model, d1 / "best", ctx.fingerprint)
    model = add_lora(ctx.model, ctx.cfg)
    result = None
    if not stage_done(d2):
        d2.mkdir(parents=True, exist_ok=True)
        if ctx.is_main:
            save_config(ctx.cfg, d2 / "config.yaml")
        if ctx.distributed:
            strategy = _strategy(ctx)  # sharded: checkpoint activations to make room; replicated: as one GPU
            dist.shard_model(model, mixed_precision=_bf16(ctx), activation_checkpointing=strategy == "fsdp",
                             info=ctx.info, separate_trainable=False, strategy=strategy)  # loss flows through layers

        def save(directory, metrics):
            meta = _meta(ctx, "finetune", metrics)
            meta["stage1"] = str(Path("..") / d1.name / "best")  # relative to d2 (the run directory)
            _save(ctx, directory, lora_state(model), meta)  # lora_state gathers on every rank

        stage = finetune_stage(model, ctx.cfg, ctx.val, ctx.device, save)
        result = train_stage(stage, ctx.train, d2, ctx.cfg.run.seed, ctx.device, ctx.cfg.run.progress, on_step)
    load_stage2(model, d2 / "best", ctx.fingerprint)
    return model, result


def lora_state(model) -> dict[str, torch.Tensor]:
    """LoRA weights by peft's state-dict names, full CPU tensors (collective when FSDP-sharded)."""
    from peft import get_peft_model_state_dict

    return {k: _full_cpu(v) for k, v in get_peft_model_state_dict(model).items()}


def _full_cpu(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu()


def _load_params(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], directory) -> None:
    """load_into (names and shapes checked) that also fills FSDP2-sharded parameters."""
    if not any(hasattr(p, "device_mesh") for p in params.values()):
        load_into(params, tensors, directory)
        return
    check_fits({n: tuple(p.shape) for n, p in params.items()}, tensors, directory)
    from lolcats.training.trainer import _copy_full_into

    with torch.no_grad():
        for n, p in params.items():
            _copy_full_into(p, tensors[n])


# ---------------------------------------------------------------- loading checkpoints


def load_stage1(model, directory: str | Path, fingerprint: str | None = None) -> dict:
    """Convert ``model`` as the checkpoint says (if not yet) and load φ and window factors."""
    meta = read_meta(directory)
    if meta.get("stage") != "distill":
        raise CheckpointError(f"{directory} is a {meta.get('stage')!r} checkpoint, not stage 1 (distill)")
    check_base(meta, fingerprint or base_fingerprint(model), directory)
    attn_cfg = AttentionConfig(**meta["attention"])
    if meta.get("num_layers") not in (None, model.config.num_hidden_layers):
        raise CheckpointError(f"checkpoint {directory} is for {meta['num_layers']} layers; "
                              f"the model has {model.config.num_hidden_layers}")
    convert_model(model, attn_cfg)
    _load_params(attention_parameters(model), load_tensors(directory), directory)
    return meta


def load_stage2(peft_model, directory: str | Path, fingerprint: str | None = None) -> dict:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    meta = read_meta(directory)
    if meta.get("stage") != "finetune":
        raise CheckpointError(f"{directory} is a {meta.get('stage')!r} checkpoint, not stage 2 (finetune)")
    if fingerprint is not None:
        check_base(meta, fingerprint, directory)
    tensors = load_tensors(directory)
    if dist.is_sharded(peft_model):  # peft's names drop the adapter name of the parameters'
        params = {n.replace(".default.", "."): p for n, p in lora_parameters(peft_model).items()}
        _load_params(params, tensors, directory)
        return meta
    check_fits({n: tuple(t.shape) for n, t in get_peft_model_state_dict(peft_model).items()}, tensors, directory)
    set_peft_model_state_dict(peft_model, tensors)
    return meta


def load_linearized(base: str | None, stage1: str | None, stage2: str | None = None, device=None,
                    dtype: str = "auto", merge: bool = True):
    """(model, tokenizer) of a linearized model from its checkpoints; ``base`` defaults to the
    checkpoint's recorded base model. With ``merge``, LoRA is merged into the weights."""
    meta2 = read_meta(stage2) if stage2 else None
    if stage1 is None and meta2 is not None:  # recorded relative to the stage-2 run directory
        stage1 = str((Path(stage2).resolve().parent / meta2["stage1"]).resolve())
    if stage1 is None:
        raise ValueError("load_linearized needs a stage-1 checkpoint (or a stage-2 one that names it)")
    meta1 = read_meta(stage1)
    mcfg = ModelConfig(**{**meta1["config"]["model"], **({"name": base} if base else {}), "dtype": dtype})
    device = resolve_device("auto") if device is None else torch.device(device)
    model = load_base_model(mcfg, device)
    tok = load_tokenizer(mcfg)
    fp = base_fingerprint(model)
    load_stage1(model, stage1, fp)
    if stage2:
        cfg = Config()
        for k, v in meta2["finetune"].items():
            setattr(cfg.finetune, k, v)
        model = add_lora(model, cfg)
        load_stage2(model, stage2, fp)
        if merge:
            model = model.merge_and_unload()
    set_attention_mode(model, "student")
    _enable_generation(model)
    return model.eval(), tok


def _enable_generation(model) -> None:
    try:
        from lolcats.generation.cache import enable_lolcats_generation
    except ImportError:
        return
    enable_lolcats_generation(model)


# ---------------------------------------------------------------- the whole recipe


def linearize(cfg: Config, on_step=None) -> dict:
    """Both stages, printing validation perplexity of the base model and after each stage."""
    t0 = time.time()
    ctx = prepare(cfg)
    report: dict = {"run_dirs": [str(d) for d in stage_dirs(cfg)], "train_tokens": int(ctx.train.numel()),
                    "val_tokens": int(ctx.val.numel())}
    report["base"] = {"val_loss": base_perplexity(ctx)}
    r1 = run_distill(ctx, on_step)
    if not stage_done(stage_dirs(cfg)[0]):
        raise RuntimeError(f"stage 1 is not finished in {stage_dirs(cfg)[0]} (blocks left to train)")
    report["stage1"] = {"val_loss": student_perplexity(ctx), **_stage_summary(r1, stage_dirs(cfg)[0])}
    model, r2 = run_finetune(ctx, on_step)
    report["stage2"] = {"val_loss": student_perplexity(ctx, model), **_stage_summary(r2, stage_dirs(cfg)[1])}
    for k in ("base", "stage1", "stage2"):
        report[k]["ppl"] = math.exp(min(report[k]["val_loss"], 50))
    report["seconds"] = time.time() - t0
    if ctx.is_main:
        (stage_dirs(cfg)[1].parent / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _stage_summary(result: StageResult | None, directory: Path) -> dict:
    if result is None:
        s = json.loads((directory / SUMMARY).read_text())
        s["skipped"] = True
    else:
        s = result.to_dict()
    s.pop("history", None)
    return s


def format_report(report: dict) -> str:
    lines = ["", "| model | val loss | val ppl | stage time (s) | tokens | trainable params |",
             "|---|---|---|---|---|---|"]
    for k, label in (("base", "base (softmax)"), ("stage1", "after attention transfer"),
                     ("stage2", "after LoRA (linearized)")):
        r = report[k]
        tr = f"{r['trainable']:,} ({100 * r['trainable'] / max(r['total'], 1):.3f}%)" if "trainable" in r else "-"
        secs = f"{r['seconds']:.0f}" + (" (done earlier)" if r.get("skipped") else "") if "seconds" in r else "-"
        tok = f"{r['tokens']:,}" if "tokens" in r else "-"
        lines.append(f"| {label} | {r['val_loss']:.4f} | {r['ppl']:.2f} | {secs} | {tok} | {tr} |")
    lines.append(f"\nrun directories: {', '.join(report['run_dirs'])}; total {report['seconds']:.0f} s")
    return "\n".join(lines)
