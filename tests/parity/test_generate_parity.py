"""Greedy generation is token-identical to transformers' generate on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from idefics3_kit.generation import generate_steps, position_ids_from_mask  # noqa: E402

pytestmark = pytest.mark.parity

IMAGE_ID = 257
PAD = 2


def tiny_hf_config(**text):
    text_config = dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=80,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                       max_position_embeddings=512, pad_token_id=PAD)
    text_config.update(text)
    return transformers.Idefics3Config(
        vision_config=dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4),
        text_config=text_config, scale_factor=2, image_token_id=IMAGE_ID)


def image_tokens(n_tiles: int, seq_len: int) -> list[int]:
    # <image> x seq_len per tile, as the processor expands it (tags left out: any ids work)
    return [IMAGE_ID] * (seq_len * n_tiles)


def pixels(n_tiles: int, max_tiles: int, gen: torch.Generator) -> torch.Tensor:
    pv = torch.zeros(max_tiles, 3, 56, 56)
    pv[:n_tiles] = (torch.rand(n_tiles, 3, 56, 56, generator=gen) * 2 - 1).clamp(-0.99, 0.99)
    return pv


def left_pad(rows: list[list[int]]):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def hf_generate(hf, eos_token_id=(299,), **kw):
    with torch.no_grad():
        return hf.generate(**kw, do_sample=False, eos_token_id=list(eos_token_id), pad_token_id=PAD)


def test_single_prompt_with_image(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(1)
    s = ours.image_seq_len
    ids = torch.tensor([[5, 17, 33] + image_tokens(1, s) + [40, 41, 42, 43]])
    pv = pixels(1, 1, g)[None]
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv,
                 pixel_attention_mask=torch.ones(1, 1, 56, 56, dtype=torch.long))
    ref = hf_generate(hf, **batch, max_new_tokens=24)
    out = ours.generate(**batch, max_new_tokens=24, do_sample=False, eos_token_id=[299])
    assert out.tolist() == ref.tolist()


def test_left_padded_batch_with_different_image_counts(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(2)
    s = ours.image_seq_len
    rows = [[7, 8] + image_tokens(1, s) + [9] + image_tokens(1, s) + [10, 11, 12],  # 2 images
            [20] + image_tokens(1, s) + [21, 22],                                 # 1 image (+ a padding tile)
            [30, 31, 32] + image_tokens(1, s) + [33, 34, 35, 36, 37, 38]]          # 1 image
    ids, mask = left_pad(rows)
    pv = torch.stack([pixels(2, 2, g), pixels(1, 2, g), pixels(1, 2, g)])
    pam = (pv.abs().sum(2) > 0).long()  # [B, T, H, W]
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, pixel_attention_mask=pam)
    ref = hf_generate(hf, **batch, max_new_tokens=20)
    out = ours.generate(**batch, max_new_tokens=20, do_sample=False, eos_token_id=[299])
    assert out.tolist() == ref.tolist()


def test_text_only_batch(pair):
    hf, ours = pair
    ids, mask = left_pad([[4, 5, 6, 7, 8, 9, 10], [100, 101, 102], [200, 201, 202, 203, 204]])
    ref = hf_generate(hf, input_ids=ids, attention_mask=mask, max_new_tokens=20)
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=[299])
    assert out.tolist() == ref.tolist()


def test_early_finish_rows_padded_like_transformers(pair):
    hf, ours = pair
    ids, mask = left_pad([[4, 5, 6, 7, 8, 9, 10], [100, 101, 102], [200, 201, 202, 203, 204]])
    free = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[299])
    eos = int(free[1, ids.shape[1] + 3])  # a token row 1 produces at its 4th step
    ref = hf_generate(hf, input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[eos])
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos)
    assert out.tolist() == ref.tolist()
    new = out[1, ids.shape[1]:].tolist()
    stop = new.index(eos)
    assert all(t == PAD for t in new[stop + 1:])


def test_generation_config_eos_is_used(pair):
    hf, ours = pair
    ids = torch.tensor([[4, 5, 6, 7]])
    free = ours.generate(input_ids=ids, max_new_tokens=10, eos_token_id=[299])
    eos = int(free[0, 6])  # third new token
    saved = dict(ours.generation_config)
    try:
        ours.generation_config = {**saved, "eos_token_id": [298, eos]}
        out = ours.generate(input_ids=ids, max_new_tokens=10)
    finally:
        ours.generation_config = saved
    assert int(out[0, -1]) == eos and out.shape[1] <= 7


def test_right_padding_is_converted(pair):
    _, ours = pair
    rows = [[4, 5, 6, 7, 8, 9, 10], [100, 101, 102]]
    ids, mask = left_pad(rows)
    right_ids = torch.full_like(ids, PAD)
    right_mask = torch.zeros_like(mask)
    for i, r in enumerate(rows):
        right_ids[i, :len(r)] = torch.tensor(r)
        right_mask[i, :len(r)] = 1
    a = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[299])
    b = ours.generate(input_ids=right_ids, attention_mask=right_mask, max_new_tokens=10, eos_token_id=[299])
    assert a.tolist() == b.tolist()  # returned left padded, like transformers expects its input


def test_cached_decode_logits_equal_uncached_recomputation(pair):
    _, ours = pair
    g = torch.Generator().manual_seed(3)
    s = ours.image_seq_len
    ids, mask = left_pad([[5, 6] + image_tokens(1, s) + [7, 8, 9], [1, 2, 3, 4] + image_tokens(1, s) + [5]])
    pv = torch.stack([pixels(1, 1, g), pixels(1, 1, g)])
    seen = []

    def recording_greedy(logits, state):
        seen.append(logits.clone())
        return logits.argmax(-1)

    with torch.inference_mode():
        steps = generate_steps(ours, ids, mask, pv, None, max_new_tokens=8, eos_token_id=[],
                               sampler=recording_greedy)
        prompt, pmask = next(steps)
        new = torch.stack(list(steps), dim=1)
        full = torch.cat([prompt, new], dim=1)
        full_mask = torch.cat([pmask, torch.ones_like(new)], dim=1)
        out = ours(input_ids=full, attention_mask=full_mask, pixel_values=pv,
                   position_ids=position_ids_from_mask(full_mask))
    length = prompt.shape[1]
    for step, logits in enumerate(seen):
        ref = out.logits[:, length - 1 + step].float()
        assert torch.allclose(logits, ref, atol=1e-4, rtol=0), (step, (logits - ref).abs().max())


def test_prompt_longer_than_context_generates_the_ids_of_transformers(pair):
    """transformers warns and generates past max_position_embeddings (RoPE runs on): same ids."""
    hf, ours = pair
    ids = torch.randint(3, 250, (1, 509), generator=torch.Generator().manual_seed(5))
    ref = hf_generate(hf, input_ids=ids, max_new_tokens=8)
    with pytest.warns(UserWarning, match="exceeds the model's context of 512"):
        out = ours.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=[299])
    assert out.tolist() == ref.tolist()


def test_min_new_tokens_blocks_eos(pair):
    _, ours = pair
    ids = torch.tensor([[4, 5, 6, 7]])
    free = ours.generate(input_ids=ids, max_new_tokens=6, eos_token_id=[299])
    eos = int(free[0, 4])  # the very first new token
    out = ours.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=3, eos_token_id=eos)
    assert eos not in out[0, 4:7].tolist()
