"""Attention ops: compiled CPU kernels against the reference, with PyTorch-derived tolerances."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from idefics3_kit import ops
from idefics3_kit.ops import _library
import importlib

attention_ops = importlib.import_module("idefics3_kit.ops.attention")
from idefics3_kit.ops.attention import attention_ref, attention_sdpa, compiled_kernel, zero_empty_rows

from _tolerance import output_ulp  # tests/ops/_tolerance.py

needs_ext = pytest.mark.skipif(not ops.has_extension(),
                               reason=f"compiled extension not built ({ops.extension_error()})")


def _inputs(b, hq, hkv, lq, lk, d, mask_kind, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, d, generator=g)
    kpm = None
    if mask_kind == "random":
        kpm = torch.rand(b, lk, generator=g) > 0.4
        kpm[0] = False  # a fully masked row: its queries output 0
    elif mask_kind == "left_pad":
        kpm = torch.ones(b, lk, dtype=torch.bool)
        kpm[-1, : lk // 2] = False
    return q, k, v, kpm


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _check_close(q, k, v, kpm, causal, dtype, run):
    """err(ours vs fp32 reference) <= max(2 * err(reference in dtype vs fp32 reference), one ulp
    of the output in dtype) + eps (the ulp floor: _tolerance.output_ulp)."""
    ref32 = attention_ref(q, k, v, causal=causal, key_padding_mask=kpm)
    ql, kl, vl = q.to(dtype), k.to(dtype), v.to(dtype)
    ours = run(ql, kl, vl)
    assert ours.shape == ref32.shape and ours.dtype == dtype
    assert torch.isfinite(ours.float()).all()
    # rows with nothing to attend to are written as exact zeros by the kernels themselves
    ones = torch.ones_like(ours)
    assert torch.equal(ours * (zero_empty_rows(ones, causal, kpm) == 0), torch.zeros_like(ours))
    if dtype == torch.float32:
        assert _max_err(ours, ref32) <= 1e-5
    else:
        ref_low = attention_ref(ql, kl, vl, causal=causal, key_padding_mask=kpm)
        bound = max(2 * _max_err(ref_low, ref32), output_ulp(ref32, dtype)) + 2e-3
        assert _max_err(ours, ref32) <= bound


# ---- reference semantics (always run) ---------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_reference_and_sdpa_agree_with_masks(causal):
    q, k, v, kpm = _inputs(2, 4, 2, 5, 9, 16, "random", 0)
    ref = attention_ref(q, k, v, causal=causal, key_padding_mask=kpm)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(attention_sdpa(q, k, v, causal=causal, key_padding_mask=kpm), ref,
                               atol=1e-5, rtol=1e-5)


def test_ops_attention_runs_on_either_backend():
    q, k, v, kpm = _inputs(1, 2, 1, 3, 3, 8, "left_pad", 1)
    out = ops.attention(q, k, v, causal=True, key_padding_mask=kpm)
    torch.testing.assert_close(out, attention_ref(q, k, v, causal=True, key_padding_mask=kpm), atol=1e-5, rtol=1e-5)


def test_force_reference_env():
    code = "import idefics3_kit.ops as o; print(o.backend())"
    env = dict(os.environ, IDEFICS3_KIT_FORCE_REFERENCE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def test_backend_reports_extension():
    assert ops.backend() == ("compiled" if ops.has_extension() else "reference")
    with ops.use_reference():
        assert ops.backend() == "reference"
    assert (ops.build_info() is not None) == (ops.has_extension() and ops.build_info() is not None)


# ---- compiled vs reference --------------------------------------------------------------------

head_dims = st.sampled_from([8, 16, 64, 72])
dtypes = st.sampled_from([torch.float32, torch.bfloat16])
masks = st.sampled_from([None, "random", "left_pad"])


@needs_ext
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 3), hkv=st.integers(1, 3), groups=st.integers(1, 4), lq=st.integers(1, 140),
       extra=st.integers(0, 70), d=head_dims, dtype=dtypes, mask=masks, causal=st.booleans(),
       seed=st.integers(0, 1000))
@example(b=2, hkv=1, groups=1, lq=2, extra=1, d=64, dtype=torch.bfloat16, mask="random", causal=False, seed=2)
def test_vision_and_prefill_match_reference(b, hkv, groups, lq, extra, d, dtype, mask, causal, seed):
    lk = lq + extra if causal else max(1, extra + lq // 2)
    q, k, v, kpm = _inputs(b, hkv * groups, hkv, lq, lk, d, mask, seed)
    op = torch.ops.idefics3_kit.prefill_attention if causal else torch.ops.idefics3_kit.vision_attention
    _check_close(q, k, v, kpm, causal, dtype, lambda ql, kl, vl: op(ql, kl, vl, kpm, 1 / math.sqrt(d)))


@needs_ext
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "left_pad"])
def test_vision_and_prefill_bf16_over_several_query_blocks(causal, mask):
    # 600 queries: two bf16 blocks of the blocked kernel when non-causal (512 rows), three when
    # causal (256), the last one partial (on an AMX CPU the tile kernels take these calls instead)
    q, k, v, kpm = _inputs(1, 2, 1, 600, 600, 64, mask, 3)
    op = torch.ops.idefics3_kit.prefill_attention if causal else torch.ops.idefics3_kit.vision_attention
    _check_close(q, k, v, kpm, causal, torch.bfloat16, lambda ql, kl, vl: op(ql, kl, vl, kpm, 0.125))


@needs_ext
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 3), hkv=st.integers(1, 3), groups=st.integers(1, 6), lk=st.integers(1, 700),
       d=head_dims, dtype=dtypes, mask=masks, seed=st.integers(0, 1000))
def test_decode_matches_reference_on_cache_views(b, hkv, groups, lk, d, dtype, mask, seed):
    q, k, v, kpm = _inputs(b, hkv * groups, hkv, 1, lk, d, mask, seed)

    def run(ql, kl, vl):
        # k/v as strided views of a larger preallocated cache, like KVCache.update returns.
        kc = torch.zeros(b, hkv, lk + 13, d, dtype=ql.dtype)
        vc = torch.zeros_like(kc)
        kc[:, :, :lk], vc[:, :, :lk] = kl, vl
        kv, vv = kc[:, :, :lk], vc[:, :, :lk]
        assert kv.stride(1) == (lk + 13) * d  # heads are Lmax rows apart, not Lk
        return torch.ops.idefics3_kit.decode_attention(ql, kv, vv, kpm, None, 1 / math.sqrt(d))

    _check_close(q, k, v, kpm, True, dtype, run)


@needs_ext
@pytest.mark.parametrize("d", [8, 40, 64, 72, 96, 120, 128])
@pytest.mark.parametrize("lq,lk,mask", [(17, 70, "random"), (40, 33, None), (1, 1, None), (16, 100, "left_pad")])
def test_vision_bf16_every_head_dim_of_the_tile_kernel(d, lq, lk, mask):
    # bf16 vision attention at each of the AMX kernel's three tile layouts (Q and the outputs in
    # tiles up to 64, Q reloaded up to 80, the outputs in a buffer above) and each register blocking
    # of the AVX-512 BF16 one, dims that are not a multiple of 16 or 32 (zero padded inside), GQA,
    # partial query and key blocks, masks, and the [B, L, H, D] projection layout. On a CPU with
    # neither the blocked kernel runs the same cases.
    q, k, v, kpm = _inputs(2, 4, 2, lq, lk, d, mask, d + lq)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # [B, L, H, D] memory
    _check_close(q, k, v, kpm, False, torch.bfloat16,
                 lambda ql, kl, vl: torch.ops.idefics3_kit.vision_attention(ql, kl, vl, kpm, 1 / math.sqrt(d)))


@needs_ext
@pytest.mark.parametrize("d", [8, 64, 72, 128])
@pytest.mark.parametrize("lq,lk,mask", [(17, 70, "random"), (40, 40, None), (1, 1, None), (33, 100, "left_pad"),
                                        (100, 100, "left_pad"), (48, 64, "random")])
def test_prefill_bf16_causal_tile_kernel(d, lq, lk, mask):
    # bf16 causal prefill through the flash kernels' causal mode (on CPUs with AMX or AVX-512 BF16;
    # the blocked kernel elsewhere): query blocks across the diagonal of 32- and 64-key blocks, a key prefix longer
    # than the queries (a cached past), GQA, left padding that leaves the first rows with no key
    # (zeros), and the [B, L, H, D] projection layout.
    q, k, v, kpm = _inputs(2, 6, 2, lq, lk, d, mask, d + lq + lk)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # [B, L, H, D] memory
    _check_close(q, k, v, kpm, True, torch.bfloat16,
                 lambda ql, kl, vl: torch.ops.idefics3_kit.prefill_attention(ql, kl, vl, kpm, 1 / math.sqrt(d)))


@needs_ext
@pytest.mark.parametrize("lq,lk,mask", [(40, 40, None), (33, 100, "left_pad")])
def test_prefill_bf16_on_a_cpu_without_onednn_bf16_runs_float32(lq, lk, mask, monkeypatch):
    # AVX2-only CPUs (AMD Zen 3): the blocked kernel's bf16 GEMMs would be torch's slow bf16 mm, so
    # ops.attention runs the kernel on float32 upcasts and rounds once; forced here on any CPU.
    monkeypatch.setattr(_library, "onednn_bf16", lambda: False)
    calls = []
    original = attention_ops.run_kernel
    monkeypatch.setattr(attention_ops, "run_kernel", lambda name, q, *a: calls.append(q.dtype) or original(name, q, *a))
    q, k, v, kpm = _inputs(2, 6, 2, lq, lk, 64, mask, lq + lk)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # [B, L, H, D] memory
    _check_close(q, k, v, kpm, True, torch.bfloat16,
                 lambda ql, kl, vl: ops.attention(ql, kl, vl, causal=True, key_padding_mask=kpm))
    assert calls == [torch.float32]
    out = ops.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, key_padding_mask=kpm)
    assert out.transpose(1, 2).is_contiguous()  # the [B, L, H, D] memory the callers reshape for free


@needs_ext
@pytest.mark.parametrize("d", [32, 64, 96, 128])
@pytest.mark.parametrize("groups", [1, 4, 7, 16])
@pytest.mark.parametrize("lk", [1, 15, 16, 17, 33, 300])
def test_decode_bf16_tile_path_shapes(d, groups, lk):
    # The AMX path (bf16, head dim a multiple of 32 up to 128, <= 16 heads per group) on CPUs that
    # have it: partial 16-key score blocks, partial 32-key value blocks, masks. Elsewhere the
    # same shapes exercise the AVX-512 / portable kernels.
    q, k, v, kpm = _inputs(2, 2 * groups, 2, 1, lk, d, "random" if lk > 1 else None, d + groups + lk)
    _check_close(q, k, v, kpm, True, torch.bfloat16,
                 lambda ql, kl, vl: torch.ops.idefics3_kit.decode_attention(ql, kl, vl, kpm, None, 1 / math.sqrt(d)))


@needs_ext
@pytest.mark.parametrize("mask_kind", [None, "first_chunk_masked", "random"])
@pytest.mark.parametrize("d", [64, 128])
def test_decode_bf16_rows_of_several_chunks(mask_kind, d):
    # Eight (batch, kv head) rows, so each row is one item of 700 keys and the AMX path walks it in
    # chunks of 256, 256 and 188 keys with a running max. Key 650 of every row gets the largest
    # score by far, so the max rises in the last chunk and the earlier chunks' sums and outputs
    # must be rescaled; with the first chunk masked, the max starts at -inf in a later chunk.
    b, hkv, groups, lk = 2, 4, 4, 700
    q, k, v, kpm = _inputs(b, hkv * groups, hkv, 1, lk, d, "random" if mask_kind == "random" else None, 17)
    k[:, :, 650] = q.view(b, hkv, groups, d).mean(2) * 2
    if mask_kind == "first_chunk_masked":
        kpm = torch.ones(b, lk, dtype=torch.bool)
        kpm[:, :256] = False
    _check_close(q, k, v, kpm, True, torch.bfloat16,
                 lambda ql, kl, vl: torch.ops.idefics3_kit.decode_attention(ql, kl, vl, kpm, None, 1 / math.sqrt(d)))


@needs_ext
def test_decode_amx_and_vector_paths_agree():
    # The same bf16 call with the tile path on and off (IDEFICS3_KIT_NO_AMX, read once per process).
    code = ("import torch, idefics3_kit.ops; g = torch.Generator().manual_seed(0); "
            "q = torch.randn(1, 8, 1, 128, generator=g).bfloat16(); k = torch.randn(1, 2, 777, 128, generator=g).bfloat16(); "
            "v = torch.randn(1, 2, 777, 128, generator=g).bfloat16(); "
            "torch.save(torch.ops.idefics3_kit.decode_attention(q, k, v, None, None, 0.088), __import__('sys').argv[1])")
    outs = []
    for flag in ("0", "1"):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ik_decode_amx_{os.getpid()}_{flag}.pt")
        subprocess.run([sys.executable, "-c", code, path], check=True, env={**os.environ, "IDEFICS3_KIT_NO_AMX": flag})
        outs.append(torch.load(path))
        os.remove(path)
    # both within bf16 rounding of each other (they round the probabilities at different points)
    assert _max_err(outs[0], outs[1]) <= 2e-2


@needs_ext
def test_decode_cache_seqlens_bounds_keys():
    q, k, v, _ = _inputs(2, 4, 2, 1, 50, 64, None, 3)
    lens = torch.tensor([20, 50], dtype=torch.int32)
    out = torch.ops.idefics3_kit.decode_attention(q, k, v, None, lens, 0.125)
    kpm = torch.arange(50)[None] < lens[:, None]
    torch.testing.assert_close(out, attention_ref(q, k, v, causal=True, key_padding_mask=kpm, scale=0.125),
                               atol=1e-5, rtol=1e-5)


@needs_ext
@pytest.mark.parametrize("causal,lq", [(False, 33), (True, 20), (True, 1)])
def test_dispatch_routes_model_layouts(causal, lq, monkeypatch):
    monkeypatch.setattr(attention_ops, "PREFER_TORCH_NONCAUSAL", False)
    # The components pass [B, L, H, D] projections viewed as [B, H, L, D] (non-contiguous).
    b, h, d = 2, 4, 64
    x = torch.randn(b, lq if not causal else 40, h, d).transpose(1, 2)
    q = torch.randn(b, lq, h, d).transpose(1, 2)
    kpm = torch.ones(b, x.shape[2], dtype=torch.bool)
    kpm[1, :3] = False
    assert compiled_kernel(q, x, x, causal, kpm) is not None
    out = ops.attention(q, x, x, causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(out, attention_ref(q, x, x, causal=causal, key_padding_mask=kpm), atol=1e-5,
                               rtol=1e-5)
    assert out.transpose(1, 2).is_contiguous()  # the caller's reshape is free


@needs_ext
def test_dispatch_policy_sends_vision_to_torch():
    q = torch.randn(1, 2, 5, 16)
    expect_torch = attention_ops.PREFER_TORCH_NONCAUSAL
    assert (compiled_kernel(q, q, q, False, None) is None) == expect_torch
    assert compiled_kernel(q, q, q, True, None) == "prefill_attention"


@needs_ext
@pytest.mark.parametrize("flags,dtype,d,expect", [
    ({"avx512_bf16"}, torch.bfloat16, 64, "vision_attention"),    # AMD Zen 4: the AVX-512 flash kernel
    ({"avx512_bf16"}, torch.bfloat16, 136, "vision_attention"),   # ... past 128: the blocked kernel
    ({"avx512_bf16"}, torch.float32, 64, None),                   # float32 stays with SDPA
    (set(), torch.bfloat16, 64, None),                             # no native bf16 dot product
    ({"avx512_bf16", "amx_bf16"}, torch.bfloat16, 64, "vision_attention"),  # the AMX kernel
    ({"avx512_bf16", "amx_bf16"}, torch.bfloat16, 136, None),      # ... past 128: SDPA's AMX brgemm
])
def test_dispatch_sends_bf16_vision_to_the_op_on_cpus_with_a_bf16_dot_product(flags, dtype, d, expect, monkeypatch):
    monkeypatch.setattr(_library, "cpu_has", lambda flag: flag in flags)
    q = torch.randn(1, 2, 40, d).to(dtype)
    assert compiled_kernel(q, q, q, False, None) == (expect if attention_ops.PREFER_TORCH_NONCAUSAL else "vision_attention")


@needs_ext
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 64), (torch.bfloat16, 32), (torch.bfloat16, 72),
                                     (torch.bfloat16, 128), (torch.bfloat16, 136), (torch.float32, 64)])
def test_dispatch_sends_bf16_vision_to_a_flash_kernel_where_there_is_one(dtype, d):
    q = torch.randn(1, 2, 40, d).to(dtype)
    flash = (_library.cpu_has("amx_bf16") or _library.cpu_has("avx512_bf16")) and dtype == torch.bfloat16 and d <= 128
    to_op = attention_ops._flash_vision(q) and attention_ops._cpu_covers(q, q, q, False)
    assert (compiled_kernel(q, q, q, False, None) == "vision_attention") == (to_op or not attention_ops.PREFER_TORCH_NONCAUSAL)
    assert to_op or not flash
    if flash:  # through the router: a flash kernel, within the reference's own bf16 error
        q32, k32, v32 = (torch.randn(2, 3, 70, d, generator=torch.Generator().manual_seed(i)) for i in range(3))
        kpm = torch.ones(2, 70, dtype=torch.bool)
        kpm[1, 50:] = False
        _check_close(q32, k32, v32, kpm, False, torch.bfloat16,
                     lambda ql, kl, vl: ops.attention(ql, kl, vl, causal=False, key_padding_mask=kpm))


@needs_ext
def test_dispatch_falls_back_for_unsupported():
    q = torch.randn(1, 2, 3, 12)  # head dim not a multiple of 8
    assert compiled_kernel(q, q, q, True, None) is None
    q16 = torch.randn(1, 2, 3, 16).half()
    assert compiled_kernel(q16, q16, q16, True, None) is None
    torch.testing.assert_close(ops.attention(q16, q16, q16), attention_ref(q16, q16, q16), atol=2e-3, rtol=2e-3)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_attention_ops(dtype):
    q, k, v, kpm = _inputs(2, 4, 2, 5, 7, 16, "left_pad", 4)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    ns = torch.ops.idefics3_kit
    torch.library.opcheck(ns.vision_attention.default, (q, k, v, kpm, 0.25))
    torch.library.opcheck(ns.prefill_attention.default, (q, k, v, kpm, 0.25))
    torch.library.opcheck(ns.decode_attention.default, (q[:, :, :1], k, v, kpm, None, 0.25))
    torch.library.opcheck(ns.decode_attention.default,
                          (q[:, :, :1], k, v, None, torch.tensor([3, 7], dtype=torch.int32), 0.25))


# ---- argument checks: clear errors, never a crash -------------------------------------------

@needs_ext
def test_attention_bad_arguments():
    ns = torch.ops.idefics3_kit
    q = torch.randn(1, 4, 3, 16)
    k = torch.randn(1, 2, 5, 16)
    cases = [
        (lambda: ns.vision_attention(q.half(), k.half(), k.half(), None, 1.0), "q must be float32 or bfloat16"),
        (lambda: ns.vision_attention(q, k.bfloat16(), k, None, 1.0), "k must have q's dtype"),
        (lambda: ns.vision_attention(q[0], k, k, None, 1.0), "q must be 4-D"),
        (lambda: ns.vision_attention(q, k.transpose(2, 3), k.transpose(2, 3), None, 1.0), "stride"),
        (lambda: ns.vision_attention(q[..., :12], k[..., :12], k[..., :12], None, 1.0), "multiple of 8"),
        (lambda: ns.vision_attention(torch.randn(1, 3, 3, 16), k, k, None, 1.0), "multiple of key/value heads"),
        (lambda: ns.vision_attention(q, k, torch.randn(1, 2, 6, 16), None, 1.0), "same shape"),
        (lambda: ns.vision_attention(q, k, k, torch.ones(1, 4, dtype=torch.bool), 1.0), "key_mask must be"),
        (lambda: ns.vision_attention(q, k, k, torch.ones(1, 5), 1.0), "key_mask must be Bool"),
        (lambda: ns.prefill_attention(torch.randn(1, 4, 6, 16), k, k, None, 1.0), "Lq <= Lk"),
        (lambda: ns.decode_attention(q, k, k, None, None, 1.0), "one query per sequence"),
        (lambda: ns.decode_attention(q[:, :, :1], k, k, None, torch.tensor([9], dtype=torch.int32), 1.0),
         r"cache_seqlens\[0\] must be in"),
        (lambda: ns.decode_attention(q[:, :, :1], k, k, None, torch.tensor([2]), 1.0), "cache_seqlens must be Int"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_under_inference_mode(dtype):
    # Inference tensors: the kernels' worker threads must run under the caller's inference mode.
    torch.set_num_threads(2)
    with torch.inference_mode():
        q, k, v, kpm = _inputs(2, 4, 2, 70, 90, 64, "left_pad", 5)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        ns = torch.ops.idefics3_kit
        for out in (ns.prefill_attention(q, k, v, kpm, 0.125), ns.vision_attention(q, k, v, kpm, 0.125),
                    ns.decode_attention(q[:, :, :1], k, v, kpm, None, 0.125)):
            assert torch.isfinite(out.float()).all()
