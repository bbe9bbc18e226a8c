"""Decode-step ops: decode_linear and rms_norm against their references (PyTorch-derived
tolerances), and decode_layers bit-identical to the Python decoder layers it replaces."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import idefics3_kit as ik
from idefics3_kit import ops
from idefics3_kit.components import decoder as decoder_mod
from idefics3_kit.components.decoder import (CausalDecoder, KVCache, Llama3Decoder, Qwen2Decoder, rope_cos_sin,
                                             signed_sin)
from idefics3_kit.ops import _library, quant
from idefics3_kit.ops import matmul as linear_ops
from idefics3_kit.ops.matmul import decode_linear_ref
from idefics3_kit.ops.norm import rms_norm_ref

needs_ext = pytest.mark.skipif(not ops.has_extension(),
                               reason=f"compiled extension not built ({ops.extension_error()})")
ns = torch.ops.idefics3_kit


def _ulp_bf16(v: torch.Tensor) -> torch.Tensor:
    """One bfloat16 ulp at |v| (8 significant bits), as float32; the subnormal spacing below."""
    a = v.float().abs().clamp_min(2.0 ** -126)
    return torch.exp2(torch.floor(torch.log2(a)) - 7)


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


# ---- decode_linear ----------------------------------------------------------------------------

def _linear_inputs(lead, k, outs, seed):
    """x [*lead, K] bf16; weights [N_i, K] bf16; biases None / bf16 / fp32 per ``outs`` entry."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g).bfloat16()
    weights, biases = [], []
    for n, bias_dtype in outs:
        weights.append((torch.randn(n, k, generator=g) / max(1.0, k ** 0.5) * 4).bfloat16())
        biases.append(None if bias_dtype is None else torch.randn(n, generator=g).to(bias_dtype))
    return x, weights, biases


def _fp32_linear(x, weights, biases):
    return torch.cat([F.linear(x.float(), w.float(), None if b is None else b.float())
                      for w, b in zip(weights, biases)], dim=-1)


def _check_linear(x, weights, biases, y):
    n_total = sum(w.shape[0] for w in weights)
    assert y.shape == (*x.shape[:-1], n_total) and y.dtype == torch.bfloat16
    assert torch.isfinite(y.float()).all()
    ref32 = _fp32_linear(x, weights, biases)
    # PyTorch's own bf16 linear (bf16 biases, as a bf16 nn.Linear holds them) sets the tolerance
    torch_bf16 = torch.cat([F.linear(x, w, None if b is None else b.bfloat16()) for w, b in zip(weights, biases)], -1)
    assert _max_err(y, ref32) <= 2 * _max_err(torch_bf16, ref32) + 1e-3 * max(1.0, ref32.abs().max().item())
    # the reference: the same fp32 sums (another order) rounded once -> at most one bf16 ulp apart,
    # plus the fp32 reassociation slack
    ref = decode_linear_ref(x, weights, biases)
    assert ref.shape == y.shape and ref.dtype == torch.bfloat16
    mag = torch.cat([F.linear(x.float().abs(), w.float().abs(), None if b is None else b.float().abs())
                     for w, b in zip(weights, biases)], dim=-1)
    bound = _ulp_bf16(torch.maximum(y.float().abs(), ref.float().abs())) + 2.0 ** -18 * mag
    assert ((y.float() - ref.float()).abs() <= bound).all()


def test_decode_linear_ref_is_fp32_linear_rounded_once():
    x, weights, biases = _linear_inputs((3,), 40, [(5, None), (7, torch.float32), (2, torch.bfloat16)], 0)
    ref = decode_linear_ref(x, weights, biases)
    assert torch.equal(ref, _fp32_linear(x, weights, biases).bfloat16())
    assert torch.equal(decode_linear_ref(x, weights), _fp32_linear(x, weights, [None] * 3).bfloat16())


leads = st.sampled_from(["rows", "b1k", "4d"])
ks = st.sampled_from([1, 2, 31, 32, 33, 64, 576]) | st.integers(1, 700)
outs = st.lists(st.tuples(st.integers(1, 70), st.sampled_from([None, torch.bfloat16, torch.float32])),
                min_size=1, max_size=3)


@needs_ext
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 17), lead=leads, k=ks, outs=outs, seed=st.integers(0, 1000))
def test_decode_linear_matches_reference(rows, lead, k, outs, seed):
    shape = {"rows": (rows,), "b1k": (rows, 1), "4d": (1, 1, rows)}[lead]  # [M, K], [B, 1, K], [1, 1, M, K]
    x, weights, biases = _linear_inputs(shape, k, outs, seed)
    _check_linear(x, weights, biases, ns.decode_linear(x, weights, biases))


@needs_ext
def test_decode_linear_layouts_and_empty_rows():
    x, weights, biases = _linear_inputs((4,), 96, [(9, torch.float32), (5, None)], 1)
    y = ns.decode_linear(x, weights, biases)
    # a 1-D x is one row; a non-contiguous x (a strided view) gives the same values
    assert torch.equal(ns.decode_linear(x[2], weights, biases), y[2])
    wide = torch.zeros(4, 200, dtype=torch.bfloat16)
    wide[:, 7:103] = x
    strided = wide[:, 7:103]
    assert not strided.is_contiguous()
    assert torch.equal(ns.decode_linear(strided, weights, biases), y)
    # no rows at all: an empty [0, N] result
    empty = ns.decode_linear(x[:0], weights, biases)
    assert empty.shape == (0, 14) and empty.dtype == torch.bfloat16


@needs_ext
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decode_linear_split_over_workers(threads):
    # Enough weight bytes for several workers; the split points fall inside weights and the row
    # counts are not multiples of 4 (the per-worker ranges are).
    x, weights, biases = _linear_inputs((1, 1), 576, [(130, torch.bfloat16), (201, None), (67, torch.float32)], 2)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = ns.decode_linear(x, weights, biases)
        torch.set_num_threads(threads)
        y = ns.decode_linear(x, weights, biases)
        with torch.inference_mode():
            y_inf = ns.decode_linear(x, weights, biases)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y, serial) and torch.equal(y_inf, serial)  # each output's sum does not depend on the split
    _check_linear(x, weights, biases, y)


@needs_ext
@pytest.mark.parametrize("rows", [4, 5, 8, 13, 16])
def test_decode_linear_batched_rows_split_over_workers(rows):
    # 4-16 rows: the tile path where the CPU has AMX (gemv_amx.h, K a multiple of 32), else the
    # vector loop; K = 100 takes the loop everywhere. Enough weight bytes for two workers, whose
    # split falls inside a weight and leaves a tile shorter than 16 rows: the same bits either way.
    for k in (576, 100):
        x, weights, biases = _linear_inputs((rows, 1), k, [(330, torch.bfloat16), (33, None), (16, torch.float32)],
                                            rows * 7 + k)
        old = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            serial = ns.decode_linear(x, weights, biases)
            torch.set_num_threads(2)
            split = ns.decode_linear(x, weights, biases)
        finally:
            torch.set_num_threads(old)
        assert torch.equal(serial, split)
        _check_linear(x, weights, biases, serial)


@needs_ext
def test_decode_linear_dispatch():
    x, weights, biases = _linear_inputs((1, 1), 64, [(8, None), (4, torch.bfloat16)], 3)
    fast = linear_ops.kernel_isa()
    with torch.no_grad():
        y = ops.decode_linear(x, weights, biases)
        assert (y is not None) == fast
        if fast:
            assert torch.equal(y, ns.decode_linear(x, weights, biases))
            assert linear_ops.applies(x.expand(linear_ops.max_rows(), 1, 64), weights[0])
        # not applicable: more rows than max_rows(), float32, the reference backend forced
        many = x.expand(linear_ops.max_rows() + 1, 1, 64).contiguous()
        assert ops.decode_linear(many, weights, biases) is None
        assert ops.decode_linear(x.float(), [w.float() for w in weights], biases) is None
        with ops.use_reference():
            assert ops.decode_linear(x, weights, biases) is None
    trained = [w.detach().clone().requires_grad_() for w in weights]
    assert ops.decode_linear(x, trained, biases) is None  # autograd needed: the kernel has no backward


# ---- rms_norm ---------------------------------------------------------------------------------

def _check_rms_norm(x, w, eps, out):
    ref = rms_norm_ref(x, w, eps)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert torch.isfinite(out.float()).all()
    if x.dtype == torch.float32:
        # the sum of squares in another order, 1/sqrt vs rsqrt: a few float32 roundings
        assert ((out - ref).abs() <= 1e-6 * ref.abs() + 1e-30).all()
    else:
        # The normalized row is cast to bf16 before the weight multiplies it: a float32 ulp in
        # the statistics can move that cast by one bf16 ulp (|w| times that in the product),
        # then the product rounds once more.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
        bound = w.float().abs() * _ulp_bf16(normed) + _ulp_bf16(torch.maximum(out.float().abs(), ref.float().abs()))
        assert ((out.float() - ref.float()).abs() <= bound).all()


dims = st.sampled_from([1, 2, 15, 16, 17, 96, 576, 3000]) | st.integers(1, 3000)


@needs_ext
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d=dims, rows=st.integers(1, 5), three_d=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       eps=st.sampled_from([1e-6, 1e-5, 0.1]), scale=st.sampled_from([1e-3, 1.0, 30.0]),
       inference=st.booleans(), seed=st.integers(0, 1000))
def test_rms_norm_matches_reference(d, rows, three_d, dtype, eps, scale, inference, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, 1, d) if three_d else (rows, d)
    with torch.inference_mode(inference):
        x = (torch.randn(*shape, generator=g) * scale).to(dtype)
        w = (torch.randn(d, generator=g) * 2).to(dtype)
        out = ns.rms_norm(x, w, eps)
        _check_rms_norm(x, w, eps, out)
        # unit weight: the normalized row itself, at most one ulp from the reference's cast
        ones = torch.ones(d, dtype=dtype)
        out1, ref1 = ns.rms_norm(x, ones, eps), rms_norm_ref(x, ones, eps)
        tol = 1e-6 * ref1.abs() + 1e-30 if dtype == torch.float32 else _ulp_bf16(ref1)
        assert ((out1.float() - ref1.float()).abs() <= tol).all()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_many_rows_and_views_under_inference_mode(dtype):
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():  # rows over several parallel chunks, on worker threads
            x = torch.randn(300, 2, 576).to(dtype)
            w = torch.randn(576).to(dtype)
            out = ns.rms_norm(x, w, 1e-5)
            _check_rms_norm(x, w, 1e-5, out)
            t = x.transpose(0, 1)  # non-contiguous x: same rows, same results
            assert torch.equal(ns.rms_norm(t, w, 1e-5), out.transpose(0, 1))
            assert ns.rms_norm(x[:0], w, 1e-5).shape == (0, 2, 576)
    finally:
        torch.set_num_threads(old)


@needs_ext
def test_rms_norm_dispatch():
    x = torch.randn(3, 64)
    w = torch.randn(64)
    with torch.no_grad():
        xb, wb = x.bfloat16(), w.bfloat16()
        assert torch.equal(ops.rms_norm(xb, wb, 1e-5), ns.rms_norm(xb, wb, 1e-5))
        # float32 stays on torch's own (float32 logits equal to transformers')
        assert torch.equal(ops.rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))
        with ops.use_reference():
            assert torch.equal(ops.rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))
        # mixed dtypes and float16 go to the reference
        assert torch.equal(ops.rms_norm(x.bfloat16(), w, 1e-5), rms_norm_ref(x.bfloat16(), w, 1e-5))
        assert torch.equal(ops.rms_norm(x.half(), w.half(), 1e-5), rms_norm_ref(x.half(), w.half(), 1e-5))
    # autograd: the reference, gradients flow
    wg = w.clone().requires_grad_()
    out = ops.rms_norm(x, wg, 1e-5)
    out.sum().backward()
    assert out.grad_fn is not None and wg.grad is not None and torch.isfinite(wg.grad).all()


# ---- decode_layers: bit-identical to the Python layers ------------------------------------------

def _tiny_decoder(dtype):
    torch.manual_seed(0)
    return ik.VLM(ik.VLMConfig.preset("tiny")).decoder.to(dtype).eval()


def _qwen2_decoder(dtype):
    torch.manual_seed(1)
    cfg = ik.Qwen2DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2)
    dec = Qwen2Decoder(cfg).to(dtype).eval()
    with torch.no_grad():  # nn.Linear's default biases are small; make them matter
        for layer in dec.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.normal_()
    return dec


DECODERS = {"tiny": _tiny_decoder, "qwen2": _qwen2_decoder}


def _expect_fused(dtype, b) -> bool:
    if not _library.cpu_is_vectorized():
        return False
    return dtype == torch.float32 or (linear_ops.kernel_isa() and b <= linear_ops.max_rows())


def _run_decode(dec, b, padded, steps, prefill=7, shared_positions=False, seed=0):
    """Prefill ``prefill`` tokens (none: the first step starts from an empty cache), then
    ``steps`` one-token steps; the logits of each call and the cache. ``shared_positions``:
    position_ids [1, L] for the whole batch (no padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, dec.vocab_size, (b, prefill + steps), generator=g)
    mask = torch.ones(b, prefill, dtype=torch.long)
    if padded:
        mask[-1, :3] = 0  # left padding in the last row
    cache = dec.new_cache(b, prefill + steps + 2)
    logits = []
    with torch.inference_mode():
        if prefill:
            pos = torch.arange(prefill)[None] if shared_positions else (mask.cumsum(-1) - 1).clamp_min(0)
            logits.append(dec(input_ids=ids[:, :prefill], cache=cache, attention_mask=mask if padded else None,
                              position_ids=pos).logits)
        for t in range(prefill, prefill + steps):
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], 1)
            pos = torch.tensor([[t]]) if shared_positions else (mask.cumsum(-1) - 1)[:, -1:]
            out = dec(input_ids=ids[:, t:t + 1], cache=cache, attention_mask=mask if padded else None,
                      position_ids=pos)
            logits.append(out.logits)
    return logits, cache


def _compare_fused_and_python(dec, dtype, b, monkeypatch, steps=3, prefill=7, **kw):
    fused_ran = []
    original = CausalDecoder._one_call_step

    def spy(self, *args):
        out = original(self, *args)
        fused_ran.append(out is not None)
        return out

    monkeypatch.setattr(CausalDecoder, "_one_call_step", spy)
    fused_logits, fused_cache = _run_decode(dec, b, steps=steps, prefill=prefill, **kw)
    # a prefill (several tokens) runs the Python layers; each one-token step the fused op
    assert fused_ran == [False] * (prefill > 0) + [_expect_fused(dtype, b)] * steps

    monkeypatch.setattr(CausalDecoder, "_one_call_step", lambda *a, **k: None)
    python_logits, python_cache = _run_decode(dec, b, steps=steps, prefill=prefill, **kw)
    monkeypatch.setattr(CausalDecoder, "_one_call_step", original)

    assert len(fused_logits) == len(python_logits) == (prefill > 0) + steps
    for got, want in zip(fused_logits, python_logits):
        assert got.dtype == dtype and torch.equal(got, want)
    assert fused_cache.length == python_cache.length == prefill + steps
    for got, want in zip(fused_cache.keys + fused_cache.values, python_cache.keys + python_cache.values):
        assert torch.equal(got, want)
        assert got[:, :, prefill + steps:].count_nonzero() == 0  # nothing written past the last step


@needs_ext
@pytest.mark.parametrize("name", ["tiny", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 2, 8])  # 8: the tile path of decode_linear where the CPU has AMX
@pytest.mark.parametrize("padded", [False, True])
def test_decode_layers_bit_identical_to_python_layers(name, dtype, b, padded, monkeypatch):
    _compare_fused_and_python(DECODERS[name](dtype), dtype, b, monkeypatch, padded=padded)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["empty_cache", "shared_positions"])
def test_decode_layers_bit_identical_edge_steps(dtype, case, monkeypatch):
    dec = _tiny_decoder(dtype)
    if case == "empty_cache":  # the very first token is a one-token step: past = 0
        _compare_fused_and_python(dec, dtype, 2, monkeypatch, steps=2, prefill=0, padded=False)
    else:  # position_ids [1, 1] for a batch of 2: the Python layers broadcast the rotary tables
        _compare_fused_and_python(dec, dtype, 2, monkeypatch, padded=False, shared_positions=True)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 2, 3, 6])
def test_decode_layers_bit_identical_with_odd_widths_and_tile_head_dims(dtype, b, monkeypatch):
    # intermediate_size 100: SiLU's vector/scalar split falls inside rows, so the gate's layout
    # matters (float32: a contiguous F.linear output, as the Python layers use). head_dim 64:
    # bf16 attention on the AMX path where the CPU has it.
    torch.manual_seed(3)
    cfg = ik.DecoderConfig(vocab_size=128, hidden_size=128, intermediate_size=100, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    dec = Llama3Decoder(cfg).to(dtype).eval()
    _compare_fused_and_python(dec, dtype, b, monkeypatch, padded=b > 1)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 3])
def test_decode_layers_bit_identical_with_layers_of_different_mlp_widths(dtype, b, monkeypatch):
    # a pruned model: layer 1's MLP narrower than layer 0's (the bf16 step sizes its reused
    # gate|up buffers from layer 0 and gives such a layer its own)
    dec = _tiny_decoder(dtype)
    mlp = dec.model.layers[1].mlp
    hidden, narrow = dec.hidden_size, mlp.gate_proj.out_features - 24
    torch.manual_seed(5)
    mlp.gate_proj = torch.nn.Linear(hidden, narrow, bias=False, dtype=dtype)
    mlp.up_proj = torch.nn.Linear(hidden, narrow, bias=False, dtype=dtype)
    mlp.down_proj = torch.nn.Linear(narrow, hidden, bias=False, dtype=dtype)
    _compare_fused_and_python(dec.eval(), dtype, b, monkeypatch, padded=b > 1)


@needs_ext
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_decode_layers_on_a_team_of_threads_bit_identical(threads, fmt, monkeypatch):
    # Shapes that give every parallel piece of a bf16 step several workers (csrc/include/
    # idefics3_kit/step_team.h runs them on one OpenMP region for the step): q|k|v 480 KiB and
    # gate|up 1.5 MiB of bf16 weights (a worker per 192 KiB), every quantized projection past 32
    # KiB a worker, and 121 tokens of keys and values (121 KiB, a worker per 32 KiB). Three threads
    # on a two-core machine: pieces of three workers on a team capped at two threads (worker 2 runs
    # on the leader). The splits must not change any bit.
    if not _expect_fused(torch.bfloat16, 2):
        pytest.skip("bf16 decode_layers needs decode_linear's AVX-512 BF16 or AVX2 path")
    torch.manual_seed(4)
    cfg = ik.DecoderConfig(vocab_size=128, hidden_size=384, intermediate_size=1024, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2, head_dim=64)
    dec = Llama3Decoder(cfg).to(torch.bfloat16).eval()
    if fmt != "bf16":
        names = [n for n, m in dec.named_modules() if type(m) is nn.Linear and n != "lm_head"]
        quant.quantize_modules(dec, names, 8 if fmt == "int8" else 4, None if fmt == "int8" else 64)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _compare_fused_and_python(dec, torch.bfloat16, 2, monkeypatch, steps=2, prefill=120, padded=True)
    finally:
        torch.set_num_threads(old)


@needs_ext
def test_decode_layers_fused_silu_matches_aten_where_aten_runs_avx512():
    # decode_layers' fused silu(gate) * up is on only where it matched ATen's bits over every bf16
    # value at its first use; where ATen runs its AVX-512 kernels that check must pass (were it to
    # fail, e.g. after a torch upgrade, the step would quietly run ATen's two calls again)
    if torch.backends.cpu.get_cpu_capability() != "AVX512" or not _library.cpu_is_vectorized():
        pytest.skip("ATen does not run its AVX-512 kernels here: the fused SiLU stays off")
    assert _library.compiled_function("decode_silu_matches_aten")() is True


@needs_ext
@pytest.mark.parametrize("b", [1, 2])
def test_decode_layers_bit_identical_when_the_gate_overflows(b, monkeypatch):
    # gate outputs of +-inf: silu(-inf) is NaN, whose bits depend on the ATen path that rounded it
    # (vector or scalar, and ATen's SiLU and multiply split a row of 100 differently), so the fused
    # SiLU leaves such a row to ATen; the steps stay bit-identical, NaNs included
    torch.manual_seed(3)
    cfg = ik.DecoderConfig(vocab_size=128, hidden_size=128, intermediate_size=100, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    dec = Llama3Decoder(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        gate = dec.model.layers[1].mlp.gate_proj.weight
        overflow = torch.where(torch.arange(gate.shape[1]) % 2 == 0, 3e38, -3e38).to(gate.dtype)
        gate[:3] = gate[60:100] = overflow  # the vector part of a row and its tail

    def bits(tensors):
        return [t.view(torch.int16) for t in tensors]

    original = CausalDecoder._one_call_step
    fused_logits, fused_cache = _run_decode(dec, b, padded=False, steps=2)
    monkeypatch.setattr(CausalDecoder, "_one_call_step", lambda *a, **k: None)
    python_logits, python_cache = _run_decode(dec, b, padded=False, steps=2)
    monkeypatch.setattr(CausalDecoder, "_one_call_step", original)
    assert torch.isnan(python_logits[-1]).any()  # the overflow reached the logits
    for got, want in zip(bits(fused_logits + fused_cache.keys + fused_cache.values),
                         bits(python_logits + python_cache.keys + python_cache.values)):
        assert torch.equal(got, want)


def _one_call_applies(dec, dtype) -> bool:
    """Whether a one-token step of ``dec`` would run every layer in the compiled call."""
    x = torch.zeros(1, 1, dec.hidden_size, dtype=dtype)
    cos, sin = rope_cos_sin(dec.inv_freq("cpu"), torch.zeros(1, 1, dtype=torch.long), dtype)
    with torch.inference_mode():
        return dec._one_call_step(x, (cos[:, None], signed_sin(sin)[:, None]), None, dec.new_cache(1, 4)) is not None


def _hooked(dec, where):
    layer = dec.model.layers[0]
    if where == "layer":
        layer.register_forward_hook(lambda m, i, o: None)
    elif where == "mlp":
        layer.mlp.register_forward_pre_hook(lambda m, i: None)
    elif where == "projection":
        layer.self_attn.o_proj.register_forward_hook(lambda m, i, o: o * 0)
    elif where == "subclass":
        class Zero(torch.nn.Linear):
            def forward(self, x):
                return super().forward(x) * 0
        old = layer.mlp.down_proj
        new = Zero(old.in_features, old.out_features, bias=False, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight)
        layer.mlp.down_proj = new
    return dec


@needs_ext
@pytest.mark.parametrize("where", ["layer", "mlp", "projection", "subclass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hooks_and_linear_subclasses_run(where, dtype):
    # Compiled paths read weights directly; a hook or an overridden forward must still take effect,
    # so those steps run the Python layers and call the modules.
    dec = _hooked(_tiny_decoder(dtype), where)
    assert not _one_call_applies(dec, dtype)
    plain = _tiny_decoder(dtype)
    ids = torch.randint(0, dec.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        outs = []
        for model in (dec, plain):
            cache = model.new_cache(1, 8)
            model(input_ids=ids, cache=cache)
            outs.append(model(input_ids=ids[:, :1], cache=cache).logits)
    if where in ("projection", "subclass"):  # the module's own forward zeroed its output
        assert not torch.equal(outs[0], outs[1])
    else:
        assert torch.equal(outs[0], outs[1])
    if where == "projection":
        layer = dec.model.layers[0].self_attn.o_proj
        with torch.inference_mode():
            assert ops.linear(layer, torch.ones(1, 1, layer.in_features, dtype=dtype)).count_nonzero() == 0


@needs_ext
def test_decode_linear_falls_back_for_weights_it_does_not_take():
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    w = torch.randn(64, 32, dtype=torch.bfloat16).t()  # [32, 64], not contiguous
    with torch.inference_mode():
        assert ops.decode_linear(x, [w], [None]) is None
        assert ops.decode_linear(x, [w.contiguous()], [torch.zeros(32, dtype=torch.float16)]) is None
        assert ops.decode_linear(x, [w.contiguous(), w.contiguous().float()], [None, None]) is None
        # the decoder's linear falls back to F.linear for such a layer instead of raising
        layer = torch.nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
        layer.weight = torch.nn.Parameter(w, requires_grad=False)
        assert torch.equal(ops.linear(layer, x), torch.nn.functional.linear(x, w))


@needs_ext
def test_decode_attention_empty_batch_and_masked_rows_under_inference_mode():
    torch.set_num_threads(2)
    q = torch.randn(0, 4, 1, 64)
    assert ns.decode_attention(q, torch.randn(0, 2, 5, 64), torch.randn(0, 2, 5, 64), None, None, 0.1).shape == (0, 4, 1, 64)
    with torch.inference_mode():  # fully masked rows are zeroed from worker threads
        q = torch.randn(4, 8, 1, 64).bfloat16()
        k = torch.randn(4, 2, 2048, 64).bfloat16()
        mask = torch.ones(4, 2048, dtype=torch.bool)
        mask[1] = mask[3] = False
        out = ns.decode_attention(q, k, k, mask, None, 0.1)
    assert out[1].count_nonzero() == 0 and out[3].count_nonzero() == 0 and out[0].count_nonzero() > 0


def _op_args(dec, b=2, past=3, dtype=None):
    """decode_layers arguments for ``dec`` at position ``past`` (random caches, rope, mask)."""
    dtype = dtype or dec.model.embed_tokens.weight.dtype
    g = torch.Generator().manual_seed(5)
    cache = dec.new_cache(b, past + 3)
    cache.allocate(b, dec.config.num_key_value_heads, dec.config.head_dim, dtype, "cpu")
    x = torch.randn(b, 1, dec.hidden_size, generator=g).to(dtype)
    weights = dec._plain_llama_layers()[0]
    params = [None if p is None else p.detach() for layer in weights for p in layer]
    for c in cache.keys + cache.values:
        c.copy_(torch.randn(c.shape, generator=g))
    hd = dec.config.head_dim
    cos, sin = (torch.randn(b, 1, 1, hd, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(b, past + 1, dtype=torch.bool)
    mask[-1, 0] = False
    c = dec.config
    return [x, params, cache.keys, cache.values, cos, sin, mask, past, c.num_attention_heads, c.num_key_value_heads,
            c.rms_norm_eps, []]


# ---- opcheck ----------------------------------------------------------------------------------

@needs_ext
def test_opcheck_decode_linear():
    x, weights, biases = _linear_inputs((2, 1), 48, [(6, None), (5, torch.float32), (3, torch.bfloat16)], 4)
    torch.library.opcheck(ns.decode_linear.default, (x, weights, biases))
    torch.library.opcheck(ns.decode_linear.default, (x[0, 0], weights[:1], [None]))
    many, weights, biases = _linear_inputs((8, 1), 64, [(20, None), (5, torch.float32)], 6)  # the tile path's rows
    torch.library.opcheck(ns.decode_linear.default, (many, weights, biases))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_rms_norm(dtype):
    x = torch.randn(3, 2, 40).to(dtype)
    torch.library.opcheck(ns.rms_norm.default, (x, torch.randn(40).to(dtype), 1e-5))


@needs_ext
@pytest.mark.parametrize("name", ["tiny", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_decode_layers(name, dtype):
    if dtype == torch.bfloat16 and not linear_ops.kernel_isa():
        pytest.skip("bf16 decode_layers needs decode_linear's AVX-512 BF16 or AVX2 path")
    torch.library.opcheck(ns.decode_layers.default, tuple(_op_args(DECODERS[name](dtype))))


@needs_ext
def test_decode_layers_writes_the_caches_at_past():
    args = _op_args(_tiny_decoder(torch.float32), past=3)
    before = [c.clone() for c in args[2] + args[3]]
    with torch.no_grad():
        ns.decode_layers(*args)
    for old, new in zip(before, args[2] + args[3]):
        changed = (old != new).any(-1).any(1)  # [B, Lmax]: positions whose keys/values changed
        assert changed[:, 3].all() and not changed[:, :3].any() and not changed[:, 4:].any()


# ---- argument checks --------------------------------------------------------------------------

@needs_ext
def test_decode_linear_bad_arguments():
    x, weights, biases = _linear_inputs((1, 1), 32, [(4, None), (3, None)], 5)
    w = weights[0]
    cases = [
        (lambda: ns.decode_linear(x.float(), weights, biases), "x must be BFloat16"),
        (lambda: ns.decode_linear(x, [w.float()], [None]), r"weights\[0\] must be BFloat16"),
        (lambda: ns.decode_linear(x, [w, w[:, :31].contiguous()], biases),
         r"weights\[1\] must be \[N, K\] with K = 32"),
        (lambda: ns.decode_linear(x, [w[0]], [None]), r"weights\[0\] must be 2-D"),
        (lambda: ns.decode_linear(x, [w.t().contiguous().t()], [None]), r"weights\[0\] must be contiguous"),
        (lambda: ns.decode_linear(x, [w], [torch.zeros(5)]), r"biases\[0\] must be \[N\] = \[4\]"),
        (lambda: ns.decode_linear(x, [w], [torch.zeros(4, 1)]), r"biases\[0\] must be \[N\]"),
        (lambda: ns.decode_linear(x, [w], [torch.zeros(4, dtype=torch.float16)]),
         r"biases\[0\] must be bfloat16 or float32"),
        (lambda: ns.decode_linear(x, [], []), "weights must hold at least one"),
        (lambda: ns.decode_linear(x, weights, [None]), "biases must have one entry"),
        (lambda: ns.decode_linear(x[0, 0, 0], [w], [None]), "at least one dimension"),
        (lambda: ns.decode_linear(x[..., :0], [w[:, :0]], [None]), "must be positive"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


@needs_ext
def test_rms_norm_bad_arguments():
    x = torch.randn(2, 8)
    cases = [
        (lambda: ns.rms_norm(x.half(), torch.ones(8).half(), 1e-5), "x must be float32 or bfloat16"),
        (lambda: ns.rms_norm(x, torch.ones(8).bfloat16(), 1e-5), "weight must be Float, got BFloat16"),
        (lambda: ns.rms_norm(x.bfloat16(), torch.ones(8), 1e-5), "weight must be BFloat16, got Float"),
        (lambda: ns.rms_norm(x, torch.ones(7), 1e-5), r"weight must be \[D\] = \[8\]"),
        (lambda: ns.rms_norm(x, torch.ones(1, 8), 1e-5), r"weight must be \[D\] = \[8\]"),
        (lambda: ns.rms_norm(x[0, 0], torch.ones(1), 1e-5), "at least one dimension"),
        (lambda: ns.rms_norm(x, torch.ones(8), -1.0), "eps must be finite and >= 0, got -1"),
        (lambda: ns.rms_norm(x, torch.ones(8), float("nan")), "eps must be finite and >= 0, got nan"),
        (lambda: ns.rms_norm(x, torch.ones(8), float("inf")), "eps must be finite and >= 0, got inf"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


def _direct_call(*args):
    """The op through _C.decode_layers_call (what ops.decode_layers calls), final_norm, head,
    head_scale and logits None."""
    return _library.compiled_function("decode_layers_call")(*args, None, None, None, None)


@needs_ext
@pytest.mark.parametrize("caller", ["torch.ops", "decode_layers_call"])
def test_decode_layers_bad_arguments(caller):
    dec = _tiny_decoder(torch.float32)
    good = _op_args(dec, b=2, past=3)
    x, params, kc, vc, cos, sin, mask, past, h, hkv, eps, scales = good
    op = ns.decode_layers if caller == "torch.ops" else _direct_call

    def with_(**changes):
        names = ["x", "params", "kc", "vc", "cos", "sin", "mask", "past", "h", "hkv", "eps", "scales"]
        args = dict(zip(names, good))
        args.update(changes)
        return lambda: op(*[args[n] for n in names])

    cases = [
        (with_(params=params[:-1]), "params must hold 12 entries per layer, got 23"),
        (with_(params=[]), "params must hold 12 entries per layer, got 0"),
        (with_(params=params[:1] + [None] + params[2:]), r"params\[1\] \(layer 0 q_proj\) must be a tensor"),
        (with_(kc=kc[:1]), "k_cache and v_cache must hold one tensor per layer"),
        (with_(vc=vc + vc[:1]), "k_cache and v_cache must hold one tensor per layer"),
        (with_(past=6), r"past \(6\) must be in \[0, Lmax = 6\)"),
        (with_(past=-1), r"past \(-1\) must be in"),
        (with_(cos=cos[..., :8]), r"cos and sin_signed must be \[B, 1, 1, hd\]"),
        (with_(sin=sin[:1]), r"cos and sin_signed must be \[B, 1, 1, hd\]"),
        (with_(cos=cos.bfloat16()), "cos and sin_signed must be"),
        (with_(mask=mask[:, :3]), r"key_mask must be \[B, past \+ 1\] = \[2, 4\]"),
        (with_(mask=mask[:1]), r"key_mask must be \[B, past \+ 1\]"),
        (with_(mask=mask.long()), "key_mask must be Bool"),
        (with_(x=torch.randn(2, 2, dec.hidden_size)), r"x must be \[B, 1, D\]"),
        (with_(x=x.half()), "x must be float32 or bfloat16"),
        (with_(h=5), "must be a positive multiple of num_kv_heads"),
        (with_(kc=[c[:1] for c in kc]), r"cache of layer 0 must be \[B, Hkv, Lmax, hd\]"),
        (with_(vc=[c.bfloat16() for c in vc]), "cache of layer 0 must be a CPU Float tensor"),
        (with_(h=3, hkv=1, kc=[c[:, :1].contiguous() for c in kc], vc=[c[:, :1].contiguous() for c in vc]),
         r"params\[1\] \(layer 0 q_proj\) must be \[48, 96\]"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


@needs_ext
def test_decode_layers_call_matches_torch_ops_and_refuses_wrong_types():
    # ops.decode_layers reaches the op through _C.decode_layers_call (the lists read directly,
    # csrc/python/decode_call.cpp): the same dispatcher call as torch.ops, so the same answer
    dec = _tiny_decoder(torch.bfloat16)
    args = _op_args(dec, b=2, past=3)
    caches = [[c.clone() for c in args[2]], [c.clone() for c in args[3]]]
    want = ns.decode_layers(*args)
    got = _direct_call(args[0], args[1], *caches, *args[4:])
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(caches[0] + caches[1], list(args[2]) + list(args[3])))
    bad = [(0, "x", [1.0]), (1, "params", torch.zeros(2)), (2, "k_cache", [None]), (7, "past", 3.0),
           (10, "eps", "1e-5"), (11, "scales", [1])]
    for index, name, value in bad:
        changed = list(args)
        changed[index] = value
        with pytest.raises(TypeError, match=f"decode_layers_call: {name} must be"):
            _direct_call(*changed)
    with pytest.raises(TypeError, match="takes the op's 16 arguments, got 12"):
        _library.compiled_function("decode_layers_call")(*args)


# ---- when the fused path applies ---------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("change", ["none_cache", "strided_cache", "weight_dtype", "subclass_weight",
                                    "needs_grad", "meta_cache"])
def test_decode_layers_wrapper_steps_aside(change):
    """``ops.decode_layers`` answers None (the caller runs its layers) for every input the op must
    not take, checked in a few passes over all the tensors (the compiled fast-path checks)."""
    dec = _tiny_decoder(torch.float32)
    x, params, kc, vc, cos, sin, mask, past, h, hkv, eps, _ = _op_args(dec, b=2, past=3)
    kc, vc = list(kc), list(vc)
    layers = [tuple(params[i:i + 12]) for i in range(0, len(params), 12)]

    def run():
        with torch.no_grad():
            return ops.decode_layers(x, layers, kc, vc, cos, sin, mask, past, h, hkv, eps)

    assert run() is not None  # the unchanged arguments take the op
    if change == "none_cache":
        vc[1] = None
    elif change == "strided_cache":
        kc[0] = kc[0].transpose(-1, -2).contiguous().transpose(-1, -2)
    elif change == "weight_dtype":
        layers[1] = (layers[1][0].double(), *layers[1][1:])
    elif change == "subclass_weight":
        layers[0] = (*layers[0][:7], layers[0][7].as_subclass(_SubTensor), *layers[0][8:])
    elif change == "needs_grad":
        layers[1] = (*layers[1][:9], layers[1][9].clone().requires_grad_(), *layers[1][10:])
        with torch.enable_grad():
            assert ops.decode_layers(x, layers, kc, vc, cos, sin, mask, past, h, hkv, eps) is None
        return
    elif change == "meta_cache":
        kc[1] = torch.empty_like(kc[1], device="meta")
    assert run() is None


class _SubTensor(torch.Tensor):
    pass


class _OtherCache(KVCache):
    pass


def _step_runs(dec, x, cache) -> bool:
    """Whether ``dec._one_call_step`` runs every layer of this step in the compiled call."""
    cos, sin = rope_cos_sin(dec.inv_freq("cpu"), torch.zeros(x.shape[0], x.shape[1], dtype=torch.long), x.dtype)
    return dec._one_call_step(x, (cos[:, None], signed_sin(sin)[:, None]), None, cache) is not None


@needs_ext
def test_decode_layer_params_falls_back_to_python_layers():
    dec = _tiny_decoder(torch.float32)
    x = torch.randn(1, 1, dec.hidden_size)
    cache = dec.new_cache(1, 8)
    assert not _step_runs(dec, x, cache)  # autograd on
    cfg = dec.config
    with torch.no_grad():
        assert _step_runs(dec, x, cache)
        with ops.use_reference():
            assert not _step_runs(dec, x, cache)
        assert not _step_runs(dec, torch.randn(1, 2, dec.hidden_size), cache)  # two tokens
        assert not _step_runs(dec, x, None)
        other = _OtherCache(cfg.num_hidden_layers, 8)
        assert not _step_runs(dec, x, other)
        assert not _step_runs(dec, x.half(), cache)
        assert not _step_runs(dec, x.bfloat16(), cache)  # float32 weights, bf16 x
        gelu = Llama3Decoder(cfg.replace(hidden_act="gelu")).eval()
        assert not _step_runs(gelu, x, cache)
        o_bias = Llama3Decoder(cfg.replace(attention_bias=True)).eval()  # q/k/v and o_proj biases
        assert o_bias.model.layers[0].self_attn.o_proj.bias is not None
        assert not _step_runs(o_bias, x, cache)
        mlp_bias = Llama3Decoder(cfg.replace(mlp_bias=True)).eval()
        assert not _step_runs(mlp_bias, x, cache)

        class Norm(decoder_mod.RMSNorm):
            pass

        sub = _tiny_decoder(torch.float32)
        sub.model.layers[1].post_attention_layernorm = Norm(cfg.hidden_size, cfg.rms_norm_eps)
        assert not _step_runs(sub, x, cache)
        # bf16: only up to decode_linear's max_rows() rows (and with one of its vector paths)
        dec16 = _tiny_decoder(torch.bfloat16)
        rows = linear_ops.max_rows()
        x16 = torch.randn(rows + 1, 1, cfg.hidden_size).bfloat16()
        assert not _step_runs(dec16, x16, dec16.new_cache(rows + 1, 8))
        few = _step_runs(dec16, x16[:rows], dec16.new_cache(rows, 8))
        assert few == linear_ops.kernel_isa()


@needs_ext
def test_decode_layers_cache_overflow(monkeypatch):
    dec = _tiny_decoder(torch.float32)
    ids = torch.randint(3, dec.vocab_size, (2, 6))
    cache = dec.new_cache(2, 5)
    with torch.inference_mode():
        dec(input_ids=ids[:, :5], cache=cache)
        assert dec._plain_llama_layers() is not None  # plain Llama layers: the fused path takes this step
        snapshot = [c.clone() for c in cache.keys + cache.values]
        with pytest.raises(ValueError, match="KV cache overflow: 6 tokens do not fit in max_length 5"):
            dec(input_ids=ids[:, 5:], cache=cache)
        assert cache.length == 5
        assert all(torch.equal(a, b) for a, b in zip(snapshot, cache.keys + cache.values))
        # the Python layers refuse it alike
        monkeypatch.setattr(CausalDecoder, "_one_call_step", lambda *a, **k: None)
        with pytest.raises(ValueError, match="KV cache overflow"):
            dec(input_ids=ids[:, 5:], cache=cache)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", ["plain", "hooked", "subclass"])
def test_decode_layers_final_norm_as_the_module_runs_it(dtype, norm):
    """A plain final RMSNorm runs inside the one-call step (the logits equal the Python layers' and
    norm's); a hooked one makes the step step aside; another class stays outside the op, which
    then returns the residual stream for the decoder's own norm module."""
    if dtype == torch.bfloat16 and not ops.matmul.covers(1, dtype):
        pytest.skip("bf16 decode_layers needs decode_linear's AVX-512 BF16 or AVX2 path")
    fused, python = _tiny_decoder(dtype), _tiny_decoder(dtype)
    calls = []
    for dec in (fused, python):
        if norm == "hooked":
            dec.model.norm.register_forward_hook(lambda m, i, o: calls.append(1))
        elif norm == "subclass":
            weight = dec.model.norm.weight
            dec.model.norm = type("Norm", (decoder_mod.RMSNorm,), {})(dec.hidden_size, dec.config.rms_norm_eps)
            dec.model.norm.weight = weight
    ids = torch.randint(3, fused.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    logits, ran = [], []
    with torch.inference_mode():
        for dec, hidden in ((fused, False), (python, True)):
            cache = dec.new_cache(1, 9)
            dec(input_ids=ids[:, :6], cache=cache)
            logits.append(dec(input_ids=ids[:, 6:7], cache=cache, output_hidden_states=hidden).logits)
            ran.append(cache.step_plan is not None and cache.step_plan.final_norm is not None)
    assert torch.equal(logits[0], logits[1])
    assert ran[0] == (norm != "subclass")  # the plan takes a plain RMSNorm's weight...
    if norm == "hooked":
        assert len(calls) == 4  # ...but with a hook the step ran the Python layers and the module


# ---- the LM head inside the step ---------------------------------------------------------------

HEAD_FORMATS = ["float32", "bf16", "int8", "int4"]


def _head_decoder(fmt: str):
    """The tiny decoder in ``fmt``: float32, bf16, or bf16 with every linear and the LM head
    quantized (int4 in groups of 32)."""
    dec = _tiny_decoder(torch.float32 if fmt == "float32" else torch.bfloat16)
    if fmt in ("int8", "int4"):
        names = [n for n, m in dec.named_modules() if type(m) is nn.Linear]
        quant.quantize_modules(dec, names, 8 if fmt == "int8" else 4, 32 if fmt == "int4" else None)
    return dec


def _skip_unless_fused(fmt: str) -> None:
    if fmt != "float32" and not ops.matmul.covers(1, torch.bfloat16):
        pytest.skip("bf16 decode_layers needs decode_linear's AVX-512 BF16 or AVX2 path")


@needs_ext
@pytest.mark.parametrize("fmt", HEAD_FORMATS)
@pytest.mark.parametrize("b", [1, 3])
def test_decode_layers_head_is_ops_linear_of_its_output(fmt, b):
    """With a head, the op writes ops.linear(lm_head, its normed output) into logits, bit for bit,
    and the output itself is the one the op returns without a head."""
    _skip_unless_fused(fmt)
    dec = _head_decoder(fmt)
    x, params, kc, vc, cos, sin, mask, past, h, hkv, eps, _ = _op_args(dec, b=b, past=3)
    weights, _, scales, final_norm = dec._plain_llama_layers()
    head, head_scale = dec._plain_head()
    assert (head_scale is not None) == (fmt in ("int8", "int4"))
    outs = []
    with torch.inference_mode():
        for with_head in (True, False):
            k, v = [c.clone() for c in kc], [c.clone() for c in vc]
            logits = torch.full((b, 1, dec.vocab_size), 7.0, dtype=x.dtype) if with_head else None
            out = ops.decode_layers(x, weights, k, v, cos, sin, mask, past, h, hkv, eps, layer_scales=scales,
                                    final_norm=final_norm, head=head if with_head else None,
                                    head_scale=head_scale if with_head else None, logits=logits)
            assert out is not None
            outs.append(out)
            if with_head:
                assert torch.equal(logits, ops.linear(dec.lm_head, out))
    assert torch.equal(outs[0], outs[1])


@needs_ext
@pytest.mark.parametrize("fmt", ["float32", "bf16", "int4"])
def test_opcheck_decode_layers_with_head(fmt):
    _skip_unless_fused(fmt)
    dec = _head_decoder(fmt)
    x, params, kc, vc, cos, sin, mask, past, h, hkv, eps, _ = _op_args(dec, b=2, past=3)
    weights, _, scales, final_norm = dec._plain_llama_layers()
    flat = [None if p is None else p.detach() for layer in weights for p in layer]  # (parameters: no grad)
    flat_scales = [sc for layer in scales for sc in layer] if scales else []
    head, head_scale = dec._plain_head()
    logits = torch.zeros(2, 1, dec.vocab_size, dtype=x.dtype)
    torch.library.opcheck(ns.decode_layers.default, (x, flat, kc, vc, cos, sin, mask, past, h, hkv, eps, flat_scales,
                                                     final_norm.detach(), head.detach(), head_scale, logits))


@needs_ext
def test_decode_layers_head_bad_arguments():
    dec = _tiny_decoder(torch.float32)
    x, params, kc, vc, cos, sin, mask, past, h, hkv, eps, scales = _op_args(dec, b=2, past=3)
    norm, head = dec.model.norm.weight.detach(), dec.lm_head.weight.detach()
    vocab = head.shape[0]
    logits = torch.zeros(2, 1, vocab)

    def call(final_norm=norm, head=head, head_scale=None, logits=logits):
        return lambda: ns.decode_layers(x, params, kc, vc, cos, sin, mask, past, h, hkv, eps, scales, final_norm, head,
                                        head_scale, logits)

    cases = [
        (call(logits=None), "head and logits come together"),
        (call(head=None), "head and logits come together"),
        (call(head=None, logits=None, head_scale=torch.ones(vocab)), "head_scale given without a head"),
        (call(final_norm=None), "a head needs final_norm"),
        (call(logits=torch.zeros(2, 1, vocab + 1)), rf"logits must be \[B, 1, V\] = \[2, 1, {vocab}\]"),
        (call(logits=torch.zeros(2, 1, vocab, dtype=torch.float64)), "logits must be Float"),
        (call(logits=torch.zeros(2, 1, 2 * vocab)[..., ::2]), "logits must be contiguous"),
        (call(head=head[:, :-1].contiguous()), r"head must be \[V, D\] with D = "),
        (call(head=head.bfloat16()), "head must be Float"),
        (call(head=head.to(torch.int8), head_scale=torch.ones(vocab, dtype=torch.bfloat16)),
         "a quantized head .* needs bfloat16 x"),
    ]
    for run, match in cases:
        with pytest.raises(RuntimeError, match=match):
            run()
    with pytest.raises(ValueError, match="head and logits come together"):
        ops.decode_layers(x, [tuple(params[i:i + 12]) for i in range(0, len(params), 12)], kc, vc, cos, sin, mask, past,
                          h, hkv, eps, final_norm=norm, head=head)


class _HeadOverride(Llama3Decoder):
    def head(self, hidden):
        return super().head(hidden) * 2


@needs_ext
@pytest.mark.parametrize("fmt", HEAD_FORMATS)
@pytest.mark.parametrize("head", ["plain", "hooked", "biased", "wrapped", "overridden"])
def test_decode_step_runs_the_lm_head_as_the_module_would(fmt, head):
    """A plain nn.Linear or QuantizedLinear LM head runs inside the one-call step (the logits are the
    Python layers' and head's, bit for bit); a hooked, biased or wrapped head, or a decoder class with
    its own ``head``, keeps the layers in the op and runs the head as before (its hook each step)."""
    _skip_unless_fused(fmt)
    decs = [_head_decoder(fmt), _head_decoder(fmt)]
    calls = []
    for i, dec in enumerate(decs):
        if head == "hooked":
            dec.lm_head.register_forward_hook(lambda m, inp, out: calls.append(1))
        elif head == "biased":
            old = dec.lm_head
            new = nn.Linear(dec.hidden_size, dec.vocab_size, bias=True).to(torch.float32 if fmt == "float32"
                                                                             else torch.bfloat16)
            if type(old) is nn.Linear:
                new.weight = old.weight
            dec.lm_head = new if type(old) is nn.Linear else quant.QuantizedLinear.from_linear(new, old.bits,
                                                                                               old.group_size)
            if i == 1:
                with torch.no_grad():
                    dec.lm_head.load_state_dict(decs[0].lm_head.state_dict())
        elif head == "wrapped":
            dec.lm_head = nn.Sequential(dec.lm_head)
        elif head == "overridden":
            dec.__class__ = _HeadOverride
    ids = torch.randint(3, decs[0].vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    logits, plans = [], []
    with torch.inference_mode():
        for dec, hidden in ((decs[0], False), (decs[1], True)):  # output_hidden_states: the Python layers
            cache = dec.new_cache(2, 10)
            dec(input_ids=ids[:, :6], cache=cache)
            steps = [dec(input_ids=ids[:, t:t + 1], cache=cache, output_hidden_states=hidden).logits for t in (6, 7)]
            logits.append(torch.cat(steps, 1))
            plans.append(cache.step_plan)
    assert torch.equal(logits[0], logits[1])
    assert plans[0] is not None  # the layers ran in the op...
    assert (plans[0].head is not None) == (head == "plain")  # ...and the head with them only when plain
    if head == "hooked":
        assert len(calls) == 6  # both decoders' prefill and two steps each


# ---- the step plan: gathered once per generation, gathered again whenever its modules change ----

def _random_like(p: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)).to(p.dtype), requires_grad=False)


def _change(dec, change: str) -> None:
    layer = dec.model.layers[0]
    if change == "values_in_place":  # the same tensors, new values: nothing to gather again
        with torch.no_grad():
            layer.self_attn.q_proj.weight.mul_(2)
    elif change == "new_parameter":
        layer.self_attn.q_proj.weight = _random_like(layer.self_attn.q_proj.weight)
    elif change == "parameter_dict_write":  # past nn.Module.__setattr__ and its registration hooks
        layer.mlp.down_proj._parameters["weight"] = _random_like(layer.mlp.down_proj.weight)
    elif change == "new_linear":
        old = layer.mlp.up_proj
        new = nn.Linear(old.in_features, old.out_features, bias=False, dtype=old.weight.dtype)
        new.weight = _random_like(old.weight)
        layer.mlp.up_proj = new
    elif change == "new_layer":
        dec.model.layers[1] = copy.deepcopy(layer)
        dec.model.layers[1].self_attn.layer_idx = 1
    elif change == "moved_layer":  # layer 0 also in place 1: the Python layers write its keys to slot 0
        dec.model.layers[1] = layer
    elif change == "norm_eps":  # not the config's eps: the Python layers run
        dec.model.layers[1].post_attention_layernorm.eps = 0.25
    elif change == "activation":
        layer.mlp.act = torch.tanh
    elif change == "quantized":
        names = [f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        quant.quantize_modules(dec, names, 8, None)
    elif change == "new_head":  # the decoder's own binding: the plan's weights came from the old head
        old = dec.lm_head
        dec.lm_head = nn.Linear(old.in_features, old.out_features, bias=False, dtype=old.weight.dtype)
        dec.lm_head.weight = _random_like(old.weight)
    elif change == "quantized_head":
        quant.quantize_modules(dec, ["lm_head"], 4, 32)


@needs_ext
@pytest.mark.parametrize("change", ["values_in_place", "new_parameter", "parameter_dict_write", "new_linear",
                                    "new_layer", "moved_layer", "norm_eps", "activation", "quantized", "new_head",
                                    "quantized_head"])
def test_step_plan_follows_changes_between_steps(change):
    """A change to the modules between two steps of one generation reaches the next step exactly as
    it reaches the Python layers: the cached weights are gathered again (or the step steps aside),
    never used stale."""
    dtype = torch.bfloat16 if change in ("quantized", "quantized_head") else torch.float32
    if dtype == torch.bfloat16 and not ops.matmul.covers(1, dtype):
        pytest.skip("bf16 decode_layers needs decode_linear's AVX-512 BF16 or AVX2 path")
    fused, python = _tiny_decoder(dtype), _tiny_decoder(dtype)
    ids = torch.randint(3, fused.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    logits = []
    with torch.inference_mode():
        for dec, layers_in_python in ((fused, False), (python, True)):
            cache = dec.new_cache(1, 10)
            dec(input_ids=ids[:, :6], cache=cache)
            dec(input_ids=ids[:, 6:7], cache=cache, output_hidden_states=layers_in_python)
            gathered = cache.step_plan
            assert (gathered is not None) != layers_in_python  # output_hidden_states runs the Python layers
            _change(dec, change)
            logits.append(dec(input_ids=ids[:, 7:8], cache=cache, output_hidden_states=layers_in_python).logits)
            if not layers_in_python:
                kept = cache.step_plan is gathered
                assert kept == (change == "values_in_place"), change
                assert (cache.step_plan is None) == (change in ("moved_layer", "norm_eps", "activation"))
    assert torch.equal(logits[0], logits[1]), change


@needs_ext
def test_step_plan_is_checked_again_at_every_step():
    """Kept plans are still asked the per-call checks: a hook added or a dtype changed in place
    after the plan was gathered makes the step run the Python layers."""
    dec = _tiny_decoder(torch.float32)
    x = torch.randn(1, 1, dec.hidden_size)
    cache = dec.new_cache(1, 8)
    with torch.no_grad():
        assert _step_runs(dec, x, cache)
        plan = cache.step_plan
        assert _step_runs(dec, x, cache) and cache.step_plan is plan
        handle = dec.model.layers[1].self_attn.register_forward_hook(lambda *a: None)
        assert not _step_runs(dec, x, cache)
        assert not _step_runs(dec, x, cache)  # and at the step after (the plan's watch holds again)
        handle.remove()
        assert _step_runs(dec, x, cache)
        handle = nn.modules.module.register_module_forward_hook(lambda *a: None)  # global: no module dict changes
        try:
            assert not _step_runs(dec, x, cache)
        finally:
            handle.remove()
        assert _step_runs(dec, x, cache) and cache.step_plan is plan
        weight = dec.model.layers[0].mlp.gate_proj.weight
        weight.data = weight.data.double()  # the same Parameter object, another dtype
        assert not _step_runs(dec, x, cache)
