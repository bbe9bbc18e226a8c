"""VLM.from_parts: variants from a vision checkpoint, a decoder checkpoint and a fresh connector."""

import json

import pytest
import torch
from safetensors import safe_open

import idefics3_kit as ik
from idefics3_kit import registry
from idefics3_kit.hf.parts import load_component
from tests.backbone_ckpts import clip_checkpoint, qwen2_checkpoint, siglip_checkpoint


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    models = {
        "clip": clip_checkpoint(root / "clip", seed=11),
        "siglip": siglip_checkpoint(root / "siglip", seed=12),
        "qwen2": qwen2_checkpoint(root / "qwen2", seed=13, tie_word_embeddings=True),
    }
    return {k: root / k for k in models}, models


def _batch(image_token_id, n_img=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(0, 100, (1, 3), generator=g), torch.full((1, n_img), image_token_id),
                     torch.randint(0, 100, (1, 4), generator=g)], dim=1)
    return ids, torch.randn(1, 1, 3, 32, 32, generator=g)


def test_clip_qwen2_variant_matches_its_parts_and_round_trips(dirs, tmp_path):
    paths, ref = dirs
    model = ik.VLM.from_parts(vision=paths["clip"], decoder=paths["qwen2"], connector="pixel_shuffle")
    cfg = model.config
    assert cfg.component_names == {"vision": "clip", "connector": "pixel_shuffle", "decoder": "qwen2"}
    # no image_token_id given: a token was appended to the vocabulary
    assert cfg.image_token_id == 128 and cfg.decoder.vocab_size == 129
    assert cfg.connector.in_dim == 48 and cfg.connector.out_dim == 64 and cfg.image_seq_len == 4
    assert model.decoder.lm_head.weight is model.decoder.model.embed_tokens.weight  # Qwen2 tiny is tied

    text = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(input_ids=text).logits
        torch.testing.assert_close(logits[..., :128], ref["qwen2"](input_ids=text).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(model.vision(px), ref["clip"](pixel_values=px).last_hidden_state[:, 1:],
                                   atol=1e-4, rtol=0)

    ids, pixels = _batch(cfg.image_token_id)
    with torch.no_grad():
        want = model(input_ids=ids, pixel_values=pixels).logits
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "idefics3"
    assert data["idefics3_kit"]["components"] == {"vision": "clip", "connector": "pixel_shuffle", "decoder": "qwen2"}
    assert data["vision_config"]["model_type"] == "clip_vision_model"
    assert data["text_config"]["model_type"] == "qwen2"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.vision_model.embeddings.class_embedding" in names
    assert "model.vision_model.pre_layrnorm.weight" in names
    assert "model.text_model.layers.0.self_attn.q_proj.bias" in names
    assert "model.connector.modality_projection.proj.weight" in names
    assert "lm_head.weight" not in names  # tied

    back = ik.VLM.from_pretrained(tmp_path)
    assert back.config == cfg
    assert back.decoder.lm_head.weight is back.decoder.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, pixel_values=pixels).logits, want, atol=0, rtol=0)


def test_siglip_qwen2_mlp_with_an_existing_token(dirs):
    paths, ref = dirs
    model = ik.VLM.from_parts(vision=paths["siglip"], decoder=paths["qwen2"],
                              connector=ik.ConnectorConfig(name="mlp", scale_factor=2, hidden_dim=80),
                              image_token_id=127)
    assert model.config.decoder.vocab_size == 128 and model.image_token_id == 127
    assert model.connector.modality_projection.linear_1.weight.shape == (80, 4 * 48)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # SiglipVisionModel's head.* tensors were skipped, the encoder matches
        torch.testing.assert_close(model.vision(px), ref["siglip"](pixel_values=px).last_hidden_state,
                                   atol=1e-4, rtol=0)
        ids, pixels = _batch(127, seed=1)
        assert model(input_ids=ids, pixel_values=pixels).logits.shape == (1, 11, 128)


def test_modules_and_configs_as_parts(dirs):
    paths, _ = dirs
    vision = load_component("vision", paths["clip"])
    decoder = ik.Qwen2DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2)
    model = ik.VLM.from_parts(vision=vision, decoder=decoder, connector={"name": "mlp", "scale_factor": 4},
                              image_token_id=5)
    assert model.vision is vision  # used as is
    assert model.config.image_seq_len == 1 and model.config.decoder == decoder
    ids = torch.tensor([[1, 5, 2]])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.randn(1, 1, 3, 32, 32))
    assert out.logits.shape == (1, 3, 64)


def test_idefics3_checkpoint_as_a_source_of_parts(tmp_path):
    torch.manual_seed(0)
    full = ik.VLM(ik.VLMConfig.preset("tiny"))
    full.save_pretrained(tmp_path)
    model = ik.VLM.from_parts(vision=tmp_path, decoder=tmp_path, connector="mlp",
                              image_token_id=full.image_token_id)
    for part in ("vision", "decoder"):
        for (n, a), (_, b) in zip(getattr(model, part).state_dict().items(),
                                  getattr(full, part).state_dict().items()):
            assert torch.equal(a, b), n


@pytest.mark.parametrize("tied", [True, False])
def test_add_token_keeps_old_logits(tmp_path, tied):
    from idefics3_kit.hf.parts import add_token

    ref = qwen2_checkpoint(tmp_path, seed=14, tie_word_embeddings=tied)
    dec = load_component("decoder", tmp_path)
    assert add_token(dec) == 128 and dec.vocab_size == 129 and dec.config.vocab_size == 129
    assert (dec.lm_head.weight is dec.model.embed_tokens.weight) is tied
    torch.testing.assert_close(dec.model.embed_tokens.weight[128], dec.model.embed_tokens.weight[:128].mean(0))
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dec(input_ids=ids).logits[..., :128], ref(input_ids=ids).logits,
                                   atol=1e-4, rtol=0)


def test_mismatches_are_named(dirs):
    paths, _ = dirs
    with pytest.raises(ValueError, match=r"in_dim 999 vs vision 'clip' hidden_size 48"):
        ik.VLM.from_parts(vision=paths["clip"], decoder=paths["qwen2"],
                          connector=ik.ConnectorConfig(in_dim=999), image_token_id=1)
    with pytest.raises(ValueError, match=r"out_dim 10 vs decoder 'qwen2' hidden_size 64"):
        ik.VLM.from_parts(vision=paths["clip"], decoder=paths["qwen2"],
                          connector=ik.ConnectorConfig(name="mlp", out_dim=10), image_token_id=1)
    with pytest.raises(ValueError, match=r"patch grid 4x4 .* not divisible by scale_factor 3"):
        ik.VLM.from_parts(vision=paths["clip"], decoder=paths["qwen2"],
                          connector=ik.ConnectorConfig(scale_factor=3), image_token_id=1)
    with pytest.raises(ValueError, match=r"image_token_id: 500 is outside the decoder vocabulary \(vocab_size 128\)"):
        ik.VLM.from_parts(vision=paths["clip"], decoder=paths["qwen2"], image_token_id=500)
    with pytest.raises(ValueError, match=r"model_type 'qwen2' is not a vision checkpoint"):
        ik.VLM.from_parts(vision=paths["qwen2"], decoder=paths["qwen2"], image_token_id=1)
    with pytest.raises(TypeError, match=r"vision=: expected a registered vision component module .* \(a decoder"):
        ik.VLM.from_parts(vision=load_component("decoder", paths["qwen2"]), decoder=paths["qwen2"],
                          image_token_id=1)
    with pytest.raises(FileNotFoundError, match="decoder checkpoint directory not found"):
        ik.VLM.from_parts(vision=paths["clip"], decoder=paths["qwen2"] / "nope", image_token_id=1)
    with pytest.raises(KeyError, match="unknown connector component 'nope'"):
        ik.VLM.from_parts(vision=paths["clip"], decoder=paths["qwen2"], connector="nope", image_token_id=1)


def test_checkpoint_shape_mismatch_lists_tensors(dirs, tmp_path):
    paths, _ = dirs
    clip_checkpoint(tmp_path, seed=1, hidden_size=32)
    model = ik.VLM.from_parts(vision=paths["clip"], decoder=paths["qwen2"], image_token_id=1)
    model.save_pretrained(tmp_path / "variant")
    cfg = json.loads((tmp_path / "variant" / "config.json").read_text())
    cfg["vision_config"]["intermediate_size"] = 64
    (tmp_path / "variant" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"wrong shapes .*model\.vision_model\.encoder\.layers\.0\.mlp\.fc1\.weight: "
                                         r"expected \[64, 48\], got \[96, 48\]"):
        ik.VLM.from_pretrained(tmp_path / "variant")


def test_plain_idefics3_config_has_no_extra_key():
    cfg = ik.VLMConfig.preset("tiny")
    assert cfg.is_plain_idefics3 and "idefics3_kit" not in cfg.to_hf_dict()
    assert registry.get("connector", "mlp")


def test_llama_causal_lm_dir_as_decoder(tmp_path, dirs):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    paths, _ = dirs
    model = ik.VLM.from_parts(vision=paths["clip"], decoder=tmp_path, connector="mlp", image_token_id=99)
    assert model.config.component_names["decoder"] == "llama3"
    ids = torch.randint(0, 99, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4, rtol=0)
