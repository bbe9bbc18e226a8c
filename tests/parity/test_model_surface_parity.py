"""The model surface transformers users reach for, equal to transformers' on the same checkpoint."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity


def test_num_parameters_and_config_names(pair):
    hf, ours = pair
    assert ours.num_parameters() == hf.num_parameters()
    assert ours.num_parameters(exclude_embeddings=True) == hf.num_parameters(exclude_embeddings=True)
    for name in ("vocab_size", "hidden_size"):
        assert getattr(ours.config, name) == getattr(hf.config.text_config, name), name
    assert ours.config.model_type == hf.config.model_type
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert ours.get_input_embeddings().weight.shape == hf.get_input_embeddings().weight.shape


def test_tuple_indexing_of_outputs(pair):
    hf, ours = pair
    ids = torch.tensor([[4, 5, 6, 7, 8]])
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=ids)
        out = ours(input_ids=ids, labels=ids)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)  # the loss first, as transformers
    torch.testing.assert_close(out[1], ref[1], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids)[0], hf(input_ids=ids)[0], atol=1e-4, rtol=1e-4)
