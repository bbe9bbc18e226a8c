"""Tiny random Idefics3 checkpoints written by transformers, for parity tests.

Each geometry mirrors a real checkpoint's ratios at toy size. Nothing is downloaded: the
weights are random and saved with transformers' own save_pretrained.
"""

from __future__ import annotations

import torch

GEOMETRIES = {
    # 14-px patches, scale 2, Llama-3.1 rope scaling (Idefics3-8B-like); 4 tokens per tile
    "p14_s2_llama3rope": dict(
        vision=dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=37,
                    num_hidden_layers=2, num_attention_heads=4),
        text=dict(vocab_size=300, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=32),
                  rope_theta=10000.0, rms_norm_eps=1e-5),
        scale_factor=2, image_token_id=257),
    # 16-px patches, scale 4, GQA 3:1 (SmolVLM-256M-like); 4 tokens per tile
    "p16_s4_gqa3": dict(
        vision=dict(image_size=128, patch_size=16, hidden_size=48, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4),
        text=dict(vocab_size=320, hidden_size=72, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                  rope_theta=100000.0, rms_norm_eps=1e-5),
        scale_factor=4, image_token_id=301),
    # 90-px tiles with 14-px patches (6x6 grid, 6 px ignored, like SmolVLM-Instruct's 384/14), scale 3, MHA
    "p14_s3_nondivisible": dict(
        vision=dict(image_size=90, patch_size=14, hidden_size=24, intermediate_size=40,
                    num_hidden_layers=1, num_attention_heads=2),
        text=dict(vocab_size=290, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                  rope_theta=273768.0, rms_norm_eps=1e-5),
        scale_factor=3, image_token_id=260),
}


def hf_config(geometry: str):
    from transformers import Idefics3Config

    g = GEOMETRIES[geometry]
    text = dict(model_type="llama", pad_token_id=2, bos_token_id=1, eos_token_id=0, **g["text"])
    return Idefics3Config(vision_config=dict(g["vision"]), text_config=text, scale_factor=g["scale_factor"],
                          image_token_id=g["image_token_id"])


def make_checkpoint(path, geometry: str, seed: int = 0):
    """Write a random transformers Idefics3 checkpoint to ``path``; return the HF model."""
    from transformers import Idefics3ForConditionalGeneration

    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(hf_config(geometry)).eval()
    model.save_pretrained(path)
    return model


def tokens_per_tile(geometry: str) -> int:
    g = GEOMETRIES[geometry]
    grid = g["vision"]["image_size"] // g["vision"]["patch_size"]
    return (grid // g["scale_factor"]) ** 2
