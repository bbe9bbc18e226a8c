"""The vision-feature cache: a cached answer is the uncached answer, the cache stays bounded, and
it never serves features of other weights or to a pass that needs gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import idefics3_kit as ik
from idefics3_kit.feature_cache import VisionFeatureCache, tile_key


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return ik.VLM(ik.VLMConfig.preset("tiny")).eval()


def image_inputs(model, tiles_per_image: list[int], seed: int = 0, partial: bool = False):
    """A batch of one prompt holding len(tiles_per_image) images of the given tile counts."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    total = sum(tiles_per_image)
    size = cfg.vision.image_size
    ids = torch.tensor([[5, 6] + [cfg.image_token_id] * cfg.image_seq_len * total + [7]])
    pv = torch.rand(1, total, 3, size, size, generator=g) * 2 - 1
    mask = torch.ones(1, total, size, size, dtype=torch.long)
    if partial:
        mask[0, -1, :, size // 2:] = 0
        pv[0, -1, :, :, size // 2:] = 0
    return dict(input_ids=ids, pixel_values=pv, pixel_attention_mask=mask)


def test_a_second_question_about_the_same_image_skips_the_tower_and_answers_the_same(model, monkeypatch):
    batch = image_inputs(model, [3], partial=True)
    plain = model.generate(**batch, max_new_tokens=8, eos_token_id=[])
    cache = model.enable_feature_cache()
    first = model.generate(**batch, max_new_tokens=8, eos_token_id=[])
    assert (cache.hits, cache.misses) == (0, 3)
    calls = []
    original = model.vision.forward
    monkeypatch.setattr(model.vision, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    second = model.generate(**batch, max_new_tokens=8, eos_token_id=[])
    assert calls == [] and (cache.hits, cache.misses) == (3, 3)
    assert torch.equal(plain, first) and torch.equal(plain, second)


def test_only_the_new_image_goes_through_the_tower(model):
    seen = image_inputs(model, [2], seed=1)
    both = image_inputs(model, [2, 2], seed=1)
    both["pixel_values"][0, 2:] = torch.rand(2, *both["pixel_values"].shape[2:]) * 2 - 1  # a new second image
    with torch.no_grad():
        want = model.get_image_features(both["pixel_values"], both["pixel_attention_mask"])
        cache = model.enable_feature_cache()
        model.get_image_features(seen["pixel_values"][:, :2], seen["pixel_attention_mask"][:, :2])
        got = model.get_image_features(both["pixel_values"], both["pixel_attention_mask"])
    assert (cache.hits, cache.misses) == (2, 4)
    # the tiles went through the tower in batches of another size: the GEMMs' blocking may round
    # differently (as in any batched run), so equal up to float32 rounding, not bit for bit
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_changed_weights_are_never_served_stale(model):
    batch = image_inputs(model, [2])
    model.enable_feature_cache()
    with torch.no_grad():
        before = model.get_image_features(batch["pixel_values"])
        model.vision.post_layernorm.weight.mul_(2.0)  # an optimizer step would do the same
        after = model.get_image_features(batch["pixel_values"])
        model.disable_feature_cache()
        fresh = model.get_image_features(batch["pixel_values"])
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)


def test_a_pass_that_records_gradients_computes_afresh(model):
    batch = image_inputs(model, [1])
    cache = model.enable_feature_cache()
    with torch.no_grad():
        model.get_image_features(batch["pixel_values"])
    features = model.get_image_features(batch["pixel_values"])
    assert features.requires_grad and cache.hits == 0
    features.sum().backward()
    assert model.vision.post_layernorm.weight.grad is not None


def test_the_cache_stays_within_its_bound(model):
    per_tile = model.config.image_seq_len * model.config.decoder.hidden_size * 4  # fp32 features of one tile
    cache = model.enable_feature_cache(max_bytes=3 * per_tile)
    with torch.no_grad():
        for seed in range(4):
            model.get_image_features(image_inputs(model, [2], seed=seed)["pixel_values"])
    assert len(cache) == 3 and cache.nbytes <= 3 * per_tile


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1GB"])
def test_a_bad_bound_is_refused(bad):
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        VisionFeatureCache(bad)


def test_the_key_sees_pixels_mask_and_dtype():
    tile = torch.rand(3, 8, 8)
    mask = torch.ones(2, 2, dtype=torch.bool)
    keys = {tile_key(tile, None), tile_key(tile, mask), tile_key(tile.to(torch.bfloat16), None),
            tile_key(tile + 1e-6, None)}
    assert len(keys) == 4
    assert tile_key(tile, None) == tile_key(tile.clone(), None)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=8), st.lists(st.integers(0, 5), min_size=1, max_size=8))
def test_any_sequence_of_batches_gets_the_encoder_s_answer(first, second):
    """For any two batches of tiles drawn from a pool (repeats, overlaps, any order), the cache
    returns exactly what the encoder returns for that batch."""
    pool = torch.arange(6 * 3 * 2 * 2, dtype=torch.float32).reshape(6, 3, 2, 2)

    def encode(pixels, mask):  # [M, 3, 2, 2] -> [M, 2, 5], a different row per tile
        return pixels.reshape(pixels.shape[0], 2, 6)[:, :, :5] * 3 + 1

    cache = VisionFeatureCache()
    for picks in (first, second):
        pixels = pool[picks]
        torch.testing.assert_close(cache.features(pixels, None, ("w",), encode), encode(pixels, None), rtol=0, atol=0)
