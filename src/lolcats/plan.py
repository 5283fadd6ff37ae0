"""``lolcats plan``: per-GPU memory and disk of each stage, before anything runs.

Parameters are counted exactly from the model config (no weights needed); memory is an
estimate, per GPU, with FSDP sharding weights, gradients and optimiser states over ``N`` GPUs:

* frozen weights: ``2 P_frozen / N`` bytes (bf16), plus, when sharded, the all-gather buffers
  of two units (the layer in use and the one prefetched): ``2 x 2 x P_layer``;
* trainable: ``16 P_train / N`` (fp32 weight, fp32 gradient, AdamW's two fp32 moments);
* activations for ``micro_batch_size x seq_len`` tokens (``B T``):
  - attention transfer keeps, per converted layer, only the attention part (q, k, v are
    detached): fp32 inputs of the feature maps ``(H + Hk) D``, their projections and the
    softmax/concat outputs ``(H + Hk) 5F`` (hedgehog; t2r ``2F``), v ``Hk D`` and the student
    and teacher outputs ``2 H D``, all ``4 B T`` bytes; ``xent`` adds two ``(B, H, T, T)``
    fp32 maps per layer; plus one layer's full forward as working memory;
  - LoRA finetuning with activation checkpointing keeps one bf16 hidden state per layer
    ``2 B T d L`` plus one layer's full activations (bf16: ``4d + 4HD + 3HkD + 4I`` per
    token, plus the student attention's fp32 feature-map terms), plus the logits and their
    gradient in fp32 ``8 B T V``;
* block-wise attention transfer first stores the teacher's hidden state entering every block:
  ``2 T d ceil(L / k)`` bytes on disk for ``T`` tokens (train + validation), the teacher's
  micro-batches split over the GPUs (sharded or replicated as the joint stage); then the
  blocks are dealt over the GPUs and train side by side (``ceil(blocks / N)`` per GPU, no
  collectives): per GPU the stage-1 model (whole, or its ``1/N`` shard plus a whole copy of
  the block's ``k`` layers when sharded) and one block's trainable states and activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lolcats.config import Config
from lolcats.models.loading import known_shapes, load_shape  # noqa: F401  (re-exported)

GIB = 1024**3


# ---------------------------------------------------------------- model config


def config_from_model_name(cfg: Config):
    """The transformers config of ``cfg.model`` (built-in, GGUF, local directory or hub name)."""
    from transformers import AutoConfig

    from lolcats.models.loading import hub_kwargs, resolve_source

    if cfg.model.init == "random":
        return load_shape(cfg.model.name)
    src, gguf = resolve_source(cfg.model)
    return AutoConfig.from_pretrained(src, **hub_kwargs(cfg.model, gguf))


def resolve_model_config(cfg: Config, model_config: Any = None):
    if model_config is None:
        return config_from_model_name(cfg)
    if isinstance(model_config, (str, Path)):
        return load_shape(model_config)
    return model_config


# ---------------------------------------------------------------- counting


@dataclass(frozen=True)
class Shape:
    """Sizes from a decoder-only config (Llama, Mistral, Qwen2)."""

    d: int  # hidden size
    inter: int  # MLP intermediate size
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @classmethod
    def from_config(cls, c) -> Shape:
        heads = c.num_attention_heads
        attn_bias = bool(getattr(c, "attention_bias", False))
        qkv_bias = attn_bias or getattr(c, "model_type", "") == "qwen2"
        return cls(d=c.hidden_size, inter=c.intermediate_size, layers=c.num_hidden_layers, heads=heads,
                   kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, vocab=c.vocab_size,
                   tied=bool(getattr(c, "tie_word_embeddings", False)), qkv_bias=qkv_bias, o_bias=attn_bias,
                   mlp_bias=bool(getattr(c, "mlp_bias", False)))

    def linears(self) -> dict[str, tuple[int, int]]:
        """Per-layer linear maps: name -> (in, out)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.d, q), "k_proj": (self.d, kv), "v_proj": (self.d, kv), "o_proj": (q, self.d),
                "gate_proj": (self.d, self.inter), "up_proj": (self.d, self.inter), "down_proj": (self.inter, self.d)}

    def layer_params(self) -> int:
        lin = self.linears()
        n = sum(i * o for i, o in lin.values()) + 2 * self.d  # weights + two RMSNorms
        if self.qkv_bias:
            n += sum(lin[k][1] for k in ("q_proj", "k_proj", "v_proj"))
        if self.o_bias:
            n += self.d
        if self.mlp_bias:
            n += 2 * self.inter + self.d
        return n

    def total_params(self) -> int:
        embed = self.vocab * self.d
        return embed + self.layers * self.layer_params() + self.d + (0 if self.tied else embed)


def attention_params_per_layer(shape: Shape, cfg: Config) -> int:
    """Feature maps (one per query head and per KV head), window factors and gated_delta's gates of one layer."""
    a = cfg.attention
    heads = shape.heads + shape.kv_heads
    n = 0
    if a.feature_map in ("hedgehog", "t2r"):
        n += heads * shape.head_dim * a.feature_dim
        if a.feature_map == "t2r":
            n += heads * a.feature_dim
    elif a.feature_map not in ("elu", "relu"):
        raise ValueError(f"unknown feature map {a.feature_map!r} for planning; known: hedgehog, t2r, elu, relu")
    if a.kind != "linear" and a.train_window_factor:
        n += shape.heads
    if a.kind == "gated_delta":  # the delta rule's write strength (weight, bias), decay and mass scale per KV head
        n += shape.kv_heads * (shape.head_dim + 3)
    return n


def lora_params_per_layer(shape: Shape, cfg: Config) -> int:
    lin = shape.linears()
    unknown = [t for t in cfg.finetune.lora_targets if t not in lin]
    if unknown:
        raise ValueError(f"unknown LoRA target {unknown[0]!r}; known: {', '.join(lin)}")
    return sum(cfg.finetune.lora_r * sum(lin[t]) for t in cfg.finetune.lora_targets)


def converted_layers(shape: Shape, cfg: Config) -> int:
    """Layers stage 1 transfers (``attention.softmax_count`` picks among them only afterwards)."""
    return len(cfg.attention.converted_layers(shape.layers))


# ---------------------------------------------------------------- activations (bytes)


def feature_width(cfg: Config, head_dim: int) -> tuple[int, int]:
    """(stored fp32 features per head per token in the feature map, output features)."""
    a = cfg.attention
    if a.feature_map == "hedgehog":
        return 5 * a.feature_dim, 2 * a.feature_dim  # z, softmax(+z), softmax(-z), concat/clamp
    if a.feature_map == "t2r":
        return 2 * a.feature_dim, a.feature_dim
    return head_dim, head_dim


def distill_layer_activations(shape: Shape, cfg: Config, tokens: int, batch: int, seq: int) -> int:
    """Bytes one converted layer keeps for the attention-transfer backward."""
    stored, _ = feature_width(cfg, shape.head_dim)
    H, Hk, D = shape.heads, shape.kv_heads, shape.head_dim
    per_token = (H + Hk) * (D + stored) + Hk * D + 2 * H * D
    total = 4 * tokens * per_token
    if cfg.distill.xent_factor > 0:
        total += 2 * 4 * batch * H * seq * seq
    return total


def full_layer_activations(shape: Shape, cfg: Config, tokens: int) -> int:
    """Bytes of one layer's forward activations kept for backward (bf16, SDPA/flash attention)."""
    H, Hk, D = shape.heads, shape.kv_heads, shape.head_dim
    bf16 = 2 * tokens * (4 * shape.d + 4 * H * D + 3 * Hk * D + 4 * shape.inter)
    stored, _ = feature_width(cfg, D)
    student = 4 * tokens * (H + Hk) * stored  # fp32 feature maps of the linear attention
    return bf16 + student


# ---------------------------------------------------------------- plan


@dataclass
class StagePlan:
    name: str
    frozen_params: int
    trainable_params: int
    bytes: dict[str, int]  # per GPU: frozen_weights, gather_buffers, trainable_states, activations
    disk_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


@dataclass
class Plan:
    model_name: str
    shape: Shape
    total_params: int
    num_gpus: int
    tokens: int | None
    micro_batch_size: dict[str, int]
    seq_len: int
    stages: list[StagePlan]
    gpu_memory_gib: float
    strategy: str = "fsdp"  # fsdp (sharded) or replicate (a whole copy per GPU)


def _stage(name: str, shape: Shape, frozen: int, trainable: int, acts: int, n: int, unit_params: int,
           disk: int = 0, notes: list[str] | None = None) -> StagePlan:
    b = {"frozen_weights": math.ceil(2 * frozen / n),
         "gather_buffers": 2 * 2 * unit_params if n > 1 else 0,
         "trainable_states": math.ceil(16 * trainable / n),
         "activations": acts}
    return StagePlan(name, frozen, trainable, b, disk, notes or [])


def plan(cfg: Config, model_config: Any = None, num_gpus: int = 1, tokens: int | None = None,
         gpu_memory_gib: float = 80.0) -> Plan:
    """Memory per GPU and disk for each stage of ``cfg`` on ``model_config`` over ``num_gpus`` GPUs.

    ``model_config``: a transformers config, a configs/shapes name, a config.json path or a
    model directory; ``cfg.model.name`` when None. ``tokens``: tokens whose hidden states the
    block-wise stage stores (train + validation); from ``cfg.data`` caps when None.
    """
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    mc = resolve_model_config(cfg, model_config)
    shape = Shape.from_config(mc)
    total, layer = shape.total_params(), shape.layer_params()
    seq, n_conv = cfg.data.seq_len, converted_layers(shape, cfg)
    if tokens is None and cfg.data.max_train_tokens is not None:
        tokens = cfg.data.max_train_tokens + (cfg.data.max_val_tokens or 0)
    attn = attention_params_per_layer(shape, cfg)

    mb_d = cfg.distill.micro_batch_size
    tok_d = mb_d * seq
    work = full_layer_activations(shape, cfg, tok_d)
    joint_acts = n_conv * distill_layer_activations(shape, cfg, tok_d, mb_d, seq) + work
    strategy = plan_strategy(cfg.run.parallel, total, num_gpus, gpu_memory_gib)
    shards = num_gpus if strategy == "fsdp" else 1  # replicated: every GPU holds the whole model
    stages = [_stage("attention transfer (joint)", shape, total, n_conv * attn, joint_acts, shards, layer,
                     notes=[f"{n_conv} converted layers trained together from one forward"])]

    k = cfg.distill.block_size
    if k is not None:
        n_blocks = math.ceil(shape.layers / k)
        k_eff = min(k, shape.layers)
        block_acts = k_eff * distill_layer_activations(shape, cfg, tok_d, mb_d, seq) + work
        per_token_disk = 2 * shape.d * n_blocks
        disk = per_token_disk * tokens if tokens else 0
        split = f", its micro-batches split over the {num_gpus} GPUs (rank 0 writes)" if num_gpus > 1 else ""
        stages.append(_stage("collect hidden states", shape, total, 0, 2 * tok_d * shape.d * n_blocks + work,
                             shards, layer, disk,
                             [f"teacher forward once{split}; stores {n_blocks} boundaries: "
                              f"{per_token_disk * 1e6 / GIB:.1f} GiB per million tokens"]))
        stages.append(_blockwise_stage(shape, k, k_eff, n_blocks, total, layer, attn, block_acts, num_gpus, shards))

    mb_f = cfg.finetune.micro_batch_size
    tok_f = mb_f * seq
    lora = shape.layers * lora_params_per_layer(shape, cfg)
    checkpointing = shards > 1  # the pipeline checkpoints activations only when the model is sharded
    kept = (2 * tok_f * shape.d * shape.layers + full_layer_activations(shape, cfg, tok_f) if checkpointing
            else shape.layers * full_layer_activations(shape, cfg, tok_f))
    ft_acts = kept + 8 * tok_f * shape.vocab
    stages.append(_stage("LoRA finetune", shape, total + n_conv * attn, lora, ft_acts, shards, layer,
                         notes=[f"LoRA r={cfg.finetune.lora_r} on {', '.join(cfg.finetune.lora_targets)}; "
                                + ("activation checkpointing per layer" if checkpointing
                                   else "activations kept (no checkpointing)")]))
    name = cfg.model.name if model_config is None else (
        str(model_config) if isinstance(model_config, (str, Path)) else getattr(mc, "model_type", "model"))
    return Plan(str(name), shape, total, num_gpus, tokens, {"distill": mb_d, "finetune": mb_f}, seq, stages,
                gpu_memory_gib, strategy)


def _blockwise_stage(shape: Shape, k: int, k_eff: int, n_blocks: int, total: int, layer: int, attn: int,
                     acts: int, num_gpus: int, shards: int) -> StagePlan:
    """Block-wise transfer as it runs: the blocks dealt over the GPUs, each trained as one-process
    stage on its GPU; the stage-1 model stays there (whole, or this GPU's shard plus a whole copy
    of the block's layers when FSDP-sharded). No collectives while a block trains."""
    per_gpu = math.ceil(n_blocks / num_gpus)
    resident = total if shards == 1 else math.ceil(total / shards)
    copy = 0 if shards == 1 else k_eff * layer
    b = {"frozen_weights": 2 * (resident + copy), "gather_buffers": 0,
         "trainable_states": 16 * k_eff * attn, "activations": acts}
    where = ("on the whole model each GPU holds" if shards == 1 else
             f"on a whole copy of its {k_eff} layers, next to the GPU's shard of the model")
    spread = ("one after another" if num_gpus == 1 else f"{per_gpu} per GPU, side by side on {num_gpus} GPUs: "
              f"wall time ~{per_gpu}/{n_blocks} of all blocks on one GPU")
    return StagePlan(f"attention transfer (block-wise, k={k})", resident + copy, k_eff * attn, b, notes=[
        f"{n_blocks} blocks of {k} layers from stored hidden states, {spread}", f"each block trains {where}"])


def plan_strategy(requested: str, total_params: int, num_gpus: int, gpu_memory_gib: float) -> str:
    """What ``run.parallel`` becomes on GPUs (``distributed.auto_strategy`` on the bf16 weights);
    one GPU never shards."""
    from lolcats.distributed import auto_strategy

    if num_gpus == 1:
        return "replicate"
    if requested != "auto":
        return requested
    return auto_strategy(2 * total_params, gpu_memory_gib * GIB)


# ---------------------------------------------------------------- printing


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f}"


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_plan(p: Plan) -> str:
    s = p.shape
    lines = [f"model {p.model_name}: {_count(p.total_params)} parameters ({p.total_params:,}); "
             f"L={s.layers} d={s.d} heads={s.heads}/{s.kv_heads} head_dim={s.head_dim} ffn={s.inter} vocab={s.vocab}",
             f"{p.num_gpus} GPU(s); seq_len {p.seq_len}; micro-batch distill {p.micro_batch_size['distill']}, "
             f"finetune {p.micro_batch_size['finetune']}; memory per GPU in GiB (budget {p.gpu_memory_gib:g}); "
             + ("FSDP2-sharded" if p.strategy == "fsdp" else
                "replicated (run.parallel replicate)" if p.num_gpus > 1 else "one GPU"),
             "",
             f"{'stage':<38}{'trainable':>10}{'frozen w':>9}{'gather':>9}{'train st':>9}{'activ':>9}{'total':>9}  fits"]
    for st in p.stages:
        b = st.bytes
        fits = "yes" if st.total_bytes <= p.gpu_memory_gib * GIB else "NO"
        lines.append(f"{st.name:<38}{_count(st.trainable_params):>10}{_gib(b['frozen_weights']):>9}"
                     f"{_gib(b['gather_buffers']):>9}{_gib(b['trainable_states']):>9}{_gib(b['activations']):>9}"
                     f"{_gib(st.total_bytes):>9}  {fits}")
        for note in st.notes:
            lines.append(f"    {note}")
        if st.disk_bytes:
            lines.append(f"    disk: {st.disk_bytes / GIB:.1f} GiB of hidden states for {p.tokens:,} tokens")
    lines.append("")
    lines.append("estimates: weights bf16, trainables fp32 + AdamW (16 B/param), sharded over the GPUs when "
                 "FSDP2-sharded; add ~1-3 GiB per GPU for the CUDA context and allocator slack")
    return "\n".join(lines)


def plan_main(cfg: Config, shape: Any = None, gpus: int = 1, tokens: int | None = None,
              gpu_memory_gib: float = 80.0) -> str:
    """Print the plan for ``cfg`` (``lolcats plan``) and return it."""
    text = format_plan(plan(cfg, shape, gpus, tokens, gpu_memory_gib))
    print(text)
    return text
