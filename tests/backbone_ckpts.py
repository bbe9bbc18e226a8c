"""Tiny random checkpoints written by transformers' save_pretrained, for the backbone tests.

transformers is a test-only dependency; every builder seeds torch so the weights are fixed.
"""

from __future__ import annotations

import torch

QWEN2_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
CLIP_TINY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 image_size=32, patch_size=8, projection_dim=16)
SIGLIP_TINY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)




def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.add_(0.05 * noise)
    return model


def qwen2_checkpoint(path, seed=0, **changes):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = _perturb(Qwen2ForCausalLM(Qwen2Config(**{**QWEN2_TINY, **changes})), seed).eval()
    model.save_pretrained(path)
    return model


def clip_checkpoint(path, seed=0, full=False, **changes):
    """A CLIPVisionModel dir (5.x layout, no prefix) or, with ``full``, a CLIPModel dir (vision_model.*)."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    vcfg = {**CLIP_TINY, **changes}
    if full:
        cfg = CLIPConfig(vision_config=vcfg, text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                                num_hidden_layers=1, num_attention_heads=2,
                                                                max_position_embeddings=16),
                         projection_dim=16)
        model = _perturb(CLIPModel(cfg), seed).eval()
    else:
        model = _perturb(CLIPVisionModel(CLIPVisionConfig(**vcfg)), seed).eval()
    model.save_pretrained(path)
    return model


def siglip_checkpoint(path, seed=0, **changes):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    model = _perturb(SiglipVisionModel(SiglipVisionConfig(**{**SIGLIP_TINY, **changes})), seed).eval()
    model.save_pretrained(path)
    return model
