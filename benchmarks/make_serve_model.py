"""A serving-benchmark checkpoint: the demo model with a SmolVLM-256M-sized decoder (random weights).

    python benchmarks/make_serve_model.py OUT_DIR
    python benchmarks/serve_load.py --model OUT_DIR --dtype bf16

The demo model's decoder has 2.6 M parameters, so its decode steps cost the same Python and
kernel-launch overhead whatever the batch, and batching gains little beyond sharing that. A real
decoder is bound by reading its weights, which a batch shares: this checkpoint keeps the demo's
processor, tokenizer and vision tower and gives it SmolVLM-256M's decoder shapes (30 layers,
hidden 576, 9 heads / 3 KV heads, intermediate 1536; the demo's 447-token vocabulary), with
random weights. Its answers are noise; its speed is a real model's.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from idefics3_kit import VLM, VLMConfig  # noqa: E402

DEMO = os.path.join(os.path.dirname(__file__), "..", "idefics3_kit", "recipes", "demo", "assets", "demo_model")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    config = VLMConfig.from_pretrained(DEMO)
    big = VLMConfig.preset("smolvlm-256m").decoder
    decoder = config.decoder.replace(hidden_size=big.hidden_size, intermediate_size=big.intermediate_size,
                                     num_hidden_layers=big.num_hidden_layers,
                                     num_attention_heads=big.num_attention_heads,
                                     num_key_value_heads=big.num_key_value_heads,
                                     head_dim=big.hidden_size // big.num_attention_heads)
    torch.manual_seed(0)
    model = VLM(config.replace(decoder=decoder))
    shutil.copytree(DEMO, out, dirs_exist_ok=True)  # processor, tokenizer, chat template
    model.save_pretrained(out)  # config.json and the weights replace the demo's
    params = sum(p.numel() for p in model.decoder.parameters())
    print(f"wrote {out}: decoder {params / 1e6:.1f} M parameters (SmolVLM-256M shapes, random weights)")


if __name__ == "__main__":
    main()
