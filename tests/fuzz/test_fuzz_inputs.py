"""Model inputs and generate arguments: any shapes, dtypes and values give the forward's result
(finite logits of the right shape) or an error naming the argument."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import idefics3_kit as ik
from tests.fuzz.outcomes import fuzz, outcome

_MODEL = {}
NAMES = ("input_ids", "pixel_values", "pixel_attention_mask", "attention_mask", "labels", "position_ids", "<image>",
         "image", "inputs_embeds")


def model():
    if "m" not in _MODEL:
        torch.manual_seed(0)
        _MODEL["m"] = ik.VLM(ik.VLMConfig.preset("tiny")).eval()
    return _MODEL["m"]


dtypes = st.sampled_from([torch.long, torch.int32, torch.float32, torch.bool, torch.uint8, torch.bfloat16])


@st.composite
def tensors(draw, max_dims=5, max_side=4, special=()):
    shape = draw(st.lists(st.integers(0, max_side), min_size=0, max_size=max_dims))
    dtype = draw(dtypes)
    values = draw(st.sampled_from(["small", "vocab_edge", "negative", "nan", "image"] + list(special)))
    t = torch.randint(0, 8, shape).to(dtype) if dtype != torch.bool else torch.randint(0, 2, shape).bool()
    if values == "vocab_edge" and t.numel():
        t.view(-1)[0] = 511 if dtype not in (torch.bool, torch.uint8) else t.view(-1)[0]
    elif values == "negative" and t.numel() and dtype not in (torch.bool, torch.uint8):
        t.view(-1)[0] = -5
    elif values == "nan" and t.is_floating_point() and t.numel():
        t.view(-1)[0] = float("nan")
    elif values == "image" and t.numel() and dtype in (torch.long, torch.int32):
        t.view(-1)[0] = 300  # the tiny preset's <image> id
    return t


@st.composite
def forward_kwargs(draw):
    kw = {"input_ids": draw(st.one_of(st.none(), tensors(max_dims=3, max_side=5)))}
    if draw(st.booleans()):
        kw["attention_mask"] = draw(tensors(max_dims=3, max_side=5))
    if draw(st.booleans()):
        kw["labels"] = draw(tensors(max_dims=3, max_side=5, special=("ignored",)))
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(1, 1, 3, 64, 64), (1, 2, 3, 64, 64), (1, 1, 3, 32, 64), (1, 3, 64, 64),
                                      (0, 1, 3, 64, 64), (1, 1, 1, 64, 64)]))
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.uint8, torch.float16]))
        kw["pixel_values"] = torch.rand(shape).to(dtype)
    return kw


def check_forward(kw):
    m = model()
    with torch.no_grad():
        kind, out = outcome(lambda: m(**kw), names=NAMES)
    if kind == "ok":
        ids = kw["input_ids"]
        assert out.logits.shape[:2] == ids.shape[:2] and out.logits.shape[-1] == 512
        assert torch.isfinite(out.logits).all()
        if out.loss is not None:
            assert torch.isfinite(out.loss)


test_forward_inputs, test_forward_inputs_full = fuzz(forward_kwargs())(check_forward)


generate_kwargs = st.fixed_dictionaries(
    {"input_ids": tensors(max_dims=3, max_side=4)},
    optional={"attention_mask": tensors(max_dims=3, max_side=4), "max_new_tokens": st.integers(-2, 3) | st.none(),
              "do_sample": st.booleans(), "temperature": st.floats(allow_nan=True) | st.none(),
              "top_k": st.integers(-2, 600) | st.none(), "top_p": st.floats(allow_nan=True) | st.none(),
              "min_p": st.floats(-1, 2) | st.none(), "repetition_penalty": st.floats(allow_nan=True) | st.none(),
              "pad_token_id": st.integers(-3, 600) | st.none(), "eos_token_id": st.integers(-3, 600) | st.none(),
              "seed": st.integers(0, 3) | st.none()})


def check_generate(kw):
    kind, out = outcome(lambda: model().generate(**kw),
                        names=tuple(kw) + ("max_new_tokens", "temperature", "top_p", "prompt", "context"))
    if kind == "ok":
        assert not out.is_floating_point() and out.shape[0] == kw["input_ids"].shape[0]
        assert int(out.min()) >= 0 and int(out.max()) < 512


test_generate_arguments, test_generate_arguments_full = fuzz(generate_kwargs)(check_generate)
