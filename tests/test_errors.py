"""Bad input gets a clear error naming the problem; nothing is half loaded."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import idefics3_kit as ik
from idefics3_kit.hf.weights import CheckpointError


@pytest.fixture()
def tiny_dir(tmp_path):
    torch.manual_seed(0)
    model = ik.VLM(ik.VLMConfig.preset("tiny"))
    model.save_pretrained(tmp_path)
    return tmp_path


def _edit_weights(path, fn):
    file = path / "model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_listed(tiny_dir):
    _edit_weights(tiny_dir, lambda t: t.pop("model.connector.modality_projection.proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model.connector.modality_projection.proj.weight"):
        ik.VLM.from_pretrained(tiny_dir)


def test_unexpected_tensor_is_listed(tiny_dir):
    _edit_weights(tiny_dir, lambda t: t.__setitem__("model.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): model.extra.weight"):
        ik.VLM.from_pretrained(tiny_dir)


def test_wrong_shape_names_tensor_expected_and_got(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 200
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.text_model.layers.0.mlp.down_proj.weight: expected \[96, 200\], got \[96, 192\]"):
        ik.VLM.from_pretrained(tiny_dir)


def test_corrupt_safetensors_names_the_file(tiny_dir):
    (tiny_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(CheckpointError, match=r"model.safetensors: (cannot read safetensors file|safetensors header)"):
        ik.VLM.from_pretrained(tiny_dir)


def test_corrupt_config_names_the_file(tiny_dir):
    (tiny_dir / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        ik.VLM.from_pretrained(tiny_dir)


def test_config_with_wrong_model_type(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["model_type"] = "llava"
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: model_type: expected 'idefics3'"):
        ik.VLM.from_pretrained(tiny_dir)


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        ik.VLM.from_pretrained(tmp_path / "nope")
    ik.VLMConfig.preset("tiny").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        ik.VLM.from_pretrained(tmp_path)


def test_sharded_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ik.VLM(ik.VLMConfig.preset("tiny")).eval()
    model.save_pretrained(tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = ik.VLM.from_pretrained(tmp_path)
    ids = torch.randint(3, 200, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    (tmp_path / "model-00002-of-{:05d}.safetensors".format(len(set(index["weight_map"].values())))).unlink()
    with pytest.raises(CheckpointError, match="lists shard files that do not exist: model-00002"):
        ik.VLM.from_pretrained(tmp_path)


def test_tied_embeddings_round_trip(tmp_path):
    cfg = ik.VLMConfig.preset("tiny")
    cfg = cfg.replace(decoder=cfg.decoder.replace(tie_word_embeddings=True))
    model = ik.VLM(cfg)
    model.save_pretrained(tmp_path)
    loaded = ik.VLM.from_pretrained(tmp_path)
    assert loaded.decoder.lm_head.weight is loaded.decoder.model.embed_tokens.weight


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return ik.VLM(ik.VLMConfig.preset("tiny")).eval()


def test_pixel_values_rank_and_channels(tiny_model):
    ids = torch.full((1, 4), tiny_model.image_token_id)
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, tiles, channels, height, width\] \(5-D\), got shape \(1, 3, 64, 64\)"):
        tiny_model(input_ids=ids, pixel_values=torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="pixel_values has 4 channels, the vision encoder expects 3"):
        tiny_model(input_ids=ids, pixel_values=torch.rand(1, 1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"pixel_attention_mask must have shape \(1, 1, 64, 64\)"):
        tiny_model(input_ids=ids, pixel_values=torch.rand(1, 1, 3, 64, 64),
                   pixel_attention_mask=torch.ones(1, 64, 64))


def test_token_ids_outside_vocabulary(tiny_model):
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 512\): min -1, max 600"):
        tiny_model(input_ids=torch.tensor([[-1, 5, 600]]))


def test_image_token_count_mismatch(tiny_model):
    ids = torch.full((1, 3), tiny_model.image_token_id)
    with pytest.raises(ValueError, match="3 image tokens but 4 image features"):
        tiny_model(input_ids=ids, pixel_values=torch.rand(1, 1, 3, 64, 64) + 0.1)


def test_labels_shape(tiny_model):
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        tiny_model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6]]))


@pytest.mark.parametrize("changes,match", [
    (dict(vision=dict(hidden_size=30, num_attention_heads=4)), r"VisionConfig.hidden_size: 30 is not divisible by num_attention_heads=4"),
    (dict(vision=dict(image_size=48, patch_size=16)), r"vision patch grid 3x3 .* is not divisible by scale_factor 2"),
    (dict(decoder=dict(num_attention_heads=6, num_key_value_heads=4)), r"DecoderConfig.num_attention_heads: 6 is not divisible by num_key_value_heads=4"),
    (dict(decoder=dict(rope_scaling={"rope_type": "llama3", "factor": 8.0})), r"DecoderConfig.rope_scaling: llama3 rope scaling needs 'low_freq_factor'"),
    (dict(image_token_id=9999), r"VLMConfig.image_token_id: 9999 is outside the decoder vocabulary"),
    (dict(vision=dict(image_size=8, patch_size=16)), r"VisionConfig.image_size: 8 is smaller than patch_size=16"),
])
def test_config_validation_names_the_field(changes, match):
    base = ik.VLMConfig.preset("tiny")
    with pytest.raises(ValueError, match=match):  # raised by the sub-config or by VLMConfig
        base.replace(**{key: getattr(base, key).replace(**value) if isinstance(value, dict) else value
                        for key, value in changes.items()})


def test_connector_dimension_mismatch_is_named():
    base = ik.VLMConfig.preset("tiny")
    with pytest.raises(ValueError, match=r"connector.out_dim: 10 does not match the decoder's hidden_size 96"):
        ik.VLMConfig(vision=base.vision, connector=ik.ConnectorConfig(out_dim=10), decoder=base.decoder,
                     image_token_id=5)
