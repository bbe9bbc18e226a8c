"""On a GPU: every CUDA kernel passes its first-use self-check for each dtype and head dim it
covers, and a model's first call leaves them all trusted (nothing fell back silently)."""

from __future__ import annotations

import importlib

import pytest
import torch

from idefics3_kit.ops import _library

attention_ops = importlib.import_module("idefics3_kit.ops.attention")
preprocess_ops = importlib.import_module("idefics3_kit.ops.preprocess")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("name", sorted(attention_ops.CUDA_HEAD_DIMS))
@pytest.mark.parametrize("dtype", attention_ops.CUDA_DTYPES)
def test_selfcheck_attention_kernels_pass(name, dtype):
    if not _library.has_kernel(name, "cuda"):
        pytest.skip(f"no CUDA kernel for {name}")
    for head_dim in attention_ops.CUDA_HEAD_DIMS[name]:
        ok, detail = attention_ops.selfcheck(name, torch.device("cuda"), dtype, head_dim)
        assert ok, f"{name} {dtype} head_dim {head_dim}: {detail}"


@pytest.mark.parametrize("name", ["resize_u8", "preprocess_into"])
def test_selfcheck_preprocess_kernels_pass(name):
    if not _library.has_kernel(name, "cuda"):
        pytest.skip(f"no CUDA kernel for {name}")
    ok, detail = preprocess_ops.selfcheck(name, torch.device("cuda"))
    assert ok, detail


def test_selfcheck_first_use_through_the_router_trusts_the_kernel():
    if not _library.has_kernel("prefill_attention", "cuda"):
        pytest.skip("no CUDA kernel for prefill_attention")
    q = torch.randn(1, 4, 16, 64, device="cuda", dtype=torch.bfloat16)
    k = v = torch.randn(1, 2, 16, 64, device="cuda", dtype=torch.bfloat16)
    assert attention_ops.compiled_kernel(q, k, v, True, None) == "prefill_attention"
    assert _library.selfcheck_results()[("prefill_attention", q.device, torch.bfloat16, 64)] is True
