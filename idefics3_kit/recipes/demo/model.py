"""The small demo VLM: its processor (a trained tokenizer plus small tiles) and its config.

Geometry: 48-px tiles, 8-px patches (a 6x6 grid), pixel shuffle by 2 -> 9 image tokens per
tile; images are resized to a longest edge of 96 px, so they split into up to 2x2 tiles plus
the global tile. The chat template is SmolVLM's (it starts with the literal ``<|im_start|>``
and the tokenizer adds no BOS).
"""

from __future__ import annotations

import os

import torch

from ... import registry
from ...components.splitter import SplitterConfig
from ...config import ConnectorConfig, DecoderConfig, VisionConfig, VLMConfig
from ...processing import Processor, TextTokenizer
from ...train.collator import chat_messages
from .synthetic import corpus_lines, make_example
from .tokenizer import END_OF_UTTERANCE, IM_START, PAD, special_tokens, train_tokenizer

SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

DEMO_GEOMETRY = {"tile": 48, "longest_edge": 96, "patch": 8, "scale": 2}


def shipped_model_dir() -> str:
    """Where the trained demo checkpoint lives inside the package."""
    return os.path.join(os.path.dirname(__file__), "assets", "demo_model")


def build_processor(out_dir: str, tile: int = 48, longest_edge: int = 96, image_seq_len: int = 9,
                    vocab_size: int = 512):
    """Train the tokenizer, assemble a Processor, save it to ``out_dir`` and load it back."""
    chat_lines = ["<|im_start|>User:<image>", "<end_of_utterance>\nAssistant: ", "User: Assistant:"]
    backend = train_tokenizer((corpus_lines() + chat_lines) * 50, vocab_size=vocab_size)
    tokenizer = TextTokenizer(backend, {
        "eos_token": END_OF_UTTERANCE, "pad_token": PAD, "bos_token": IM_START, "add_bos_token": False,
        "additional_special_tokens": special_tokens()[3:], "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    splitter = registry.create("splitter", "idefics3", SplitterConfig(longest_edge=longest_edge, tile_size=tile))
    processor = Processor(tokenizer, splitter, image_seq_len, SMOLVLM_CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)
    return Processor.from_pretrained(out_dir)


def demo_model_config(vocab_size: int, image_token_id: int, pad_id: int, eos_id: int) -> VLMConfig:
    g = DEMO_GEOMETRY
    return VLMConfig(
        vision=VisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                            image_size=g["tile"], patch_size=g["patch"]),
        connector=ConnectorConfig(scale_factor=g["scale"]),
        decoder=DecoderConfig(vocab_size=vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                              num_attention_heads=6, num_key_value_heads=2, rope_theta=10000.0,
                              max_position_embeddings=1024, pad_token_id=pad_id, eos_token_id=eos_id),
        image_token_id=image_token_id,
    )


# ---- using the trained model --------------------------------------------------------------------

HELD_OUT_SEED = 10_000_000  # training draws seeds from 0 upward; evaluation from here


def answer(model, processor, images, questions, max_new_tokens: int = 6) -> list[str]:
    """Greedy answers of ``model`` to one question per image (batched, left padded)."""
    prompts = [processor.apply_chat_template(chat_messages(q), add_generation_prompt=True) for q in questions]
    batch = processor(text=prompts, images=[[img] for img in images], return_tensors="pt", padding=True)
    with torch.inference_mode():
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    new = ids[:, batch["input_ids"].shape[1]:]
    return [text.strip() for text in processor.batch_decode(new.tolist(), skip_special_tokens=True)]


def evaluate(model, processor, count: int = 200, first_seed: int = HELD_OUT_SEED, batch_size: int = 50) -> dict:
    """Exact-match accuracy on ``count`` fresh synthetic examples, overall and per question kind."""
    examples = [make_example(first_seed + i) for i in range(count)]
    predictions = []
    for start in range(0, count, batch_size):
        chunk = examples[start:start + batch_size]
        predictions += answer(model, processor, [e.image for e in chunk], [e.question for e in chunk])
    per_kind: dict = {}
    for example, prediction in zip(examples, predictions):
        hits, total = per_kind.get(example.kind, (0, 0))
        per_kind[example.kind] = (hits + (prediction == example.answer), total + 1)
    correct = sum(h for h, _ in per_kind.values())
    return {"accuracy": correct / count, "correct": correct, "count": count,
            "per_kind": {k: h / t for k, (h, t) in sorted(per_kind.items())},
            "examples": list(zip(examples, predictions))}
