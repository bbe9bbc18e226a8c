"""Weight-only quantization (ops/quant.py): the format, the decode step's activation quantization,
the compiled few-row kernel against its reference within a tolerance derived from bf16 rounding,
opcheck, and decode_layers taking quantized layers bit-identically to the Python layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import idefics3_kit as ik
from idefics3_kit import ops
from idefics3_kit.components.decoder import Qwen2Decoder
from idefics3_kit.ops import _library, quant

ns = torch.ops.idefics3_kit
needs_kernel = pytest.mark.skipif(not (_library.has_extension() and _library.defines("quant_linear")),
                                  reason="compiled extension not built")
FORMATS = [(8, None), (4, 32), (4, 64), (4, 128)]


def _weight(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits,group", FORMATS)
def test_quantize_round_trip_error_is_within_half_a_step(bits, group):
    w = _weight(24, 256)
    q, s = quant.quantize_weight(w, bits, group)
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q.shape == ((24, 256) if bits == 8 else (24, 128))
    assert s.shape == ((24,) if bits == 8 else (24, 256 // group)) and s.dtype == w.dtype
    err = (quant.dequantize(q, s) - w).abs()
    step = s.abs()[:, None] if bits == 8 else s.abs().repeat_interleave(group, dim=1)
    # half a step; int4's +8 end is clamped to +7 (one step) for a group whose peak is negative
    assert (err <= step * (0.5 if bits == 8 else 1.0) + 1e-6).all()
    if bits == 4:
        assert (err <= step * 0.5 + 1e-6).float().mean() > 0.99


def test_int4_packing_layout():
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 31] = -8.0, 7.0, 3.0  # the peak -8 sets the scale to 1
    q, s = quant.quantize_weight(w, 4, 32)
    assert s.tolist() == [[1.0]]
    assert q[0, 0].item() == (0 + 8 * 0) | ((7 + 8) << 4) - 0 and q[0, 0].item() == 0xF0  # col 0 low, col 1 high
    assert q[0, 15].item() >> 4 == 3 + 8 and q[0, 15].item() & 0xF == 8
    assert torch.equal(quant.dequantize(q, s), w)


def test_zero_rows_and_groups_quantize_to_zero():
    w = torch.zeros(4, 64)
    for bits, group in FORMATS[:2]:
        q, s = quant.quantize_weight(w, bits, group)
        assert torch.equal(quant.dequantize(q, s), w)


@pytest.mark.parametrize("bits,group,k,match", [
    (3, None, 64, "bits must be 8 or 4"), (4, 48, 96, "group_size must be one of"),
    (4, None, 64, "group_size must be one of"), (4, 128, 576, "does not divide in_features 576")])
def test_bad_formats_are_refused_by_name(bits, group, k, match):
    with pytest.raises(quant.QuantizationError, match=match):
        quant.quantize_weight(_weight(4, k), bits, group)


def _tolerance(ref: torch.Tensor) -> torch.Tensor:
    """Per element: two bf16 ulps of the result (one rounding of the output, summation order)."""
    return ref.float().abs() * 2 ** -7 + 1e-3


# K: multiples of 64 (256, 576), one ending in half a 64-column step (96 = 64 + 32), a 16-column
# tail for int8 (40); int4 only where its group divides K
SHAPES = [(bits, group, k) for bits, group in FORMATS for k in (40, 96, 256, 576)
          if (bits == 8 and k != 96) or (bits == 4 and k % group == 0)]


@needs_kernel
@pytest.mark.parametrize("bits,group,k", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8])
def test_compiled_matches_reference(bits, group, rows, k):
    ws = [quant.quantize_weight(_weight(n, k, seed=n), bits, group) for n in (13, 8)]
    qs, ss = [w[0] for w in ws], [w[1].bfloat16() for w in ws]
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(3)).bfloat16()
    biases = [torch.randn(13).bfloat16(), None]
    assert quant.applies(x, qs, ss, biases)
    got = quant.quant_linear(x, qs, ss, biases)
    ref = quant.quant_linear_ref(x, qs, ss, biases)
    assert got.shape == (rows, 21)
    assert ((got.float() - ref.float()).abs() <= _tolerance(ref)).all()


@needs_kernel
def test_many_rows_dequantize_then_matmul():
    q, s = quant.quantize_weight(_weight(32, 128).bfloat16(), 4, 32)
    x = torch.randn(2, 40, 128).bfloat16()
    assert not quant.applies(x, [q], [s])
    got = quant.quant_linear(x, [q], [s])
    ref = quant.weight_only_ref(x, [q], [s])
    # the weight is dequantized to bf16 first (one rounding per weight: 2^-9 of each product),
    # then oneDNN's bf16 matmul: bounded by the sum of |products|, plus the output's rounding
    products = x.float().abs() @ quant.dequantize(q, s, torch.float32).abs().T
    assert ((got.float() - ref.float()).abs() <= products * 2 ** -8 + _tolerance(ref)).all()


@needs_kernel
@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64)])
def test_opcheck_quant_linear(bits, group):
    ws = [quant.quantize_weight(_weight(n, 128, seed=n).bfloat16(), bits, group) for n in (8, 5)]
    x = torch.randn(2, 1, 128).bfloat16()
    torch.library.opcheck(ns.quant_linear.default, (x, [w[0] for w in ws], [w[1] for w in ws],
                                                    [None, torch.randn(5)]))


@needs_kernel
@pytest.mark.parametrize("bits,group", FORMATS)
def test_compiled_dequantize_equals_reference(bits, group):
    q, s = quant.quantize_weight(_weight(24, 256).bfloat16(), bits, group)
    assert torch.equal(ns.quant_dequantize(q, s), quant.dequantize(q, s, torch.bfloat16))
    torch.library.opcheck(ns.quant_dequantize.default, (q, s))


@needs_kernel
def test_op_refuses_bad_arguments_by_name():
    q, s = quant.quantize_weight(_weight(8, 64).bfloat16(), 4, 32)
    x = torch.randn(1, 64).bfloat16()
    with pytest.raises(RuntimeError, match=r"scales\[0\] must be \[N, K/g\]"):
        ns.quant_linear(x, [q], [s[:, :1].contiguous()[:, :0]], [None])
    with pytest.raises(RuntimeError, match=r"qweights\[0\] must be int8 \(8 bits\) or uint8"):
        ns.quant_linear(x, [q.to(torch.int16)], [s], [None])
    with pytest.raises(RuntimeError, match=r"x must be BFloat16"):
        ns.quant_linear(x.float(), [q], [s], [None])
    with pytest.raises(RuntimeError, match=r"scales\[0\] must be BFloat16"):
        ns.quant_linear(x, [q], [s.float()], [None])


def test_quantized_linear_steps_aside_for_float32_and_grad():
    lin = nn.Linear(64, 16)
    ql = quant.QuantizedLinear.from_linear(lin, 8)
    x = torch.randn(3, 64)  # a decode step: activations quantized, in torch
    assert torch.equal(ql(x), quant.quant_linear_ref(x, [ql.qweight], [ql.scales], [ql.bias]))
    x = torch.randn(quant.MAX_ROWS + 1, 64)  # a prefill: dequantize + matmul
    assert torch.equal(ql(x), nn.functional.linear(x, ql.dequantized_weight(torch.float32), lin.bias))
    assert not ql.qweight.requires_grad and not ql.scales.requires_grad


@pytest.mark.parametrize("k", [32, 40, 100, 576])
def test_activation_quantization_is_within_half_a_step(k):
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(k)) * torch.logspace(-2, 2, k)
    x[1, :32] = 0  # an all-zero block
    xq, xs = quant.quantize_activations(x.bfloat16())
    assert xq.dtype == torch.int8 and xq.shape == (3, k) and xs.shape == (3, -(-k // 32))
    step = xs.repeat_interleave(32, dim=-1)[:, :k]
    seen = xq.float() * step
    assert ((seen - x.bfloat16().float()).abs() <= step * 0.5 + x.abs() * 2 ** -20).all()
    assert xs[1, 0] == 0 and (xq[1, :32] == 0).all()
    assert (xq.abs().view(-1)[:32].max() == 127)


@needs_kernel
@pytest.mark.parametrize("bits,group", [(8, None), (4, 64)])
def test_decode_step_error_vs_weight_only_is_small(bits, group):
    """The activation quantization of a decode step costs about what int8 weights cost: checked
    as a bound on the relative error of the whole output against the weight-only result."""
    q, s = quant.quantize_weight(_weight(64, 576).bfloat16(), bits, group)
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(1)).bfloat16()
    step, full = quant.quant_linear(x, [q], [s]).float(), quant.weight_only_ref(x, [q], [s]).float()
    assert (step - full).norm() / full.norm() < 0.02


# ---- decode_layers takes quantized layers -------------------------------------------------------

def _tiny_quantized(bits, group=32):
    torch.manual_seed(0)
    model = ik.VLM(ik.VLMConfig.preset("tiny")).to(torch.bfloat16).eval()
    return model.quantize("int8") if bits == 8 else model.quantize("int4", group_size=group)


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_decode_layers_takes_quantized_layers_bit_identically(bits):
    if not ops.matmul.covers(2, torch.bfloat16):
        pytest.skip("bf16 decode_layers needs decode_linear's AVX-512 BF16 or AVX2 path")
    dec = _tiny_quantized(bits).decoder
    found = dec._plain_llama_layers()
    assert found is not None and found[2] is not None  # the fused step takes the quantized layers
    fused, python = _one_step_fused_and_python(dec)
    assert torch.equal(fused, python)


def _one_step_fused_and_python(dec, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of one decode step of ``rows`` sequences after a 5-token prefill, through the fused
    step and through the Python layers (output_hidden_states runs them)."""
    ids = torch.randint(3, 100, (rows, 5))
    outs = []
    for hidden in (False, True):
        cache = dec.new_cache(rows, 8)
        with torch.inference_mode():
            dec(input_ids=ids, cache=cache)
            outs.append(dec(input_ids=ids[:, :1], cache=cache, output_hidden_states=hidden).logits)
    return outs[0], outs[1]


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
def test_decode_layers_takes_quantized_layers_with_qkv_biases_bit_identically(bits):
    """Qwen2's q/k/v projections carry biases: quantized, the fused step adds them as the Python
    layers' quant_linear does."""
    if not ops.matmul.covers(2, torch.bfloat16):
        pytest.skip("bf16 decode_layers needs decode_linear's AVX-512 BF16 or AVX2 path")
    torch.manual_seed(0)
    cfg = ik.Qwen2DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2)
    dec = Qwen2Decoder(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():  # nn.Linear's default biases are small; make them matter
        for layer in dec.model.layers:
            for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                p.bias.normal_()
    names = [n for n, m in dec.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    quant.quantize_modules(dec, names, bits, 32 if bits == 4 else None)
    found = dec._plain_llama_layers()
    assert found is not None and found[2] is not None
    fused, python = _one_step_fused_and_python(dec)
    assert torch.equal(fused, python)


@needs_kernel
@pytest.mark.parametrize("which", ["mlp", "attention"])
def test_decode_layers_takes_partly_quantized_layers_bit_identically(which):
    """Only some projections of each layer quantized (whole groups: q|k|v with o, or gate|up with
    down): the fused step still takes the layers, linear by linear, and matches the Python layers."""
    if not ops.matmul.covers(2, torch.bfloat16):
        pytest.skip("bf16 decode_layers needs decode_linear's AVX-512 BF16 or AVX2 path")
    torch.manual_seed(0)
    dec = ik.VLM(ik.VLMConfig.preset("tiny")).to(torch.bfloat16).eval().decoder
    parts = ("gate_proj", "up_proj", "down_proj") if which == "mlp" else ("q_proj", "k_proj", "v_proj", "o_proj")
    names = [n for n, m in dec.named_modules() if type(m) is torch.nn.Linear and n.rsplit(".", 1)[-1] in parts]
    quant.quantize_modules(dec, names, 8, None)
    scales = dec._plain_llama_layers()[2]
    assert scales is not None and all((s is not None) == (i in (1, 2, 3, 7) if which == "attention" else i in (9, 10, 11))
                                      for layer in scales for i, s in enumerate(layer))
    fused = []
    one_call = dec._one_call_step
    dec._one_call_step = lambda *a: fused.append(one_call(*a)) or fused[-1]  # records what ran
    step, python = _one_step_fused_and_python(dec)
    # prefills run the Python layers, the first step the fused op (output_hidden_states skips it)
    assert [out is not None for out in fused] == [False, True, False]
    assert torch.equal(step, python)


@needs_kernel
@pytest.mark.parametrize("rows", [6, 12])
def test_decode_layers_quantized_batches_within_quant_rows(rows):
    """With AMX, decode_layers takes bf16 batches up to 16 rows (decode_linear's tile path); with
    quantized layers only up to quant.MAX_ROWS (past it quant_linear dequantizes, which the Python
    layers run). Either way the step equals the Python layers'."""
    if not ops.matmul.covers(rows, torch.bfloat16):
        pytest.skip("this CPU's compiled decode kernels do not take this many rows")
    dec = _tiny_quantized(8).decoder
    fused = []
    one_call = dec._one_call_step
    dec._one_call_step = lambda *a: fused.append(one_call(*a)) or fused[-1]  # records what ran
    step, python = _one_step_fused_and_python(dec, rows)
    assert [out is not None for out in fused] == [False, rows <= quant.MAX_ROWS, False]
    assert torch.equal(step, python)
