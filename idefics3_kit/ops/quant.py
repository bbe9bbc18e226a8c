"""Weight-only quantization: the format, its reference math, the compiled few-row kernel, and the
``QuantizedLinear`` module that holds it (the one owner of the concept; docs/quantization.md).

Decode on a CPU is bound by the weight bytes read per token, so fewer bytes is the way to go
faster. Two symmetric formats, scales in the dtype of the weight they replace:

- int8: ``qweight`` int8 [N, K], ``scales`` [N] (per output channel); w = q * s, q in [-127, 127].
- int4: ``qweight`` uint8 [N, K/2] (two weights per byte: column 2j in the low nibble, 2j+1 in
  the high one, each stored as q + 8), ``scales`` [N, K/g] (one per group of g = 32/64/128
  columns); w = q * s, q in [-8, 7] (llama.cpp q4_0's rule: the largest-magnitude weight of a
  group maps to -8, which uses all 16 levels).

A decode step (at most ``MAX_ROWS`` rows) also quantizes its activations, per row and per block
of 32 columns, to int8 (llama.cpp's q8_0: scale = amax / 127, round half to even), so the
compiled kernel multiplies int8 by int8 with AVX-512 VNNI instead of expanding every weight to
float: ~3x fewer instructions per weight byte, which is what lets a step run at the memory's
speed. ``quant_linear_ref`` is the specification of that step: the quantized activations times
the exactly dequantized weights, accumulated in float32, bias added, rounded once to x's dtype.
The ordinary path (float32 models, other devices, wrappers) computes the same thing in torch, so
a step gives the same answer with or without the kernel. More rows (a prefill) are not
activation-quantized: the weight is dequantized once to x's dtype (the compiled
``quant_dequantize`` for bf16) and the ordinary (oneDNN) matmul runs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _library, dense_linear, fast_path

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)
MAX_ROWS = 8  # the compiled kernel re-reads the weights per 4 rows; beyond 8, dequantize + GEMM


class QuantizationError(ValueError):
    """A quantization request that cannot be met (bits, group size, shapes), with the reason."""


def check_format(bits: int, group_size: int | None, in_features: int | None = None, name: str = "") -> None:
    """Refuse unsupported bits / group sizes by name (``in_features`` must split into groups)."""
    where = f" ({name})" if name else ""
    if bits not in BITS:
        raise QuantizationError(f"quantization bits must be 8 or 4, got {bits!r}")
    if bits == 4:
        if group_size not in GROUP_SIZES:
            raise QuantizationError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size!r}")
        if in_features is not None and in_features % group_size:
            raise QuantizationError(f"int4 group_size {group_size} does not divide in_features {in_features}{where}; "
                                    f"pick a group size that does ({[g for g in GROUP_SIZES if in_features % g == 0]})")


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] -> (qweight, scales) in the format above; scales in w's dtype, and
    q computed against the rounded scales, so dequantize gives the nearest representable weight."""
    check_format(bits, group_size, w.shape[-1])
    wf = w.detach().float()
    if bits == 8:
        scales = (wf.abs().amax(dim=1) / 127).to(w.dtype)
        s = scales.float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(wf / s[:, None]).clamp_(-127, 127).to(torch.int8)
        return q.contiguous(), scales.contiguous()
    n, k = wf.shape
    assert group_size is not None  # check_format: int4 has a group size
    g = wf.view(n, k // group_size, group_size)                      # [N, K/g, g]
    peak = g.gather(-1, g.abs().argmax(-1, keepdim=True))            # signed largest magnitude [N, K/g, 1]
    scales = (peak / -8).squeeze(-1).to(w.dtype)                     # [N, K/g]
    s = scales.float()
    s = torch.where(s != 0, s, torch.ones_like(s))
    q = torch.round(g / s[..., None]).clamp_(-8, 7).to(torch.int16).view(n, k) + 8   # [N, K] in [0, 15]
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)          # [N, K/2]
    return packed.contiguous(), scales.contiguous()


def bits_of(qweight: torch.Tensor) -> int:
    """8 for an int8 qweight, 4 for a packed uint8 one."""
    if qweight.dtype == torch.int8:
        return 8
    if qweight.dtype == torch.uint8:
        return 4
    raise QuantizationError(f"qweight must be int8 (8 bits) or uint8 (packed 4 bits), got {qweight.dtype}")


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(qweight, scales) -> the weight [N, K] in ``dtype`` (default: the scales'), computed in float32."""
    dtype = dtype or scales.dtype
    if bits_of(qweight) == 8:
        return (qweight.float() * scales.float()[:, None]).to(dtype)
    n = qweight.shape[0]
    q = torch.stack(((qweight & 0xF), (qweight >> 4)), dim=-1).view(n, -1).to(torch.int16) - 8   # [N, K]
    groups = scales.shape[1]
    w = q.view(n, groups, -1).float() * scales.float()[..., None]   # [N, K/g, g]
    return w.view(n, -1).to(dtype)


ACT_BLOCK = 32  # columns per activation scale in a decode step


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (xq int8 [..., K], xs float32 [..., ceil(K / 32)]): per row and block of 32
    columns, xs = amax / 127 and xq = round_half_even(x * (127 / amax)) in float32 (0 for an
    all-zero block); x ~= xq * xs within half a step."""
    k = x.shape[-1]
    blocks = -(-k // ACT_BLOCK)
    xf = F.pad(x.float(), (0, blocks * ACT_BLOCK - k)).unflatten(-1, (blocks, ACT_BLOCK))   # [..., K/32, 32]
    amax = xf.abs().amax(dim=-1, keepdim=True)                                            # [..., K/32, 1]
    # a true division (``127.0 / amax`` would be reciprocal() * 127: two roundings, not the kernel's one)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(xf * inv).clamp_(-127, 127).to(torch.int8).flatten(-2)[..., :k]
    return xq, (amax / 127).squeeze(-1)


def quant_linear_ref(x: torch.Tensor, qweights, scales, biases=None) -> torch.Tensor:
    """Reference of a decode step: x quantized per block of 32 columns (``quantize_activations``),
    each weight's linear accumulated in float32 over the exactly dequantized weight, bias added,
    rounded once to x's dtype; the outputs concatenated on the last dim."""
    xq, xs = quantize_activations(x)
    x_seen = xq.float() * xs.repeat_interleave(ACT_BLOCK, dim=-1)[..., :x.shape[-1]]   # [..., K]
    return _float32_linears(x_seen, x.dtype, qweights, scales, biases)


def weight_only_ref(x: torch.Tensor, qweights, scales, biases=None) -> torch.Tensor:
    """What a prefill (more than MAX_ROWS rows) computes, up to the matmul's rounding: x as it is
    (no activation quantization) against each dequantized weight, float32 sums, one rounding."""
    return _float32_linears(x.float(), x.dtype, qweights, scales, biases)


def _float32_linears(x32: torch.Tensor, dtype: torch.dtype, qweights, scales, biases) -> torch.Tensor:
    """x32 @ each dequantized weight (+ bias) in float32, each rounded once to ``dtype``, concatenated."""
    biases = biases if biases is not None else [None] * len(qweights)
    outs = []
    for q, s, b in zip(qweights, scales, biases):
        y = x32 @ dequantize(q, s, torch.float32).T
        outs.append((y if b is None else y + b.float()).to(dtype))
    return torch.cat(outs, dim=-1)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0


def applies(x: torch.Tensor, qweights, scales, biases=None) -> bool:
    """Whether the compiled kernel runs: bf16 x of at most MAX_ROWS rows, bf16 scales, contiguous
    weights of the format above, plain tensors on the CPU (``fast_path``)."""
    biases = list(biases) if biases is not None else []
    if x.dtype != torch.bfloat16 or x.dim() == 0 or x.shape[-1] == 0 or _rows(x) > MAX_ROWS:
        return False
    if not qweights or not fast_path.usable("quant_linear", (x, *qweights, *scales, *biases)):
        return False
    k = x.shape[-1]
    for q, s in zip(qweights, scales):
        if q.dim() != 2 or not q.is_contiguous() or not s.is_contiguous() or s.dtype != torch.bfloat16:
            return False
        if q.dtype == torch.int8:
            if q.shape[1] != k or s.shape != (q.shape[0],):
                return False
        elif q.dtype == torch.uint8:
            if 2 * q.shape[1] != k or s.dim() != 2 or s.shape[0] != q.shape[0] or k % s.shape[1] \
                    or k // s.shape[1] not in GROUP_SIZES:
                return False
        else:
            return False
    return all(b is None or (b.dim() == 1 and b.shape[0] == q.shape[0] and b.dtype in (torch.bfloat16, torch.float32))
               for q, b in zip(qweights, biases))


def quant_linear(x: torch.Tensor, qweights, scales, biases=None) -> torch.Tensor:
    """x [..., K] @ each dequantized weight (+ bias) -> [..., sum N_i]. A decode step (at most
    MAX_ROWS rows) quantizes x per block of 32 columns: the compiled kernel where it applies, else
    the same math in torch (``quant_linear_ref``). More rows (a prefill) dequantize the weight to
    x's dtype and run the ordinary matmul (``dense_linear.matmul``: in float32 where this CPU has no
    bf16 matmul)."""
    biases = list(biases) if biases is not None else [None] * len(qweights)
    if applies(x, qweights, scales, biases):
        return _library.op("quant_linear")(x, list(qweights), list(scales), biases)
    if 0 < _rows(x) <= MAX_ROWS:
        return quant_linear_ref(x, qweights, scales, biases)
    outs = [dense_linear.matmul(x, _dequantize_for(x, q, s), None if b is None else b.to(x.dtype))
            for q, s, b in zip(qweights, scales, biases)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _dequantize_for(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The weight in x's dtype for the ordinary matmul: the compiled ``quant_dequantize`` (one pass,
    threads; the same values as ``dequantize``) for bf16, else the reference."""
    if (x.dtype == torch.bfloat16 and scales.dtype == torch.bfloat16 and qweight.is_contiguous()
            and scales.is_contiguous() and fast_path.usable("quant_dequantize", (x, qweight, scales))):
        return _library.op("quant_dequantize")(qweight, scales)
    return dequantize(qweight, scales, x.dtype)


@_library.register_fake("quant_linear")
def _quant_linear_fake(x, qweights, scales, biases):
    _library.same_device("quant_linear", (("x", x), *((f"qweights[{i}]", w) for i, w in enumerate(qweights)),
                                          *((f"scales[{i}]", s) for i, s in enumerate(scales))))
    torch._check(len(qweights) > 0, lambda: "quant_linear: qweights must not be empty")
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in qweights)))


@_library.register_fake("quant_dequantize")
def _quant_dequantize_fake(qweight, scales):
    _library.same_device("quant_dequantize", (("qweight", qweight), ("scales", scales)))
    k = qweight.shape[1] * (2 if qweight.dtype == torch.uint8 else 1)
    return scales.new_empty((qweight.shape[0], k))


class QuantizedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is stored quantized (int8 per channel or int4 per group).

    ``qweight`` and ``scales`` are frozen parameters (so checkpoints, ``.to(device)`` and the
    safe loader treat them like any weight); the bias, if any, stays in float. Not trainable.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 bias: bool = False, dtype=torch.bfloat16, device=None):
        super().__init__()
        check_format(bits, group_size, in_features)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if bits == 4 else None
        if bits == 8:
            q = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
            s = torch.empty(out_features, dtype=dtype, device=device)
        else:
            assert group_size is not None  # check_format: int4 has a group size
            q = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
            s = torch.empty(out_features, in_features // group_size, dtype=dtype, device=device)
        self.qweight = nn.Parameter(q, requires_grad=False)
        self.scales = nn.Parameter(s, requires_grad=False)
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                                     requires_grad=False) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None) -> "QuantizedLinear":
        w = linear.weight
        out = cls(w.shape[1], w.shape[0], bits, group_size, bias=False, dtype=w.dtype, device="meta")
        q, s = quantize_weight(w, bits, group_size)
        out.qweight = nn.Parameter(q, requires_grad=False)
        out.scales = nn.Parameter(s, requires_grad=False)
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return out

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, [self.qweight], [self.scales], [self.bias])

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}"


fast_path.plain_module(QuantizedLinear)


def quantize_modules(root: nn.Module, names: Sequence[str], bits: int, group_size: int | None = None) -> None:
    """Replace the ``nn.Linear`` submodules of ``root`` named in ``names`` by QuantizedLinear, one at
    a time (each float weight is freed as soon as its quantized copy exists). Every name is checked
    before anything changes."""
    modules = dict(root.named_modules())
    for name in names:
        m = modules.get(name)
        if type(m) is not nn.Linear:
            raise QuantizationError(f"{name!r} is not a plain nn.Linear (got {type(m).__name__}); cannot quantize it")
        check_format(bits, group_size, m.in_features, name)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        with torch.no_grad():
            setattr(parent, attr, QuantizedLinear.from_linear(getattr(parent, attr), bits, group_size))


def empty_quantized_modules(root: nn.Module, names: Sequence[str], bits: int, group_size: int | None = None) -> None:
    """Like ``quantize_modules`` but with empty (meta) quantized weights: the structure a quantized
    checkpoint loads into, built without touching any float weight."""
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        m = getattr(parent, attr)
        if not isinstance(m, nn.Linear):
            raise QuantizationError(f"{name!r} is not an nn.Linear (got {type(m).__name__}); cannot quantize it")
        setattr(parent, attr, QuantizedLinear(m.in_features, m.out_features, bits, group_size,
                                              bias=m.bias is not None, dtype=m.weight.dtype, device="meta"))
