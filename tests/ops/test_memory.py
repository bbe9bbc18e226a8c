"""ops.empty_pooled / release_pooled: pooled CPU buffers for the large preprocessing outputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from idefics3_kit import ops

needs_ext = pytest.mark.skipif(not ops.has_extension(),
                               reason=f"compiled extension not built ({ops.extension_error()})")

BIG = (3, 512, 512)  # 3 MiB of float32: above the pool's 1 MiB floor


def test_empty_pooled_is_a_plain_cpu_tensor():
    t = ops.empty_pooled(BIG, torch.float32)
    assert t.shape == BIG and t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
    t.fill_(2.5)
    assert float(t.sum()) == 2.5 * t.numel()
    m = ops.empty_pooled((2, 700, 700), torch.int64)
    assert m.dtype == torch.int64 and m.shape == (2, 700, 700)


@needs_ext
def test_freed_buffer_is_reused_for_the_same_size():
    ops.release_pooled()
    a = ops.empty_pooled(BIG, torch.float32)
    ptr = a.data_ptr()
    del a
    b = ops.empty_pooled(BIG, torch.float32)
    assert b.data_ptr() == ptr  # the idle buffer came back
    c = ops.empty_pooled(BIG, torch.float32)  # b still alive: a different buffer
    assert c.data_ptr() != ptr
    del b, c
    assert ops.release_pooled() == 2 * 3 * 512 * 512 * 4
    assert ops.release_pooled() == 0


@needs_ext
def test_views_keep_the_buffer_alive():
    a = ops.empty_pooled(BIG, torch.float32).fill_(1.0)
    view = a[1]
    ptr = a.data_ptr()
    del a
    b = ops.empty_pooled(BIG, torch.float32)  # the view holds the storage: not handed out again
    assert b.data_ptr() != ptr
    assert float(view.sum()) == 512 * 512


@needs_ext
def test_small_sizes_and_bad_sizes():
    ops.release_pooled()
    small = ops.empty_pooled((4, 4), torch.float32)
    del small
    assert ops.release_pooled() == 0  # below the floor: plain allocation, nothing pooled
    with pytest.raises(RuntimeError, match="sizes must be non-negative"):
        torch.ops.idefics3_kit.empty_pooled([2, -1], torch.float32)
    assert ops.empty_pooled((0, 5), torch.float32).numel() == 0


@needs_ext
def test_pool_cap_zero_disables_pooling():
    code = ("import torch, idefics3_kit.ops as o; a = o.empty_pooled((3, 512, 512)); p = a.data_ptr(); del a; "
            "print(o.release_pooled())")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "IDEFICS3_KIT_POOL_MB": "0"})
    assert out.stdout.strip() == "0"


def test_reference_backend_uses_torch_empty():
    with ops.use_reference():
        t = ops.empty_pooled(BIG, torch.bfloat16)
    assert t.dtype == torch.bfloat16 and t.shape == BIG


@needs_ext
def test_pool_drops_least_recently_returned_buffers_over_the_cap():
    # cap 5 MiB, buffers of 3 MiB: returning the second evicts the first; a third size never fits
    code = ("import torch, idefics3_kit.ops as o; a = o.empty_pooled((3, 512, 512)); b = o.empty_pooled((3, 512, 512)); "
            "pb = b.data_ptr(); del a; del b; c = o.empty_pooled((3, 512, 512)); print(c.data_ptr() == pb); del c; "
            "big = o.empty_pooled((6, 512, 512)); del big; print(o.release_pooled())")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "IDEFICS3_KIT_POOL_MB": "5"})
    assert out.stdout.split() == ["True", str(3 * 512 * 512 * 4)]
