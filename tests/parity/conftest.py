"""Fixtures of the parity tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, our model) with identical random weights (tiny Idefics3, see test_generate_parity)."""
    transformers = pytest.importorskip("transformers")
    import idefics3_kit as ik
    from tests.parity.test_generate_parity import tiny_hf_config

    torch.manual_seed(0)
    hf = transformers.Idefics3ForConditionalGeneration(tiny_hf_config()).eval()
    path = tmp_path_factory.mktemp("tiny_idefics3")
    hf.save_pretrained(path)
    ours = ik.VLM.from_pretrained(path)
    return hf, ours
