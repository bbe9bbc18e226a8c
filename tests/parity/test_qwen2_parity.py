"""qwen2 decoder vs transformers' Qwen2ForCausalLM on tiny random checkpoints (fp32, 1e-4)."""

import json

import pytest
import torch

from idefics3_kit import Qwen2DecoderConfig
from idefics3_kit.hf.parts import load_component
from tests.backbone_ckpts import qwen2_checkpoint

pytestmark = pytest.mark.parity


@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_logits_match_transformers(tmp_path, tied):
    ref = qwen2_checkpoint(tmp_path, seed=1 if tied else 2, tie_word_embeddings=tied)
    ours = load_component("decoder", tmp_path)
    assert type(ours).component_name == "qwen2"
    assert isinstance(ours.config, Qwen2DecoderConfig)
    assert ours.config.rope_theta == 1000000.0 and ours.config.num_key_value_heads == 2
    assert ours.config.tie_word_embeddings is tied
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) is tied
    assert ours.model.layers[0].self_attn.q_proj.bias is not None
    assert ours.model.layers[0].self_attn.o_proj.bias is None

    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    # left padding: the real positions agree (plain forward: positions arange(L) in both)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1, 4:], want[1, 4:], atol=1e-4, rtol=0)


def test_qwen2_cached_decoding_matches_transformers(tmp_path):
    ref = qwen2_checkpoint(tmp_path, seed=3)
    ours = load_component("decoder", tmp_path)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        cache = ours.new_cache(1, 11)
        seq, step = ids, ids
        for _ in range(5):
            nxt = ours(input_ids=step, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
            seq, step = torch.cat([seq, nxt], 1), nxt
    assert seq.tolist() == want.tolist()


def test_qwen2_config_json_round_trip(tmp_path):
    qwen2_checkpoint(tmp_path, seed=0)
    data = json.loads((tmp_path / "config.json").read_text())
    from idefics3_kit.config import sub_config_from_hf, sub_config_to_hf

    cfg = sub_config_from_hf("decoder", data)
    assert cfg.name == "qwen2" and cfg.rms_norm_eps == data["rms_norm_eps"]
    back = sub_config_to_hf("decoder", cfg)
    assert back["model_type"] == "qwen2" and back["rope_parameters"]["rope_theta"] == 1000000.0
    assert sub_config_from_hf("decoder", back) == cfg


def test_qwen2_refuses_sliding_window_and_biases():
    with pytest.raises(ValueError, match="sliding-window attention is not implemented"):
        Qwen2DecoderConfig(use_sliding_window=True, sliding_window=4096, max_window_layers=2, num_hidden_layers=4,
                           vocab_size=32, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                           num_key_value_heads=1)
    # sliding window switched on but no layer reaches max_window_layers: plain attention, accepted
    Qwen2DecoderConfig(use_sliding_window=True, sliding_window=4096, max_window_layers=24)
    with pytest.raises(ValueError, match="mlp_bias"):
        Qwen2DecoderConfig(mlp_bias=True)
