"""The LoLCATs recipe, top to bottom: load, swap, attention transfer, LoRA.

    ctx = prepare(cfg)          # base model, tokenizer, packed train/val data (one process or torchrun)
    run_distill(ctx)            # stage 1 (skipped when done); ctx.model converted, best phi loaded
    model, _ = run_finetune(ctx)   # stage 2 on top (skipped when done); best LoRA loaded
    linearize(cfg)              # all of it, with validation perplexity before and after each stage

Where each stage trains and when it counts as done: :mod:`lolcats.runs`. Loading a trained model
for use: :mod:`lolcats.models.trained` (``load_linearized`` is re-exported here).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lolcats import distributed as dist
from lolcats.attention.convert import convert_model, keep_softmax
from lolcats.attention.layers import softmax_layers
from lolcats.attention.modes import set_attention_mode
from lolcats.attention.params import set_attention_trainable, stage1_checkpoint_names
from lolcats.checkpoint import WEIGHTS, atomic_write, file_sha256, read_meta, save_checkpoint, write_json
from lolcats.config import Config, save_config
from lolcats.data import build_data, check_sources
from lolcats.models.checks import check_model_settings
from lolcats.models.gguf_cache import shared_gguf_reads
from lolcats.models.loading import Build, base_fingerprint, load_base_model, load_tokenizer, model_config
from lolcats.models.locator import base_locator
from lolcats.models.lora import add_lora
from lolcats.models.trained import load_linearized, load_stage1, load_stage2
from lolcats.runs import BEST, CONFIG, STATE, SUMMARY, check_output_dir, lock_dir, stage_dirs, stage_done
from lolcats.runtime import resolve_device, resolve_dtype
from lolcats.training.blockwise import train_blockwise
from lolcats.training.stages import MSE_LOG, distill_stage, finetune_stage, layer_mse, lm_validate, top_layers
from lolcats.training.state import check_state
from lolcats.training.trainer import StageResult, train_stage

__all__ = ["Context", "prepare", "run_distill", "run_finetune", "linearize", "lock_run", "base_perplexity",
           "student_perplexity", "load_linearized", "stage_dirs", "stage_done"]


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
    strategy: str | None = None  # under torchrun: fsdp (built sharded) or replicate; None: one process

    @property
    def distributed(self) -> bool:
        return self.info is not None and self.info.distributed

    @property
    def is_main(self) -> bool:
        return self.info is None or self.info.is_main


# ---------------------------------------------------------------- set-up


def prepare(cfg: Config) -> Context:
    """Check the settings, then load the base model, tokenizer and packed data (from the tokenised
    cache when present). Whatever can be checked before loading is: the output directory, the device,
    resume states, the data sources, and the settings against the model's architecture (from its config).

    Under torchrun with ``run.parallel`` fsdp (decided from the config, before loading) the model
    is built sharded: converted for stage 1 on the meta device, FSDP2-wrapped, and each rank
    reads only its rows of the weights (:class:`~lolcats.models.loading.Build`).
    """
    check_output_dir(cfg)
    resolve_device(cfg.run.device)  # a device that is not there (cuda on a CPU machine) stops here
    for d in stage_dirs(cfg):
        if (d / STATE).is_file() and not stage_done(d):
            check_state(d / STATE)
    check_sources(cfg.data)
    with shared_gguf_reads():  # a GGUF base is parsed once for its config, tokenizer and weights
        hf_config = model_config(cfg.model)
        check_model_settings(cfg, hf_config)
        info = dist.init_distributed(_dist_device(cfg.run.device))  # no-op outside torchrun
        device = info.device if info.distributed else resolve_device(cfg.run.device)
        strategy = (dist.choose_strategy(lambda: _weight_bytes(cfg, device), cfg.run.parallel, device)
                    if info.distributed else None)
        torch.manual_seed(cfg.run.seed)
        tok = load_tokenizer(cfg.model)
        if not info.is_main:
            dist.barrier()  # rank 0 tokenises and writes the cache first
        data = build_data(cfg.data, tok, seed=cfg.run.seed)
        if info.is_main:
            dist.barrier()
        build = None
        if strategy == "fsdp":
            build = Build(edit=lambda m: _for_distill(m, cfg), shard=_sharder(info, strategy, "distill"))
        model = load_base_model(cfg.model, device, config=hf_config, build=build)
    return Context(cfg, model, tok, device, base_fingerprint(model), data.train, data.val, info, strategy)


def _weight_bytes(cfg: Config, device: torch.device) -> int:
    """The base weights' bytes, counted from the model's config (nothing loaded)."""
    from lolcats.plan import Shape, config_from_model_name

    params = Shape.from_config(config_from_model_name(cfg)).total_params()
    return params * resolve_dtype(cfg.model.dtype, device).itemsize


def _for_distill(model, cfg: Config):
    """Stage 1's model: converted, feature maps (and window factors) trainable."""
    convert_model(model, cfg.attention)
    set_attention_trainable(model, True, cfg.attention.train_window_factor)
    return model


def _for_finetune(model, cfg: Config, stage1: Path, fingerprint: str, kept: list[int]):
    """Stage 2's model: stage 1's best loaded, the layers ``kept`` as softmax, LoRA added (seeded by ``run.seed``)."""
    load_stage1(model, stage1, fingerprint)
    return _with_lora(model, cfg, kept)


def _with_lora(model, cfg: Config, kept: list[int]):
    """The layers ``kept`` turned back into softmax, then LoRA added (seeded by ``run.seed``)."""
    if kept:
        keep_softmax(model, kept)
    return add_lora(model, cfg.finetune, cfg.run.seed)


PICK = "softmax_pick.json"  # in the stage-2 directory: the layers attention.softmax_count keeps, and why


def _softmax_pick(ctx: Context, d1: Path, d2: Path) -> list[int]:
    """The layers ``attention.softmax_count`` keeps as softmax in stage 2 (none without it), picked once per stage-2
    directory (a resumed stage 2 reads ``softmax_pick.json``): by stage-1 validation MSE, by the base model's
    retrieval heads (``attention.softmax_pick: retrieval``, scored on ``ctx.model`` in teacher mode), or by the KL
    drop on needle answers when one stage-1 layer is restored to softmax (``kl``)."""
    a = ctx.cfg.attention
    if not a.softmax_count:
        return []
    if (d2 / PICK).exists():
        return json.loads((d2 / PICK).read_text())["layers"]
    probe = None
    if a.softmax_pick == "retrieval":
        from lolcats.evaluation.recall import retrieval_scores

        scores, what = retrieval_scores(ctx.model, ctx.tokenizer), "retrieval scores"  # the converted layers
    elif a.softmax_pick == "kl":
        scores, probe = _kl_pick_scores(ctx)
        what = "KL drops on the answers of needle prompts"
    else:
        scores, what = layer_mse(read_meta(d1 / BEST)["metrics"]), f"stage-1 MSE logs ({MSE_LOG}<layer> in its metrics)"
    kept = top_layers(scores, a.softmax_count, what)
    if ctx.is_main:
        d2.mkdir(parents=True, exist_ok=True)
        write_json(d2 / PICK, {"by": a.softmax_pick, "scores": {str(i): v for i, v in sorted(scores.items())},
                               "layers": kept, **({"probe": probe} if probe else {})})
    return kept


def _kl_pick_scores(ctx: Context) -> tuple[dict[int, float], dict]:
    """``attention.softmax_pick: kl``: each converted layer's KL drop when restored (``evaluation.layer_pick``), on
    RULER single-needle prompts whose haystack is the run's first local training file (natural text of the run's
    own data), or on passkey prompts when that is a Hub dataset; lengths up to the model's context."""
    from lolcats.evaluation.layer_pick import restore_kl_scores
    from lolcats.evaluation.recall import RecallSettings, build_samples, lengths_in_context

    a = ctx.cfg.attention
    lengths = lengths_in_context(ctx.model, a.softmax_pick_lengths)

    def prompts(task: str, haystack: str | None) -> list:
        settings = RecallSettings(tasks=(task,), lengths=tuple(lengths), samples=a.softmax_pick_samples,
                                  haystack=haystack, seed=ctx.cfg.run.seed)
        return [s for n in lengths for s in build_samples(ctx.tokenizer, task, n, settings)]

    first, samples = ctx.cfg.data.train[0], None
    probe: dict = {"lengths": lengths, "task": "niah_single", "haystack": first}
    if Path(first).is_file():
        try:
            samples = prompts("niah_single", first)
        except ValueError as e:  # a training text too short to hide a needle in: the passkey prompts
            probe["not_niah_single"] = str(e)
    if samples is None:
        probe.update(task="passkey", haystack=None)
        samples = prompts("passkey", None)
    probe["samples"] = len(samples)
    return restore_kl_scores(ctx.model, samples), probe


@contextlib.contextmanager
def lock_run(cfg: Config, stages: tuple[str, ...] = ("distill", "finetune")):
    """Hold the locks of the stage directories this run will train in (the unfinished ones of
    ``stages``), so a second run of the same config stops at start-up. Block-wise stage 1 locks
    each block instead (its block processes share the stage directory)."""
    check_output_dir(cfg)
    dirs = [d for name, d in zip(("distill", "finetune"), stage_dirs(cfg))
            if name in stages and not stage_done(d) and not (name == "distill" and cfg.distill.block_size)]
    with contextlib.ExitStack() as stack:
        for d in dirs:
            stack.enter_context(lock_dir(d))
        yield


def _dist_device(name: str) -> str:
    """init_distributed's device kind (auto, cuda or cpu) for a run.device value."""
    return "cuda" if name.startswith("cuda") else name if name in ("cpu", "auto") else "auto"


def checkpoint_meta(ctx: Context, stage: str) -> dict:
    """What a stage's checkpoint records besides its tensors (the trainer adds the metrics)."""
    return {"stage": stage, "base_model": ctx.cfg.model.name, "base_fingerprint": ctx.fingerprint,
            "base": base_locator(ctx.cfg.model, ctx.fingerprint), "attention": asdict(ctx.cfg.attention),
            "finetune": asdict(ctx.cfg.finetune), "config": ctx.cfg.saved_dict(),
            "num_layers": ctx.model.config.num_hidden_layers}


def _start(ctx: Context, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        atomic_write(directory / CONFIG, lambda p: save_config(ctx.cfg, p))


def _sharder(info: dist.DistInfo, strategy: str, stage: str):
    """model -> model: FSDP2 units or replicas for ``stage`` under torchrun (as ``run.parallel`` decided)."""
    def shard(model):
        if dist.is_sharded(model):  # built sharded already
            return model
        bf16 = model.get_input_embeddings().weight.dtype == torch.bfloat16
        if stage == "distill":  # feature maps in their own units: the loss does not flow through the layers
            return dist.shard_model(model, mixed_precision=bf16, activation_checkpointing=False, info=info,
                                    strategy=strategy)
        return dist.shard_model(model, mixed_precision=bf16, activation_checkpointing=strategy == "fsdp",
                                info=info, separate_trainable=False, strategy=strategy)
    return shard


def _shard(ctx: Context, model, stage: str):
    """Under torchrun: FSDP2 or replicas as ``run.parallel`` decided (no-op on one process)."""
    return _sharder(ctx.info, ctx.strategy, stage)(model) if ctx.distributed else model


# ---------------------------------------------------------------- the stages


def run_distill(ctx: Context, on_step=None, blocks: list[int] | None = None) -> StageResult | None:
    """Stage 1 (skipped when already done); leaves ctx.model converted with the best weights.

    With ``distill.block_size`` set, layers train block by block from stored teacher states
    (:mod:`lolcats.training.blockwise`; under torchrun the ranks share the teacher pass and
    train their blocks side by side); ``blocks`` (or $LOLCATS_BLOCKS) picks the blocks this
    call trains. Returns None when the stage was done already, or, block-wise, while other
    blocks are still to train (the model then keeps its untrained feature maps).
    """
    d1, _ = stage_dirs(ctx.cfg)
    convert_model(ctx.model, ctx.cfg.attention)
    result = None
    if not stage_done(d1):
        _start(ctx, d1)
        meta = checkpoint_meta(ctx, "distill")
        if not stage1_checkpoint_names(ctx.model, ctx.cfg.attention.train_window_factor):
            result = _nothing_to_transfer(ctx, d1, meta)  # every layer kept softmax
        elif ctx.cfg.distill.block_size:
            result = train_blockwise(ctx.model, ctx.cfg, ctx.train, ctx.val, d1, ctx.fingerprint, ctx.device,
                                     meta, on_step, blocks)
            if result is None:
                return None
        else:
            set_attention_trainable(ctx.model, True, ctx.cfg.attention.train_window_factor)  # before sharding
            _shard(ctx, ctx.model, "distill")
            stage = distill_stage(ctx.model, ctx.cfg, ctx.val, ctx.device, meta)
            result = train_stage(stage, ctx.train, d1, ctx.cfg.run.seed, ctx.device, ctx.cfg.run.progress, on_step)
    load_stage1(ctx.model, d1 / BEST, ctx.fingerprint)
    set_attention_mode(ctx.model, "student")
    return result


def _nothing_to_transfer(ctx: Context, d1: Path, meta: dict) -> StageResult:
    """Stage 1 of a model that keeps every layer softmax: an empty checkpoint, no steps."""
    result = StageResult(0.0, {}, 0, 0, 0.0, 0, sum(p.numel() for p in ctx.model.parameters()))
    if ctx.is_main:
        save_checkpoint(d1 / BEST, {}, {**meta, "metrics": {}})
        write_json(d1 / SUMMARY, result.to_dict())
    dist.barrier()
    return result


def run_finetune(ctx: Context, on_step=None):
    """Stage 2 (after stage 1); returns (peft model with the best LoRA weights, result or None)."""
    d1, d2 = stage_dirs(ctx.cfg)
    if not stage_done(d1):
        raise RuntimeError(f"stage 1 has not finished: {d1} (run `lolcats distill` first)")
    kept = _softmax_pick(ctx, d1, d2)
    if ctx.strategy == "fsdp":  # LoRA goes in before sharding: a fresh model, built sharded with it
        ctx.model = None  # stage 1's shards go first
        build = Build(edit=lambda m: _for_finetune(m, ctx.cfg, d1 / BEST, ctx.fingerprint, kept),
                      shard=_sharder(ctx.info, ctx.strategy, "finetune"))
        ctx.model = model = load_base_model(ctx.cfg.model, ctx.device, build=build)
    else:
        model = _with_lora(ctx.model, ctx.cfg, kept)
    result = None
    if not stage_done(d2):
        _start(ctx, d2)
        _shard(ctx, model, "finetune")
        meta = {**checkpoint_meta(ctx, "finetune"), "stage1": str(Path("..") / d1.name / BEST),  # from d2
                "stage1_sha256": file_sha256(d1 / BEST / WEIGHTS),
                "softmax_layers": softmax_layers(model)}  # load_linearized keeps the same ones
        stage = finetune_stage(model, ctx.cfg, ctx.val, ctx.device, meta)
        result = train_stage(stage, ctx.train, d2, ctx.cfg.run.seed, ctx.device, ctx.cfg.run.progress, on_step)
    load_stage2(model, d2 / BEST, ctx.fingerprint)
    return model, result


# ---------------------------------------------------------------- the whole recipe


def base_perplexity(ctx: Context) -> float:
    """Validation loss of the unconverted model (teacher mode if converted)."""
    set_attention_mode(ctx.model, "teacher")
    return _val_loss(ctx, ctx.model)


def student_perplexity(ctx: Context, model=None) -> float:
    """Validation loss of the converted model (``model``, default ``ctx.model``) in student mode."""
    model = ctx.model if model is None else model
    set_attention_mode(model, "student")
    return _val_loss(ctx, model)


def _val_loss(ctx: Context, model) -> float:
    f = ctx.cfg.finetune
    return lm_validate(model, ctx.val, f.precision, ctx.device, f.micro_batch_size)[0]


def linearize(cfg: Config, on_step=None) -> dict:
    """Both stages, with the validation loss of the base model and after each stage; writes report.json."""
    t0 = time.time()
    with lock_run(cfg):
        ctx = prepare(cfg)
        d1, d2 = stage_dirs(cfg)
        report: dict = {"run_dirs": [str(d1), str(d2)], "train_tokens": int(ctx.train.numel()),
                        "val_tokens": int(ctx.val.numel())}
        report["base"] = {"val_loss": base_perplexity(ctx)}
        r1 = run_distill(ctx, on_step)
        if not stage_done(d1):
            raise RuntimeError(f"stage 1 is not finished in {d1} (blocks left to train)")
        report["stage1"] = {"val_loss": student_perplexity(ctx), **_stage_summary(r1, d1)}
        model, r2 = run_finetune(ctx, on_step)
    report["stage2"] = {"val_loss": student_perplexity(ctx, model), **_stage_summary(r2, d2)}
    for k in ("base", "stage1", "stage2"):
        report[k]["ppl"] = math.exp(min(report[k]["val_loss"], 50))
    report["seconds"] = time.time() - t0
    if ctx.is_main:
        write_json(d2.parent / "report.json", report)
    return report


def _stage_summary(result: StageResult | None, directory: Path) -> dict:
    if result is None:
        s = json.loads((directory / SUMMARY).read_text())
        s["skipped"] = True
    else:
        s = result.to_dict()
    s.pop("history", None)
    return s
