"""The attention module and its reference ops."""

import io

import pytest
import torch

from conftest import tiny_model
from lolcats.attention.convert import convert_model
from lolcats.attention.modes import collect_distill_outputs, set_attention_mode
from lolcats.config import AttentionConfig
from lolcats.ops.decode.naive import decode_step_naive
from lolcats.ops.decode.state import DecodeState
from lolcats.ops.kinds import window_slots
from lolcats.ops.hybrid.naive import hybrid_attention_naive
from lolcats.ops.linear.naive import linear_attention_quadratic, linear_attention_recurrent

KINDS = ["linear", "sliding_window", "terraced_window"]


def rand_qkv(B=2, H=4, Hk=2, T=37, D=8, F=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)
    return (r(B, H, T, D), r(B, Hk, T, D), r(B, Hk, T, D), r(B, H, T, F).exp(), r(B, Hk, T, F).exp(),
            torch.rand(H, generator=g, dtype=torch.float32))


@pytest.mark.parametrize("kind", ["sliding_window", "terraced_window"])
def test_hybrid_with_window_covering_sequence_is_softmax(kind):
    q, k, v, fq, fk, wf = rand_qkv(T=50)
    y, _ = hybrid_attention_naive(q, k, v, fq, fk, wf, kind, window_size=64, scale=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True, scale=0.3)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_linear_quadratic_equals_recurrent_with_state():
    _, _, v, fq, fk, _ = rand_qkv(T=41)
    s0 = (torch.rand(2, 2, 6, 8, dtype=torch.float32), torch.rand(2, 2, 6, dtype=torch.float32))
    yq, sq = linear_attention_quadratic(fq, fk, v, s0, output_final_state=True)
    yr, sr = linear_attention_recurrent(fq, fk, v, s0, output_final_state=True)
    torch.testing.assert_close(yq, yr.to(yq.dtype))
    for a, b in zip(sq, sr):
        torch.testing.assert_close(a, b.to(a.dtype))


def test_linear_split_in_two_with_state_equals_whole():
    _, _, v, fq, fk, _ = rand_qkv(T=40)
    y, _ = linear_attention_quadratic(fq, fk, v)
    y1, s = linear_attention_quadratic(fq[:, :, :17], fk[:, :, :17], v[:, :, :17], output_final_state=True)
    y2, _ = linear_attention_quadratic(fq[:, :, 17:], fk[:, :, 17:], v[:, :, 17:], initial_state=s)
    torch.testing.assert_close(torch.cat([y1, y2], 2), y)


@pytest.mark.parametrize("kind", KINDS)
def test_decode_steps_equal_full_sequence(kind):
    q, k, v, fq, fk, wf = rand_qkv(T=45)
    w = 7
    if kind == "linear":
        ref, _ = linear_attention_quadratic(fq, fk, v)
    else:
        ref, _ = hybrid_attention_naive(q, k, v, fq, fk, wf, kind, w, 0.3)
    st = DecodeState.empty(2, 2, window_slots(kind, w), 8, 8, 6, torch.float32, "cpu")
    ys = [decode_step_naive(q[:, :, t], k[:, :, t], v[:, :, t], fq[:, :, t], fk[:, :, t], st,
                            torch.full((2,), t), wf, kind, w, 0.3) for t in range(45)]
    torch.testing.assert_close(torch.stack(ys, 2), ref)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_teacher_mode_reproduces_hf_logits(arch):
    model = tiny_model(arch)
    x = torch.randint(0, 128, (2, 70))
    with torch.no_grad():
        ref = model(x).logits
    convert_model(model, AttentionConfig())
    set_attention_mode(model, "teacher")
    with torch.no_grad():
        out = model(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_student_with_long_window_reproduces_hf_logits():
    model = tiny_model()
    x = torch.randint(0, 128, (2, 70))
    with torch.no_grad():
        ref = model(x).logits
    convert_model(model, AttentionConfig(kind="sliding_window", window_size=128))
    with torch.no_grad():
        out = model(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmap", ["hedgehog", "t2r", "elu", "relu"])
@pytest.mark.parametrize("kind", KINDS)
def test_distill_mode_returns_teacher_output_and_typed_losses(fmap, kind):
    model = tiny_model()
    x = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        ref = model(x).logits
    convert_model(model, AttentionConfig(kind=kind, feature_map=fmap, window_size=8, feature_dim=8))
    set_attention_mode(model, "distill")
    with collect_distill_outputs(model, xent=True) as outs:
        out = model(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert [o.layer_idx for o in outs] == [0, 1]
    assert all(o.mse.ndim == 0 and o.mse >= 0 and torch.isfinite(o.xent) for o in outs)
    trainable = [o.mse.requires_grad for o in outs]
    assert all(trainable) == (fmap in ("hedgehog", "t2r") or kind != "linear")


def test_only_feature_maps_and_window_factors_get_gradients():
    model = tiny_model()
    convert_model(model, AttentionConfig(window_size=8))
    for n, p in model.named_parameters():
        p.requires_grad_(".feature_map_" in n or "window_factors" in n)
    set_attention_mode(model, "distill")
    with collect_distill_outputs(model) as outs:
        model.model(torch.randint(0, 128, (1, 30)))
    sum(o.mse for o in outs).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".feature_map_" in n or "window_factors" in n for n in grads)


def test_window_factor_is_kept_without_autograd_and_follows_the_parameter():
    model = tiny_model()
    convert_model(model, AttentionConfig(window_size=8))
    m = next(mod for mod in model.modules() if getattr(mod, "window_factors", None) is not None)
    p = m.window_factors
    with torch.no_grad():
        a = m.window_factor()
        assert m.window_factor() is a  # kept: no sigmoid launched again
        torch.testing.assert_close(a, torch.sigmoid(p))
        p.add_(1.0)  # an in-place change (an optimizer step, load_state_dict)
        b = m.window_factor()
        assert b is a  # recomputed in the same tensor (a CUDA graph captured with it reads the new value)
        torch.testing.assert_close(b, torch.sigmoid(p))
    with torch.inference_mode():
        torch.testing.assert_close(m.window_factor(), torch.sigmoid(p))
    m.window_factors = torch.nn.Parameter(torch.zeros_like(p))  # new data
    with torch.no_grad():
        torch.testing.assert_close(m.window_factor(), torch.full_like(p, 0.5))
    g = m.window_factor()  # with autograd: a fresh sigmoid that gradients flow through
    assert g.grad_fn is not None
    g.sum().backward()
    assert m.window_factors.grad is not None


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="supported: llama, mistral, qwen2"):
        convert_model(m, AttentionConfig())


def test_left_padding_matches_unpadded_row():
    model = tiny_model()
    convert_model(model, AttentionConfig(kind="terraced_window", window_size=8, feature_init="random"))
    x = torch.randint(3, 128, (1, 30))
    pad = torch.full((1, 5), 2)
    xp = torch.cat([pad, x], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 30, dtype=torch.long)], 1)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = model(x).logits
        out = model(xp, attention_mask=mask, position_ids=pos).logits[:, 5:]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- one q/k/v projection


def fused_model(arch: str = "llama", **fields):
    """A converted tiny model, layer 1 kept as softmax attention, in student mode; ``fields`` are config fields."""
    model = tiny_model(arch, **fields)
    convert_model(model, AttentionConfig(window_size=8, feature_init="random", softmax_layers=[1]))
    set_attention_mode(model, "student")
    return model


def qkv_storages(attn) -> set[int]:
    return {p.weight.untyped_storage().data_ptr() for p in (attn.q_proj, attn.k_proj, attn.v_proj)}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@torch.no_grad()
def test_fuse_qkv_keeps_outputs_and_state_dict(arch, tmp_path):
    """One GEMM over the concatenated weights (and Qwen2's biases): the same logits, the same state_dict
    (keys and values; the Parameters are views of one tensor), and save_pretrained writes the same tensors."""
    from safetensors.torch import load_file

    from lolcats.attention.layers import lolcats_modules
    from lolcats.attention.use import set_inference_fusion

    model = fused_model(arch)
    x = torch.randint(0, 128, (2, 21))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(x).logits
    assert set_inference_fusion(model) == 2
    mods = list(lolcats_modules(model))
    assert all(m.fused_qkv is not None and len(qkv_storages(m)) == 1 for m in mods)
    assert (mods[0].q_proj.bias is not None) == (arch == "qwen2")
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(saved[k], before[k]) for k in saved) and "model.layers.0.self_attn.k_proj.weight" in saved


def perturb_lora(model) -> None:
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)


@torch.no_grad()
def test_fuse_qkv_leaves_peft_alone_and_drops_out_when_wrapped_later():
    """PEFT-wrapped projections are not fused; wrapping them after fuse_qkv turns the fused path off (the
    LoRA update is used, not the plain weights); so does replacing the weights' data (model.to)."""
    from peft import LoraConfig, get_peft_model

    from lolcats.attention.layers import lolcats_modules
    from lolcats.attention.use import set_inference_fusion

    x = torch.randint(0, 128, (1, 13))
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    wrapped = get_peft_model(fused_model(), lora)
    perturb_lora(wrapped)
    ref = wrapped(x).logits
    assert set_inference_fusion(wrapped) == 0 and all(m.fused_qkv is None for m in lolcats_modules(wrapped))
    torch.testing.assert_close(wrapped(x).logits, ref, rtol=0, atol=0)

    model = fused_model()
    assert set_inference_fusion(model) == 2
    late = get_peft_model(model, lora)
    perturb_lora(late)
    want = late(x).logits
    assert all(m.fused_qkv is None for m in lolcats_modules(late))  # dropped at the first forward
    for m in lolcats_modules(late):
        m.unfuse_qkv()
    torch.testing.assert_close(late(x).logits, want, rtol=0, atol=0)

    model = fused_model()
    set_inference_fusion(model)
    model.to(torch.float64)  # swaps every Parameter's .data: the views are gone
    out = model(x).logits
    assert all(m.fused_qkv is None for m in lolcats_modules(model)) and out.dtype == torch.float64


def test_fused_qkv_steps_aside_for_weight_gradients():
    """The fused tensor is not a Parameter: while the projections' weights want a gradient, three GEMMs run."""
    from lolcats.attention.use import set_inference_fusion

    model = fused_model()
    set_inference_fusion(model)
    attn = model.model.layers[0].self_attn
    attn.k_proj.weight.requires_grad_(True)
    model(torch.randint(0, 128, (1, 9))).logits.sum().backward()
    assert attn.k_proj.weight.grad is not None and attn.k_proj.weight.grad.abs().sum() > 0
    assert attn.fused_qkv is not None  # kept for inference


# ----------------------------------------------------------------------------- the decoder layer's norms and MLP


def decoder_modules(model) -> list[torch.nn.Module]:
    """Every layer's input norm, post-attention norm and MLP, then the final norm."""
    stack = model.model
    return [m for layer in stack.layers for m in (layer.input_layernorm, layer.post_attention_layernorm,
                                                   layer.mlp)] + [stack.norm]


@pytest.mark.parametrize("arch,fields", [("llama", {}), ("mistral", {}), ("qwen2", {}), ("llama", {"mlp_bias": True})])
@torch.no_grad()
def test_inference_fusion_swaps_norms_and_mlp(arch, fields, tmp_path):
    """Every RMSNorm (the final one too) and SiLU MLP swapped for the fused modules, on the same Parameters and
    Linear modules (gate/up weights and biases views of one tensor): the same logits, the same state_dict, the
    same tensors saved; fusing twice changes nothing; unfusing puts the very same modules back."""
    from safetensors.torch import load_file

    from lolcats.attention.fusion import FusedMLP, FusedRMSNorm, add_norm_forward
    from lolcats.attention.use import set_inference_fusion

    model = fused_model(arch, **fields)
    for layer in model.model.layers:
        if layer.mlp.gate_proj.bias is not None:  # zero at init: make them count
            layer.mlp.gate_proj.bias.normal_()
            layer.mlp.up_proj.bias.normal_()
    x = torch.randint(0, 128, (2, 21))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals, ref = decoder_modules(model), model(x).logits
    assert set_inference_fusion(model) == 2
    fused = decoder_modules(model)
    assert [type(m) for m in fused] == [FusedRMSNorm, FusedRMSNorm, FusedMLP] * 2 + [FusedRMSNorm]
    assert all(f.replaced[0] is o for f, o in zip(fused, originals))
    assert all(layer.forward.func is add_norm_forward for layer in model.model.layers)  # add + norm: one op
    buf = io.BytesIO()  # a fused model saved whole loads again, its layers' forward bound to the loaded layers
    torch.save(model, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert all(layer.forward.args[0] is layer for layer in loaded.model.layers)
    torch.testing.assert_close(loaded(x).logits, ref, rtol=0, atol=1e-6)
    for f, o in zip(fused, originals):
        if isinstance(f, FusedRMSNorm):
            assert f.weight is o.weight
        else:
            assert all(getattr(f, n) is getattr(o, n) for n in ("gate_proj", "up_proj", "down_proj"))
            ts = [t for p in (f.gate_proj, f.up_proj) for t in (p.weight, p.bias) if t is not None]
            assert f.rows is not None and len({t.untyped_storage().data_ptr() for t in ts}) == 1 + bool(fields)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=1e-6)
    assert set_inference_fusion(model) == 2 and all(a is b for a, b in zip(decoder_modules(model), fused))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert saved.keys() == before.keys() and all(torch.equal(saved[k], before[k]) for k in saved)
    for _ in range(2):  # unfusing an unfused model is a no-op
        set_inference_fusion(model, False)
        assert all(a is b for a, b in zip(decoder_modules(model), originals))
        assert all("forward" not in layer.__dict__ for layer in model.model.layers)  # the class's forward again
    assert torch.equal(model(x).logits, ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_inference_fusion_trains_through(arch):
    """Where a gradient is wanted the fused modules run the reference math: the loss and the gradients (of the
    MLPs', the norms', every weight) equal the unfused model's."""
    from lolcats.attention.use import set_inference_fusion

    model = fused_model(arch).requires_grad_(True)
    x = torch.randint(0, 128, (2, 13))

    def loss_and_grads():
        model.zero_grad()
        loss = model(x).logits.pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want = loss_and_grads()
    set_inference_fusion(model)
    got_loss, got = loss_and_grads()
    assert any("mlp.up_proj" in n for n in got) and any("layernorm" in n for n in got) and "model.norm.weight" in got
    assert torch.equal(got_loss, want_loss) and got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0, msg=n)


@torch.no_grad()
def test_inference_fusion_leaves_other_mlps_alone():
    """An MLP whose activation is not SiLU (hidden_act gelu) keeps its module; the norms are still fused."""
    from lolcats.attention.fusion import FusedRMSNorm
    from lolcats.attention.use import set_inference_fusion

    model = fused_model("llama", hidden_act="gelu")
    x = torch.randint(0, 128, (1, 11))
    ref = model(x).logits
    set_inference_fusion(model)
    layer = model.model.layers[0]
    assert type(layer.mlp).__name__ == "LlamaMLP" and isinstance(layer.input_layernorm, FusedRMSNorm)
    assert torch.equal(model(x).logits, ref)


@torch.no_grad()
def test_fused_mlp_steps_aside_when_wrapped_or_moved():
    """LoRA on gate_proj after fusing: the MLP runs the wrapped projection (its update counts), and unfusing hands it
    to the original MLP. model.to swaps the weights' data: the one GEMM steps aside until fused again."""
    from peft import LoraConfig, get_peft_model

    from lolcats.attention.use import set_inference_fusion

    x = torch.randint(0, 128, (1, 13))
    model = fused_model()
    ref = model(x).logits
    set_inference_fusion(model)
    late = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj"]))
    perturb_lora(late)
    want = late(x).logits
    mlp = model.model.layers[0].mlp
    assert mlp.rows is None and not torch.allclose(want, ref)  # dropped at the first forward; LoRA used
    set_inference_fusion(late, False)
    assert hasattr(model.model.layers[0].mlp.gate_proj, "lora_A") and mlp.replaced[0] is model.model.layers[0].mlp
    torch.testing.assert_close(late(x).logits, want, rtol=0, atol=0)

    model = fused_model()
    set_inference_fusion(model)
    model.to(torch.float64)  # swaps every Parameter's .data: the views are gone
    out = model(x).logits
    assert all(layer.mlp.rows is None for layer in model.model.layers) and out.dtype == torch.float64
    assert set_inference_fusion(model) == 2 and all(layer.mlp.rows is not None for layer in model.model.layers)
    torch.testing.assert_close(model(x).logits, out, rtol=0, atol=1e-12)
