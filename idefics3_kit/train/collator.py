"""Conversations -> right-padded training batches whose labels are the assistant's turns.

A conversation is rendered with the processor's chat template; an assistant turn is the text
between the conversation up to it rendered with the generation prompt and the conversation
through it (the template must extend a conversation turn by turn, as chat templates do). Tokens
whose characters start inside an assistant turn are labelled, everything else is -100: the
system and user turns, the images, the generation prompts. The processor reports each token's
place in the text (``return_offsets_mapping``), so nothing is tokenized twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..processing.images import image_size
from .data import Conversation, ConversationDataset, RecordError

IGNORE = -100


def chat_messages(question: str, answer: str | None = None) -> list[dict]:
    """A one-image question (and its answer) as chat messages."""
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    if answer is None:
        return [user]
    return [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


@dataclass
class Rendered:
    """A conversation as the model reads it: the text, whether the tokenizer adds its special
    tokens (not when the template already wrote the BOS), and the character spans of the
    assistant's turns."""

    text: str
    add_special_tokens: bool
    spans: list[tuple[int, int]]


def render(processor, conversation: Conversation) -> Rendered:
    messages = conversation.messages
    text = processor.apply_chat_template(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = processor.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = processor.apply_chat_template(messages[:i + 1])
        if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
            raise RecordError(f"{conversation.where}: the chat template does not extend the conversation turn by "
                              f"turn, so assistant turn {i} cannot be found in the rendered text",
                              reason="template does not extend turn by turn")
        spans.append((len(before), len(through)))
    return Rendered(text, not processor.template_writes_bos(text), spans)


def measure(processor, conversation: Conversation) -> tuple[int, int, int]:
    """(token length, index of the last image token or -1, index of the first assistant token) of
    a conversation, from the rendered text and the images' sizes alone (no pixel is decoded).
    Exact: an image's block starts and ends with special tokens, so the text around it tokenizes
    the same alone as in the whole."""
    rendered = render(processor, conversation)
    pieces = rendered.text.split(processor.image_token)
    if len(pieces) - 1 != len(conversation.images):
        raise RecordError(f"{conversation.where}: the chat template wrote {len(pieces) - 1} <image> tokens for "
                          f"{len(conversation.images)} images", reason="template and images disagree")
    tok = processor.tokenizer
    ids, offsets = tok.encodings([pieces[0]], rendered.add_special_tokens)
    length, last_image, consumed = len(ids[0]), -1, len(pieces[0])
    first_label = _first_in_spans(offsets[0], rendered.spans, 0, 0)
    for source, piece in zip(conversation.images, pieces[1:]):
        try:
            width, height = image_size(source)
        except ValueError as exc:
            raise RecordError(f"{conversation.where}: {exc}", reason="unreadable image") from None
        length += processor.plan(width, height).prompt_tokens
        last_image = length - 1
        consumed += len(processor.image_token)
        ids, offsets = tok.encodings([piece], False)
        if first_label < 0:
            first_label = _first_in_spans(offsets[0], rendered.spans, consumed, length)
        length += len(ids[0])
        consumed += len(piece)
    return length, last_image, first_label


def _first_in_spans(offsets, spans, char_base: int, token_base: int) -> int:
    for j, (start, end) in enumerate(offsets):
        if end > start and any(a <= char_base + start < b for a, b in spans):
            return token_base + j
    return -1


def measure_dataset(dataset: ConversationDataset, processor, max_length: int | None) -> None:
    """Set every conversation's token length (for length grouping) and drop, counted, those that
    ``max_length`` cannot take: the cut would fall inside an image's tokens, or no assistant
    token would remain. Bad records raise unless the dataset skips them."""
    kept, lengths = [], []
    for conversation in dataset.conversations:
        try:
            length, last_image, first_label = measure(processor, conversation)
        except RecordError as exc:
            if not dataset.skip_bad_records:
                raise
            dataset.count_skipped(exc.reason)
            continue
        if max_length is not None and length > max_length:
            if last_image >= max_length:
                dataset.count_skipped("max_length would cut through an image")
                continue
            if first_label < 0 or first_label >= max_length:
                dataset.count_skipped("no assistant token within max_length")
                continue
        kept.append(conversation)
        lengths.append(min(length, max_length) if max_length else length)
    if not kept:
        raise ValueError(f"{dataset.name}: no usable record (max_length={max_length}); skipped: {dataset.skipped}")
    dataset.conversations, dataset.lengths = kept, lengths


class ConversationCollator:
    """[(conversation, images)] -> {"inputs": model kwargs with labels, "skipped": {reason: n}}.

    Runs in the DataLoader's workers. ``inputs`` is None when every item of the micro-batch was
    skipped (an image that could not be decoded, with ``skip_bad_records``).
    """

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, items) -> dict:
        skipped: dict[str, int] = {}
        kept = []
        for conversation, images in items:
            if isinstance(images, RecordError):
                skipped[images.reason] = skipped.get(images.reason, 0) + 1
                continue
            kept.append((conversation, images, render(self.processor, conversation)))
        if not kept:
            return {"inputs": None, "skipped": skipped, "examples": 0}
        return {"inputs": self._batch(kept), "skipped": skipped, "examples": len(kept)}

    def _batch(self, kept) -> dict:
        proc = self.processor
        add_special = {r.add_special_tokens for _, _, r in kept}
        if len(add_special) != 1:
            raise RecordError("the conversations of one batch disagree on whether the template writes the BOS")
        images = [imgs for _, imgs, _ in kept]
        batch = proc(text=[r.text for _, _, r in kept], images=images if any(images) else None, padding=True,
                     padding_side="right", return_offsets_mapping=True, add_special_tokens=add_special.pop())
        ids, mask, offsets = batch["input_ids"], batch["attention_mask"], batch.pop("offset_mapping")
        labels = torch.full_like(ids, IGNORE)
        for row, (_, _, rendered) in enumerate(kept):
            start, end = offsets[row, :, 0], offsets[row, :, 1]
            inside = torch.zeros_like(start, dtype=torch.bool)
            for a, b in rendered.spans:
                inside |= (start >= a) & (start < b)
            take = inside & (end > start) & (mask[row] == 1) & (ids[row] != proc.image_token_id)
            labels[row, take] = ids[row, take]
        inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "pixel_values" in batch:
            inputs["pixel_values"] = batch["pixel_values"]
            inputs["pixel_attention_mask"] = batch["pixel_attention_mask"]
        if self.max_length is not None and ids.shape[1] > self.max_length:
            for key in ("input_ids", "attention_mask", "labels"):  # right padded: the end goes
                inputs[key] = inputs[key][:, :self.max_length]
        return inputs
