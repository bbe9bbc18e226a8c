"""Assemble your own VLM: CLIP vision + pixel-shuffle connector + Qwen2 decoder.

Runs on CPU in a few seconds. With transformers installed it first writes two tiny random
checkpoints (a CLIPVisionModel and a Qwen2ForCausalLM) and assembles the variant from those
directories, exactly as you would from real ones; without transformers it assembles the same
variant from configs (random weights). Then it trains the connector for a few steps, decodes
greedily with the KV cache, saves the variant and loads it back.

    python examples/assemble_clip_qwen2.py [output_dir]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

import idefics3_kit as ik

CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=64, patch_size=16)  # a 4x4 patch grid
QWEN2 = dict(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)


def write_tiny_checkpoints(root: Path):
    """Tiny random transformers checkpoints; returns (vision_dir, decoder_dir) or None."""
    try:
        from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM
    except ImportError:
        return None
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**CLIP)).save_pretrained(root / "clip")
    Qwen2ForCausalLM(Qwen2Config(**QWEN2, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
                     ).save_pretrained(root / "qwen2")
    return root / "clip", root / "qwen2"


def main(out: Path) -> None:
    dirs = write_tiny_checkpoints(out)
    if dirs is not None:
        vision, decoder = dirs
        print(f"parts: {vision} (CLIPVisionModel), {decoder} (Qwen2ForCausalLM)")
    else:  # the same variant from configs, random weights
        vision, decoder = ik.ClipVisionConfig(**CLIP), ik.Qwen2DecoderConfig(**QWEN2, rope_theta=1e6)
        print("transformers not installed: building the parts from configs")

    # image_token_id=None appends an <image> token to the decoder's vocabulary (id = old vocab size)
    model = ik.VLM.from_parts(vision=vision, decoder=decoder,
                              connector=ik.ConnectorConfig(name="pixel_shuffle", scale_factor=2))
    cfg = model.config
    print(f"components: {cfg.component_names}; <image> id {cfg.image_token_id}; "
          f"{cfg.image_seq_len} image tokens per {cfg.vision.image_size}px tile; params {model.parameter_counts()}")

    # one 64x64 tile per sample -> 4 image tokens, then a 3-token caption to learn
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 1, 3, 64, 64, generator=g)  # [B, T, 3, S, S]
    image = torch.full((2, cfg.image_seq_len), cfg.image_token_id)
    ids = torch.cat([torch.full((2, 1), 1), image, torch.tensor([[5, 6, 7], [8, 9, 10]])], dim=1)
    labels = ids.clone()
    labels[:, : 1 + cfg.image_seq_len] = -100

    # train the connector only
    model.requires_grad_(False).connector.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(model.connector.parameters(), lr=3e-3)
    for step in range(10):
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (0, 9):
            print(f"step {step}: loss {loss.item():.3f}")
    model.eval()

    # greedy decoding with the decoder's KV cache: prefill with the image, then one token a step
    prompt = ids[:1, : 1 + cfg.image_seq_len]
    cache = model.decoder.new_cache(1, prompt.shape[1] + 5)
    with torch.no_grad():
        logits = model(input_ids=prompt, pixel_values=pixels[:1], cache=cache).logits
        new = []
        for _ in range(5):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            new.append(int(nxt))
            logits = model(input_ids=nxt, cache=cache).logits
    print(f"greedy continuation: {new}")

    # a variant saves and loads like any checkpoint; config.json records its component names
    model.save_pretrained(out / "variant")
    back = ik.VLM.from_pretrained(out / "variant")
    with torch.no_grad():
        same = torch.equal(back(input_ids=ids, pixel_values=pixels).logits,
                           model(input_ids=ids, pixel_values=pixels).logits)
    print(f"saved to {out / 'variant'}; reloaded logits identical: {same}")
    assert same


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
