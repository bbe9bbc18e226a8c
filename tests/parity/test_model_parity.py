"""Logits and loss of ik.VLM against transformers' Idefics3ForConditionalGeneration."""

import pytest
import torch

import idefics3_kit as ik
from tests.hf_checkpoints import GEOMETRIES, tokens_per_tile

pytestmark = pytest.mark.parity
transformers = pytest.importorskip("transformers")

TOL = 1e-4


def load_pair(path):
    from transformers import Idefics3ForConditionalGeneration

    hf = Idefics3ForConditionalGeneration.from_pretrained(path).eval()
    ours = ik.VLM.from_pretrained(path)
    return hf, ours


def tile_pixels(n_tiles: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Normalized-looking pixels in [-1, 1] (never exactly 0): [n_tiles, 3, size, size]."""
    return torch.rand(n_tiles, 3, size, size, generator=gen) * 1.9 - 0.95


def batch_with_padding(geometry: str, seed: int = 0):
    """Sample 0: 2 tiles, sample 1: 1 tile + a padding tile, left-padded text, labels."""
    g = GEOMETRIES[geometry]
    size, img_id, s = g["vision"]["image_size"], g["image_token_id"], tokens_per_tile(geometry)
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.zeros(2, 2, 3, size, size)
    pixel_values[0] = tile_pixels(2, size, gen)
    pixel_values[1, 0] = tile_pixels(1, size, gen)[0]
    pixel_mask = torch.zeros(2, 2, size, size, dtype=torch.long)
    pixel_mask[0] = 1
    pixel_mask[1, 0] = 1
    text = lambda n: torch.randint(3, 250, (n,), generator=gen)  # noqa: E731
    row0 = torch.cat([text(3), torch.full((2 * s,), img_id), text(5)])
    row1 = torch.cat([text(2), torch.full((s,), img_id), text(4)])
    pad = len(row0) - len(row1)
    row1 = torch.cat([torch.full((pad,), 2), row1])
    input_ids = torch.stack([row0, row1])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :pad] = 0
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[input_ids == img_id] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                pixel_attention_mask=pixel_mask, labels=labels)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_text_only_logits(hf_checkpoint, geometry):
    hf, ours = load_pair(hf_checkpoint(geometry))
    ids = torch.randint(3, 250, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_one_image_logits(hf_checkpoint, geometry):
    hf, ours = load_pair(hf_checkpoint(geometry))
    batch = batch_with_padding(geometry)
    one = {k: v[:1] for k, v in batch.items() if k != "labels"}
    one["pixel_values"] = one["pixel_values"][:, :1]
    one["pixel_attention_mask"] = one["pixel_attention_mask"][:, :1]
    s = tokens_per_tile(geometry)
    img_id = GEOMETRIES[geometry]["image_token_id"]
    one["input_ids"] = torch.cat([torch.tensor([[5, 6]]), torch.full((1, s), img_id), torch.tensor([[7, 8, 9]])], 1)
    one["attention_mask"] = torch.ones_like(one["input_ids"])
    with torch.no_grad():
        expected = hf(**one).logits
        got = ours(**one).logits
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_left_padded_batch_with_padding_tile_logits_and_loss(hf_checkpoint, geometry):
    hf, ours = load_pair(hf_checkpoint(geometry))
    batch = batch_with_padding(geometry)
    with torch.no_grad():
        expected = hf(**batch)
        got = ours(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got.logits[real], expected.logits[real], atol=TOL, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)


def test_loss_keeps_image_token_labels_like_transformers(hf_checkpoint):
    geometry = "p14_s2_llama3rope"
    hf, ours = load_pair(hf_checkpoint(geometry))
    batch = batch_with_padding(geometry)
    batch["labels"] = batch["input_ids"].clone()  # image-token labels kept (only -100 is ignored)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).loss, hf(**batch).loss, atol=1e-5, rtol=0)


def test_partial_pixel_mask(hf_checkpoint):
    """A tile whose right half is padding: patch mask, position ids and key mask all matter."""
    geometry = "p14_s2_llama3rope"
    hf, ours = load_pair(hf_checkpoint(geometry))
    batch = batch_with_padding(geometry)
    size = GEOMETRIES[geometry]["vision"]["image_size"]
    batch["pixel_attention_mask"][0, 1, :, size // 2:] = 0
    batch["pixel_values"][0, 1, :, :, size // 2:] = 0
    with torch.no_grad():
        expected = hf(**batch).logits
        got = ours(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=TOL, rtol=0)


def test_image_features_and_hidden_states(hf_checkpoint):
    geometry = "p16_s4_gqa3"
    hf, ours = load_pair(hf_checkpoint(geometry))
    batch = batch_with_padding(geometry)
    with torch.no_grad():
        expected = hf.model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"]).pooler_output
        got = ours.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"])
        assert got.shape == (3, tokens_per_tile(geometry), GEOMETRIES[geometry]["text"]["hidden_size"])
        torch.testing.assert_close(got.reshape(-1, got.shape[-1]), torch.cat(list(expected)), atol=TOL, rtol=0)
        # precomputed image features skip the vision tower and give the same logits
        feats_out = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         image_hidden_states=got)
        pix_out = ours(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
        torch.testing.assert_close(feats_out.logits, pix_out.logits)
        hf_hidden = hf(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states
    assert len(pix_out.hidden_states) == len(hf_hidden)
    real = batch["attention_mask"].bool()
    for a, b in zip(pix_out.hidden_states, hf_hidden):
        torch.testing.assert_close(a[real], b[real], atol=TOL, rtol=0)


def test_logits_to_keep(hf_checkpoint):
    _, ours = load_pair(hf_checkpoint("p16_s4_gqa3"))
    ids = torch.randint(3, 250, (1, 9))
    with torch.no_grad():
        full = ours(input_ids=ids).logits
        last = ours(input_ids=ids, logits_to_keep=1).logits
    assert last.shape == (1, 1, full.shape[-1])
    torch.testing.assert_close(last[:, 0], full[:, -1])


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_save_pretrained_loads_in_transformers(hf_checkpoint, tmp_path, geometry):
    from transformers import Idefics3ForConditionalGeneration

    _, ours = load_pair(hf_checkpoint(geometry))
    ours.save_pretrained(tmp_path)
    hf = Idefics3ForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = batch_with_padding(geometry)
    with torch.no_grad():
        expected = hf(**batch)
        got = ours(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got.logits[real], expected.logits[real], atol=TOL, rtol=0)


def test_bf16_load_and_forward(hf_checkpoint):
    path = hf_checkpoint("p16_s4_gqa3")
    model = ik.VLM.from_pretrained(path, dtype=torch.bfloat16, device="cpu")
    assert model.dtype == torch.bfloat16
    batch = batch_with_padding("p16_s4_gqa3")
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


@pytest.mark.parametrize("hidden,heads", [(144, 2), (128, 1)])
def test_bf16_image_features_with_so400m_head_dims(tmp_path, hidden, heads):
    """bf16 image features of a vision tower with head dim 72 (SigLIP-so400m: SmolVLM-2.2B,
    Idefics3-8B) or 128 against transformers' float32 ones: within twice transformers' own bf16
    error. On a CPU with AMX or AVX-512 BF16 these take a flash attention kernel (a partial-tile mask
    too)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    from idefics3_kit.ops.attention import flash_head_dim

    g = GEOMETRIES["p14_s2_llama3rope"]
    vision = dict(g["vision"], image_size=112, hidden_size=hidden, intermediate_size=160, num_attention_heads=heads)
    text = dict(model_type="llama", pad_token_id=2, bos_token_id=1, eos_token_id=0, **g["text"])
    torch.manual_seed(0)
    hf = Idefics3ForConditionalGeneration(Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                                                         image_token_id=g["image_token_id"])).eval()
    hf.save_pretrained(tmp_path)
    ours = ik.VLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    hf16 = Idefics3ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert flash_head_dim(hidden // heads)
    gen = torch.Generator().manual_seed(1)
    pixels = torch.zeros(2, 2, 3, 112, 112)
    pixels[0] = tile_pixels(2, 112, gen)
    pixels[1, 0] = tile_pixels(1, 112, gen)[0]
    mask = torch.zeros(2, 2, 112, 112, dtype=torch.long)
    mask[0] = 1
    mask[1, 0, :80, :100] = 1  # a partial tile: masked patches
    with torch.no_grad():
        ref = torch.cat(list(hf.model.get_image_features(pixels, mask).pooler_output)).float()
        theirs = torch.cat(list(hf16.model.get_image_features(pixels.bfloat16(), mask).pooler_output)).float()
        got = ours.get_image_features(pixels.bfloat16(), mask).float().reshape(ref.shape)
    assert torch.isfinite(got).all()
    err, their_err = (got - ref).norm() / ref.norm(), (theirs - ref).norm() / ref.norm()
    assert err <= 2 * their_err + 1e-3, (err.item(), their_err.item())
