"""The vision tower over chunks of tiles on the CPU (VLM.run_vision_tower, under encode_tiles): the features of one call up
to float rounding (a GEMM's blocking depends on its row count), and one call wherever a hook,
autograd or a compiler could tell the difference."""

from __future__ import annotations

import pytest
import torch

import idefics3_kit as ik
from idefics3_kit import model as model_module


def _model(dtype):
    torch.manual_seed(0)
    return ik.VLM(ik.VLMConfig.preset("tiny")).to(dtype).eval()


def _tiles(model, n, seed=0):
    size = model.config.vision.image_size
    pixels = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 1.9 - 0.95
    grid = size // model.vision.patch_size
    mask = torch.ones(n, grid, grid, dtype=torch.bool)
    mask[-1, grid // 2:] = False  # a partial tile: its patch mask goes with it into its chunk
    return pixels.to(model.dtype), mask


def _calls(module):
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_give_the_features_of_one_call(dtype, monkeypatch):
    model = _model(dtype)
    pixels, mask = _tiles(model, 7)
    with torch.inference_mode():
        whole = model.connector(model.vision(pixels, mask))
        monkeypatch.setattr(model_module, "CPU_VISION_TOKENS_PER_THREAD", 1)  # one tile per call
        assert model._tiles_per_call(pixels) == 1
        chunked = model.encode_tiles(pixels, mask)
    if dtype == torch.float32:  # rounding only
        assert ((chunked - whole).norm() / whole.norm()).item() <= 1e-6
        return
    # bf16: against the same weights and tiles in float32, no further from it than one call is (x2)
    exact = _model(torch.float32)
    exact.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.inference_mode():
        ref = exact.connector(exact.vision(pixels.float(), mask))

    def err(t):
        return ((t.float() - ref).norm() / ref.norm()).item()

    assert err(chunked) <= 2 * err(whole) + 1e-3, (err(chunked), err(whole))


def test_one_call_under_a_hook_autograd_or_a_large_budget(monkeypatch):
    model = _model(torch.float32)
    pixels, mask = _tiles(model, 5)
    monkeypatch.setattr(model_module, "CPU_VISION_TOKENS_PER_THREAD", 1)
    with torch.inference_mode():
        assert model._tiles_per_call(pixels) == 1
    calls = _calls(model.vision)
    with torch.inference_mode():
        model.encode_tiles(pixels, mask)
    assert calls == [5]  # a user's hook sees the call it expects
    model.vision._forward_hooks.clear()
    assert model._tiles_per_call(pixels) == 5  # autograd on: a training step is one call
    monkeypatch.setattr(model_module, "CPU_VISION_TOKENS_PER_THREAD", 10**6)
    with torch.inference_mode():
        assert model._tiles_per_call(pixels) >= 5  # a budget above the batch: one call
