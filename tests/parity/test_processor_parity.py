"""Processor parity with transformers' Idefics3Processor (PIL backend): ids, masks, bit-equal pixels.

Checkpoints are built by transformers itself (tests/processor_checkpoints.py). The worked examples of
reference §1.12 run at the three real geometries, one image per call (a 17-tile 512² image is 53 MB
of float32; a padded batch of seven would be 370 MB), and their sums and hashes are checked against
the table too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from idefics3_kit import Processor
from tests.processor_checkpoints import (REAL_GEOMETRIES, gradient_image, hf_processor, make_checkpoint,
                                         noise_image, split_legacy_layout)

pytestmark = pytest.mark.parity

# (W, H) -> (tiles, float64 sum, first 16 hex of sha256) from reference §1.12, per geometry
WORKED = {
    "idefics3": {(1600, 900): (13, -13292.517633, "e0d33eb3fd778d04"),
                 (900, 1600): (13, -13307.992144, "29a1e5f11ba16340"),
                 (300, 300): (17, -18144.706865, "537ac394ec7794e4"),
                 (2000, 100): (5, -4977.585412, "976ee63a5e82aef3"),
                 (100, 2000): (5, -4977.585412, "2962819b04bc147b"),
                 (640, 480): (13, -13451.020039, "8cd767ce83a7fb8c"),
                 (1, 1): (17, None, None)},
    "smolvlm": {(1600, 900): (13, -14871.348005, "dff71815c03f1ea9"),
                (900, 1600): (13, None, None),
                (300, 300): (17, -20150.617396, "e74cd3508d25633f"),
                (2000, 100): (5, -5392.138889, "76a8e00b996e56b1"),
                (100, 2000): (5, None, None),
                (640, 480): (13, None, None),
                (1, 1): (17, None, None)},
    "smolvlm256m": {(1600, 900): (13, -26414.002288, "ef1b14cc18dc15e1"),
                    (900, 1600): (13, -26413.547380, "e6bd8b1d0380bd50"),
                    (300, 300): (17, -35579.243439, "11a08bb7949f5327"),
                    (2000, 100): (5, -9461.257708, "41b549a660bcc333"),
                    (100, 2000): (5, -9446.183197, "f68082cfa0f58e91"),
                    (640, 480): (13, None, None),
                    (1, 1): (17, None, None)},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Factory of checkpoint dirs, one per distinct setting, built once per module."""
    cache = {}

    def get(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            cache[key] = make_checkpoint(tmp_path_factory.mktemp("ckpt"), **kwargs)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def real_pair(checkpoints):
    """(ours, transformers') processors per real geometry, with the real image_seq_len."""
    pairs = {}

    def get(name):
        if name not in pairs:
            longest, tile, seq_len = REAL_GEOMETRIES[name]
            path = checkpoints(longest_edge=longest, tile=tile, image_seq_len=seq_len)
            pairs[name] = (Processor.from_pretrained(path), hf_processor(path))
        return pairs[name]

    return get


def assert_same(ours, theirs, keys=("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")):
    for key in keys:
        assert key in ours, key
        a, b = ours[key], torch.as_tensor(theirs[key])
        assert a.shape == b.shape, (key, a.shape, b.shape)
        assert a.dtype == b.dtype, (key, a.dtype, b.dtype)
        assert torch.equal(a, b), key  # bit-equal, pixels included


def sha16(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("geometry", list(WORKED))
@pytest.mark.parametrize("size", list(WORKED["idefics3"]), ids=lambda s: f"{s[0]}x{s[1]}")
def test_worked_examples(real_pair, geometry, size):
    ours, hf = real_pair(geometry)
    image = gradient_image(*size)
    prompt = "<image>In this image, we see"
    mine = ours(text=prompt, images=image)
    theirs = hf(text=prompt, images=image, return_tensors="pt")
    assert_same(mine, theirs)
    tiles, total, digest = WORKED[geometry][size]
    pixels = mine["pixel_values"].numpy()
    assert pixels.shape == (1, tiles, 3, ours.splitter.tile_size, ours.splitter.tile_size)
    assert (mine["input_ids"] == ours.image_token_id).sum() == tiles * ours.image_seq_len
    if total is not None:
        assert round(float(pixels.astype(np.float64).sum()), 6) == pytest.approx(total, abs=2e-6)
        assert sha16(pixels) == digest


def test_plan_matches_the_worked_examples(real_pair):
    ours, _ = real_pair("smolvlm256m")
    p = ours.plan(1600, 900)
    assert (p.resized, p.grid_size, p.rows, p.cols, p.tiles) == ((1152, 2048), (1536, 2048), 3, 4, 13)
    assert p.image_tokens == 13 * 64


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "P_transparency", "L", "CMYK", "1"])
def test_modes(checkpoints, mode):
    path = checkpoints(longest_edge=96, tile=32)
    base = noise_image(37, 23, seed=3, mode="RGBA" if mode in ("RGBA", "P_transparency") else "RGB")
    if mode == "P_transparency":
        image = base.convert("RGB").convert("P")
        image.info["transparency"] = 5
    elif mode == "LA":
        image = noise_image(37, 23, seed=4, mode="LA")
    else:
        image = base.convert(mode)
    prompt = "<image>x"
    assert_same(Processor.from_pretrained(path)(text=prompt, images=image),
                hf_processor(path)(text=prompt, images=image, return_tensors="pt"))


def test_rgba_at_a_real_geometry(real_pair):
    ours, hf = real_pair("idefics3")
    image = noise_image(50, 40, seed=5, mode="RGBA")
    assert_same(ours(text="<image>", images=image), hf(text="<image>", images=image, return_tensors="pt"))


def _array_inputs():
    rgb = np.asarray(noise_image(29, 17, seed=6))
    rgba = np.asarray(noise_image(29, 17, seed=7, mode="RGBA"))
    return {"hwc": rgb, "chw": np.ascontiguousarray(rgb.transpose(2, 0, 1)), "hwc4": rgba,
            "chw4": np.ascontiguousarray(rgba.transpose(2, 0, 1)), "hw1": rgb[:, :, :1].copy(),
            "torch_chw": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))}


@pytest.mark.parametrize("kind", list(_array_inputs()))
def test_array_inputs(checkpoints, kind):
    path = checkpoints(longest_edge=96, tile=32)
    image = _array_inputs()[kind]
    assert_same(Processor.from_pretrained(path)(text="<image>", images=image),
                hf_processor(path)(text="<image>", images=image, return_tensors="pt"))


def test_plain_2d_grayscale_equals_the_references_hw1(checkpoints):
    """The reference refuses [H, W]; we take it as the [H, W, 1] it does accept."""
    path = checkpoints(longest_edge=96, tile=32)
    gray = np.asarray(noise_image(29, 17, seed=8, mode="L"))
    assert_same(Processor.from_pretrained(path)(text="<image>", images=gray),
                hf_processor(path)(text="<image>", images=gray[:, :, None], return_tensors="pt"))


@pytest.mark.parametrize("flavour", ["llama", "smol"])
def test_batch_with_different_image_counts(checkpoints, flavour):
    path = checkpoints(flavour=flavour, longest_edge=96, tile=32, image_seq_len=5)
    a, b, c = noise_image(60, 30, 1), noise_image(20, 70, 2), noise_image(33, 33, 3)
    texts = ["<image>In this image, we see", "bla, bla<image><image>", "no image here"]
    images = [[a], [b, c], []]
    mine = Processor.from_pretrained(path)(text=texts, images=images)
    theirs = hf_processor(path)(text=texts, images=images, return_tensors="pt", padding=True)
    assert_same(mine, theirs)
    assert all(row == sorted(row) for row in mine["attention_mask"].tolist())  # left padding
    assert mine["pixel_attention_mask"][2].sum() == 0 and mine["pixel_values"][2].abs().sum() == 0


def test_flat_image_list_is_shared_out_by_prompt(checkpoints):
    path = checkpoints(longest_edge=96, tile=32)
    images = [noise_image(40, 30, 1), noise_image(30, 40, 2), noise_image(10, 10, 3)]
    texts = ["<image>one", "two<image> and <image>"]
    assert_same(Processor.from_pretrained(path)(text=texts, images=images),
                hf_processor(path)(text=texts, images=images, return_tensors="pt", padding=True))


def test_no_split_mode(checkpoints):
    path = checkpoints(longest_edge=96, tile=32, splitting=False)
    images = [[noise_image(60, 30, 1)], [noise_image(20, 70, 2), noise_image(5, 5, 3)]]
    texts = ["<image>a", "<image>b<image>"]
    mine = Processor.from_pretrained(path)(text=texts, images=images)
    assert_same(mine, hf_processor(path)(text=texts, images=images, return_tensors="pt", padding=True))
    assert mine["pixel_values"].shape == (2, 2, 3, 32, 32)


def test_per_call_overrides(checkpoints):
    path = checkpoints(longest_edge=96, tile=32)
    image = noise_image(60, 30, 1)
    kwargs = dict(do_image_splitting=False, max_image_size={"longest_edge": 16}, size={"longest_edge": 48})
    assert_same(Processor.from_pretrained(path)(text="<image>", images=image, **kwargs),
                hf_processor(path)(text="<image>", images=image, return_tensors="pt", **kwargs))


def test_add_special_tokens_false_and_right_padding(checkpoints):
    path = checkpoints(longest_edge=96, tile=32)
    hf = hf_processor(path)
    hf.tokenizer.padding_side = "right"
    texts, images = ["<image>a b c d e f", "<image>"], [[noise_image(9, 9, 1)], [noise_image(9, 19, 2)]]
    mine = Processor.from_pretrained(path)(text=texts, images=images, add_special_tokens=False, padding_side="right")
    assert_same(mine, hf(text=texts, images=images, add_special_tokens=False, return_tensors="pt", padding=True))


def test_text_only_and_images_only(checkpoints):
    path = checkpoints(longest_edge=96, tile=32)
    ours, hf = Processor.from_pretrained(path), hf_processor(path)
    texts = ["hello world", "In this image"]
    mine = ours(text=texts)
    assert set(mine) == {"input_ids", "attention_mask"}
    assert_same(mine, hf(text=texts, return_tensors="pt", padding=True), keys=("input_ids", "attention_mask"))
    image = noise_image(30, 20, 1)
    only = ours(images=[image, image])
    assert set(only) == {"pixel_values", "pixel_attention_mask"}
    assert_same(only, hf(images=[image, image], return_tensors="pt"), keys=("pixel_values", "pixel_attention_mask"))


def test_truncation_of_text_only_matches(checkpoints):
    path = checkpoints(longest_edge=96, tile=32)
    text = ["<image>In this image, we see a cat sitting on a red chair"]
    image = noise_image(20, 20, 1)
    ours = Processor.from_pretrained(path)
    full = ours(text=text, images=image)["input_ids"].shape[1]
    mine = ours(text=text, images=image, truncation=True, max_length=full - 3)
    theirs = hf_processor(path)(text=text, images=image, truncation=True, max_length=full - 3, return_tensors="pt")
    assert_same(mine, theirs)


def test_legacy_layout_and_json_template(checkpoints, tmp_path):
    path = make_checkpoint(tmp_path / "legacy", longest_edge=96, tile=32, template_layout="json")
    split_legacy_layout(path)
    image = noise_image(30, 20, 1)
    ours, hf = Processor.from_pretrained(path), hf_processor(path)
    assert_same(ours(text="<image>x", images=image), hf(text="<image>x", images=image, return_tensors="pt"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages)


CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
    [{"role": "user", "content": [{"type": "text", "text": "What do these images show?"}, {"type": "image"},
                                  {"type": "image"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "The first image shows the statue of Liberty in "
                                        "New York. The second image picture depicts Idefix, the dog of Obelix "
                                        "in Asterix and Obelix."}]},
     {"role": "user", "content": [{"type": "text", "text": "And who is that?"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
     {"role": "user", "content": [{"type": "image", "url": None}, {"type": "text", "text": "Hi\n\nthere"}]}],
]


@pytest.mark.parametrize("layout", ["jinja", "json", "tokenizer"])
@pytest.mark.parametrize("flavour", ["llama", "smol"])
def test_chat_template_strings(checkpoints, layout, flavour):
    path = checkpoints(flavour=flavour, longest_edge=96, tile=32, template_layout=layout)
    ours, hf = Processor.from_pretrained(path), hf_processor(path)
    # transformers' processor does not fall back to the tokenizer's template; we do
    source = {"chat_template": hf.tokenizer.chat_template} if layout == "tokenizer" else {}
    for conversation in CONVERSATIONS:
        for generation_prompt in (False, True):
            expected = hf.apply_chat_template(conversation, add_generation_prompt=generation_prompt, **source)
            assert ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt) == expected
    expected = ("<|begin_of_text|>User: What do these images show?<image><image><end_of_utterance>\nAssistant: The "
                "first image shows the statue of Liberty in New York. The second image picture depicts Idefix, the "
                "dog of Obelix in Asterix and Obelix.<end_of_utterance>\nUser: And who is that?<end_of_utterance>\n"
                "Assistant:")
    if flavour == "smol":
        expected = expected.replace("<|begin_of_text|>", "<|im_start|>")
    assert ours.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True) == expected


def test_builtin_template_renders_like_transformers_after_save(checkpoints, tmp_path):
    path = checkpoints(longest_edge=96, tile=32, template=None, template_layout="none")
    ours = Processor.from_pretrained(path)
    assert ours.chat_template is None
    ours.save_pretrained(tmp_path / "saved")
    hf = hf_processor(tmp_path / "saved")
    for conversation in CONVERSATIONS:
        assert ours.apply_chat_template(conversation, add_generation_prompt=True) == \
            hf.apply_chat_template(conversation, add_generation_prompt=True)
    assert ours.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True) == \
        "<|begin_of_text|>User:<image>What is this?<end_of_utterance>\nAssistant:"


def test_double_bos_and_tokenized_chat_template(checkpoints):
    path = checkpoints(longest_edge=96, tile=32)
    ours, hf = Processor.from_pretrained(path), hf_processor(path)
    image = noise_image(30, 20, 1)
    conversation = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": "What is this?"}]}]
    prompt = ours.apply_chat_template(conversation, add_generation_prompt=True)
    bos = ours.tokenizer.bos_token_id
    doubled = ours(text=prompt, images=image)["input_ids"][0]
    assert doubled[:2].tolist() == [bos, bos]  # the reference's double BOS (§2.4), reproduced
    assert torch.equal(doubled, torch.as_tensor(hf(text=prompt, images=image, return_tensors="pt")["input_ids"][0]))
    mine = ours.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    theirs = hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    return_tensors="pt")
    assert mine["input_ids"][0, :2].tolist() != [bos, bos]
    assert_same(mine, theirs)


def test_save_pretrained_round_trip(checkpoints, tmp_path):
    path = checkpoints(flavour="smol", longest_edge=96, tile=32, image_seq_len=4)
    ours = Processor.from_pretrained(path)
    ours.save_pretrained(tmp_path / "saved")
    names = {p.name for p in (tmp_path / "saved").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
            "chat_template.jinja"} <= names
    texts, images = ["<image>a", "b<image><image>"], [[noise_image(40, 20, 1)], [noise_image(9, 9, 2)] * 2]
    hf = hf_processor(tmp_path / "saved")
    assert hf.image_seq_len == 4
    expected = hf_processor(path)(text=texts, images=images, return_tensors="pt", padding=True)
    assert_same(hf(text=texts, images=images, return_tensors="pt", padding=True), expected)
    assert_same(Processor.from_pretrained(tmp_path / "saved")(text=texts, images=images), expected)


def test_batch_decode(checkpoints):
    path = checkpoints(longest_edge=96, tile=32)
    ours, hf = Processor.from_pretrained(path), hf_processor(path)
    ids = ours(text=["<image>In this image, we see", "a cat"], images=[[noise_image(9, 9, 1)], []])["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == hf.batch_decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("flavour,add_bos", [("llama", False), ("smol", True)])
def test_add_bos_token_in_tokenizer_config(tmp_path, flavour, add_bos):
    """transformers 5.24 ignores tokenizer_config.json's add_bos_token when tokenizer.json exists; so do we."""
    import json

    path = make_checkpoint(tmp_path / "c", flavour=flavour, longest_edge=96, tile=32)
    config_file = tmp_path / "c" / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "add_bos_token": add_bos}))
    ours, hf = Processor.from_pretrained(path), hf_processor(path)
    texts, images = ["<image>In this image", "hello"], [[noise_image(20, 10, 1)], []]
    mine = ours(text=texts, images=images)
    assert_same(mine, hf(text=texts, images=images, return_tensors="pt", padding=True))
    assert (mine["input_ids"][0, 0] == ours.tokenizer.bos_token_id) == (flavour == "llama")


def test_a_processor_built_without_transformers_loads_in_transformers(tmp_path):
    from idefics3_kit import SplitterConfig, registry
    from tests.processor_checkpoints import tiny_tokenizer

    splitter = registry.create("splitter", "idefics3", SplitterConfig(longest_edge=64, tile_size=32))
    ours = Processor(tiny_tokenizer(), splitter, image_seq_len=2)
    ours.save_pretrained(tmp_path)
    hf = hf_processor(tmp_path)
    texts, images = ["<image>In this image", "hello world"], [[noise_image(20, 10, 1)], []]
    assert_same(ours(text=texts, images=images), hf(text=texts, images=images, return_tensors="pt", padding=True))
    conversation = CONVERSATIONS[0]
    assert ours.apply_chat_template(conversation, add_generation_prompt=True) == \
        hf.apply_chat_template(conversation, add_generation_prompt=True)


def test_file_paths_load_like_transformers(checkpoints, tmp_path):
    """Paths: EXIF orientation applied and alpha dropped (transformers' load_image), photos included."""
    from PIL import Image

    path = checkpoints(longest_edge=96, tile=32)
    ours, hf = Processor.from_pretrained(path), hf_processor(path)
    rgba = tmp_path / "rgba.png"
    noise_image(30, 20, seed=9, mode="RGBA").save(rgba)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    noise_image(40, 20, seed=10).save(rotated, exif=exif)
    cat = str(Path(__file__).parents[1] / "data" / "chelsea.png")
    files = [str(rgba), str(rotated), cat]
    texts = ["<image>a", "<image>b", "<image>c"]
    mine = ours(text=texts, images=files)
    assert_same(mine, hf(text=texts, images=files, return_tensors="pt", padding=True))
    assert (ours.plan(str(rotated)).width, ours.plan(str(rotated)).height) == (20, 40)
    assert mine.image_plans[1][0].height == 40
