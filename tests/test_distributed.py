"""FSDP2 on CPU (gloo): two processes train like one process on the same global batch.

The two-process half runs this file as a script under ``torch.distributed.run``; the test
runs the same steps in-process on one rank and compares the trained weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import torchrun_two
from lolcats.distributed import (
    DistInfo,
    all_reduce_mean,
    distributed_sampler_slice,
    gather_trainable_state_dict,
    init_distributed,
    shard_model,
)

STEPS, GLOBAL_BATCH, SEQ = 3, 4, 16
STAGES = ("distill", "lm")


def tiny_converted_model(stage: str = "distill"):
    """Tiny Llama with hedgehog attention; trainable: feature maps (+ norms for the "lm" stage)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lolcats.attention.convert import convert_model
    from lolcats.attention.modes import set_attention_mode
    from lolcats.attention.params import attention_parameters
    from lolcats.config import AttentionConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    convert_model(model, AttentionConfig(feature_map="hedgehog", feature_dim=8, feature_init="random",
                                         kind="sliding_window", window_size=4, backend="torch"))
    for p in attention_parameters(model).values():
        p.requires_grad_(True)
    if stage == "lm":  # gradients flow through every layer's output, as in LoRA finetuning
        for n, p in model.named_parameters():
            if n.endswith("layernorm.weight") or n == "model.norm.weight":
                p.requires_grad_(True)
    set_attention_mode(model, "distill" if stage == "distill" else "student")
    return model


def stage_loss(model, ids: torch.Tensor, stage: str) -> torch.Tensor:
    """ids (b, T) -> scalar loss, a mean over this rank's sequences."""
    from lolcats.attention.modes import collect_distill_outputs

    if stage == "lm":
        return model(input_ids=ids, labels=ids).loss
    with collect_distill_outputs(model) as outs:
        model(input_ids=ids, logits_to_keep=1)  # call the FSDP root; skip most of the LM head
    return sum(o.mse for o in outs)


def train(info: DistInfo, stage: str, activation_checkpointing: bool) -> dict[str, torch.Tensor]:
    """A few AdamW steps; each rank takes its share of every global batch."""
    model = tiny_converted_model(stage).to(info.device)
    model = shard_model(model, mixed_precision=False, activation_checkpointing=activation_checkpointing, info=info)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        ids = torch.randint(0, 128, (GLOBAL_BATCH, SEQ), generator=gen)  # (B, T), same on every rank
        mine = ids[distributed_sampler_slice(GLOBAL_BATCH, info.rank, info.world_size)]
        loss = stage_loss(model, mine.to(info.device), stage)
        loss.backward()
        all_reduce_mean(loss)
        opt.step()
        opt.zero_grad()
    return gather_trainable_state_dict(model, trainable)


def test_sampler_slice_covers_every_item_once():
    for n in range(0, 11):
        for world in (1, 2, 3, 4):
            parts = [range(n)[distributed_sampler_slice(n, r, world)] for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError):
        distributed_sampler_slice(4, 2, 2)


def test_single_process_is_noop():
    info = init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    assert all_reduce_mean(3.0) == 3.0
    model = tiny_converted_model()
    before = dict(model.named_parameters())
    assert shard_model(model, mixed_precision=True, info=info) is model
    assert dict(model.named_parameters()).keys() == before.keys()
    sd = gather_trainable_state_dict(model)
    assert sd and all(".feature_map_" in n or "window_factors" in n for n in sd)


def run_two_ranks(tmp_path: Path, device: str) -> dict[str, dict[str, torch.Tensor]]:
    out = tmp_path / "rank0.pt"
    torchrun_two(__file__, str(out), device)
    return torch.load(out)


def check_matches_one_process(results, tol: float) -> None:
    one = DistInfo(0, 1, 0, torch.device("cpu"), True)
    for stage in STAGES:
        reference, sharded = train(one, stage, activation_checkpointing=False), results[stage]
        assert sharded.keys() == reference.keys() and len(reference) > 0
        for n, ref in reference.items():
            assert sharded[n].shape == ref.shape, n
            torch.testing.assert_close(sharded[n], ref, atol=tol, rtol=tol, msg=f"{stage}: {n}")
        initial = dict(tiny_converted_model(stage).named_parameters())
        assert any(not torch.equal(initial[n].detach(), ref) for n, ref in reference.items())  # it trained


def test_two_processes_match_one(tmp_path: Path):
    check_matches_one_process(run_two_ranks(tmp_path, "cpu"), tol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_match_one_cpu_process(tmp_path: Path):
    """NCCL + FSDP2 on two GPUs (torch on the GPU machine) against one CPU process."""
    check_matches_one_process(run_two_ranks(tmp_path, "cuda"), tol=2e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_precision_sharding_one_gpu_is_noop_but_checkpointing_runs():
    info = DistInfo(0, 1, 0, torch.device("cuda"), True)
    state = train(info, "lm", activation_checkpointing=True)
    assert state and all(t.device.type == "cpu" for t in state.values())


if __name__ == "__main__":  # one rank of the two-process run
    torch.set_num_threads(1)
    info = init_distributed(device=sys.argv[2] if len(sys.argv) > 2 else "cpu")
    assert info.world_size == 2
    from lolcats.distributed import all_gather_cat

    full = torch.arange(12.0, device=info.device).view(4, 3)
    assert torch.equal(all_gather_cat(full[distributed_sampler_slice(4, info.rank, 2)]), full)
    # checkpointing needs gradients through the layer outputs: the lm stage, not distill
    states = {stage: train(info, stage, activation_checkpointing=stage == "lm") for stage in STAGES}
    if info.is_main:
        torch.save(states, sys.argv[1])
    else:
        assert all(s == {} for s in states.values())
    from lolcats.distributed import cleanup

    cleanup()


def test_choose_strategy():
    from conftest import tiny_model
    from lolcats.distributed import average_gradients, choose_strategy

    m = tiny_model()
    assert choose_strategy(m, "auto", torch.device("cpu")) == "replicate"
    assert choose_strategy(m, "fsdp", torch.device("cpu")) == "fsdp"
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    average_gradients([p])  # one process: unchanged
    assert torch.equal(p.grad, torch.full((3,), 2.0))
