"""ops.dense: oneDNN's linear with the bias and GELU in the epilogue, against the ordinary path.

Tolerance from PyTorch's own low-precision error: against a float64 reference, the fused path
may be off by at most what torch's own unfused bf16/float32 path is off (x2, plus one ulp of
the output for the different rounding point)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from idefics3_kit import ops
from idefics3_kit.ops import _library
from idefics3_kit.ops import dense_linear as dense_mod
from idefics3_kit.ops import packed

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
# bf16 matmuls in oneDNN need AVX-512 (or newer): on an AVX2-only CPU the bf16 path steps aside
needs_onednn_bf16 = pytest.mark.skipif(not _library.onednn_bf16(), reason="oneDNN has no bf16 matmul on this CPU")


@pytest.fixture(params=["native", "float32"])
def bf16_route(request, monkeypatch):
    """bf16 through oneDNN's bf16 matmul (CPUs with AVX-512), or as float32 on the upcast values,
    the route of AVX2-only CPUs (forced here on any CPU)."""
    if request.param == "native" and not _library.onednn_bf16():
        pytest.skip("oneDNN has no bf16 matmul on this CPU")
    if request.param == "float32":
        monkeypatch.setattr(_library, "onednn_bf16", lambda: False)
    return request.param


@pytest.fixture(params=["fused", "separate", "pass"])
def epilogue(request, monkeypatch):
    """The activation in oneDNN's matmul epilogue (AVX-512 CPUs with AMX), after it by torch's own
    op (AVX2-only CPUs, where oneDNN's eltwise post-ops are slow), or, for the tanh GELU, by our
    compiled in-place pass (AVX-512 CPUs without AMX: ``gelu_pass``): all forced here on any CPU."""
    if request.param == "pass" and not _library.has_kernel("gelu_tanh_", "cpu"):
        pytest.skip("the compiled extension is not built")
    monkeypatch.setattr(dense_mod, "epilogue_activations", lambda: request.param != "separate")
    monkeypatch.setattr(dense_mod, "gelu_pass", lambda: request.param == "pass")
    return request.param


ACTS = {None: lambda y: y, "gelu": F.gelu, "gelu_pytorch_tanh": lambda y: F.gelu(y, approximate="tanh")}


def layer(k: int, n: int, dtype, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, k ** -0.5)
        if bias:
            lin.bias.normal_(0, 0.5)
    return lin.to(dtype).eval()


def float64_reference(lin: nn.Linear, x: torch.Tensor, activation) -> torch.Tensor:
    y = x.double() @ lin.weight.double().T
    if lin.bias is not None:
        y = y + lin.bias.double()
    return ACTS[activation](y)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("shape,bias", [((2, 100, 64), True), ((300, 48), False), ((1, 128, 96), True)])
def test_fused_path_is_as_close_to_float64_as_torch_s_own(dtype, activation, shape, bias, bf16_route, epilogue):
    if dtype == torch.float32 and bf16_route == "float32":
        pytest.skip("the bf16 route does not change float32")
    lin = layer(shape[-1], 80, dtype, bias)
    x = torch.randn(*shape).to(dtype)
    with torch.no_grad():
        assert dense_mod.applies(lin, x)
        fused = ops.dense(lin, x, activation)
        torch_own = ACTS[activation](lin(x))
    exact = float64_reference(lin, x, activation)
    assert fused.dtype == dtype and fused.shape == torch_own.shape
    torch_err = (torch_own.double() - exact).abs().max().item()
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert (fused.double() - exact).abs().max().item() <= 2 * torch_err + ulp


@needs_onednn
def test_non_contiguous_input():
    lin = layer(64, 32, torch.bfloat16)
    x = torch.randn(128, 2, 64).to(torch.bfloat16).transpose(0, 1)  # [2, 128, 64], strided
    with torch.no_grad():
        torch.testing.assert_close(ops.dense(lin, x), lin(x), rtol=0, atol=torch.finfo(torch.bfloat16).eps * 8)


class MyLinear(nn.Linear):
    pass


@pytest.mark.parametrize("case", ["grad", "few rows", "subclass", "hook", "float16", "reference forced",
                                  "switched off", "dtype mismatch"])
def test_steps_aside_and_gives_the_ordinary_answer(case, monkeypatch):
    lin = layer(64, 32, torch.bfloat16)
    x = torch.randn(2, 100, 64).to(torch.bfloat16)
    if case == "few rows":
        x = x[:1, :3]
    elif case == "subclass":
        sub = MyLinear(64, 32).to(torch.bfloat16)
        sub.load_state_dict(lin.state_dict())
        lin = sub
    elif case == "hook":
        lin.register_forward_hook(lambda m, i, o: o * 2)
    elif case == "float16":
        lin, x = lin.half(), x.half()
    elif case == "reference forced":
        monkeypatch.setenv("IDEFICS3_KIT_FORCE_REFERENCE", "1")
    elif case == "switched off":
        monkeypatch.setenv("IDEFICS3_KIT_DENSE", "0")
    elif case == "dtype mismatch":
        x = x.float()
        lin = lin.float().to(torch.bfloat16)
        x = x  # float32 input, bf16 weight: torch would refuse; so do we, with torch's own error
    grad = case == "grad"
    if grad:
        lin.weight.requires_grad_(True)
    with torch.set_grad_enabled(grad):
        assert not dense_mod.applies(lin, x)
        if case == "dtype mismatch":
            with pytest.raises(RuntimeError):
                ops.dense(lin, x, "gelu_pytorch_tanh")
            return
        got = ops.dense(lin, x, "gelu_pytorch_tanh")
        want = F.gelu(lin(x), approximate="tanh")
    assert torch.equal(got, want)
    if grad:
        got.float().sum().backward()
        assert lin.weight.grad is not None


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.dense(layer(8, 8, torch.float32), torch.randn(100, 8), "swish")


def test_the_vision_tower_takes_the_fused_path_and_keeps_its_answer(monkeypatch, bf16_route, epilogue):
    """A SigLIP tile through the fused path equals the ordinary path within bf16 rounding."""
    import idefics3_kit as ik
    from idefics3_kit.components.vision import SiglipVisionEncoder

    cfg = ik.VLMConfig.preset("tiny").vision.replace(image_size=128)  # 64 patches per tile: the fused path runs
    torch.manual_seed(0)
    tower = SiglipVisionEncoder(cfg).to(torch.bfloat16).eval()
    pixels = torch.rand(2, 3, 128, 128).to(torch.bfloat16) * 2 - 1
    calls = []
    original = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(dense_mod.torch.ops.mkldnn, "_linear_pointwise",
                        lambda *a: calls.append(a[3]) or original(*a), raising=False)
    with torch.no_grad():
        fused = tower(pixels)
        monkeypatch.setenv("IDEFICS3_KIT_FORCE_REFERENCE", "1")
        ordinary = tower(pixels)
    # the pass takes bf16 outputs; on the float32 route the GELU stays in the epilogue
    in_epilogue = epilogue == "fused" or (epilogue == "pass" and bf16_route == "float32")
    fused_gelus = cfg.num_hidden_layers if in_epilogue else 0
    # six linears a layer, and the patch embedding as one GEMM (``patch_embed``)
    assert calls.count("gelu") == fused_gelus and len(calls) == 6 * cfg.num_hidden_layers + 1
    scale = ordinary.float().abs().max().item()
    torch.testing.assert_close(fused.float(), ordinary.float(), rtol=0, atol=scale * 2 ** -6)


@needs_onednn_bf16  # the float32 route (AVX2-only CPUs) rounds after a float32 sum: within the closeness tests
@needs_onednn
@pytest.mark.parametrize("rows", [64, 300, 892])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_without_activation_is_bit_identical_to_f_linear(rows, bias):
    """What lets the decoder's prefill linears (ops.linear / ops.linears) take this path."""
    lin = layer(576, 1536, torch.bfloat16, bias)
    x = torch.randn(2, rows, 576).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ops.dense(lin, x), lin(x))
        assert all(torch.equal(a, b) for a, b in zip(ops.linears(x, [lin, lin]), [lin(x), lin(x)]))


@needs_onednn_bf16  # the float32 route (AVX2-only CPUs) rounds after a float32 sum: within the closeness tests
@needs_onednn
def test_a_bf16_prefill_gives_the_ordinary_logits_bit_for_bit(monkeypatch):
    import idefics3_kit as ik
    from idefics3_kit.ops import matmul

    torch.manual_seed(0)
    model = ik.VLM(ik.VLMConfig.preset("tiny")).to(torch.bfloat16).eval()
    ids = torch.randint(3, 200, (2, 80))
    monkeypatch.setattr(ops, "gated", lambda *args: None)  # the fused SiLU gate rounds elsewhere (below)
    with torch.no_grad():
        fast = model(input_ids=ids).logits
        monkeypatch.setattr(matmul, "_many_rows", lambda layer, x: layer(x))  # only this path undone
        ordinary = model(input_ids=ids).logits
    assert torch.equal(fast, ordinary)


# ---- ops.gated: the gated MLP's SiLU and product in the epilogues --------------------------------

def gated_float64(gate: nn.Linear, up: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.silu(float64_reference(gate, x, None)) * float64_reference(up, x, None)


@needs_onednn
@pytest.mark.parametrize("shape,bias", [((2, 100, 64), False), ((300, 48), True), ((1, 892, 96), False)])
def test_gated_is_as_close_to_float64_as_torch_s_own(shape, bias, bf16_route, epilogue):
    gate, up = layer(shape[-1], 80, torch.bfloat16, bias, seed=1), layer(shape[-1], 80, torch.bfloat16, bias, seed=2)
    x = torch.randn(*shape).to(torch.bfloat16)
    with torch.no_grad():
        fused = ops.gated(gate, up, x, F.silu)
        torch_own = F.silu(gate(x)) * up(x)
    assert fused is not None and fused.dtype == torch.bfloat16 and fused.shape == torch_own.shape
    exact = gated_float64(gate, up, x)
    torch_err = (torch_own.double() - exact).abs().max().item()
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().max().item()
    assert (fused.double() - exact).abs().max().item() <= 2 * torch_err + ulp


@pytest.mark.parametrize("case", ["float32", "few rows", "other activation", "subclass", "hook", "grad",
                                  "switched off", "reference forced", "different widths"])
def test_gated_steps_aside(case, monkeypatch):
    gate, up = layer(64, 32, torch.bfloat16, False, seed=1), layer(64, 32, torch.bfloat16, False, seed=2)
    x, act = torch.randn(2, 100, 64).to(torch.bfloat16), F.silu
    if case == "float32":
        gate, up, x = gate.float(), up.float(), x.float()
    elif case == "few rows":
        x = x[:1, :3]
    elif case == "other activation":
        act = F.gelu
    elif case == "subclass":
        sub = MyLinear(64, 32, bias=False).to(torch.bfloat16)
        sub.load_state_dict(up.state_dict())
        up = sub
    elif case == "hook":
        gate.register_forward_pre_hook(lambda m, i: None)
    elif case == "grad":
        up.weight.requires_grad_(True)
    elif case == "switched off":
        monkeypatch.setenv("IDEFICS3_KIT_DENSE", "0")
    elif case == "reference forced":
        monkeypatch.setenv("IDEFICS3_KIT_FORCE_REFERENCE", "1")
    elif case == "different widths":
        up = layer(64, 48, torch.bfloat16, False, seed=2)

    with torch.set_grad_enabled(case == "grad"):
        assert ops.gated(gate, up, x, act) is None


@needs_onednn
def test_a_bf16_prefill_with_the_fused_gate_keeps_the_logits(monkeypatch, bf16_route):
    """The decoder's MLPs take ops.gated in a bf16 prefill (one call each) and the logits stay
    within bf16 rounding of the unfused ops'."""
    import idefics3_kit as ik

    torch.manual_seed(0)
    model = ik.VLM(ik.VLMConfig.preset("tiny")).to(torch.bfloat16).eval()
    ids = torch.randint(3, 200, (2, 80))
    calls = []
    original = ops.gated
    monkeypatch.setattr(ops, "gated", lambda *a: calls.append(original(*a)) or calls[-1])
    with torch.no_grad():
        fused = model(input_ids=ids).logits
        assert len(calls) == model.config.decoder.num_hidden_layers and all(c is not None for c in calls)
        monkeypatch.setattr(ops, "gated", lambda *args: None)
        ordinary = model(input_ids=ids).logits
    scale = ordinary.float().abs().max().item()
    torch.testing.assert_close(fused.float(), ordinary.float(), rtol=0, atol=scale * 2 ** -5)


# ---- ops.conv2d: the patch embedding where bf16 runs as float32 ---------------------------------

def conv_layer(dtype, bias: bool = True) -> nn.Conv2d:
    torch.manual_seed(3)
    return nn.Conv2d(3, 48, 8, 8, bias=bias).to(dtype).eval()


@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_on_the_float32_route_is_as_close_to_float64_as_torch_s_own(bias, monkeypatch):
    monkeypatch.setattr(_library, "onednn_bf16", lambda: False)  # the AVX2-only CPU's route, on any CPU
    conv = conv_layer(torch.bfloat16, bias)
    x = torch.randn(2, 3, 64, 48).to(torch.bfloat16)
    calls = []
    original = dense_mod.F.conv2d
    monkeypatch.setattr(dense_mod.F, "conv2d", lambda *a: calls.append(a[0].dtype) or original(*a))
    with torch.no_grad():
        got = ops.conv2d(conv, x)
        torch_own = conv(x)
    assert calls[0] == torch.float32 and got.dtype == torch.bfloat16 and got.shape == torch_own.shape
    exact = F.conv2d(x.double(), conv.weight.double(), None if conv.bias is None else conv.bias.double(), 8)
    torch_err = (torch_own.double() - exact).abs().max().item()
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().max().item()
    assert (got.double() - exact).abs().max().item() <= 2 * torch_err + ulp


@pytest.mark.parametrize("case", ["native bf16", "float32", "grad", "subclass", "hook", "reflect padding",
                                  "reference forced"])
def test_conv2d_steps_aside_and_gives_the_ordinary_answer(case, monkeypatch):
    if case != "native bf16":
        monkeypatch.setattr(_library, "onednn_bf16", lambda: False)
    elif not _library.onednn_bf16():
        pytest.skip("this CPU has no oneDNN bf16: the float32 route is the one it takes")
    conv, x = conv_layer(torch.bfloat16), torch.randn(1, 3, 32, 32).to(torch.bfloat16)
    if case == "float32":
        conv, x = conv.float(), x.float()
    elif case == "subclass":
        class MyConv(nn.Conv2d):
            pass
        sub = MyConv(3, 48, 8, 8).to(torch.bfloat16)
        sub.load_state_dict(conv.state_dict())
        conv = sub
    elif case == "hook":
        conv.register_forward_hook(lambda m, i, o: o * 2)
    elif case == "reflect padding":
        conv.padding_mode, conv.padding = "reflect", (1, 1)
    elif case == "reference forced":
        monkeypatch.setenv("IDEFICS3_KIT_FORCE_REFERENCE", "1")
    elif case == "grad":
        conv.weight.requires_grad_(True)
    with torch.set_grad_enabled(case == "grad"):
        assert torch.equal(ops.conv2d(conv, x), conv(x))


# ---- ops.patch_embed: the patch embedding as one GEMM ---------------------------------------------

def conv_reference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The patch tokens [N, h*w, D] in float64."""
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x.double(), conv.weight.double(), bias, conv.stride).flatten(2).transpose(1, 2)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("size", [(64, 48), (128, 128)])
def test_patch_embed_is_as_close_to_float64_as_torch_s_own(dtype, bias, size, bf16_route, monkeypatch):
    """The GEMM of the patches by the kernel: the same products as the convolution, summed in
    another order, so within twice torch's own convolution error (plus one ulp) of float64, laid out
    as the convolution's tokens [N, h*w, D], contiguous."""
    if dtype == torch.float32 and bf16_route == "float32":
        pytest.skip("the bf16 route does not change float32")
    conv = conv_layer(dtype, bias)
    x = torch.randn(2, 3, *size).to(dtype)
    gemms = []
    original = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(dense_mod.torch.ops.mkldnn, "_linear_pointwise",
                        lambda *a: gemms.append(a[0].shape) or original(*a), raising=False)
    with torch.no_grad():
        got = ops.patch_embed(conv, x)
        torch_own = conv(x).flatten(2).transpose(1, 2)
    rows = 2 * (size[0] // 8) * (size[1] // 8)
    assert gemms == [(rows, 3 * 8 * 8)]
    assert got.dtype == dtype and got.shape == torch_own.shape and got.is_contiguous()
    exact = conv_reference(conv, x)
    torch_err = (torch_own.double() - exact).abs().max().item()
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert (got.double() - exact).abs().max().item() <= 2 * torch_err + ulp


@needs_onednn
@pytest.mark.parametrize("case", ["grad", "subclass", "hook", "stride", "padding", "ragged size", "few patches",
                                  "reference forced", "switched off"])
def test_patch_embed_steps_aside_and_gives_the_ordinary_answer(case, monkeypatch):
    """Anything but a plain, tiling convolution over enough patches (inference, no hooks) runs the
    convolution itself and the transpose: the ordinary answer, bit for bit."""
    conv, x = conv_layer(torch.float32), torch.randn(2, 3, 64, 64)
    if case == "subclass":
        class MyConv(nn.Conv2d):
            pass
        sub = MyConv(3, 48, 8, 8)
        sub.load_state_dict(conv.state_dict())
        conv = sub
    elif case == "hook":
        conv.register_forward_hook(lambda m, i, o: o * 2)
    elif case == "stride":
        conv.stride = (4, 4)
    elif case == "padding":
        conv.padding = (1, 1)
    elif case == "ragged size":
        x = torch.randn(2, 3, 68, 64)  # 8.5 patches high: the convolution drops the remainder
    elif case == "few patches":
        x = torch.randn(1, 3, 32, 32)  # 16 patches: fewer rows than the dense path takes
    elif case == "reference forced":
        monkeypatch.setenv("IDEFICS3_KIT_FORCE_REFERENCE", "1")
    elif case == "switched off":
        monkeypatch.setenv("IDEFICS3_KIT_DENSE", "0")
    elif case == "grad":
        conv.weight.requires_grad_(True)
    assert not dense_mod._patch_gemm_applies(conv, x)
    with torch.set_grad_enabled(case == "grad"):
        got = ops.patch_embed(conv, x)
        want = conv(x).flatten(2).transpose(1, 2)
    assert torch.equal(got, want) and got.is_contiguous()


@pytest.mark.parametrize("upcast", [True, False])
@pytest.mark.parametrize("onednn", [True, False])
def test_matmul_of_built_weights(upcast, onednn, monkeypatch):
    """``dense_linear.matmul`` (a prefill's product with a freshly dequantized weight): where bf16
    runs as float32 it is the float32 product rounded once, through oneDNN when torch has it (within
    a bf16 ulp of F.linear's, the two sum in different orders) or F.linear; elsewhere F.linear."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 96, generator=g).bfloat16()
    w, b = torch.randn(72, 96, generator=g).bfloat16(), torch.randn(72, generator=g).bfloat16()
    monkeypatch.setattr(_library, "bf16_as_float32", lambda t: upcast)
    if not onednn:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with torch.inference_mode():
        got = dense_mod.matmul(x, w, b)
        assert got.dtype == torch.bfloat16 and got.shape == (3, 40, 72)
        if not upcast:
            assert torch.equal(got, F.linear(x, w, b))
            return
        want = F.linear(x.float(), w.float(), b.float())
        if not onednn or not torch.backends.mkldnn.is_available():
            assert torch.equal(got, want.bfloat16())
        else:
            torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=2 ** -7)


# ---- packed weights ------------------------------------------------------------------------------


@pytest.fixture
def clean_packs():
    yield
    dense_mod._ENABLED.clear()
    packed._PACKS.clear()


@needs_onednn_bf16
@needs_onednn
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_weights_give_the_same_bits(activation, bias, clean_packs):
    torch.manual_seed(0)
    lin, up = layer(96, 200, torch.bfloat16, bias), layer(96, 200, torch.bfloat16, bias, seed=1)
    x = torch.randn(2, 80, 96).bfloat16()
    with torch.no_grad():
        plain, plain_gated = ops.dense(lin, x, activation), ops.gated(lin, up, x, F.silu)
        assert dense_mod.pack_weights([lin, up]) == 2 * 96 * 200 * 2
        assert dense_mod.packed_layers() == 2
        assert dense_mod._packed_weight(lin) is not None
        assert torch.equal(ops.dense(lin, x, activation), plain)
        assert torch.equal(ops.gated(lin, up, x, F.silu), plain_gated)


@needs_onednn_bf16
@needs_onednn
def test_a_packed_copy_follows_its_weight(clean_packs):
    """An in-place update (an optimizer step, load_state_dict) or a new weight: the next call packs
    again, so the answer is always the current weight's; unpack_weights drops the copy."""
    torch.manual_seed(0)
    lin = layer(64, 128, torch.bfloat16)
    x = torch.randn(100, 64).bfloat16()
    with torch.no_grad():
        dense_mod.pack_weights([lin])
        first = dense_mod._packed_weight(lin)
        lin.weight.mul_(-2)
        assert dense_mod._packed_weight(lin) is not first
        assert torch.equal(ops.dense(lin, x), F.linear(x, lin.weight, lin.bias))
        lin.load_state_dict({"weight": torch.randn(128, 64).bfloat16(), "bias": lin.bias.clone()})
        assert torch.equal(ops.dense(lin, x), F.linear(x, lin.weight, lin.bias))
        lin.weight = nn.Parameter(torch.randn(128, 64).bfloat16())
        assert torch.equal(ops.dense(lin, x), F.linear(x, lin.weight, lin.bias))
        dense_mod.unpack_weights([lin])
        assert dense_mod.packed_layers() == 0 and dense_mod._packed_weight(lin) is None
        assert packed.fresh((lin,), None) is None
        lin.weight = nn.Parameter(torch.randn(128, 64))  # float32: never packed, never used packed
        dense_mod.pack_weights([lin])
        assert dense_mod.packed_layers() == 0


@needs_onednn
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_pytorch_tanh"])
def test_float32_copies_where_bf16_runs_as_float32(activation, monkeypatch, clean_packs):
    """Without oneDNN bf16 (AVX2 CPUs; forced here) bf16 linears compute in float32 on the exact
    upcasts: their packed copies are float32 (twice the bytes), the results the same bits as the
    unpacked route's, and a copy still follows its weight."""
    monkeypatch.setattr(_library, "onednn_bf16", lambda: False)
    torch.manual_seed(0)
    lin, up = layer(96, 200, torch.bfloat16, True), layer(96, 200, torch.bfloat16, True, seed=1)
    x = torch.randn(2, 80, 96).bfloat16()
    with torch.no_grad():
        plain, plain_gated = ops.dense(lin, x, activation), ops.gated(lin, up, x, F.silu)
        assert dense_mod.packable_bytes([lin, up]) == dense_mod.pack_weights([lin, up]) == 2 * 96 * 200 * 4
        assert dense_mod._packed_weight(lin).dtype == torch.float32
        assert torch.equal(ops.dense(lin, x, activation), plain)
        assert torch.equal(ops.gated(lin, up, x, F.silu), plain_gated)
        lin.weight.mul_(-2)  # in place: packed again at the next call
        dense_mod.unpack_weights([up])
        want = ops.dense(lin, x, activation)
        dense_mod.unpack_weights([lin])
        assert torch.equal(want, ops.dense(lin, x, activation))


@needs_onednn_bf16
@needs_onednn
def test_vlm_packed_weights_keep_the_features_and_the_state_dict(clean_packs):
    import idefics3_kit as ik

    torch.manual_seed(0)
    cfg = ik.VLMConfig.preset("tiny")
    cfg = cfg.replace(vision=cfg.vision.replace(image_size=128))  # 64 patches per tile: the dense path runs
    model = ik.VLM(cfg).to(torch.bfloat16).eval()
    pixels = (torch.rand(2, 3, 128, 128) * 2 - 1).bfloat16()
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model.run_vision_tower(pixels, None)
        assert model.enable_packed_weights() > 0
        after = model.run_vision_tower(pixels, None)
        model.disable_packed_weights()
    assert torch.equal(before, after)
    assert list(model.state_dict()) == keys and dense_mod.packed_layers() == 0
    with pytest.raises(ValueError, match="unknown parts"):
        model.enable_packed_weights(("vision", "lm_head"))


@needs_onednn_bf16
@needs_onednn
def test_vlm_packs_a_small_decoder_within_the_budget(clean_packs):
    """``decoder_max_bytes`` (chat and the server's policy): the decoder's linears but its output
    head are packed when their copy fits the budget, and not at all when it does not; a prefill
    through the packed copies gives the same logits, bit for bit."""
    import idefics3_kit as ik

    torch.manual_seed(0)
    model = ik.VLM(ik.VLMConfig.preset("tiny")).to(torch.bfloat16).eval()
    head = model.get_output_embeddings()
    body = [m for m in model.decoder.modules() if isinstance(m, nn.Linear) and m is not head]
    body_bytes = dense_mod.packable_bytes(body)
    assert body_bytes > 0
    ids = torch.randint(0, model.image_token_id, (1, 96))  # text only; >= MIN_ROWS rows: the dense path runs
    with torch.no_grad():
        before = model(input_ids=ids).logits
        base = model.enable_packed_weights(decoder_max_bytes=body_bytes - 1)  # over budget: vision + connector only
        assert dense_mod.packable_bytes([model.vision, model.connector]) == base
        model.disable_packed_weights()
        packed_bytes = model.enable_packed_weights(decoder_max_bytes=body_bytes)
        assert packed_bytes == base + body_bytes
        assert all(m in dense_mod._ENABLED for m in body) and head not in dense_mod._ENABLED
        after = model(input_ids=ids).logits
        model.disable_packed_weights()
    assert torch.equal(before, after)
    assert dense_mod.packed_layers() == 0
