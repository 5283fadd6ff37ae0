"""The sparse-cache kernels compile for an H100 (sm_90) at the shapes the default model uses, on any machine (Triton's
own ptxas, no GPU), and fit its shared memory: the eviction at window 256 once asked for 320 KB and failed only when a
GPU run launched it ("out of resource: shared memory"). The launch's own constants (``launch_constants``,
``evict_constants``, the warps) are compiled, with the pointer dtypes of a bfloat16 model.

The builds run in a fresh process (this file as a script): other test modules turn on the Triton interpreter
(TRITON_INTERPRET=1), under which ``triton.jit`` gives functions the compiler cannot build."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

H100_SHARED = 232_448  # bytes of shared memory one block may use on sm_90 (227 KB)
FP32 = {"kv", "ks", "scratch", "snap_kv", "snap_ks", "gp"}
INT64 = {"runs", "snap_pos", "sp_pos", "win_pos", "pos_ptr"}
INTS = {"T", "HK", "NB", "H", "sink"}
# SmolLM2's heads (64), feature dim 128 (Hedgehog 2 x 64), cache 256: the default's window and the widest. About 25 s
# a window on a CPU. Llama-3-8B's heads (128) build to 116 KB (_evict) at window 64 and 192 KB at 256 (triton 3.9,
# 2026-12-08): within the H100's 227 KB; left out here for time (docs/PERFORMANCE.md has sm_80 / sm_89's). The
# attention launch at window 64 only: at 256 its w x w tiles take ~3 minutes to build on a CPU (at 512 not in 8).
CASES = [("_evict", 64), ("_evict_step", 64), ("_evict", 256), ("_evict_step", 256), ("_attend", 64)]


def _ptxas() -> bool:
    """Triton's NVIDIA backend with the ptxas its wheel ships (or one named by TRITON_PTXAS_PATH)."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(os.environ.get("TRITON_PTXAS_PATH", bundled))


pytestmark = pytest.mark.skipif(
    tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 3) or not _ptxas(),
    reason="builds with triton >= 3.3's ASTSource and its NVIDIA ptxas")


def signature(kernel, constants: dict) -> dict:
    """The kernel's argument types as a bfloat16 model launches it (states and chunk in bf16)."""
    def kind(name: str) -> str:
        if name in constants:
            return "constexpr"
        if name in INTS:
            return "i32"
        if name in ("eps", "scale"):
            return "fp32"
        if name == "valid_ptr":
            return "*i8"
        return "*fp32" if name in FP32 else "*i64" if name in INT64 else "*bf16"
    return {name: kind(name) for name in inspect.signature(kernel.fn).parameters}


def build(name: str, window: int) -> int:
    """Shared memory (bytes) of kernel ``name`` of ``ops/triton/sparse.py`` built for sm_90 at ``window``."""
    import torch
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lolcats.ops.triton import sparse
    dims = sparse.launch_constants(window, 2 * window, 256, 64, 64, 128, torch.bfloat16)
    if name == "_attend":
        constants, warps = {**dims, "DT": tl.bfloat16}, sparse.ATTEND_WARPS
    else:
        constants = {**dims, **sparse.evict_constants(dims, "self_recall", tl.bfloat16)}
        constants.update({"HAS_VALID": True} if name == "_evict_step" else {})
        warps = sparse.EVICT_WARPS
    kernel = getattr(sparse, name)
    src = ASTSource(kernel, signature(kernel, constants), constants)
    built = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})
    return built.metadata.shared


@pytest.fixture(scope="module")
def shared() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {tuple(k.split(":")): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.parametrize("name,window", CASES)
def test_sparse_kernels_build_for_sm90_within_shared_memory(shared, name, window):
    assert 0 < shared[(name, str(window))] <= H100_SHARED, (name, window, shared[(name, str(window))])


if __name__ == "__main__":
    print(json.dumps({f"{name}:{window}": build(name, window) for name, window in CASES}))
