"""The CUDA kernels' first-use self-check: the trust cache, the warning, the switch, and the
check functions themselves (run here against the CPU kernels of the same ops, which are
validated: a correct kernel passes, a wrong one fails)."""

from __future__ import annotations

import importlib
import logging
import unittest.mock as mock

import pytest
import torch

from idefics3_kit.ops import _library

attention_ops = importlib.import_module("idefics3_kit.ops.attention")
preprocess_ops = importlib.import_module("idefics3_kit.ops.preprocess")

needs_extension = pytest.mark.skipif(not _library.has_extension(), reason="the compiled extension is not built")


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(_library, "_TRUSTED", {})
    monkeypatch.delenv(_library.SELFCHECK_ENV, raising=False)


def test_a_failing_check_warns_once_and_is_remembered(caplog):
    calls = []

    def check():
        calls.append(1)
        return False, "max error 3.5, allowed 0.01"

    with caplog.at_level(logging.WARNING, logger="idefics3_kit"):
        assert not _library.kernel_trusted("prefill_attention", ("cuda:0", torch.bfloat16, 128), check)
        assert not _library.kernel_trusted("prefill_attention", ("cuda:0", torch.bfloat16, 128), check)
    assert len(calls) == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "prefill_attention failed its self-check" in warnings[0]
    assert "max error 3.5" in warnings[0] and "IDEFICS3_KIT_CUDA_SELFCHECK=0" in warnings[0]
    assert _library.selfcheck_results() == {("prefill_attention", "cuda:0", torch.bfloat16, 128): False}


def test_an_exception_in_the_check_means_not_trusted(caplog):
    def check():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with caplog.at_level(logging.WARNING, logger="idefics3_kit"):
        assert not _library.kernel_trusted("decode_attention", ("cuda:0",), check)
    assert "illegal memory access" in caplog.records[0].getMessage()


def test_a_passing_check_is_cached_per_key():
    seen = []

    def check():
        seen.append(1)
        return True, "ok"

    assert _library.kernel_trusted("resize_u8", ("cuda:0",), check)
    assert _library.kernel_trusted("resize_u8", ("cuda:0",), check)
    assert _library.kernel_trusted("resize_u8", ("cuda:1",), check)
    assert len(seen) == 2  # one check per device


def test_the_switch_skips_the_check(monkeypatch):
    monkeypatch.setenv(_library.SELFCHECK_ENV, "0")
    assert _library.kernel_trusted("vision_attention", ("cuda:0",), lambda: pytest.fail("checked"))


@needs_extension
@pytest.mark.parametrize("name", ["vision_attention", "prefill_attention", "decode_attention"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_check_accepts_a_correct_kernel(name, dtype):
    ok, detail = attention_ops.selfcheck(name, "cpu", dtype, 64)
    assert ok, detail


@needs_extension
@pytest.mark.parametrize("name", ["prefill_attention", "decode_attention"])
def test_attention_check_rejects_a_wrong_kernel(monkeypatch, name):
    real = _library.op

    def off_by_a_bit(op_name):
        kernel = real(op_name)
        return lambda *args: kernel(*args) * 1.05  # 5 % too large: far outside bf16 rounding
    monkeypatch.setattr(_library, "op", off_by_a_bit)
    ok, detail = attention_ops.selfcheck(name, "cpu", torch.bfloat16, 64)
    assert not ok and "max error" in detail


@needs_extension
def test_attention_check_rejects_nan():
    real = _library.op

    with mock.patch.object(_library, "op", lambda n: (lambda *a: real(n)(*a) * float("nan"))):
        assert not attention_ops.selfcheck("decode_attention", "cpu", torch.float32, 64)[0]


@needs_extension
@pytest.mark.parametrize("name", ["resize_u8", "preprocess_into"])
def test_preprocess_check_accepts_the_kernel_and_rejects_one_wrong_pixel(monkeypatch, name):
    assert preprocess_ops.selfcheck(name, "cpu")[0]
    real = _library.op

    def one_pixel_off(op_name):
        kernel = real(op_name)

        def run(*args):
            out = kernel(*args)
            target = out if out is not None else args[1]  # resize returns; preprocess_into fills args[1]
            target.view(-1)[7] += 1
            return out
        return run
    monkeypatch.setattr(_library, "op", one_pixel_off)
    ok, detail = preprocess_ops.selfcheck(name, "cpu")
    assert not ok and "1 of" in detail
