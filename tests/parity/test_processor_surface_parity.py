"""The processor's and tokenizer's transformers surface, compared with transformers: continue_final_message,
return_tensors="np", nested kwargs, the positional (images, text) order, row/col info, and the
tokenizer calls tools like TRL make (call, pad, convert, special tokens, chat template, save)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from idefics3_kit.processing import Processor  # noqa: E402
from tests.processor_checkpoints import gradient_image, hf_processor, make_checkpoint  # noqa: E402

pytestmark = pytest.mark.parity

CONVERSATION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A cat sitting"}]}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("proc"), image_seq_len=3)
    return Processor.from_pretrained(path), hf_processor(path), path


def test_continue_final_message_equals_transformers(pair):
    ours, hf, _ = pair
    theirs = hf.apply_chat_template(CONVERSATION, continue_final_message=True)
    assert ours.apply_chat_template(CONVERSATION, continue_final_message=True) == theirs
    assert theirs.endswith("A cat sitting")
    with pytest.raises(ValueError, match="not compatible"):
        ours.apply_chat_template(CONVERSATION, continue_final_message=True, add_generation_prompt=True)


def test_tokenized_chat_with_options_equals_transformers(pair):
    ours, hf, _ = pair
    image = gradient_image(120, 90)
    conv = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe."}]}]
    a = ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
    b = hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"):
        assert torch.equal(a[key], torch.as_tensor(b[key])), key


def test_return_tensors_np(pair):
    ours, hf, _ = pair
    image = gradient_image(200, 120)
    a = ours(text=["<image>Hi there"], images=[[image]], return_tensors="np")
    b = hf(text=["<image>Hi there"], images=[[image]], return_tensors="np")
    for key in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"):
        assert isinstance(a[key], np.ndarray) and a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="'pt', 'np' or None"):
        ours(text="hi", return_tensors="tf")


def test_positional_images_text_order_nested_kwargs_and_row_col_info(pair):
    ours, hf, _ = pair
    image = gradient_image(800, 300)
    a = ours([image], "<image>Hi", images_kwargs={"do_image_splitting": True}, text_kwargs={"padding": True},
             return_row_col_info=True)
    b = hf(images=[image], text="<image>Hi", return_tensors="pt")
    assert torch.equal(a["input_ids"], torch.as_tensor(b["input_ids"]))
    # transformers' image processor gives rows/cols; its processor drops them, ours returns them when asked
    info = hf.image_processor(images=[[image]], return_row_col_info=True)
    assert a["rows"] == info["rows"] and a["cols"] == info["cols"]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(do_rescale=False), ValueError, "do_rescale=False is not supported"),
    (dict(resample=3), ValueError, "resample=3"),
    (dict(colour="red"), TypeError, "unexpected keyword argument 'colour'"),
])
def test_unsupported_or_unknown_call_arguments_are_named(pair, kwargs, error, match):
    ours, _, _ = pair
    with pytest.raises(error, match=match):
        ours(text="<image>hi", images=[gradient_image(40, 40)], **kwargs)


def test_apply_chat_template_keywords_go_where_transformers_sends_them(pair):
    ours, _, _ = pair
    text_only = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    with pytest.raises(TypeError, match="padding_sid"):  # not a template variable, not a call argument
        ours.apply_chat_template(text_only, tokenize=True, padding_sid="left")
    assert ours.apply_chat_template(text_only, tokenize=True, padding_side="left").shape[0] == 1
    with pytest.raises(ValueError, match="return_assistant_tokens_mask=True is not supported"):
        ours.apply_chat_template(CONVERSATION, tokenize=True, return_assistant_tokens_mask=True)


# ---- the tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_call_pad_and_conversions_equal_transformers(pair):
    ours, hf, _ = pair
    tok, ref = ours.tokenizer, hf.tokenizer
    texts = ["In this image, we see a cat.", "Hi"]
    assert tok("a dog")["input_ids"] == ref("a dog")["input_ids"]
    a = tok(texts, padding=True, return_tensors="pt")
    b = ref(texts, padding=True, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert tok.convert_tokens_to_ids("<image>") == ref.convert_tokens_to_ids("<image>")
    assert tok.convert_tokens_to_ids(["<image>", "<end_of_utterance>"]) == \
        ref.convert_tokens_to_ids(["<image>", "<end_of_utterance>"])
    ids = a["input_ids"][0].tolist()
    assert tok.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert tok.tokenize("a cat sat") == ref.tokenize("a cat sat")
    for name in ("bos_token", "eos_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(tok, name) == getattr(ref, name), name
    assert len(tok) == len(ref)
    padded = tok.pad([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], return_tensors="pt")
    ref_padded = ref.pad([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], return_tensors="pt")
    assert torch.equal(padded["input_ids"], ref_padded["input_ids"])
    assert torch.equal(padded["attention_mask"], ref_padded["attention_mask"])


def test_tokenizer_save_and_hand_out_transformers(pair, tmp_path):
    ours, hf, _ = pair
    ours.tokenizer.save_pretrained(tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("a cat")["input_ids"] == hf.tokenizer("a cat")["input_ids"]
    fast = ours.tokenizer.to_transformers()
    assert isinstance(fast, transformers.PreTrainedTokenizerFast)
    assert fast("a cat")["input_ids"] == hf.tokenizer("a cat")["input_ids"]
    assert fast.pad_token == hf.tokenizer.pad_token


def test_tokenizer_chat_template(pair):
    ours, hf, _ = pair
    tok = ours.tokenizer
    tok.chat_template = ours.template
    text_only = [{"role": "user", "content": "Hello"}]
    assert tok.apply_chat_template(text_only, tokenize=False, add_generation_prompt=True) == \
        hf.apply_chat_template(text_only, add_generation_prompt=True)
    ids = tok.apply_chat_template(text_only, add_generation_prompt=True)
    assert ids == hf.tokenizer(hf.apply_chat_template(text_only, add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"]
