"""ops.argmax_last is torch.argmax(dim=-1), index for index: ties, NaN, infinities, views, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from idefics3_kit import ops
from idefics3_kit.components.sampler import Greedy
from idefics3_kit.ops import reduce

needs_ext = pytest.mark.skipif(not ops.has_extension(), reason="the compiled extension is not built")

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@FUZZ
@given(rows=st.integers(1, 4), length=st.integers(reduce.MIN_LENGTH, 3 * reduce.MIN_LENGTH + 7),
       dtype=st.sampled_from(DTYPES), levels=st.integers(1, 6), seed=st.integers(0, 2 ** 31 - 1),
       specials=st.lists(st.tuples(st.integers(0, 3), st.floats(0, 1), st.sampled_from((math.nan, math.inf, -math.inf))),
                         max_size=4))
def test_same_index_as_torch(rows, length, dtype, levels, seed, specials):
    """Few distinct values force ties across and inside blocks; NaN and infinities land anywhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (rows, length), generator=g).to(dtype)
    for row, where, value in specials:
        x[row % rows, int(where * (length - 1))] = value
    expected = x.argmax(dim=-1)
    assert torch.equal(ops.argmax_last(x), expected)
    assert torch.equal(reduce.argmax_blocked(x), expected)  # the path without the extension


@pytest.mark.parametrize("dtype", DTYPES)
def test_edges(dtype):
    n = 49280  # SmolVLM's vocabulary: a whole number of blocks
    x = torch.full((6, n), -math.inf, dtype=dtype)  # row 0: only -inf -> 0, as torch
    x[1, n - 1] = 1.0  # the last entry
    x[2, 5] = x[2, 4000] = 3.0  # a tie across blocks: the first
    x[3, 7] = math.nan
    x[3, 9000] = math.nan  # two NaN: the first
    x[4, 100] = math.inf
    x[4, 90] = math.nan  # NaN beats +inf
    x[5] = torch.linspace(-1, 1, n).to(dtype)
    assert torch.equal(ops.argmax_last(x), x.argmax(dim=-1))
    assert torch.equal(reduce.argmax_blocked(x), x.argmax(dim=-1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_signed_zeros_tie(dtype):
    """torch compares -0 and +0 equal: the first of them is the maximum of a row below zero."""
    x = torch.full((3, 1000), -1.0, dtype=dtype)
    x[0, 300], x[0, 700] = -0.0, 0.0
    x[1, 300], x[1, 700] = 0.0, -0.0
    x[2, 900] = -0.0
    expected = x.argmax(dim=-1)
    assert expected.tolist() == [300, 300, 900]
    assert torch.equal(ops.argmax_last(x), expected)
    assert torch.equal(reduce.argmax_blocked(x), expected)


@needs_ext
@pytest.mark.parametrize("dtype", reduce.COMPILED_DTYPES)
def test_compiled_op_runs_for_its_dtypes(dtype, monkeypatch):
    def no_blocked(x):
        raise AssertionError("the blocked ATen path ran where the compiled op applies")
    monkeypatch.setattr(reduce, "argmax_blocked", no_blocked)
    x = torch.randn(2, 3, 5000).to(dtype)
    assert torch.equal(ops.argmax_last(x), x.argmax(dim=-1))


@needs_ext
@pytest.mark.parametrize("dtype", reduce.COMPILED_DTYPES)
def test_opcheck_argmax_last(dtype):
    x = torch.randn(3, 700).to(dtype)
    x[1, 5] = math.nan
    torch.library.opcheck(torch.ops.idefics3_kit.argmax_last.default, (x,))
    torch.library.opcheck(torch.ops.idefics3_kit.argmax_last.default, (torch.randn(2, 2, 9).to(dtype),))


@needs_ext
def test_argmax_last_op_refuses_bad_input_clearly():
    op = torch.ops.idefics3_kit.argmax_last
    with pytest.raises(RuntimeError, match="float32 or bfloat16, got Half"):
        op(torch.randn(2, 600).half())
    with pytest.raises(RuntimeError, match="at least one dimension"):
        op(torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="last dimension must not be empty"):
        op(torch.randn(3, 0))
    view = torch.randn(900, 3).t()  # not contiguous: copied, same answer
    assert torch.equal(op(view), view.argmax(dim=-1))


def test_shapes_and_views():
    x = torch.randn(2, 3, 1000)
    assert ops.argmax_last(x).shape == (2, 3)
    assert torch.equal(ops.argmax_last(x), x.argmax(dim=-1))
    view = torch.randn(1500, 4).t()  # [4, 1500], not contiguous
    assert torch.equal(ops.argmax_last(view), view.argmax(dim=-1))
    sliced = torch.randn(3, 2000)[:, 7:1900]
    assert torch.equal(ops.argmax_last(sliced), sliced.argmax(dim=-1))
    for shape in ((0, 1000), (1000,), (2, 0, 700)):  # no rows, one row without a batch dim
        x = torch.randn(*shape)
        got = ops.argmax_last(x)
        assert got.shape == x.argmax(dim=-1).shape and torch.equal(got, x.argmax(dim=-1))


def test_short_rows_integers_and_compile_take_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(reduce.F, "pad", lambda *a, **k: calls.append(1))  # the blocked path pads 1000
    for x in (torch.randn(3, 100), torch.randint(0, 9, (2, 1000))):
        assert torch.equal(ops.argmax_last(x), x.argmax(dim=-1))
    assert not calls
    compiled = torch.compile(ops.argmax_last, backend="eager", fullgraph=True)
    x = torch.randn(2, 2048)
    assert torch.equal(compiled(x), x.argmax(dim=-1))


def test_greedy_sampler_uses_it():
    logits = torch.randn(3, 5000, dtype=torch.bfloat16)
    logits[1, 17] = logits[1, 4000] = 100
    assert torch.equal(Greedy()(logits), logits.argmax(dim=-1))
