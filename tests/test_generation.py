"""The generation loop: padding, positions, settings, static cache, seeded sampling."""

from __future__ import annotations

import pytest
import torch

import idefics3_kit as ik
from idefics3_kit import generation as G


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ik.VLM(ik.VLMConfig.preset("tiny")).eval()


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert G.position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_to_left_padding_moves_right_padding_and_keeps_left():
    ids = torch.tensor([[5, 6, 0, 0], [0, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    new_ids, new_mask = G.to_left_padding(ids, mask)
    assert new_ids.tolist() == [[0, 0, 5, 6], [0, 7, 8, 9]]
    assert new_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    same = G.to_left_padding(new_ids, new_mask)
    assert same[0] is new_ids


def test_settings_merge_call_over_generation_config():
    dec = ik.VLMConfig.preset("tiny").decoder
    s = G.resolve_settings({"eos_token_id": [2, 7], "do_sample": True, "temperature": 0.5, "max_length": 99},
                           dec, temperature=0.9)
    assert s.eos_token_ids == (2, 7) and s.do_sample and s.temperature == 0.9 and s.pad_token_id == 0
    assert G.resolve_settings({}, dec).eos_token_ids == (2,)  # the model config's eos
    assert G.resolve_settings({}, dec, eos_token_id=5).eos_token_ids == (5,)
    with pytest.raises(TypeError, match="unexpected arguments: top_q"):
        G.resolve_settings({}, dec, top_q=0.3)
    with pytest.raises(ValueError, match="top_p must be in"):
        G.resolve_settings({}, dec, top_p=2.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        G.resolve_settings({}, dec, max_new_tokens=-1)


def test_output_shape_and_max_new_tokens(model):
    ids = torch.randint(3, 200, (2, 6))
    out = model.generate(input_ids=ids, max_new_tokens=7, eos_token_id=[])
    assert out.shape == (2, 13) and torch.equal(out[:, :6], ids)
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=0), ids)


def test_cache_is_preallocated_once_and_written_in_place(model, monkeypatch):
    made = []
    original = model.decoder.new_cache

    def spy(batch_size, max_length, **kw):
        cache = original(batch_size, max_length, **kw)
        made.append((cache, max_length))
        return cache

    monkeypatch.setattr(model.decoder, "new_cache", spy)
    ids = torch.randint(3, 200, (1, 5))
    buffers = []
    hook = model.decoder.register_forward_hook(lambda m, i, o: buffers.append([k.data_ptr() for k in made[0][0].keys]))
    model.generate(input_ids=ids, max_new_tokens=9, eos_token_id=[])
    hook.remove()
    assert len(made) == 1
    cache, max_length = made[0]
    assert max_length == 5 + 9 and all(k.shape[2] == max_length for k in cache.keys)
    assert len(buffers) == 9 and all(b == buffers[0] for b in buffers)  # allocated by the prefill, then reused
    assert cache.length == 5 + 8  # the last token is sampled, never fed back


def test_image_features_computed_once(model, monkeypatch):
    calls = []
    original = model.get_image_features

    def spy(*a, **kw):
        calls.append(1)
        return original(*a, **kw)

    monkeypatch.setattr(model, "get_image_features", spy)
    cfg = model.config
    ids = torch.tensor([[5, 6] + [cfg.image_token_id] * cfg.image_seq_len + [7]])
    pv = torch.rand(1, 1, 3, cfg.vision.image_size, cfg.vision.image_size) * 2 - 1
    model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=6, eos_token_id=[])
    assert len(calls) == 1


def test_fixed_seed_sampling_is_reproducible(model):
    ids = torch.randint(3, 200, (2, 6))
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.7, top_p=0.9, min_p=0.05,
              repetition_penalty=1.1, eos_token_id=[])
    a = model.generate(input_ids=ids, seed=0, **kw)
    b = model.generate(input_ids=ids, seed=0, **kw)
    c = model.generate(input_ids=ids, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, model.generate(input_ids=ids, seed=1, **kw))


def test_per_row_seeds_make_rows_independent_of_the_batch(model):
    ids = torch.randint(3, 200, (3, 6))
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, eos_token_id=[])
    batch = model.generate(input_ids=ids, seed=[10, 11, 12], **kw)
    alone = model.generate(input_ids=ids[1:2], seed=[11], **kw)
    assert torch.equal(batch[1:2], alone)


def test_prompt_longer_than_context_warns_and_generates_like_transformers(model):
    """transformers generates past max_position_embeddings with a warning; strict_context refuses."""
    ctx = model.config.decoder.max_position_embeddings
    with pytest.warns(UserWarning, match="exceeds the model's context"):
        out = model.generate(input_ids=torch.full((1, ctx - 2), 5), max_new_tokens=5, eos_token_id=[])
    assert out.shape[1] == ctx + 3  # the cache is sized for prompt + new tokens
    with pytest.raises(ValueError, match="strict_context=True"):
        model.generate(input_ids=torch.full((1, ctx - 2), 5), max_new_tokens=5, strict_context=True)


def test_custom_sampler_chain_from_the_registry(model):
    from idefics3_kit import registry
    from idefics3_kit.components.sampler import SamplerChain

    chain = SamplerChain([registry.create("sampler", "top_k", top_k=1)], registry.create("sampler", "multinomial"))
    ids = torch.randint(3, 200, (2, 6))
    assert torch.equal(model.generate(input_ids=ids, sampler=chain, seed=5, max_new_tokens=6, eos_token_id=[]),
                       model.generate(input_ids=ids, max_new_tokens=6, eos_token_id=[]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_and_prepacked_decode_weights_are_bit_identical(monkeypatch, dtype):
    import copy

    from idefics3_kit.ops import matmul, packed

    torch.manual_seed(0)
    model = ik.VLM(ik.VLMConfig.preset("tiny")).eval().to(dtype)
    attn = model.decoder.model.layers[0].self_attn
    projs = (attn.q_proj, attn.k_proj, attn.v_proj)
    ids = torch.randint(3, 200, (matmul.max_rows() + 2, 12))  # more rows than the few-row kernel takes
    mask = torch.ones_like(ids)
    mask[0, :5] = 0

    def run():
        seen = []

        def rec(logits, state):
            seen.append(logits.clone())
            return logits.argmax(-1)

        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, sampler=rec, eos_token_id=[])
        return torch.stack(seen)

    monkeypatch.setenv("IDEFICS3_KIT_PREPACK", "0")
    plain = run()
    assert matmul.packed_for(projs) is None
    monkeypatch.setenv("IDEFICS3_KIT_PREPACK", "1")
    fused = run()
    if dtype == torch.bfloat16 and packed.can_pack(model.decoder.lm_head.weight):
        assert matmul.packed_for(projs) is not None and matmul.packed_for((model.decoder.lm_head,)) is not None
    else:
        assert matmul.packed_for(projs) is None  # fp32: nothing to gain, nothing kept
    assert torch.equal(plain, fused)
    assert torch.equal(copy.deepcopy(model).decoder.lm_head.weight, model.decoder.lm_head.weight)
    with torch.no_grad():
        attn.q_proj.weight.mul_(2)  # modified in place: the fused copy is stale and not used
    assert matmul.packed_for(projs) is None
    model.to(torch.float16).to(dtype)  # swapped weights: stale too
    assert matmul.packed_for((model.decoder.lm_head,)) is None
    with torch.no_grad():
        assert torch.equal(model.decoder(input_ids=ids[:1, :3]).logits,
                           model.decoder(input_ids=ids[:1, :3]).logits)
    matmul.unpack(model)
    assert packed._PACKS.get(attn.q_proj) is None


def test_auto_prepack_skips_batch_sizes_the_few_row_kernel_covers(monkeypatch):
    # ops.decode_linear reads the plain weights for <= max_rows() rows: a packed copy (the decoder's
    # weights once more) would be unused memory there; larger batches still get it.
    from idefics3_kit.ops import matmul

    from idefics3_kit.ops import _library

    if not _library.onednn_bf16():  # no oneDNN bf16 matmul (an AVX2-only CPU): nothing is ever packed
        decoder = ik.VLM(ik.VLMConfig.preset("tiny")).to(torch.bfloat16).decoder
        monkeypatch.setenv("IDEFICS3_KIT_PREPACK", "1")
        assert matmul.prepare_decode(decoder, 8) is False
        return
    monkeypatch.delenv("IDEFICS3_KIT_PREPACK", raising=False)
    decoder = ik.VLM(ik.VLMConfig.preset("tiny")).to(torch.bfloat16).decoder
    with torch.inference_mode():
        kernel = matmul.covers(1, torch.bfloat16)
        assert matmul.prepare_decode(decoder, 1) is (not kernel)
        assert matmul.prepare_decode(decoder, matmul.max_rows() + 1) is True
        monkeypatch.setenv("IDEFICS3_KIT_PREPACK", "1")
        assert matmul.prepare_decode(decoder, 1) is True
