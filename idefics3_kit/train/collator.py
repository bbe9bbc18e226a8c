"""Examples (image, question, answer) -> right-padded training batches with answer-only labels."""

from __future__ import annotations

import torch


def chat_messages(question: str, answer: str | None = None) -> list[dict]:
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    if answer is None:
        return [user]
    return [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


class Collator:
    """Examples (image, question, answer) -> a right-padded training batch.

    Labels are -100 everywhere except the assistant's answer (and the end-of-utterance token
    that closes it), so the loss teaches answering, not predicting prompts or image tokens.
    The whole batch goes through the processor once; each row's answer tokens are found at
    its end (the text after the generation prompt, tokenized alone, must be the row's tail,
    which is checked).
    """

    def __init__(self, processor, pad_token_id: int | None = None):
        self.processor = processor
        self.pad_token_id = pad_token_id

    def answer_suffix(self, question: str, answer: str) -> str:
        proc = self.processor
        prompt = proc.apply_chat_template(chat_messages(question), add_generation_prompt=True)
        full = proc.apply_chat_template(chat_messages(question, answer))
        if not full.startswith(prompt):
            raise ValueError("the chat template does not extend the generation prompt with the answer")
        return full[len(prompt):]

    def __call__(self, examples) -> dict:
        proc = self.processor
        suffixes = [self.answer_suffix(e.question, e.answer) for e in examples]
        texts = [proc.apply_chat_template(chat_messages(e.question, e.answer)) for e in examples]
        batch = proc(text=texts, images=[[e.image] for e in examples], return_tensors="pt", padding=True,
                     padding_side="right")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(ids, -100)
        for i, suffix in enumerate(suffixes):
            answer_ids = torch.tensor(proc.tokenizer.encode(suffix, add_special_tokens=False), dtype=torch.long)
            end = int(mask[i].sum())
            start = end - answer_ids.shape[0]
            if not torch.equal(ids[i, start:end], answer_ids):
                raise ValueError(f"example {i}: the answer {suffix!r} does not tokenize the same inside the "
                                 "prompt; cannot mask labels")
            labels[i, start:end] = answer_ids
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "pixel_values": batch["pixel_values"], "pixel_attention_mask": batch["pixel_attention_mask"]}
