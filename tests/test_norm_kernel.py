"""The RMSNorm and SiLU-product kernels (``ops/triton/norm.py``, ``ops/triton/activation.py``) against their
references (``ops/norm/naive.py``): float32 and bf16, row counts and widths that are not powers of two (d = 576 as
SmolLM2's), leading shapes (B, T, d) and (N, d), strided rows, a weight in bf16 or float32; forward only; one op
under torch.compile; and the fused decoder modules running them. Without CUDA the kernels run in the Triton
interpreter; outputs are allocated NaN-filled (LOLCATS_KERNEL_DEBUG=1), so an unwritten element fails."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["LOLCATS_KERNEL_DEBUG"] = "1"
triton = pytest.importorskip("triton")

import lolcats.ops.triton.activation as activation_mod  # noqa: E402
import lolcats.ops.triton.norm as norm_mod  # noqa: E402
from lolcats.ops.norm.naive import add_rms_norm_reference, rms_norm_reference, silu_mul_reference  # noqa: E402

if not CUDA and not type(norm_mod._rms_norm_fwd).__name__.startswith("Interpreted"):
    norm_mod, activation_mod = importlib.reload(norm_mod), importlib.reload(activation_mod)
rms_norm_triton, silu_mul_triton = norm_mod.rms_norm_triton, activation_mod.silu_mul_triton
add_rms_norm_triton = norm_mod.add_rms_norm_triton

DEV = "cuda" if CUDA else "cpu"
BF16 = torch.bfloat16
SHAPES = [(2, 5, 576), (7, 130), (3, 7), (1, 1, 64), (33, 20)]  # (B, T, d) or (N, d)


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str, rounded: torch.dtype) -> None:
    """Same shape and dtype, no NaN; within 1e-5 of the scale where every rounding is to float32, else elementwise
    within two roundings to ``rounded`` (2^-6 relative for bf16: the interpreter truncates where the GPU rounds to
    nearest, and both ops round twice)."""
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    assert not torch.isnan(a).any(), f"{what}: NaN (unwritten element?)"
    err = (a.float() - b.float()).abs()
    if rounded == torch.float32 and a.dtype == torch.float32:
        bound = 1e-5 * b.abs().max().item()
    else:
        bound = 2**-6 * b.float().abs() + 1e-6
    assert (err <= bound).all(), f"{what}: max err {err.max().item():.3e}, scale {b.float().abs().max().item():.3e}"


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (BF16, BF16), (BF16, torch.float32),
                                          (torch.float32, BF16)])
@torch.no_grad()
def test_rms_norm_kernel_matches_reference(shape, dtype, wdtype):
    """HF's RMSNorm in one launch: the result in torch.result_type(weight, x), rounded as HF rounds it."""
    x = randn(*shape, dtype=dtype, scale=3.0)
    w = (1 + randn(shape[-1], seed=1) / 4).to(wdtype)
    assert_close(rms_norm_triton(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), "rms_norm", dtype)


@torch.no_grad()
def test_rms_norm_kernel_reads_strided_rows():
    """Rows at a stride (a slice of a wider tensor) are read in place, not copied."""
    wide = randn(3, 4, 2 * 130, dtype=BF16)
    x, w = wide[..., :130], randn(130, dtype=BF16, seed=1)
    assert_close(rms_norm_triton(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), "rms_norm", BF16)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (BF16, BF16), (BF16, torch.float32)])
@torch.no_grad()
def test_add_rms_norm_kernel_matches_reference(shape, dtype, wdtype):
    """The residual add and the norm in one launch: the sum as torch rounds it (exactly), the norm of that sum."""
    x, res = randn(*shape, dtype=dtype, scale=3.0), randn(*shape, dtype=dtype, seed=2, scale=3.0)
    w = (1 + randn(shape[-1], seed=1) / 4).to(wdtype)
    y, s = add_rms_norm_triton(x, res, w, 1e-6)
    y_ref, s_ref = add_rms_norm_reference(x, res, w, 1e-6)
    if CUDA:  # the interpreter truncates to bf16 where the GPU rounds to nearest
        assert s.dtype == s_ref.dtype and torch.equal(s, s_ref)
    assert_close(s, s_ref, "add_rms_norm's sum", dtype)
    assert_close(y, rms_norm_reference(s, w, 1e-6) if not CUDA else y_ref, "add_rms_norm", dtype)  # of its sum
    wide = torch.cat([res, res], -1)[..., :shape[-1]]  # a residual of strided rows
    y2, s2 = add_rms_norm_triton(x, wide, w, 1e-6)
    assert torch.equal(s2, s) and torch.equal(y2, y)
    with pytest.raises(ValueError, match="differ"):
        add_rms_norm_triton(x, res[..., :1], w, 1e-6)


@pytest.mark.parametrize("shape", [(2, 5, 2 * 1536), (7, 2 * 130), (3, 2 * 7), (1, 1, 2 * 64), (9, 2 * 1100)])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@torch.no_grad()
def test_silu_mul_kernel_matches_reference(shape, dtype):
    """silu(gate) * up in one launch (I > one 1024-column block, I not a power of two), HF's roundings."""
    gate_up = randn(*shape, dtype=dtype, scale=3.0)
    assert_close(silu_mul_triton(gate_up), silu_mul_reference(gate_up), "silu_mul", dtype)
    strided = torch.cat([gate_up, gate_up], -1)[..., :shape[-1]]  # rows at twice the stride
    assert_close(silu_mul_triton(strided), silu_mul_reference(gate_up), "silu_mul (strided)", dtype)


def test_kernels_are_forward_only_and_compile():
    """A gradient through them is refused; torch.compile records each as one op (fullgraph), same result."""
    x, w, gate_up = randn(2, 3, 576, dtype=BF16), randn(576, dtype=BF16), randn(2, 3, 2 * 130, dtype=BF16)
    with pytest.raises(ValueError, match="no backward"):
        rms_norm_triton(x, w.clone().requires_grad_(), 1e-6)
    with pytest.raises(ValueError, match="no backward"):
        silu_mul_triton(gate_up.clone().requires_grad_())
    with pytest.raises(ValueError, match="no backward"):
        add_rms_norm_triton(x, x.clone().requires_grad_(), w, 1e-6)

    def both(x, w, gate_up):
        return rms_norm_triton(x, w, 1e-6), silu_mul_triton(gate_up), *add_rms_norm_triton(x, x, w, 1e-6)

    with torch.no_grad():
        want = both(x, w, gate_up)
        got = torch.compile(both, backend="eager", fullgraph=True)(x, w, gate_up)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_triton_backend_carries_them(monkeypatch):
    from lolcats.ops import get_backend

    monkeypatch.setenv("LOLCATS_TRITON_ON_CPU", "1")
    x = torch.zeros(1, device=DEV)
    assert get_backend("triton", x).rms_norm.__name__ == "rms_norm_triton"
    assert get_backend("triton", x).silu_mul.__name__ == "silu_mul_triton"
    assert get_backend("triton", x).add_rms_norm.__name__ == "add_rms_norm_triton"
    assert get_backend("torch", x).add_rms_norm is add_rms_norm_reference
    assert get_backend("torch", x).rms_norm is rms_norm_reference
    assert get_backend("torch", x).silu_mul is silu_mul_reference


def counted_student(monkeypatch, arch: str):
    """A tiny converted ``arch`` model in student mode on the triton backend, whose rms_norm, add_rms_norm and
    silu_mul calls are appended to the returned list ("norm", "add_norm", "mlp") as they run the kernels."""
    from dataclasses import replace

    from conftest import tiny_model
    from lolcats import ops
    from lolcats.attention.convert import convert_model
    from lolcats.attention.modes import set_attention_mode
    from lolcats.config import AttentionConfig

    monkeypatch.setenv("LOLCATS_TRITON_ON_CPU", "1")
    calls = []
    tri = ops.get_backend("triton", torch.zeros(1))
    counted = replace(tri, rms_norm=lambda *a: calls.append("norm") or rms_norm_triton(*a),
                      add_rms_norm=lambda *a: calls.append("add_norm") or add_rms_norm_triton(*a),
                      silu_mul=lambda *a: calls.append("mlp") or silu_mul_triton(*a))
    monkeypatch.setitem(ops.BACKENDS, "triton", counted)
    model = convert_model(tiny_model(arch).to(DEV), AttentionConfig(backend="triton", window_size=8,
                                                                     feature_init="random"))
    set_attention_mode(model, "student")
    return model, calls


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_fused_decoder_runs_the_kernels(monkeypatch, arch):
    """With the triton backend a fused model's norms and MLPs run the kernels (2 layers x (1 norm + 1 add and
    norm) + the final norm, 2 MLPs) and give the unfused logits; with a gradient wanted they step aside (no kernel
    call)."""
    from lolcats.attention.use import set_inference_fusion

    model, calls = counted_student(monkeypatch, arch)
    x = torch.randint(0, 128, (2, 13), device=DEV)
    with torch.no_grad():
        ref = model(x).logits
        set_inference_fusion(model)
        got = model(x).logits
    assert sorted(calls) == ["add_norm"] * 2 + ["mlp"] * 2 + ["norm"] * 3
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    calls.clear()
    model.requires_grad_(True)
    model(x).logits.sum().backward()
    assert calls == [] and model.model.norm.weight.grad is not None


def test_decode_runner_carries_the_residual_across_layers(monkeypatch):
    """FastGenerator's decode step over fused layers (``fusion.run_layers``): per step of 2 layers, 1 input norm,
    3 residual adds in a norm's launch (both post-attention norms and layer 1's input norm), the final norm; its
    prefill (the model's forward: each layer's ``add_norm_forward``) 3 norms and 2 adds in a norm's launch; the
    same greedy tokens as the unfused model."""
    from lolcats.attention.fusion import carries_residual
    from lolcats.generation import FastGenerator

    model, calls = counted_student(monkeypatch, "llama")
    ids = torch.randint(0, 128, (2, 9), device=DEV)
    mask = torch.ones_like(ids)
    want = FastGenerator(model, 2, 4, eos_token_ids=[], use_cuda_graph=False, fuse=False).generate(ids, mask)
    assert not carries_residual(model.model.layers) and calls == []
    gen = FastGenerator(model, 2, 4, eos_token_ids=[], use_cuda_graph=False)
    assert carries_residual(model.model.layers)
    got = gen.generate(ids, mask)
    assert torch.equal(got, want)
    steps = 3  # 4 tokens: the prefill's, then 3 decode steps
    assert {c: calls.count(c) for c in set(calls)} == {"norm": 3 + 2 * steps, "add_norm": 2 + 3 * steps,
                                                       "mlp": 2 + 2 * steps}
