"""CPU check of the CUDA attention kernels' index/masking logic through a lane-level emulation
(tests/cuda/emulate_attention.py): same acceptance as the GPU tests (2x torch's own low-precision
error against fp32). No GPU needed; the GPU tests (test_attention_cuda.py) check the hardware.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from idefics3_kit.ops.attention import attention_ref, zero_empty_rows


def _emu():
    spec = importlib.util.spec_from_file_location(
        "_i3k_emulate_attention", os.path.join(os.path.dirname(os.path.abspath(__file__)), "emulate_attention.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


emu = _emu()


def _check(out, q, k, v, **kw):
    # the kernels open rows with no key; ops.attention zeroes them afterwards (the reference semantics)
    out = zero_empty_rows(out, kw.get("causal", False), kw.get("key_padding_mask"))
    ref32 = attention_ref(q.float(), k.float(), v.float(), **kw)
    ref_lp = attention_ref(q, k, v, **kw).float()
    err = (out.float() - ref32).abs().max().item()
    err_pt = (ref_lp - ref32).abs().max().item()
    assert err <= 2 * err_pt + 1e-5, f"emulated kernel error {err:.3e} > 2 x torch's {err_pt:.3e}"


@pytest.mark.parametrize("d", [72, 64])
@pytest.mark.parametrize("mask", ["none", "padding", "empty_row"])
def test_fwd_vision(d, mask):
    torch.manual_seed(d)
    b, h, l = 2, 2, 70
    q, k, v = (torch.randn(b, h, l, d, dtype=torch.bfloat16) for _ in range(3))
    kpm = None
    if mask != "none":
        kpm = torch.ones(b, l, dtype=torch.bool)
        kpm[1, 50:] = False
        if mask == "empty_row":
            kpm[0] = False
    out = emu.attention_fwd(q, k, v, kpm, d ** -0.5, causal=False)
    _check(out, q, k, v, key_padding_mask=kpm, scale=d ** -0.5)


@pytest.mark.parametrize("lq,lk", [(70, 70), (20, 150), (1, 65)])
@pytest.mark.parametrize("left_pad", [False, True])
def test_fwd_prefill_gqa(lq, lk, left_pad):
    torch.manual_seed(lq + lk)
    b, hq, hkv, d = 2, 4, 2, 64
    q = torch.randn(b, hq, lq, d, dtype=torch.float16)
    k, v = (torch.randn(b, hkv, lk, d, dtype=torch.float16) for _ in range(2))
    kpm = None
    if left_pad:
        kpm = torch.ones(b, lk, dtype=torch.bool)
        kpm[0, : lk - 1] = False  # padded queries opened up
        kpm[1, : lk // 2] = False
    out = emu.attention_fwd(q, k, v, kpm, d ** -0.5, causal=True)
    _check(out, q, k, v, causal=True, key_padding_mask=kpm, scale=d ** -0.5)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("variant", ["plain", "mask", "seqlens"])
def test_decode(d, splits, variant):
    torch.manual_seed(d + splits)
    b, hq, hkv, lk = 2, 4, 2, 90
    q = torch.randn(b, hq, 1, d, dtype=torch.bfloat16)
    k, v = (torch.randn(b, hkv, lk, d, dtype=torch.bfloat16) for _ in range(2))
    kpm = seqlens = None
    if variant == "mask":
        kpm = torch.rand(b, lk) > 0.4
        kpm[0] = False
    if variant == "seqlens":
        seqlens = torch.tensor([lk, 17], dtype=torch.int32)
    out = emu.attention_decode(q, k, v, kpm, seqlens, d ** -0.5, splits)
    for i in range(b):
        n = lk if seqlens is None else int(seqlens[i])
        m = None if kpm is None else kpm[i: i + 1, :n]
        _check(out[i: i + 1], q[i: i + 1], k[i: i + 1, :, :n], v[i: i + 1, :, :n], key_padding_mask=m,
               scale=d ** -0.5)
