"""hypothesis properties of the parts that make components composable."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import idefics3_kit as ik
from idefics3_kit.components.connector import pixel_shuffle, pixel_unshuffle
from idefics3_kit.components.vision import patch_position_ids


@given(grid_per_scale=st.integers(1, 8), scale=st.integers(1, 5), patch=st.sampled_from([8, 14, 16]))
def test_tokens_per_tile(grid_per_scale, scale, patch):
    grid = grid_per_scale * scale
    cfg = ik.VLMConfig.preset("tiny").replace(
        vision=ik.VisionConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=grid * patch, patch_size=patch),
        connector=ik.ConnectorConfig(scale_factor=scale))
    assert cfg.image_seq_len == (grid * patch // patch) ** 2 // scale ** 2 == grid_per_scale ** 2


@given(n=st.integers(1, 3), m=st.integers(1, 5), scale=st.integers(1, 4), d=st.integers(1, 6))
def test_pixel_shuffle_is_a_permutation_with_inverse(n, m, scale, d):
    p = (m * scale) ** 2
    x = torch.arange(n * p * d, dtype=torch.float64).reshape(n, p, d)
    y = pixel_shuffle(x, scale)
    assert y.shape == (n, m * m, scale * scale * d)
    assert torch.equal(y.flatten().sort().values, x.flatten())  # every value exactly once
    assert torch.equal(pixel_unshuffle(y, scale), x)


@given(m=st.integers(1, 4), scale=st.integers(1, 3), d=st.integers(1, 4))
def test_pixel_shuffle_matches_transformers(m, scale, d):
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    side = m * scale
    x = torch.randn(2, side * side, d)
    expected = Idefics3Connector.pixel_shuffle(None, x, scale)
    assert torch.equal(pixel_shuffle(x, scale), expected)


def _hf_position_ids(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """transformers' own procedure, read out through an identity position embedding."""
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    emb = Idefics3VisionEmbeddings(Idefics3VisionConfig(hidden_size=1, image_size=grid, patch_size=1))
    with torch.no_grad():
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        emb.position_embedding.weight.copy_(torch.arange(grid * grid, dtype=torch.float32)[:, None])
        pixels = torch.zeros(mask.shape[0], 3, mask.shape[1], mask.shape[2])
        return emb(pixels, mask)[..., 0].round().long()


@given(grid=st.integers(1, 40), data=st.data())
def test_position_ids_follow_reference_for_partial_masks(grid, data):
    h = data.draw(st.integers(1, grid), label="rows in the tile")
    w = data.draw(st.integers(1, grid), label="cols in the tile")
    n = data.draw(st.integers(1, 3), label="tiles")
    mask = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):  # valid patches form a top-left rectangle, as bottom/right padding makes
        mask[i, : data.draw(st.integers(1, h)), : data.draw(st.integers(1, w))] = True
    ours = patch_position_ids(mask, grid)
    assert torch.equal(ours, _hf_position_ids(mask, grid))


@pytest.mark.parametrize("grid", [4, 16, 26, 27, 32])
def test_full_tile_positions_are_the_identity_for_real_grids(grid):
    # float32 rounding breaks this for some other sizes (e.g. 25), in transformers too
    full = patch_position_ids(torch.ones(1, grid, grid, dtype=torch.bool), grid)
    assert torch.equal(full[0], torch.arange(grid * grid))


@st.composite
def vlm_configs(draw):
    heads = draw(st.integers(1, 4))
    patch = draw(st.sampled_from([2, 4, 14, 16]))
    scale = draw(st.integers(1, 3))
    grid = scale * draw(st.integers(1, 3))
    kv = draw(st.sampled_from([h for h in range(1, heads + 1) if heads % h == 0]))
    rope = draw(st.sampled_from([None, {"rope_type": "linear", "factor": 2.0},
                                 {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}]))
    vocab = draw(st.integers(20, 500))
    return ik.VLMConfig(
        vision=ik.VisionConfig(hidden_size=8 * heads, intermediate_size=draw(st.integers(1, 64)),
                               num_hidden_layers=draw(st.integers(1, 3)), num_attention_heads=heads,
                               image_size=grid * patch, patch_size=patch,
                               layer_norm_eps=draw(st.sampled_from([1e-6, 1e-5]))),
        connector=ik.ConnectorConfig(scale_factor=scale),
        decoder=ik.DecoderConfig(vocab_size=vocab, hidden_size=16 * heads, intermediate_size=draw(st.integers(1, 64)),
                                 num_hidden_layers=draw(st.integers(1, 3)), num_attention_heads=heads,
                                 num_key_value_heads=kv, rope_theta=draw(st.sampled_from([1e4, 5e5])),
                                 rope_scaling=rope, tie_word_embeddings=draw(st.booleans()),
                                 pad_token_id=draw(st.none() | st.integers(0, 10)),
                                 bos_token_id=draw(st.integers(0, 10)), eos_token_id=draw(st.integers(0, 10))),
        image_token_id=draw(st.integers(0, vocab - 1)),
    )


@given(vlm_configs())
def test_config_hf_json_round_trip(cfg):
    text = json.dumps(cfg.to_hf_dict())
    assert ik.VLMConfig.from_hf_dict(json.loads(text)) == cfg
    assert ik.VLMConfig.from_dict(cfg.to_dict()) == cfg


@given(vlm_configs())
def test_config_round_trip_through_transformers(cfg):
    from transformers import Idefics3Config

    hf = Idefics3Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    assert ik.VLMConfig.from_hf_dict(hf.to_dict()) == cfg


@pytest.mark.parametrize("name", ["idefics3-8b", "smolvlm-instruct", "smolvlm-256m", "tiny"])
def test_presets_have_the_reference_token_counts(name):
    cfg = ik.VLMConfig.preset(name)
    expected = {"idefics3-8b": 169, "smolvlm-instruct": 81, "smolvlm-256m": 64}.get(name, cfg.image_seq_len)
    assert cfg.image_seq_len == expected
    assert ik.VLMConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@given(half=st.integers(1, 40), heads=st.integers(1, 4), length=st.integers(1, 5),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_rolled_rope_is_bit_identical_to_rotate_half(half, heads, length, dtype, seed):
    """decode_layers' rope (roll + signed sin) equals the transformers-style formula bit for bit."""
    from idefics3_kit.components.decoder import apply_rope, apply_rope_rolled, rope_cos_sin, signed_sin

    g = torch.Generator().manual_seed(seed)
    hd = 2 * half
    x = (torch.randn(2, heads, length, hd, generator=g) * 3).to(dtype)  # [B, H, L, hd]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    cos, sin = rope_cos_sin(inv_freq, torch.randint(0, 4096, (2, length), generator=g), dtype)  # [B, L, hd]
    expected = apply_rope(x, cos, sin)
    got = apply_rope_rolled(x, cos[:, None], signed_sin(sin)[:, None])
    assert torch.equal(got, expected)


@given(half=st.integers(4, 64), position=st.integers(0, 20000), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_step_rope_table_equals_computing_the_position(half, position, dtype):
    """A decode step's rotation read from the decoder's table (CausalDecoder._step_rope) is what
    rope_cos_sin + signed_sin give for that one position, bit for bit (the forward only asks the
    table below STEP_ROPE_POSITIONS)."""
    from idefics3_kit.components import decoder as dec_mod
    from idefics3_kit.config import DecoderConfig

    position %= dec_mod.STEP_ROPE_POSITIONS
    cfg = DecoderConfig(vocab_size=16, hidden_size=4 * half, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=2 * half)
    decoder = dec_mod.CausalDecoder(cfg)
    cos, sin_signed = decoder._step_rope(position, dtype, torch.device("cpu"))
    ref_cos, ref_sin = dec_mod.rope_cos_sin(decoder.inv_freq("cpu"), torch.tensor([[position]]), dtype)
    assert cos.shape == sin_signed.shape == (1, 1, 1, 2 * half)
    assert torch.equal(cos.flatten(), ref_cos.flatten())
    assert torch.equal(sin_signed.flatten(), dec_mod.signed_sin(ref_sin).flatten())
