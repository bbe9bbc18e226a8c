"""Every compiled CPU op against its reference where a fuzzing pass found faults: NaN and inf
anywhere, strided / transposed / expanded / sliced views, empty sizes, a tensor on another
device, and arguments an op must refuse.

"Same as the reference" means: NaN exactly where the reference (attention_ref, decode_linear_ref,
rms_norm_ref, Pillow) has NaN, the same infinities, and finite values within the tolerances that
test_attention.py and test_decode_ops.py derive from PyTorch's own low-precision error. Padding
around sliced views is filled with NaN, so a read outside a view shows up as a NaN the reference
does not have.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from idefics3_kit import ops
from idefics3_kit.ops import _library
from idefics3_kit.ops import preprocess as P
from idefics3_kit.ops.attention import attention_ref
from idefics3_kit.ops.matmul import decode_linear_ref
from idefics3_kit.ops.norm import rms_norm_ref

from _tolerance import output_ulp

needs_ext = pytest.mark.skipif(not ops.has_extension(),
                               reason=f"compiled extension not built ({ops.extension_error()})")
ns = torch.ops.idefics3_kit
SPECIALS = (math.nan, math.inf, -math.inf)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])

# ---- layouts ----------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "padded", "permuted", "expanded", "transposed")


def restride(t: torch.Tensor, layout: str, dim: int = 0) -> torch.Tensor:
    """``t``'s values (for "expanded": slice 0 of ``dim`` repeated along it) in another layout.

    padded: a slice of a larger NaN-filled buffer (every dim, the last one included, starts at an
    offset); permuted: the leading dims stored in reverse order (last dim still unit stride);
    expanded: stride 0 along ``dim``; transposed: the last two dims swapped in memory.
    """
    if layout == "contiguous" or t.numel() == 0 and layout == "expanded":
        return t.contiguous()
    if layout == "padded":
        fill = math.nan if t.is_floating_point() else 0
        big = torch.full([s + 3 for s in t.shape], fill, dtype=t.dtype)
        view = big[tuple(slice(1, 1 + s) for s in t.shape)]
        view.copy_(t)
        return view
    if layout == "permuted":
        n = t.dim()
        order = list(reversed(range(n - 1))) + [n - 1]
        return t.permute(order).contiguous().permute([order.index(i) for i in range(n)])
    if layout == "expanded":
        return t.narrow(dim, 0, 1).expand(t.shape)
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t
    raise ValueError(layout)


def place_specials(t: torch.Tensor, picks) -> torch.Tensor:
    """A copy of ``t`` with NaN / +inf / -inf at the flat positions ``picks`` [(fraction, value)]."""
    t = t.clone()
    if t.numel():
        flat = t.view(-1)
        for u, value in picks:
            flat[min(int(u * t.numel()), t.numel() - 1)] = value
    return t


special_picks = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(SPECIALS)), max_size=3)


def assert_same_nonfinite(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """NaN and +-inf exactly where ``ref`` has them; returns the mask of finite entries."""
    o, r = ours.float(), ref.float()
    assert o.shape == r.shape
    assert torch.equal(o.isnan(), r.isnan()), f"NaN at {(o.isnan() != r.isnan()).nonzero()[:5].tolist()}"
    assert torch.equal(o == math.inf, r == math.inf) and torch.equal(o == -math.inf, r == -math.inf)
    return torch.isfinite(r)


def max_err(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    d = (a.float() - b.float()).abs()[where]
    return d.max().item() if d.numel() else 0.0



# ---- attention: vision / prefill / decode -------------------------------------------------------

def _kpm(kind: str, b: int, lk: int, g: torch.Generator):
    if kind == "none":
        return None
    if kind == "random":
        m = torch.rand(b, lk, generator=g) > 0.4
    else:
        m = torch.ones(b, lk, dtype=torch.bool)
        m[:, : lk // 3] = False  # left padding: early causal rows have nothing to attend to
    if b and kind == "random":
        m[0] = False  # a row with every key masked: its queries output 0
    return m


def _attention_call(kind, q, k, v, kpm, scale):
    if kind == "decode":
        return ns.decode_attention(q, k, v, kpm, None, scale)
    return (ns.vision_attention if kind == "vision" else ns.prefill_attention)(q, k, v, kpm, scale)


def check_attention(kind, dtype, q, k, v, kpm, scale):
    """The op on (q, k, v) in ``dtype`` (any layout) against attention_ref in dtype and float32.

    The NaN / inf pattern is the float32 reference's (of the same dtype-rounded inputs). The bf16
    reference can have more NaN rows: torch's bf16 matmul (oneDNN), given an odd inner size, reads
    one element past each row of its first operand and multiplies it by zero, so in P·V a NaN row
    of P also poisons the row before it. The kernels keep rows apart (the brief's rule: a NaN in one
    row never changes another), so the bf16 reference only sets the tolerance, where it is finite.
    """
    causal = kind != "vision"
    ours = _attention_call(kind, q, k, v, kpm, scale)
    assert ours.dtype == dtype and ours.shape == q.shape
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    ref_low = attention_ref(qc, kc, vc, causal=causal, key_padding_mask=kpm, scale=scale)
    ref32 = attention_ref(qc.float(), kc.float(), vc.float(), causal=causal, key_padding_mask=kpm, scale=scale)
    finite = assert_same_nonfinite(ours, ref32) & torch.isfinite(ref_low.float())
    err = max_err(ours, ref32, finite)
    if dtype == torch.float32:
        assert err <= 1e-5
    else:
        assert err <= max(2 * max_err(ref_low, ref32, finite), output_ulp(ref32, dtype, finite)) + 2e-3
    return ours


@needs_ext
@FUZZ
@given(kind=st.sampled_from(["vision", "prefill", "decode"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       b=st.integers(0, 3), hkv=st.integers(1, 2), groups=st.integers(1, 5), d=st.sampled_from([8, 32, 64, 72, 80]),
       lk=st.integers(1, 80) | st.integers(250, 300), lq_frac=st.floats(0, 1), mask=st.sampled_from(["none", "random", "left_pad"]),
       layouts=st.tuples(*[st.sampled_from(LAYOUTS[:4])] * 3), dims=st.tuples(*[st.integers(0, 2)] * 3),
       picks=st.tuples(special_picks, special_picks, special_picks), seed=st.integers(0, 2 ** 16))
def test_attention_ops_match_reference(kind, dtype, b, hkv, groups, d, lk, lq_frac, mask, layouts, dims, picks, seed):
    # NaN / inf at random places of q, k and v; strided, permuted, expanded and padded views;
    # empty batches and empty query blocks. Non-finite values of v also poison rows that give
    # their key probability 0 (masked, or after a causal row): 0 * NaN is NaN in the reference.
    g = torch.Generator().manual_seed(seed)
    lq = 1 if kind == "decode" else int(lq_frac * (lk if kind == "prefill" else 70))  # several blocks too
    shapes = [(b, hkv * groups, lq, d), (b, hkv, lk, d), (b, hkv, lk, d)]
    tensors = [place_specials(torch.randn(s, generator=g).to(dtype), p) for s, p in zip(shapes, picks)]
    q, k, v = (restride(t, lay, dim) for t, lay, dim in zip(tensors, layouts, dims))
    check_attention(kind, dtype, q, k, v, _kpm(mask, b, lk, g), 1 / math.sqrt(d))


@needs_ext
@pytest.mark.parametrize("kind", ["vision", "prefill", "decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_in_q_or_k_gives_nan_rows(kind, dtype):
    # Fault 1: a NaN query (a NaN-filled q_proj) came out as finite numbers; so did a NaN key.
    # Long enough rows for the AVX-512 softmax (and, in bf16 decode with head dim 64, AMX tiles).
    b, h, d, lk = 2, 4, 64, 300
    lq = 1 if kind == "decode" else 150
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for n in (lq, lk, lk))
    q[0, 1, lq - 1, 5] = math.nan  # one query row
    k[1, 2, 7, 0] = math.nan       # one key: every row of batch 1, head 2 that attends to it
    out = check_attention(kind, dtype, q, k, v, None, 0.125)
    assert out[0, 1, lq - 1].isnan().all() and out[1, 2].isnan().all()
    assert not out[0, 0].isnan().any() and not out[1, 3].isnan().any()
    q.fill_(math.nan)  # the checkpoint with a NaN-filled q_proj: no finite logits
    assert _attention_call(kind, q, k, v, None, 0.125).isnan().all()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_values_follow_reference_under_masks(dtype):
    # The reference multiplies every value row by its probability, 0 included: NaN or inf in the
    # value of a masked key, or of a key after a causal row, gives NaN in that column of every
    # row with a key to attend to; rows with none stay exactly 0. 200 queries: several fp32 blocks.
    b, h, d, lk = 2, 2, 32, 260
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype) for n in (200, lk, lk))
    kpm = torch.ones(b, lk, dtype=torch.bool)
    kpm[1, :100] = False
    kpm[0, 30] = False
    v[0, 0, 30, 3] = math.nan    # a masked key
    v[0, 1, lk - 1, 4] = math.inf  # the last key: after every causal row but the last
    v[1, 0, 10, 5] = -math.inf   # a masked key of a left-padded row
    vis = check_attention("vision", dtype, q, k, v, kpm, 0.2)
    assert vis[0, 0, :, 3].isnan().all() and vis[1, 0, :, 5].isnan().all()
    assert vis[0, 1, :, 4].abs().eq(math.inf).all()  # every row sees the last key: inf, not NaN
    out = check_attention("prefill", dtype, q, k, v, kpm, 0.2)
    assert out[0, 0, :, 3].isnan().all() and out[0, 1, :-1, 4].isnan().all() and not out[0, 1, -1, 4].isnan()
    assert torch.equal(out[1, :, :40], torch.zeros_like(out[1, :, :40]))  # before the first key: 0
    assert out[1, 0, 40:, 5].isnan().all()
    dec = check_attention("decode", dtype, q[:, :, -1:], k, v, kpm, 0.2)
    assert dec[0, 0, 0, 3].isnan() and dec[1, 0, 0, 5].isnan()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["vision", "decode"])
def test_infinite_scores_follow_float32_softmax(kind, dtype):
    # +inf among a row's scores: inf - inf = NaN, the row is NaN; -inf scores get weight 0; a row
    # whose scores are all -inf is NaN (softmax of an all -inf row); scale NaN: every row NaN.
    b, h, d, lk = 1, 8, 32, 40
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, n, d, generator=g).abs().to(dtype) for n in (1, lk, lk))
    q[0, 0, 0, 0] = math.inf        # scores +inf: NaN row
    q[0, 1, 0, 0] = -math.inf       # scores -inf everywhere (k >= 0): NaN row
    k[0, 0, 3, 1] = -math.inf       # key 3 scores -inf for every head: weight 0, rows stay finite
    out = check_attention(kind if kind == "decode" else "vision", dtype, q if kind == "decode" else q.expand(b, h, 5, d),
                          k, v, None, 0.3)
    assert out[0, 0].isnan().all() and out[0, 1].isnan().all() and torch.isfinite(out[0, 2:].float()).all()
    assert _attention_call(kind, q if kind == "decode" else q.expand(b, h, 5, d), k, v, None, math.nan).isnan().all()


@needs_ext
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["vision", "prefill", "decode"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       d=st.sampled_from([16, 64]), row=st.integers(0, 10 ** 6), value=st.sampled_from(SPECIALS),
       masked=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_a_nonfinite_query_changes_no_other_row(kind, dtype, d, row, value, masked, seed):
    b, hkv, groups, lk = 2, 2, 3, 90
    lq = 1 if kind == "decode" else 70
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * groups, lq, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, lk, d, generator=g).to(dtype) for _ in range(2))
    kpm = _kpm("left_pad", b, lk, g) if masked else None
    clean = _attention_call(kind, q, k, v, kpm, 0.1)
    rows = q.shape[0] * q.shape[1] * q.shape[2]
    bi, h, i = np.unravel_index(row % rows, q.shape[:3])
    q[bi, h, i, row % d] = value
    out = _attention_call(kind, q, k, v, kpm, 0.1)
    others = torch.ones(q.shape[:3], dtype=torch.bool)
    others[bi, h, i] = False
    assert torch.equal(out[others], clean[others])
    ref = attention_ref(q, k, v, causal=kind != "vision", key_padding_mask=kpm, scale=0.1)[bi, h, i]
    assert_same_nonfinite(out[bi, h, i], ref)
    if torch.equal(ref, torch.zeros_like(ref)):  # a row with nothing to attend to stays exactly 0
        assert torch.equal(out[bi, h, i], ref)


@needs_ext
def test_attention_layouts_refused_clearly():
    # Fault 7: what the kernels do not read in place is refused with a message naming it.
    q = torch.randn(1, 2, 3, 16)
    cases = [
        (lambda: ns.vision_attention(q.transpose(2, 3).contiguous().transpose(2, 3), q, q, None, 1.0),
         "q must have stride"),
        (lambda: ns.decode_attention(q[:, :, :1], q, q.transpose(2, 3).contiguous().transpose(2, 3), None, None, 1.0),
         "v must have stride"),
        (lambda: ns.prefill_attention(q, q[:, :, :0], q[:, :, :0], None, 1.0), "k must hold at least one key"),
        (lambda: ns.vision_attention(q, q, q, torch.ones(1, 6, dtype=torch.bool)[:, ::2], 1.0),
         "key_mask must be contiguous"),
        (lambda: ns.vision_attention(q, q, q, torch.ones(1, 1, dtype=torch.bool).expand(1, 3), 1.0),
         "key_mask must be contiguous"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()
    # ops.attention takes those layouts through torch's SDPA instead
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(ops.attention(qt, q, q, causal=True), attention_ref(q, q, q, causal=True))


@needs_ext
def test_decode_amx_and_vector_paths_agree_on_nonfinite(tmp_path):
    # The bf16 decode with the AMX tile path on and off (IDEFICS3_KIT_NO_AMX, read once per
    # process): both give the reference's NaN / inf pattern, over several 256-key chunks and splits.
    import os
    import subprocess
    import sys

    code = """
import math, sys, torch, idefics3_kit.ops
out = []
for d in (32, 64, 128):
    g = torch.Generator().manual_seed(d)
    q = torch.randn(2, 8, 1, d, generator=g).bfloat16()
    k = torch.randn(2, 2, 777, d, generator=g).bfloat16()
    v = torch.randn(2, 2, 777, d, generator=g).bfloat16()
    q[0, 1, 0, 3] = math.nan; q[0, 2, 0, 0] = math.inf; k[1, 0, 600, 2] = math.nan
    v[1, 1, 20, 7] = math.inf; v[0, 0, 700, 1] = math.nan
    kpm = torch.ones(2, 777, dtype=torch.bool); kpm[1, 20] = False; kpm[0, 300:] = False
    out.append((q, k, v, kpm, torch.ops.idefics3_kit.decode_attention(q, k, v, kpm, None, 0.09)))
torch.save(out, sys.argv[1])
"""
    runs = []
    for flag in ("0", "1"):
        path = tmp_path / f"amx{flag}.pt"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True,
                       env={**os.environ, "IDEFICS3_KIT_NO_AMX": flag})
        runs.append(torch.load(path))
    for amx, vector in zip(*runs):
        for q, k, v, kpm, out in (amx, vector):
            ref = attention_ref(q.float(), k.float(), v.float(), key_padding_mask=kpm, scale=0.09)
            assert_same_nonfinite(out, ref)
            assert out[0, 1].isnan().all() and out[0, 2].isnan().all() and out[1, 0].isnan().all()
        assert max_err(amx[4], vector[4], torch.isfinite(amx[4].float())) <= 2e-2


# ---- decode_linear ----------------------------------------------------------------------------

def _linear_bound(x, weights, biases, y, ref, finite):
    """test_decode_ops._check_linear's bound: one bf16 ulp plus the float32 reassociation slack."""
    mag = torch.cat([F.linear(x.float().abs(), w.float().abs(), None if b is None else b.float().abs())
                     for w, b in zip(weights, biases)], dim=-1)
    big = torch.maximum(y.float().abs(), ref.float().abs()).clamp_min(2.0 ** -126)
    ulp = torch.exp2(torch.floor(torch.log2(big)) - 7)
    return ((y.float() - ref.float()).abs() <= ulp + 2.0 ** -18 * mag)[finite].all()


@needs_ext
@FUZZ
@given(lead=st.sampled_from([(0,), (1,), (3,), (2, 1), (1, 1, 4)]), k=st.sampled_from([1, 31, 32, 33, 70]),
       outs=st.lists(st.tuples(st.integers(0, 9), st.booleans()), min_size=1, max_size=3),
       x_layout=st.sampled_from(LAYOUTS), b_layout=st.sampled_from(["contiguous", "padded", "expanded"]),
       picks=st.tuples(special_picks, special_picks, special_picks), seed=st.integers(0, 2 ** 16))
def test_decode_linear_matches_reference(lead, k, outs, x_layout, b_layout, picks, seed):
    g = torch.Generator().manual_seed(seed)
    x = place_specials(torch.randn(*lead, k, generator=g).bfloat16(), picks[0])
    weights = [(torch.randn(n, k, generator=g) / k ** 0.5).bfloat16() for n, _ in outs]
    biases = [torch.randn(n, generator=g).bfloat16() if has else None for n, has in outs]
    if weights[0].numel():
        weights[0] = place_specials(weights[0], picks[1])
    if biases[-1] is not None:
        biases[-1] = restride(place_specials(biases[-1], picks[2]), b_layout)
    xs = restride(x, x_layout, dim=0)
    y = ns.decode_linear(xs, weights, biases)
    ref = decode_linear_ref(xs.contiguous(), weights, [None if b is None else b.contiguous() for b in biases])
    assert y.shape == ref.shape and y.dtype == torch.bfloat16
    finite = assert_same_nonfinite(y, ref)
    assert _linear_bound(xs, weights, biases, y, ref, finite)


@needs_ext
def test_decode_linear_and_rms_norm_nan_row_changes_no_other_row():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 96, generator=g).bfloat16()
    w = [torch.randn(37, 96, generator=g).bfloat16(), torch.randn(9, 96, generator=g).bfloat16()]
    clean = ns.decode_linear(x, w, [None, None])
    x[2, 50] = math.nan
    out = ns.decode_linear(x, w, [None, None])
    assert out[2].isnan().all() and torch.equal(out[[0, 1, 3]], clean[[0, 1, 3]])
    for dtype in (torch.float32, torch.bfloat16):  # rms_norm's rows too
        xr, wr = torch.randn(5, 300, generator=g).to(dtype), torch.randn(300, generator=g).to(dtype)
        clean = ns.rms_norm(xr, wr, 1e-6)
        xr[3, 7] = math.inf
        out = ns.rms_norm(xr, wr, 1e-6)
        assert out[3, 7].isnan() and torch.equal(out[[0, 1, 2, 4]], clean[[0, 1, 2, 4]])


@needs_ext
def test_decode_linear_refuses_weight_layouts():
    x = torch.randn(1, 32).bfloat16()
    w = torch.randn(8, 32).bfloat16()
    for bad, match in [(w.t().contiguous().t(), r"weights\[0\] must be contiguous"),
                       (w[:1].expand(8, 32), r"weights\[0\] must be contiguous"),
                       (torch.randn(8, 40).bfloat16()[:, 4:36], r"weights\[0\] must be contiguous")]:
        with pytest.raises(RuntimeError, match=match):
            ns.decode_linear(x, [bad], [None])
        with torch.no_grad():
            assert ops.decode_linear(x, [bad], [None]) is None  # the wrapper steps aside


# ---- rms_norm ---------------------------------------------------------------------------------

@needs_ext
@FUZZ
@given(shape=st.sampled_from([(0, 5), (3, 0), (1, 1), (4, 17), (2, 3, 40)]), dtype=st.sampled_from([torch.float32,
                                                                                                     torch.bfloat16]),
       x_layout=st.sampled_from(LAYOUTS), w_layout=st.sampled_from(["contiguous", "padded", "expanded"]),
       eps=st.sampled_from([0.0, 1e-6, 0.1]), picks=st.tuples(special_picks, special_picks),
       zero_row=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_rms_norm_matches_reference(shape, dtype, x_layout, w_layout, eps, picks, zero_row, seed):
    g = torch.Generator().manual_seed(seed)
    x = place_specials(torch.randn(*shape, generator=g).to(dtype), picks[0])
    if zero_row and x.numel():
        x.view(-1, shape[-1])[0] = 0  # eps 0: 0 / 0 is NaN in both
    w = place_specials((torch.randn(shape[-1], generator=g) * 2).to(dtype), picks[1])
    xs, ws = restride(x, x_layout, dim=0), restride(w, w_layout)
    out = ns.rms_norm(xs, ws, eps)
    ref = rms_norm_ref(xs.contiguous(), ws.contiguous(), eps)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    finite = assert_same_nonfinite(out, ref)
    if dtype == torch.float32:
        assert ((out - ref).abs() <= 1e-6 * ref.abs() + 1e-30)[finite].all()
    else:  # test_decode_ops._check_rms_norm's bound: the cast before the weight, then one rounding
        normed = F.rms_norm(xs.float(), (shape[-1],), eps=eps).to(dtype).float().abs().clamp_min(2.0 ** -126)
        big = torch.maximum(out.float().abs(), ref.float().abs()).clamp_min(2.0 ** -126)
        bound = ws.float().abs() * torch.exp2(torch.floor(torch.log2(normed)) - 7) + torch.exp2(
            torch.floor(torch.log2(big)) - 7)
        assert ((out.float() - ref.float()).abs() <= bound)[finite].all()


@pytest.mark.parametrize("eps", [-1.0, -1e-12, math.nan, math.inf, True, "1e-5", None])
def test_rms_norm_eps_refused_alike(eps):
    # Fault 4: fp32 ops.rms_norm(x, w, eps=-1) returned NaN where the bf16 op refused it.
    x, w = torch.randn(2, 8), torch.ones(8)
    for fn in (ops.rms_norm, rms_norm_ref):
        for dtype in (torch.float32, torch.bfloat16):
            with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
                fn(x.to(dtype), w.to(dtype), eps)
    if ops.has_extension() and isinstance(eps, float):
        with pytest.raises(RuntimeError, match="eps must be finite and >= 0"):
            ns.rms_norm(x, w, eps)


# ---- a tensor on another device ------------------------------------------------------------------

def _meta(t):
    return t.to("meta")


@needs_ext
def test_one_meta_argument_is_refused_not_faked():
    # Fault 2: a call with one meta tensor among CPU ones reaches the op's fake kernel, which
    # returned an uninitialised CPU tensor (decode_linear) or did nothing (preprocess_into).
    x, w = torch.randn(1, 32).bfloat16(), torch.randn(8, 32).bfloat16()
    q = torch.randn(1, 2, 3, 16)
    mask = torch.ones(1, 3, dtype=torch.bool)
    img = torch.zeros(16, 16, 3, dtype=torch.uint8)
    pv, pm = torch.zeros(1, 1, 3, 16, 16), torch.zeros(1, 1, 16, 16, dtype=torch.int64)
    geo, mean, std = [0, 0, 16, 16, 16, 16, 0, 0], [0.5] * 3, [0.5] * 3
    cases = [
        (lambda: ns.decode_linear(x, [_meta(w)], [None]), r"weights\[0\] must be on the device of x"),
        (lambda: ns.decode_linear(x, [w], [_meta(torch.zeros(8))]), r"biases\[0\] must be on the device of x"),
        (lambda: ns.decode_linear(_meta(x), [w], [None]), r"weights\[0\] must be on the device of x \(meta\)"),
        (lambda: ns.rms_norm(x, _meta(torch.ones(32).bfloat16()), 1e-5), "weight must be on the device of x"),
        (lambda: ns.vision_attention(q, _meta(q), q, None, 1.0), "k must be on the device of q"),
        (lambda: ns.prefill_attention(q, q, q, _meta(mask), 1.0), "key_mask must be on the device of q"),
        (lambda: ns.decode_attention(q[:, :, :1], q, _meta(q), None, None, 1.0), "v must be on the device of q"),
        (lambda: ns.decode_attention(q[:, :, :1], q, q, None, _meta(torch.ones(1, dtype=torch.int32)), 1.0),
         "cache_seqlens must be on the device of q"),
        (lambda: ns.preprocess_into([_meta(img)], pv, pm, geo, mean, std, 1 / 255),
         r"images\[0\] must be on the CPU or on the device of pixel_values"),
        (lambda: ns.preprocess_into([img], pv, _meta(pm), geo, mean, std, 1 / 255),
         "pixel_mask must be on the device of pixel_values"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()
    # all on the meta device: the fake kernel's shape inference, as before
    assert ns.decode_linear(_meta(x), [_meta(w)], [None]).device.type == "meta"


@needs_ext
def test_decode_layers_meta_argument_is_refused():
    x = torch.randn(1, 1, 16)
    params = [torch.ones(16), torch.randn(16, 16), torch.randn(8, 16), torch.randn(8, 16), None, None, None,
              torch.randn(16, 16), torch.ones(16), torch.randn(24, 16), torch.randn(24, 16), torch.randn(16, 24)]
    kc, vc = [torch.zeros(1, 1, 4, 8)], [torch.zeros(1, 1, 4, 8)]
    cos, sin = torch.ones(1, 1, 1, 8), torch.zeros(1, 1, 1, 8)
    out = ns.decode_layers(x, params, kc, vc, cos, sin, None, 0, 2, 1, 1e-5, [])
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(RuntimeError, match="cos must be on the device of x"):
        ns.decode_layers(x, params, kc, vc, _meta(cos), sin, None, 0, 2, 1, 1e-5, [])
    bad = list(params)
    bad[11] = _meta(bad[11])
    with pytest.raises(RuntimeError, match=r"params\[11\] must be on the device of x"):
        ns.decode_layers(x, bad, kc, vc, cos, sin, None, 0, 2, 1, 1e-5, [])
    # the wrapper steps aside (returns None) instead of calling the op
    with torch.inference_mode():
        assert ops.decode_layers(x, [tuple(params)], kc, vc, _meta(cos), sin, None, 0, 2, 1, 1e-5) is None
        assert ops.decode_layers(x, [tuple(params)], kc, vc, cos, sin, _meta(torch.ones(1, 1, dtype=torch.bool)), 0,
                                 2, 1, 1e-5) is None


@needs_ext
def test_wrappers_route_meta_inputs_away_from_the_compiled_ops(monkeypatch):
    calls = []

    def no_compiled_op(name):
        calls.append(name)
        raise AssertionError(f"the compiled {name} was called")

    monkeypatch.setattr(_library, "op", no_compiled_op)
    x, w = torch.randn(1, 32).bfloat16(), torch.randn(8, 32).bfloat16()
    q = torch.randn(1, 2, 1, 16)
    img = torch.zeros(16, 16, 3, dtype=torch.uint8)
    with torch.inference_mode():
        assert ops.decode_linear(x, [_meta(w)], [None]) is None
        for call in (lambda: ops.rms_norm(x, _meta(torch.ones(32).bfloat16()), 1e-5),
                     lambda: ops.attention(q, _meta(q), q, causal=True),
                     lambda: ops.resize_u8(_meta(img), 8, 8)):
            try:
                call()
            except (RuntimeError, NotImplementedError, ValueError):
                pass  # whatever the ordinary PyTorch code says about mixed devices
        with pytest.raises(ValueError, match="image 0 is on the meta device"):
            ops.preprocess_into([_meta(img)], torch.zeros(1, 1, 3, 16, 16), torch.zeros(1, 1, 16, 16),
                                [0, 0, 16, 16, 16, 16, 0, 0], [0.5] * 3, [0.5] * 3, 1 / 255)
    assert calls == []


# ---- decode_layers ------------------------------------------------------------------------------

def _layer_params(hidden, heads, kv_heads, hd, inter, dtype, g, bias=False):
    def r(*s):
        return (torch.randn(*s, generator=g) / max(1, s[-1]) ** 0.5).to(dtype)
    return [torch.ones(hidden, dtype=dtype), r(heads * hd, hidden), r(kv_heads * hd, hidden), r(kv_heads * hd, hidden),
            r(heads * hd) if bias else None, r(kv_heads * hd) if bias else None, r(kv_heads * hd) if bias else None,
            r(hidden, heads * hd), torch.ones(hidden, dtype=dtype), r(inter, hidden), r(inter, hidden), r(hidden, inter)]


def _layers_args(dtype, b=2, layers=2, hidden=32, heads=4, kv_heads=2, hd=8, inter=48, past=3, seed=6):
    g = torch.Generator().manual_seed(seed)
    params = [p for _ in range(layers) for p in _layer_params(hidden, heads, kv_heads, hd, inter, dtype, g, True)]
    kc = [torch.randn(b, kv_heads, past + 2, hd, generator=g).to(dtype) for _ in range(layers)]
    vc = [torch.randn(b, kv_heads, past + 2, hd, generator=g).to(dtype) for _ in range(layers)]
    x = torch.randn(b, 1, hidden, generator=g).to(dtype)
    cos, sin = (torch.randn(b, 1, 1, hd, generator=g).to(dtype) for _ in range(2))
    return [x, params, kc, vc, cos, sin, torch.ones(b, past + 1, dtype=torch.bool), past, heads, kv_heads, 1e-5, []]


def _needs_layers(dtype):
    if dtype == torch.bfloat16 and not ops.matmul.kernel_isa():
        pytest.skip("bf16 decode_layers needs decode_linear's AVX-512 BF16 or AVX2 path")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_layers_refuses_wrong_shapes_and_eps(dtype):
    # Fault 3: float32 decode_layers broadcast a wrong-shaped down_proj or norm weight and took
    # eps < 0. Every slot is checked against the layer's dimensions (hidden 32, 4 heads, 2 kv
    # heads, head dim 8, intermediate 48), in C++.
    _needs_layers(dtype)
    good = _layers_args(dtype)
    ns.decode_layers(*good)  # the good arguments run
    wrong = {0: [1], 1: [33, 32], 2: [8, 32], 3: [16, 31], 4: [33], 5: [15], 6: [1], 7: [32, 31], 8: [1],
             9: [48, 31], 10: [47, 32], 11: [1, 48]}
    for slot, shape in wrong.items():
        for layer in (0, 1):
            args = _layers_args(dtype)
            args[1][layer * 12 + slot] = torch.ones(shape, dtype=dtype)
            with pytest.raises(RuntimeError, match=rf"params\[{layer * 12 + slot}\] \(layer {layer} "):
                ns.decode_layers(*args)
    for slot, bad in [(11, lambda t: t.t().contiguous().t()), (0, lambda t: t.to(torch.float16)),
                      (9, lambda t: t[:1].expand(t.shape))]:  # transposed, another dtype, expanded
        args = _layers_args(dtype)
        args[1][slot] = bad(args[1][slot])
        with pytest.raises(RuntimeError, match=rf"params\[{slot}\] \(layer 0 "):
            ns.decode_layers(*args)
    for eps in (-1.0, math.nan, math.inf):
        args = _layers_args(dtype)
        args[10] = eps
        with pytest.raises(RuntimeError, match="eps must be finite and >= 0"):
            ns.decode_layers(*args)
        with pytest.raises(ValueError, match="decode_layers: eps must be a finite number >= 0"):
            ops.decode_layers(args[0], [tuple(args[1][:12]), tuple(args[1][12:])], *args[2:])
    args = _layers_args(dtype)
    args[2] = [c.transpose(2, 3).contiguous().transpose(2, 3) for c in args[2]]
    with pytest.raises(RuntimeError, match="cache of layer 0 must be contiguous"):
        ns.decode_layers(*args)
    args = _layers_args(dtype)
    args[3][1] = torch.zeros(2, 2, 5, 16, dtype=dtype)
    with pytest.raises(RuntimeError, match="cache of layer 1 must have head dim 8"):
        ns.decode_layers(*args)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_layers_nan_row_changes_no_other_row(dtype):
    _needs_layers(dtype)
    args = _layers_args(dtype, b=3)
    clean_caches = [c.clone() for c in args[2] + args[3]]
    clean = ns.decode_layers(*args)
    for c, saved in zip(args[2] + args[3], clean_caches):
        c.copy_(saved)
    args[0][1, 0, 7] = math.nan
    out = ns.decode_layers(*args)
    assert out[1].isnan().all() and torch.equal(out[[0, 2]], clean[[0, 2]])
    b = ns.decode_layers(*_layers_args(dtype, b=0))  # an empty batch
    assert b.shape == (0, 1, 32)


# ---- empty_pooled ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,match", [([2.5, 3], r"shape\[0\] must be an integer >= 0, got 2.5"),
                                         ([2, 3.0], r"shape\[1\] must be an integer >= 0, got 3.0"),
                                         ([True, 3], r"shape\[0\] must be an integer >= 0, got True"),
                                         ([2, -1], r"shape\[1\] must be an integer >= 0, got -1"),
                                         (["4"], r"shape\[0\] must be an integer"),
                                         (5, "shape must be a sequence of ints")])
def test_empty_pooled_refuses_non_integer_sizes(shape, match):
    # Fault 5: empty_pooled([2.5, 3]) truncated the float to a [2, 3] tensor.
    with pytest.raises(ValueError, match=match):
        ops.empty_pooled(shape)
    with ops.use_reference(), pytest.raises(ValueError, match=match):
        ops.empty_pooled(shape)


def test_empty_pooled_takes_integer_likes():
    t = ops.empty_pooled([np.int64(2), torch.tensor(3), torch.Size([4])[0]], torch.float32)
    assert t.shape == (2, 3, 4)
    assert ops.empty_pooled((0, 7)).shape == (0, 7) and operator.index(np.int32(3)) == 3


# ---- preprocess_into / resize_u8 -------------------------------------------------------------------

MEAN, STD, RESCALE = [0.5] * 3, [0.5] * 3, 1 / 255


def _img(h, w, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("first,second", [
    ([0, 1, 40, 40, 32, 48, 2, 3], [0, 2, 20, 20, 16, 16, 0, 0]),  # inside the first image's tiles 1..7
    ([0, 1, 40, 40, 32, 48, 2, 3], [0, 7, 20, 20, 16, 16, 0, 0]),  # its last tile (the global one)
    ([0, 8, 40, 40, 16, 16, 0, 0], [0, 4, 20, 20, 32, 32, 2, 2]),  # the other's last tile is its one
    ([0, 3, 40, 40, 16, 16, 0, 0], [0, 3, 20, 20, 16, 16, 0, 0]),  # the same single tile
])
def test_preprocess_refuses_overlapping_tiles(first, second):
    # Fault 6: two images of one sample told to write the same tile.
    imgs = [_img(40, 40), _img(20, 20, 1)]
    pv, pm = torch.zeros(2, 12, 3, 16, 16), torch.zeros(2, 12, 16, 16, dtype=torch.int64)
    geometry = first + second
    with pytest.raises(ValueError, match="images 0 and 1 both write tile"):
        P.check_geometry(imgs, pv, pm, geometry)
    with pytest.raises(ValueError, match="both write tile"):
        ops.preprocess_into(imgs, pv, pm, geometry, MEAN, STD, RESCALE)
    if ops.has_extension():
        with pytest.raises(RuntimeError, match="preprocess_into: images 0 and 1 both write tile"):
            ns.preprocess_into(imgs, pv, pm, geometry, MEAN, STD, RESCALE)
    # the same tiles in another sample, or adjacent ranges, are fine
    ok = first + [1] + second[1:]
    P.check_geometry(imgs, pv, pm, ok)


@needs_ext
def test_preprocess_refuses_out_of_range_geometry_without_overflow():
    imgs = [_img(16, 16)]
    pv, pm = torch.zeros(1, 2, 3, 16, 16), torch.zeros(1, 2, 16, 16)
    for first in (2 ** 63 - 1, 2 ** 62, -1):
        with pytest.raises(RuntimeError, match="outside pixel_values"):
            ns.preprocess_into(imgs, pv, pm, [0, first, 16, 16, 16, 16, 0, 0], MEAN, STD, RESCALE)
    with pytest.raises(RuntimeError, match="rows/cols must be >= 0"):
        ns.preprocess_into(imgs, pv, pm, [0, 0, 16, 16, 16, 16, -1, -1], MEAN, STD, RESCALE)
    with pytest.raises(ValueError, match="rows and cols must be >= 0"):
        P.check_geometry(imgs, pv, pm, [0, 0, 16, 16, 16, 16, -1, -1])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_preprocess_layouts_match_reference(dtype):
    # Fault 7 for images: the op reads contiguous images and writes contiguous pixel_values and
    # refuses others; ops.preprocess_into / ops.resize_u8 hand them a contiguous copy or the
    # reference. The mask may have any layout (bool included), and no image is no work.
    img = _img(40, 70, 2)
    strided = torch.zeros(40, 90, 3, dtype=torch.uint8)[:, 10:80]
    strided.copy_(img)
    geometry = [0, 0, 40, 70, 32, 64, 2, 4, 0, 9, 40, 70, 16, 16, 0, 0]
    outs = []
    for fill in ("reference", "compiled"):
        pv = torch.full((1, 12, 3, 16, 16), 7.0, dtype=dtype)
        pm = torch.zeros(1, 16, 16, 12, dtype=torch.bool).permute(0, 3, 1, 2)  # non-contiguous mask
        if fill == "reference":
            P.preprocess_into_ref([img, img], pv, pm, geometry, MEAN, STD, RESCALE)
        else:
            ns.preprocess_into([img, img], pv, pm, geometry, MEAN, STD, RESCALE)
        outs.append((pv, pm))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    with pytest.raises(RuntimeError, match=r"images\[0\] must be contiguous"):
        ns.preprocess_into([strided], outs[0][0], outs[0][1], geometry[:8], MEAN, STD, RESCALE)
    pv_t = torch.zeros(1, 12, 3, 16, 16, dtype=dtype).transpose(3, 4)
    with pytest.raises(RuntimeError, match="pixel_values must be contiguous"):
        ns.preprocess_into([img], pv_t, outs[0][1], geometry[:8], MEAN, STD, RESCALE)
    pm = torch.zeros(1, 12, 16, 16)
    ops.preprocess_into([strided], pv_t, pm, geometry[:8], MEAN, STD, RESCALE)  # wrapper: any layouts
    assert torch.equal(pv_t[:, :9], outs[0][0][:, :9]) and pm[0, :9].eq(1).all() and pm[0, 9:].eq(0).all()
    assert torch.equal(ops.resize_u8(strided, 33, 21), P.resize_u8_ref(img, 33, 21))
    with pytest.raises(RuntimeError, match="image must be contiguous"):
        ns.resize_u8(strided, 33, 21)
    ns.preprocess_into([], torch.zeros(0, 0, 3, 0, 0), torch.zeros(0, 0, 0, 0), [], MEAN, STD, RESCALE)
    ns.preprocess_into([], torch.zeros(2, 3, 3, 16, 16), torch.zeros(2, 3, 16, 16), [], MEAN, STD, RESCALE)
