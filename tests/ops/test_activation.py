"""ops.gelu_tanh_ (the compiled in-place GELU of SigLIP's MLP) against float64 and torch's own GELU:
values, specials, lengths around the vector width and the parallel chunks, the paths that step
aside, opcheck, and ops.dense routing fc1 through it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _tolerance import output_ulp  # tests/ops/_tolerance.py
from idefics3_kit import ops
from idefics3_kit.ops import _library, activation, dense_linear

needs_ext = pytest.mark.skipif(not ops.has_extension(), reason="the compiled extension is not built")
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECIALS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e30, -1e30, 3e38, -3e38, 1e-30, -1e-30, -5.0, -9.0, 9.0, -40.0]


def _ref64(x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh in float64 as x * sigmoid(2y) (= x / 2 * (1 + tanh(y))): torch's float64 formula
    itself cancels to 0 in the tail (tanh(y) rounds to -1 below y ~ -19)."""
    xd = x.double()
    y = 0.7978845608028654 * (xd + 0.044715 * xd ** 3)
    out = xd * torch.sigmoid(2 * y)
    return torch.where(torch.isnan(xd) | (xd == -math.inf), math.nan, out)


def _check_against_float64(x: torch.Tensor, got: torch.Tensor) -> None:
    """Each output within one rounding of the float64 value (bf16: one ulp of it; float32: 8 ulps,
    the exp polynomial's and reciprocal's error, plus the tail's conditioning: for y < 0 the result
    is x e^(2y) / (1 + e^(2y)), so float32's rounding of y moves it by ~2|y| ulps, and e^(2y) is 0
    below float32's normal range), and no worse
    overall than torch's own GELU in x's dtype (twice its largest error: the house tolerance rule)."""
    ref = _ref64(x)
    finite = torch.isfinite(ref)
    err = (got.double() - ref).abs()[finite]
    if x.dtype == torch.bfloat16:
        ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(ref.abs()[finite].clamp_min(1e-30))))
        assert bool((err <= ulp + 1e-38).all()), float((err - ulp).max())
    else:
        xd = x.double()[finite]
        y = 0.7978845608028654 * (xd + 0.044715 * xd ** 3)
        tiny = torch.finfo(torch.float32).tiny * xd.abs()  # e^(2y) below float32's normal range is 0
        bound = torch.finfo(torch.float32).eps * (8 + 4 * y.abs()) * ref.abs()[finite] + tiny + 1e-37
        assert bool((err <= bound).all()), float((err - bound).max())
    torch_err = (F.gelu(x, approximate="tanh").double() - ref).abs()[finite]
    if err.numel():  # (floored at an ulp of the largest output: a few values can all round luckily)
        assert float(err.max()) <= 2 * max(float(torch_err.max()), output_ulp(ref[finite], x.dtype)) + 1e-37
    assert torch.equal(torch.isnan(got), torch.isnan(ref))  # NaN where torch's formula gives NaN (-inf, NaN)


@needs_ext
@pytest.mark.parametrize("dtype", activation.DTYPES)
@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0, 30.0])
def test_matches_float64_within_torch_s_own_error(dtype, scale):
    x = (torch.randn(4, 3000, generator=torch.Generator().manual_seed(int(scale * 10))) * scale).to(dtype)
    got = ops.gelu_tanh_(x.clone())
    _check_against_float64(x, got)
    if dtype == torch.bfloat16:  # the same bf16 as torch's own GELU almost everywhere (rounding ties aside),
        # except in the tail, where torch's 1 + tanh(y) cancels in float32 (x < -3: off by > 1e-5 relative)
        body = x > -3
        same = (got[body] == F.gelu(x, approximate="tanh")[body]).float().mean().item()
        assert same > 0.99, same


@needs_ext
@pytest.mark.parametrize("dtype", activation.DTYPES)
def test_specials(dtype):
    """NaN, infinities, signed zeros and huge values give torch's own results, bit for bit (-inf:
    NaN, as torch's -inf / 2 * (1 + tanh(-inf)); a huge negative x: -0); small and tail values are
    within the float64 bound."""
    x = torch.tensor(SPECIALS, dtype=dtype)
    got = ops.gelu_tanh_(x.clone())
    want = F.gelu(x, approximate="tanh")
    exact = ~torch.isfinite(x) | (x == 0) | (x.abs() >= 1e30)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    keep = exact & ~torch.isnan(want)
    assert torch.equal(got[keep], want[keep])
    assert torch.equal(torch.signbit(got[keep]), torch.signbit(want[keep]))  # -0 stays -0
    _check_against_float64(x[~exact], got[~exact])


@needs_ext
@FUZZ
@given(n=st.integers(0, 2 ** 16 + 40), dtype=st.sampled_from(activation.DTYPES), seed=st.integers(0, 2 ** 31 - 1))
def test_every_length(n, dtype, seed):
    """Lengths around the 16-lane vectors and the 16 384-entry parallel chunks: the tail is masked,
    nothing past it is written (the guard value), every entry is computed once."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(n + 3, generator=g).to(dtype)
    x = buf[:n]
    before = buf[n:].clone()
    ops.gelu_tanh_(x)
    assert torch.equal(buf[n:], before)
    _check_against_float64(torch.randn(n + 3, generator=torch.Generator().manual_seed(seed)).to(dtype)[:n], x)


@needs_ext
def test_steps_aside_for_what_it_does_not_take():
    """float16, a non-contiguous view, autograd: torch's own in-place GELU, the same answer."""
    x16 = torch.randn(100).half()
    assert torch.equal(ops.gelu_tanh_(x16.clone()), F.gelu(x16, approximate="tanh"))
    base = torch.randn(10, 20)
    view = base.clone().t()
    want = F.gelu(view, approximate="tanh")
    assert torch.equal(ops.gelu_tanh_(view), want)
    leaf = torch.randn(50, requires_grad=True)
    y = leaf * 2
    out = ops.gelu_tanh_(y)
    out.sum().backward()
    assert leaf.grad is not None


@needs_ext
def test_refuses_what_it_cannot_take():
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.idefics3_kit.gelu_tanh_(torch.randn(8).half())
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.idefics3_kit.gelu_tanh_(torch.randn(8, 8).t())


@needs_ext
@pytest.mark.parametrize("dtype", activation.DTYPES)
def test_opcheck_gelu_tanh(dtype):
    torch.library.opcheck(torch.ops.idefics3_kit.gelu_tanh_, (torch.randn(3, 70).to(dtype),))


@needs_ext
@pytest.mark.parametrize("bias", [True, False])
def test_dense_routes_the_tanh_gelu_through_the_pass(bias, monkeypatch):
    """Where gelu_pass() holds, ops.dense's fc1 runs the linear without an epilogue and then this
    pass: the rounding points of transformers (the linear's output, then the GELU's), so the result
    is F.gelu(F.linear(x)) up to the GEMM's summation order: within one bf16 ulp."""
    if not _library.onednn_bf16():  # (the float32 route's GELU: tests/ops/test_dense_linear.py)
        pytest.skip("oneDNN has no bf16 matmul on this CPU: bf16 runs as float32, the GELU on its unrounded sum")
    monkeypatch.setattr(dense_linear, "gelu_pass", lambda: True)
    calls = []
    original = activation.gelu_tanh_
    monkeypatch.setattr(dense_linear, "gelu_tanh_", lambda y: calls.append(y.shape) or original(y))
    torch.manual_seed(0)
    layer = nn.Linear(96, 200, bias=bias).bfloat16()
    x = torch.randn(2, 80, 96).bfloat16()
    with torch.no_grad():
        got = ops.dense(layer, x, "gelu_pytorch_tanh")
        want = F.gelu(layer(x), approximate="tanh")
        applies = dense_linear.applies(layer, x)  # (under no_grad, as dense asked it)
    if applies:
        assert calls == [torch.Size([2, 80, 200])]
    ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(1e-3)
    assert bool(((got.float() - want.float()).abs() <= 2 * ulp).all())


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_runs_the_pass_after_the_linear_where_the_epilogue_is_off(dtype, monkeypatch):
    """AVX2 CPUs (no oneDNN epilogue GELU, bf16 as float32; forced here on any CPU): ops.dense's
    tanh GELU runs as the compiled pass on the linear's unrounded float32 output, as torch's F.gelu
    did there: the same function within float32 error, then rounded once to x's dtype."""
    if not activation.vectorized():
        pytest.skip("the pass has no vector path on this CPU (torch's F.gelu runs)")
    monkeypatch.setattr(dense_linear, "epilogue_activations", lambda: False)
    monkeypatch.setattr(_library, "onednn_bf16", lambda: False)  # bf16 runs as float32
    calls = []
    original = activation.gelu_tanh_
    monkeypatch.setattr(dense_linear, "gelu_tanh_", lambda y: calls.append((y.dtype, y.shape)) or original(y))
    torch.manual_seed(0)
    layer = nn.Linear(96, 200).to(dtype)
    x = torch.randn(2, 80, 96).to(dtype)
    with torch.no_grad():
        got = ops.dense(layer, x, "gelu_pytorch_tanh")
        exact = F.gelu(F.linear(x.double(), layer.weight.double(), layer.bias.double()), approximate="tanh")
        applies = dense_linear.applies(layer, x)
    if not applies:
        pytest.skip("the dense path does not apply here (no oneDNN linear in this torch)")
    assert calls == [(torch.float32, torch.Size([2, 80, 200]))]
    assert got.dtype == dtype
    # float32: the GEMM's and the GELU's float32 errors; bf16: one rounding of that (at most an ulp,
    # eps relative) and the float32 part
    rounding = torch.finfo(dtype).eps * exact.abs() if dtype == torch.bfloat16 else 0
    tol = rounding + 1e-5 * (1 + exact.abs())
    assert bool(((got.double() - exact).abs() <= tol).all())
