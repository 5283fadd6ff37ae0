"""`lolcats plan`: exact parameter counts against real modules; shapes; disk; printing."""

from __future__ import annotations


import pytest

from lolcats.config import load_config
from lolcats.plan import (
    Shape,
    attention_params_per_layer,
    format_plan,
    known_shapes,
    load_shape,
    lora_params_per_layer,
    plan,
    plan_main,
)


def tiny_config(kind: str = "llama", **kw):
    from transformers import AutoConfig

    fields = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2)
    return AutoConfig.for_model(kind, **{**fields, **kw})


def numel(module, pred=lambda n: True) -> int:
    return sum(p.numel() for n, p in module.named_parameters(remove_duplicate=True) if pred(n))


@pytest.mark.parametrize("kind,kw", [("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                     ("llama", {"attention_bias": True, "mlp_bias": True}),
                                     ("mistral", {"head_dim": 32}), ("qwen2", {})])
def test_parameter_count_is_exact(kind, kw):
    from transformers import AutoModelForCausalLM

    c = tiny_config(kind, **kw)
    assert Shape.from_config(c).total_params() == numel(AutoModelForCausalLM.from_config(c))


@pytest.mark.parametrize("fmap,kind,train_wf", [("hedgehog", "terraced_window", True), ("t2r", "sliding_window", True),
                                                ("hedgehog", "linear", True), ("elu", "sliding_window", False),
                                                ("hedgehog", "gated_delta", True)])
def test_attention_trainable_count_matches_conversion(fmap, kind, train_wf):
    from transformers import AutoModelForCausalLM

    from lolcats.attention.convert import convert_model
    from lolcats.attention.params import attention_parameters, set_attention_trainable

    cfg = load_config(None, {"attention": {"feature_map": fmap, "kind": kind, "feature_dim": 8,
                                           "train_window_factor": train_wf}})
    c = tiny_config()
    model = convert_model(AutoModelForCausalLM.from_config(c), cfg.attention)
    set_attention_trainable(model, True, train_wf)
    trainable = sum(p.numel() for p in attention_parameters(model).values() if p.requires_grad)
    assert c.num_hidden_layers * attention_params_per_layer(Shape.from_config(c), cfg) == trainable


def test_lora_count_matches_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, {"finetune": {"lora_r": 4, "lora_targets": ["q_proj", "v_proj", "down_proj"]}})
    c = tiny_config()
    model = get_peft_model(AutoModelForCausalLM.from_config(c),
                           LoraConfig(r=4, target_modules=cfg.finetune.lora_targets))
    assert c.num_hidden_layers * lora_params_per_layer(Shape.from_config(c), cfg) == numel(model, lambda n: "lora_" in n)
    cfg.finetune.lora_targets = ["qkv"]
    with pytest.raises(ValueError, match="known: q_proj"):
        lora_params_per_layer(Shape.from_config(c), cfg)


@pytest.mark.parametrize("name,billions", [("llama3-8b", 8.03), ("llama3.1-70b", 70.55), ("llama3.1-405b", 405.85),
                                           ("smollm2-135m", 0.13)])
def test_shapes(name, billions):
    c = load_shape(name)
    assert c.model_type == "llama"
    assert round(Shape.from_config(c).total_params() / 1e9, 2) == billions
    assert name in known_shapes()


def test_smollm2_shape_matches_the_weights():
    """configs/shapes/smollm2-135m.json (random-weights benchmarks) is the shipped model's architecture."""
    from transformers import AutoConfig

    from lolcats.config import ModelConfig
    from lolcats.models.loading import hub_kwargs, resolve_source

    try:
        src, gguf = resolve_source(ModelConfig())
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"SmolLM2 weights package not installed: {e}")
    real, shape = AutoConfig.from_pretrained(src, **hub_kwargs(ModelConfig(), gguf)), load_shape("smollm2-135m")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "tie_word_embeddings"):
        assert getattr(shape, key) == getattr(real, key), key
    assert shape.rope_parameters["rope_theta"] == real.rope_parameters["rope_theta"]


def test_unknown_shape_lists_known():
    with pytest.raises(ValueError, match="llama3-8b"):
        load_shape("llama9-1t")


def test_block_wise_disk_and_stages():
    cfg = load_config(None, {"distill": {"block_size": 5}, "run": {"parallel": "fsdp"}})
    p = plan(cfg, "llama3-8b", num_gpus=8, tokens=1_000_000)
    names = [s.name for s in p.stages]
    assert names[0].startswith("attention transfer (joint)") and names[-1] == "LoRA finetune"
    collect = next(s for s in p.stages if s.name == "collect hidden states")
    assert collect.disk_bytes == 2 * 1_000_000 * 4096 * 7  # ceil(32 / 5) boundaries
    block = next(s for s in p.stages if "block-wise" in s.name)
    joint = p.stages[0]
    assert block.trainable_params * 32 == joint.trainable_params * 5
    assert block.bytes["activations"] < joint.bytes["activations"]
    one = plan(cfg, "llama3-8b", num_gpus=1, tokens=1_000_000)
    assert one.stages[0].bytes["frozen_weights"] == pytest.approx(8 * p.stages[0].bytes["frozen_weights"], rel=1e-6)
    assert plan(load_config(), "llama3-8b").stages[0].bytes["gather_buffers"] == 0


def test_format_and_cli(capsys):
    from lolcats.cli import main

    cfg = load_config(None, {"distill": {"block_size": 8}})
    text = plan_main(cfg, "llama3.1-70b", 8, 2000000)
    capsys.readouterr()
    assert main(["plan", "--shape", "llama3.1-70b", "--gpus", "8", "--tokens", "2000000",
                 "--distill.block_size", "8"]) == 0
    assert text in capsys.readouterr().out
    for word in ("70.55B", "joint", "block-wise, k=8", "LoRA finetune", "disk:", "fits"):
        assert word in text
    assert format_plan(plan(cfg, tiny_config(), 2)).count("\n") > 5


def test_model_config_object_and_bad_gpus():
    with pytest.raises(ValueError, match="num_gpus"):
        plan(load_config(), tiny_config(), 0)
    p = plan(load_config(), tiny_config(), 1)
    assert p.total_params == Shape.from_config(tiny_config()).total_params()
    assert all(s.total_bytes > 0 for s in p.stages)


def test_replicated_plan_holds_the_whole_model_per_gpu():
    """auto: an 8B model replicates on 80 GB GPUs (weights under a third), a 70B one shards."""
    rep = plan(load_config(), "llama3-8b", num_gpus=8)
    one = plan(load_config(), "llama3-8b", num_gpus=1)
    assert rep.strategy == "replicate" and "replicated" in format_plan(rep)
    assert rep.stages[0].bytes == one.stages[0].bytes
    assert "no checkpointing" in " ".join(one.stages[-1].notes)
    big = plan(load_config(), "llama3.1-70b", num_gpus=8)
    assert big.strategy == "fsdp" and "checkpointing per layer" in " ".join(big.stages[-1].notes)
