"""Checkpoint files: a config.json, a safetensors file or a tokenizer.json with bytes flipped,
cut or inserted either loads (the same model, or a changed value that is still a valid one) or
fails with an error naming the file."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import strategies as st

import idefics3_kit as ik
from idefics3_kit.processing import Processor
from idefics3_kit.recipes.demo.model import shipped_model_dir
from tests.fuzz.outcomes import fuzz, outcome

_CACHE: dict[str, str] = {}


def pristine() -> str:
    """A tiny checkpoint (model + processor), written once per process."""
    if "dir" not in _CACHE:
        folder = tempfile.mkdtemp(prefix="fuzz-ckpt-")
        torch.manual_seed(0)
        ik.VLM(ik.VLMConfig.preset("tiny")).save_pretrained(folder)
        for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                     "chat_template.jinja"):
            if os.path.exists(os.path.join(shipped_model_dir(), name)):
                shutil.copy(os.path.join(shipped_model_dir(), name), folder)
        _CACHE["dir"] = folder
    return _CACHE["dir"]


@st.composite
def damage(draw, size: int, header_bias: bool):
    """(edits, cut): byte edits (position, value) and an optional truncation point."""
    limit = min(size, 2000) if header_bias and draw(st.booleans()) else size
    edits = draw(st.lists(st.tuples(st.integers(0, limit - 1), st.integers(0, 255)), min_size=0, max_size=5))
    cut = draw(st.none() | st.integers(0, size))
    return edits, cut


def damaged_copy(name: str, edits, cut) -> str:
    folder = tempfile.mkdtemp(prefix="fuzz-case-")
    target = os.path.join(folder, "ckpt")
    shutil.copytree(pristine(), target)
    path = os.path.join(target, name)
    data = bytearray(open(path, "rb").read())
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[:cut]
    with open(path, "wb") as f:
        f.write(bytes(data))
    return target


def _size(name: str) -> int:
    return os.path.getsize(os.path.join(pristine(), name))


def check_file(name: str, load, case):
    edits, cut = case
    target = damaged_copy(name, edits, cut)
    try:
        outcome(lambda: load(target), names=(name, "config", "tensor"))
    finally:
        shutil.rmtree(os.path.dirname(target), ignore_errors=True)


def _cases(name: str, header_bias: bool):
    return st.deferred(lambda: damage(_size(name), header_bias))


def check_weights(case):
    check_file("model.safetensors", ik.VLM.from_pretrained, case)


def check_config(case):
    check_file("config.json", ik.VLM.from_pretrained, case)


def check_tokenizer(case):
    check_file("tokenizer.json", Processor.from_pretrained, case)


def check_preprocessor(case):
    check_file("preprocessor_config.json", Processor.from_pretrained, case)


test_weights_file, test_weights_file_full = fuzz(_cases("model.safetensors", True), fast=20, full=300)(check_weights)
test_config_file, test_config_file_full = fuzz(_cases("config.json", False), fast=20, full=300)(check_config)
test_tokenizer_file, test_tokenizer_file_full = fuzz(_cases("tokenizer.json", False), fast=10, full=150)(
    check_tokenizer)
test_preprocessor_file, test_preprocessor_file_full = fuzz(_cases("preprocessor_config.json", False), fast=15,
                                                           full=200)(check_preprocessor)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
@pytest.mark.parametrize("content", [b"", b"null", b"[]", b"\x00" * 16, b"{}" * 3])
def test_hand_written_file_contents(name, content):
    target = damaged_copy(name, [], 0)
    with open(os.path.join(target, name), "wb") as f:
        f.write(content)
    load = Processor.from_pretrained if name == "tokenizer.json" else ik.VLM.from_pretrained
    kind, _ = outcome(lambda: load(target), names=(name,))
    assert kind == "error"
    shutil.rmtree(os.path.dirname(target), ignore_errors=True)
