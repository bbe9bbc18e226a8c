"""Processor behaviour that needs no transformers: errors, layouts, padding, truncation, plan, loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from hypothesis import given, settings
from hypothesis import strategies as st

import idefics3_kit as ik
from idefics3_kit import Processor, SplitterConfig, registry
from idefics3_kit.ops import preprocess as preprocess_op
from tests.processor_checkpoints import tiny_tokenizer
from tests.strategies import geometries, image_sizes

SMALL = SplitterConfig(longest_edge=96, tile_size=32)


@pytest.fixture(scope="module")
def proc() -> Processor:
    return Processor(tiny_tokenizer(), registry.create("splitter", "idefics3", SMALL), image_seq_len=3)


@pytest.fixture(scope="module")
def saved(proc, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("proc")
    proc.save_pretrained(path)
    return path


def img(w=20, h=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_repr_and_token_names(proc):
    assert repr(proc).startswith("Processor(longest_edge=96, tile_size=32, splitting=True, image_seq_len=3")
    assert proc.tokenizer.token_to_id(proc.image_token) == proc.image_token_id


def test_expansion_layout(proc):
    three = "<image>" * 3
    assert proc.expand_image(0, 0) == f"<fake_token_around_image><global-img>{three}<fake_token_around_image>"
    two_by_two = proc.expand_image(2, 2)
    assert two_by_two == (
        f"<fake_token_around_image><row_1_col_1>{three}<fake_token_around_image><row_1_col_2>{three}\n"
        f"<fake_token_around_image><row_2_col_1>{three}<fake_token_around_image><row_2_col_2>{three}\n"
        f"\n<fake_token_around_image><global-img>{three}<fake_token_around_image>")


def test_output_keys_shapes_and_left_padding(proc):
    batch = proc(text=["<image>In this image", "hello"], images=[[img()], []])
    assert isinstance(batch, ik.BatchFeature)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"}
    assert batch.pixel_values.shape == (2, 7, 3, 32, 32)  # 20×10 -> 96×48 -> 96×64: 2×3 + global
    assert batch.input_ids[0, 0] == proc.tokenizer.bos_token_id
    mask = batch.attention_mask[1]
    assert mask[0] == 0 and mask[-1] == 1 and batch.input_ids[1, 0] == proc.tokenizer.pad_token_id
    assert (batch.input_ids == proc.image_token_id).sum() == 7 * 3
    assert batch.image_plans[0][0].tiles == 7 and batch.image_plans[1] == []


def test_right_padding_and_lists(proc):
    out = proc(text=["a", "hello world"], padding_side="right", return_tensors=None)
    assert isinstance(out["input_ids"], list) and out["attention_mask"][0][-1] == 0
    unpadded = proc(text=["a", "hello world"], padding=False, return_tensors=None)
    assert len(unpadded["input_ids"][0]) < len(unpadded["input_ids"][1])
    with pytest.raises(ValueError, match="padding=True"):
        proc(text=["a", "hello world"], padding=False)
    assert proc(text=["a"], padding="max_length", max_length=9).input_ids.shape == (1, 9)
    assert proc(text=["a"], pad_to_multiple_of=8).input_ids.shape == (1, 8)


def test_batch_feature_to():
    batch = ik.BatchFeature(input_ids=torch.ones(1, 2, dtype=torch.long), pixel_values=torch.zeros(1, 1, 3, 2, 2))
    batch.to(torch.bfloat16)
    assert batch.pixel_values.dtype == torch.bfloat16 and batch.input_ids.dtype == torch.long
    assert batch.to("cpu").input_ids.device.type == "cpu"
    with pytest.raises(AttributeError):
        batch.nothing


@pytest.mark.parametrize("text,images,match", [
    (["<image>a", "b"], None, r"Found 1 <image> tokens in the text but no images"),
    (["a", "b"], [[img()], []], r"1 image\(s\) were passed but the text has no <image>"),
    (["<image>a", "<image><image>b"], [img(), img()], r"Found total 3 <image> tokens and 2 images"),
    (["<image>a", "<image><image>b"], [[img(), img()], [img()]],
     r"Found \[1, 2\] <image> tokens and \[2, 1\] images per sample"),
    (["<image>a"], [[img()], [img()]], r"Found total 1 <image> tokens and 2 images"),
    (None, None, "either `text` or `images`"),
    ([1, 2], None, "`text` must be a string"),
    ("<image>", [[img()], "x"], "sample 1 must be a list of images"),
    ("<image>", {"a": 1}, "images must be an image"),
])
def test_count_errors(proc, text, images, match):
    with pytest.raises(ValueError, match=match):
        proc(text=text, images=images)


def test_bad_image_is_named_and_nothing_is_processed(proc, monkeypatch):
    calls = []
    monkeypatch.setattr(preprocess_op, "preprocess_into", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"image 2 \(sample 1, position 1\): cannot decode"):
        proc(text=["<image>", "<image><image>"], images=[[img()], [img(), b"\x89PNG broken"]])
    with pytest.raises(ValueError, match=r"image 0 \(sample 0, position 0\) is empty"):
        proc(text="<image>", images=np.zeros((0, 4, 3), np.uint8))
    assert calls == []


def test_image_seq_len_per_call_must_match(proc):
    assert proc(text="<image>", images=img(), image_seq_len=3).input_ids.shape[1] > 0
    with pytest.raises(ValueError, match="image_seq_len=5 differs from this processor's 3"):
        proc(text="<image>", images=img(), image_seq_len=5)


def test_pixel_limit_per_call(proc):
    with pytest.raises(ValueError, match=r"image 0 \(sample 0, position 0\) has 200 pixels .* limit of 199"):
        proc(text="<image>", images=img(20, 10), max_pixels=199)


def test_truncation_that_cuts_image_tokens_is_refused(proc, monkeypatch):
    full = proc(text="hello <image> world", images=img()).input_ids.shape[1]
    calls = []
    with monkeypatch.context() as patch:
        patch.setattr(preprocess_op, "preprocess_into", lambda *a, **k: calls.append(1))
        with pytest.raises(ValueError, match=r"would cut image tokens of prompt 0.*need 21 <image> tokens"):
            proc(text="hello <image> world", images=img(), truncation=True, max_length=full - 4)
    assert calls == []  # refused before any pixel work
    kept = proc(text="<image> hello world", images=img(), truncation=True, max_length=full - 1)
    assert kept.input_ids.shape[1] == full - 1 and kept.input_ids[0, 0] == proc.tokenizer.bos_token_id
    assert proc.tokenizer.backend.truncation is None  # the shared tokenizer is never switched to truncating


def test_plan_agrees_with_processing(proc):
    image = img(45, 17, seed=4)
    plan = proc.plan(45, 17)
    assert plan == proc.plan(image)
    batch = proc(text="<image>", images=image, add_special_tokens=False)
    assert plan.image_tokens == (batch.input_ids == proc.image_token_id).sum() == plan.tiles * 3
    assert plan.prompt_tokens == batch.input_ids.shape[1]
    assert (plan.rows, plan.cols, plan.tiles) == (batch.image_plans[0][0].rows, batch.image_plans[0][0].cols,
                                                  batch.pixel_values.shape[1])


@settings(deadline=None, max_examples=25)
@given(size=image_sizes(80), geometry=geometries(max_tile=32, max_longest=96), seq_len=st.integers(1, 5))
def test_image_tokens_are_tiles_times_seq_len(proc, size, geometry, seq_len):
    longest, tile = geometry
    p = Processor(proc.tokenizer, proc.splitter, image_seq_len=seq_len)
    image = Image.fromarray(img(size[1], size[0], seed=size[0]))  # PIL: a 1×3 array would read as CHW
    batch = p(text="<image>", images=image, longest_edge=longest, tile_size=tile, add_special_tokens=False)
    plan = p.plan(size[1], size[0], longest_edge=longest, tile_size=tile)
    assert (batch.input_ids == p.image_token_id).sum() == plan.image_tokens == plan.tiles * seq_len
    assert batch.input_ids.shape[1] == plan.prompt_tokens and batch.pixel_values.shape[1] == plan.tiles


def test_overrides_change_the_plan(proc):
    assert proc.plan(45, 17, do_image_splitting=False).tiles == 1
    batch = proc(text="<image>", images=img(), max_image_size={"longest_edge": 16}, size={"longest_edge": 48})
    assert batch.pixel_values.shape[-1] == 16
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        proc(text="<image>", images=img(), colour="red")


def test_decode_skips_image_tokens(proc):
    batch = proc(text="<image>In this image", images=img())
    assert proc.batch_decode(batch.input_ids, skip_special_tokens=True)[0].endswith("In this image")
    assert "<global-img>" in proc.decode(batch.input_ids[0])


def test_save_and_load_round_trip(proc, saved):
    loaded = Processor.from_pretrained(saved)
    assert loaded.image_seq_len == 3 and loaded.splitter.config == SMALL
    texts, images = ["<image>In this image", "hello"], [[img()], []]
    a, b = proc(text=texts, images=images), loaded(text=texts, images=images)
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = Processor.from_pretrained(saved, image_seq_len=5, tile_size=16)
    assert changed.plan(20, 10).image_tokens == 5 * 19  # 48×96 in tiles of 16: 3×6 + 1


def test_no_bos_without_a_post_processor(tmp_path):
    proc = Processor(tiny_tokenizer(bos=False), registry.create("splitter", "idefics3", SMALL), image_seq_len=3)
    assert proc(text="hello").input_ids[0, 0] != proc.tokenizer.bos_token_id
    proc.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    loaded = Processor.from_pretrained(tmp_path)  # ignored like transformers 5.24: tokenizer.json decides
    assert loaded(text="hello").input_ids[0, 0] != loaded.tokenizer.bos_token_id


def test_chat_template_default_and_tokenize(proc):
    messages = [{"role": "user", "content": [{"type": "image", "image": img()},
                                             {"type": "text", "text": "What is this?"}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<s>User:<image>What is this?<end_of_utterance>\nAssistant:"
    ids = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids[0, 0] == proc.tokenizer.bos_token_id and ids[0, 1] != proc.tokenizer.bos_token_id
    batch = proc.apply_chat_template([messages, messages], tokenize=True, return_dict=True)
    assert batch.pixel_values.shape[0] == 2
    assert proc.apply_chat_template([{"role": "user", "content": "plain"}]) == "<s>User: plain<end_of_utterance>\n"
    as_lists = proc.apply_chat_template(messages, tokenize=True, return_tensors=None, padding=False)
    assert isinstance(as_lists, list) and as_lists[0][0] == proc.tokenizer.bos_token_id


def test_chat_template_errors(proc):
    with pytest.raises(ValueError, match="does not parse"):
        proc.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")
    with pytest.raises(ValueError, match="chat template failed: nope"):
        proc.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ raise_exception('nope') }}")
    with pytest.raises(ValueError, match="message 0 must be a dict"):
        proc.apply_chat_template(["hello"])


def _copy(saved: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in saved.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_from_pretrained_errors_name_the_file(saved, tmp_path):
    with pytest.raises(ValueError, match="folder not found"):
        Processor.from_pretrained(tmp_path / "missing")
    no_tok = _copy(saved, tmp_path / "a")
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json not found in"):
        Processor.from_pretrained(no_tok)
    bad_tok = _copy(saved, tmp_path / "b")
    (bad_tok / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"tokenizer.json could not be loaded: .*b/tokenizer.json"):
        Processor.from_pretrained(bad_tok)
    bad_cfg = _copy(saved, tmp_path / "c")
    (bad_cfg / "processor_config.json").write_text("[1,")
    with pytest.raises(ValueError, match=r"c/processor_config.json: not valid JSON"):
        Processor.from_pretrained(bad_cfg)
    no_image = _copy(saved, tmp_path / "d")
    (no_image / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="no image settings"):
        Processor.from_pretrained(no_image)
    bad_tok_cfg = _copy(saved, tmp_path / "e")
    (bad_tok_cfg / "tokenizer_config.json").write_text(json.dumps(["list"]))
    with pytest.raises(ValueError, match="tokenizer_config.json: must hold a JSON object"):
        Processor.from_pretrained(bad_tok_cfg)
