"""The CUDA routing must be harmless where there is no CUDA kernel (CPU CI)."""

from __future__ import annotations

import importlib

import pytest
import torch

from idefics3_kit.ops import _library
from idefics3_kit.ops.attention import compiled_kernel
from idefics3_kit.ops.preprocess import alloc_batch, fills_on

attention_module = importlib.import_module("idefics3_kit.ops.attention")  # (ops.attention is the function)


def test_has_cuda_kernel_is_false_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for op in ("preprocess_into", "resize_u8", "vision_attention", "prefill_attention", "decode_attention",
               "no_such_op"):
        assert _library.has_kernel(op, "cuda") is False
    assert not fills_on("cuda") and fills_on("cpu")


def test_attention_routes_no_cpu_tensor_to_a_cuda_kernel():
    q = torch.randn(1, 2, 3, 136, dtype=torch.bfloat16)  # 136: past the CPU flash kernels (<= 128)
    # non-causal on the CPU: torch's SDPA, or the CPU op's blocked kernel for bf16 on an AVX-512
    # BF16 CPU without AMX (ops/attention.py, _flash_vision); never a CUDA kernel
    expect = "vision_attention" if attention_module._flash_vision(q) else None
    assert compiled_kernel(q, q, q, False, None) == expect
    assert compiled_kernel(q[:, :, :1], q, q, True, None) in (None, "decode_attention")


def test_alloc_batch_shapes():
    pv, pm = alloc_batch(2, 5, 28, device="cpu", dtype=torch.bfloat16)
    assert pv.shape == (2, 5, 3, 28, 28) and pv.dtype == torch.bfloat16 and not pv.any()
    assert pm.shape == (2, 5, 28, 28) and pm.dtype == torch.int64 and not pm.any()


def test_dispatch_query_api_exists():
    # the check has_kernel relies on (private torch API): fails loudly if torch renames it
    assert hasattr(torch._C, "_dispatch_has_kernel_for_dispatch_key")
