"""clip vision encoder vs transformers' CLIPVisionModel on tiny random checkpoints (fp32, 1e-4)."""

import pytest
import torch

from idefics3_kit import ClipVisionConfig, registry
from idefics3_kit.hf.parts import load_component
from tests.backbone_ckpts import clip_checkpoint

pytestmark = pytest.mark.parity


def _pixels(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_clip_matches_last_hidden_state_without_class_token(tmp_path):
    ref = clip_checkpoint(tmp_path, seed=4)
    ours = load_component("vision", tmp_path)
    assert type(ours).component_name == "clip" and isinstance(ours.config, ClipVisionConfig)
    assert ours.config.hidden_act == "quick_gelu" and ours.config.layer_norm_eps == 1e-5
    px = _pixels()
    with torch.no_grad():
        out = ref(pixel_values=px, output_hidden_states=True)
        got = ours(px, torch.ones(2, 4, 4, dtype=torch.bool))
        got_nomask = ours(px)
        pooled = ours.pooled(px)
    assert got.shape == (2, 16, 48)  # [N, (S/p)², D]: class token dropped, square 4x4 grid
    torch.testing.assert_close(got, out.last_hidden_state[:, 1:], atol=1e-4, rtol=0)
    torch.testing.assert_close(got_nomask, got, atol=0, rtol=0)
    torch.testing.assert_close(pooled, out.pooler_output, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layer", [-2, 0, 1])
def test_clip_feature_layer_selects_hidden_state(tmp_path, layer):
    ref = clip_checkpoint(tmp_path, seed=5)
    base = load_component("vision", tmp_path)
    ours = registry.create("vision", "clip", base.config.replace(feature_layer=layer))
    ours.load_state_dict(base.state_dict())
    px = _pixels(seed=1)
    with torch.no_grad():
        want = ref(pixel_values=px, output_hidden_states=True).hidden_states[layer][:, 1:]
        got = ours(px)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_clip_vision_from_a_full_clip_model_dir(tmp_path):
    """A CLIPModel dir (vision_model.* next to the text tower and projections)."""
    ref = clip_checkpoint(tmp_path, seed=6, full=True)
    ours = load_component("vision", tmp_path)
    px = _pixels(seed=2)
    with torch.no_grad():
        want = ref.vision_model(pixel_values=px).last_hidden_state[:, 1:]
        got = ours(px)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_clip_masked_patches_do_not_leak(tmp_path):
    clip_checkpoint(tmp_path, seed=7)
    ours = load_component("vision", tmp_path)
    px = _pixels(n=1, seed=3)
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[:, 2:, :] = False  # bottom half is padding
    px2 = px.clone()
    px2[..., 16:, :] = 5.0  # change only the padded pixels
    with torch.no_grad():
        a, b = ours(px, mask), ours(px2, mask)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-5, rtol=0)  # valid rows unchanged
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("size", [(48, 48), (16, 40)])
def test_clip_other_tile_sizes_interpolate_positions_like_transformers(tmp_path, size):
    ref = clip_checkpoint(tmp_path, seed=9)
    ours = load_component("vision", tmp_path)
    px = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(pixel_values=px, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
        got = ours(px)
    assert got.shape == (2, (size[0] // 8) * (size[1] // 8), 48)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_clip_refuses_other_tile_sizes_without_interpolation():
    enc = registry.create("vision", "clip", ClipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, image_size=32, patch_size=8,
                                                             interpolate_pos_encoding=False))
    with pytest.raises(ValueError, match="tiles must be 32x32"):
        enc(torch.zeros(1, 3, 64, 64))
    assert enc(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 16)
    with pytest.raises(ValueError, match="feature_layer"):
        ClipVisionConfig(num_hidden_layers=2, feature_layer=3)


def test_clip_vision_model_dir_in_the_older_prefixed_layout(tmp_path):
    """transformers 4.x saved CLIPVisionModel(WithProjection) tensors under vision_model.*."""
    from safetensors.torch import load_file, save_file

    ref = clip_checkpoint(tmp_path, seed=8)
    file = tmp_path / "model.safetensors"
    tensors = {"vision_model." + k: v for k, v in load_file(str(file)).items()}
    tensors["visual_projection.weight"] = torch.zeros(16, 48)
    save_file(tensors, str(file), metadata={"format": "pt"})
    ours = load_component("vision", tmp_path)
    px = _pixels(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(ours(px), ref(pixel_values=px).last_hidden_state[:, 1:], atol=1e-4, rtol=0)
