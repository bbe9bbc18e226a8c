"""Streaming: incremental detokenization never emits a broken character; iterator and callback forms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

tokenizers = pytest.importorskip("tokenizers")

import idefics3_kit as ik  # noqa: E402
from idefics3_kit.streaming import IncrementalDetokenizer, TextStreamer  # noqa: E402

CORPUS = ["héllo wörld, ça va? naïve café", "日本語のテキストです", "emoji 🙂🚀🎉 and 👍🏽 too",
          "plain ascii words for merges: the cat sat on the mat", "Ελληνικά και русский текст"] * 5


@pytest.fixture(scope="module")
def tok():
    """A tiny byte-level BPE: multi-byte characters span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<end_of_utterance>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(CORPUS, trainer)
    return t


def stream_all(tok, ids):
    d = IncrementalDetokenizer(tok)
    chunks = [d.push(i) for i in ids]
    chunks.append(d.flush())
    return [c for c in chunks if c]


def test_fixture_splits_characters_over_tokens(tok):
    ids = tok.encode("🚀").ids
    assert len(ids) > 1 and "\ufffd" in tok.decode(ids[:1])


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab çé日本🙂🚀👍🏽Ωж \n")), max_size=40))
def test_stream_equals_full_decode_and_never_breaks_a_character(tok, text):
    ids = tok.encode(text).ids
    chunks = stream_all(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)


def test_special_tokens_are_skipped(tok):
    eou = tok.token_to_id("<end_of_utterance>")
    ids = tok.encode("café 🙂").ids + [eou]
    assert "".join(stream_all(tok, ids)) == "café 🙂"


# ---- through the model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ik.VLMConfig.preset("tiny")
    # one id past the tokenizer's for <image>: text prompts never hold it (an <image> without pixels is an error)
    vocab = tok.get_vocab_size() + 1
    cfg = cfg.replace(decoder=cfg.decoder.replace(vocab_size=vocab, eos_token_id=1, pad_token_id=0),
                      image_token_id=vocab - 1)
    return ik.VLM(cfg).eval()


def test_model_stream_iterator_matches_generate(model, tok):
    ids = torch.tensor([tok.encode("emoji 🙂 café").ids])
    out = model.generate(input_ids=ids, max_new_tokens=40, do_sample=True, temperature=1.3, seed=3)
    new = out[0, ids.shape[1]:].tolist()
    chunks = list(model.stream(tok, input_ids=ids, max_new_tokens=40, do_sample=True, temperature=1.3, seed=3))
    # random weights emit invalid byte sequences too, whose U+FFFD is in the full decode as well; the
    # guarantee is that nothing emitted is ever revised: the pieces add up to the full decode
    assert "".join(chunks) == tok.decode(new)
    assert not any(c.endswith("\ufffd") for c in chunks[:-1])
    assert len(chunks) > 1


def test_callback_form(model, tok):
    ids = torch.tensor([tok.encode("héllo").ids])
    pieces = []
    out = model.generate(input_ids=ids, max_new_tokens=25, streamer=TextStreamer(tok, pieces.append))
    assert "".join(pieces) == tok.decode(out[0, ids.shape[1]:].tolist())


def test_stream_refuses_a_batch(model, tok):
    ids = torch.tensor([tok.encode("ab").ids] * 2)
    with pytest.raises(ValueError, match="batch size 1"):
        next(model.stream(tok, input_ids=ids, max_new_tokens=3))


def test_processor_like_object_is_accepted(tok):
    class Proc:
        tokenizer = tok

    assert "".join(stream_all(Proc(), tok.encode("日本").ids)) == "日本"
