"""The swappable backbones: every registered vision/connector/decoder mixes with every other,
every decoder decodes the same with and without its KV cache, and the mlp connector's math."""

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

import idefics3_kit as ik
from idefics3_kit import registry
from idefics3_kit.components.connector import pixel_shuffle

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   image_size=32, patch_size=8)
TINY_DECODER = dict(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=0, max_position_embeddings=128)


def _tiny(kind, name, sizes):
    cls = registry.config_class(kind, name)
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{"name": name, **{k: v for k, v in sizes.items() if k in fields}})


def test_new_components_are_registered():
    assert "clip" in registry.list_components("vision")
    assert "mlp" in registry.list_components("connector")
    assert "qwen2" in registry.list_components("decoder")
    assert registry.config_class("vision", "clip") is ik.ClipVisionConfig
    assert registry.config_class("decoder", "qwen2") is ik.Qwen2DecoderConfig


@pytest.mark.parametrize("kind,name", [("vision", "clip"), ("decoder", "qwen2")])
def test_default_configs_build(kind, name):
    """Real-size defaults (CLIP ViT-B/16, Qwen2.5-0.5B), built on the meta device to stay fast."""
    with torch.device("meta"):
        module = registry.create(kind, name)
    n = sum(p.numel() for p in module.parameters())
    assert n == {"clip": 85_799_424, "qwen2": 494_032_768}[name]  # transformers: CLIPVisionModel, Qwen2ForCausalLM


@pytest.mark.parametrize("name", registry.list_components("decoder"))
def test_greedy_with_and_without_kv_cache(name):
    torch.manual_seed(0)
    dec = registry.create("decoder", name, _tiny("decoder", name, TINY_DECODER)).eval()
    prompt = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    steps = 6
    with torch.no_grad():
        full = prompt
        for _ in range(steps):  # recompute everything each step
            nxt = dec(input_ids=full).logits[:, -1].argmax(-1, keepdim=True)
            full = torch.cat([full, nxt], dim=1)
        cache = dec.new_cache(2, prompt.shape[1] + steps)
        cached, step = prompt, prompt
        for _ in range(steps):
            nxt = dec(input_ids=step, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
            cached, step = torch.cat([cached, nxt], dim=1), nxt
    assert cached.tolist() == full.tolist()


def test_mlp_connector_is_pixel_shuffle_then_linear_gelu_linear():
    torch.manual_seed(0)
    cfg = ik.ConnectorConfig(name="mlp", scale_factor=2, in_dim=8, out_dim=12, hidden_dim=20)
    conn = registry.create("connector", "mlp", cfg)
    x = torch.randn(3, 16, 8)
    out = conn(x)
    assert out.shape == (3, 4, 12)
    p = conn.modality_projection
    want = p.linear_2(F.gelu(p.linear_1(pixel_shuffle(x, 2))))
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    assert p.linear_1.weight.shape == (20, 32) and p.linear_1.bias is not None
    # hidden_dim 0: the inner width is out_dim
    conn = registry.create("connector", "mlp", cfg.replace(hidden_dim=0))
    assert conn.modality_projection.linear_1.weight.shape == (12, 32)


COMBOS = list(itertools.product(registry.list_components("vision"), registry.list_components("connector"),
                                registry.list_components("decoder")))


@pytest.mark.parametrize("vision,connector,decoder", COMBOS)
def test_every_combination_assembles_runs_and_round_trips(vision, connector, decoder):
    cfg = ik.VLMConfig(vision=_tiny("vision", vision, TINY_VISION),
                       connector=registry.make_config(registry.get("connector", connector), {"scale_factor": 2}),
                       decoder=_tiny("decoder", decoder, TINY_DECODER), image_token_id=90)
    assert cfg.connector.in_dim == 32 and cfg.connector.out_dim == 48
    assert cfg.image_seq_len == 4
    back = ik.VLMConfig.from_hf_dict(cfg.to_hf_dict())
    assert back == cfg
    assert ("idefics3_kit" in cfg.to_hf_dict()) == (not cfg.is_plain_idefics3)
    torch.manual_seed(0)
    model = ik.VLM(cfg).eval()
    ids = torch.tensor([[1, 5] + [90] * 4 + [7, 8]])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.randn(1, 1, 3, 32, 32))
    assert out.logits.shape == (1, 8, 96)
    assert out.image_hidden_states.shape == (1, 4, 48)


def test_vlm_config_names_the_expected_config_class():
    with pytest.raises(TypeError, match="vision component 'clip' takes a ClipVisionConfig, got VisionConfig"):
        ik.VLMConfig(vision=ik.VisionConfig(name="clip"))
    # a dict is built with the registered class
    cfg = ik.VLMConfig(vision={"name": "clip", **TINY_VISION}, decoder={"name": "qwen2", **TINY_DECODER},
                       image_token_id=3)
    assert isinstance(cfg.vision, ik.ClipVisionConfig) and isinstance(cfg.decoder, ik.Qwen2DecoderConfig)
