"""The rest of transformers' generate, compared with transformers on a tiny random checkpoint:
beam search (ids, scores, beam indices), return_dict_in_generate (scores and logits), stop_strings,
user logits processors and stopping criteria, GenerationConfig objects, use_cache=False,
streamers that get the prompt first, num_return_sequences, and the repetition penalty on a
left-padded batch."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.parity.test_generate_parity import PAD, hf_generate, image_tokens, left_pad, pixels  # noqa: E402

pytestmark = pytest.mark.parity


def image_batch(ours, seed=2):
    g = torch.Generator().manual_seed(seed)
    s = ours.image_seq_len
    rows = [[7, 8] + image_tokens(1, s) + [9, 10, 11, 12],
            [30, 31, 32] + image_tokens(1, s) + [33, 34, 35, 36, 37, 38]]
    ids, mask = left_pad(rows)
    pv = torch.stack([pixels(1, 1, g), pixels(1, 1, g)])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv,
                pixel_attention_mask=torch.ones(2, 1, 56, 56, dtype=torch.long))


def frequent_tokens(ours, batch, n=2) -> list[int]:
    """Tokens greedy decoding emits early: as eos ids they make beams finish at different steps."""
    free = ours.generate(**batch, max_new_tokens=6, eos_token_id=[299])
    new = free[:, batch["input_ids"].shape[1]:]
    return sorted({int(new[0, 1]), int(new[1, 2])})[:n]


@pytest.mark.parametrize("beams,length_penalty,early_stopping,returns", [
    (2, 1.0, False, 1), (3, 1.0, True, 2), (3, 0.5, "never", 3), (4, -1.0, False, 2), (2, 2.0, "never", 1)])
def test_beam_search_ids_scores_and_indices(pair, beams, length_penalty, early_stopping, returns):
    hf, ours = pair
    batch = image_batch(ours)
    eos = frequent_tokens(ours, batch)
    kw = dict(max_new_tokens=10, num_beams=beams, length_penalty=length_penalty, early_stopping=early_stopping,
              num_return_sequences=returns, eos_token_id=eos, pad_token_id=PAD, return_dict_in_generate=True,
              output_scores=True, output_logits=True, do_sample=False)
    with torch.no_grad():
        ref = hf.generate(**batch, **kw)
    out = ours.generate(**batch, **kw)
    assert out.sequences.tolist() == ref.sequences.tolist()
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=1e-4)
    assert out.beam_indices.tolist() == ref.beam_indices.tolist()
    assert len(out.scores) == len(ref.scores) and len(out.logits) == len(ref.logits)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_beam_search_text_only_plain_output(pair):
    hf, ours = pair
    ids, mask = left_pad([[4, 5, 6, 7, 8, 9, 10], [100, 101, 102]])
    ref = hf_generate(hf, input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=3)
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=3, eos_token_id=[299])
    assert out.tolist() == ref.tolist()


def test_greedy_return_dict_scores_and_logits(pair):
    hf, ours = pair
    batch = image_batch(ours)
    kw = dict(max_new_tokens=8, return_dict_in_generate=True, output_scores=True, output_logits=True,
              repetition_penalty=1.3, eos_token_id=[299], pad_token_id=PAD, do_sample=False)
    with torch.no_grad():
        ref = hf.generate(**batch, **kw)
    out = ours.generate(**batch, **kw)
    assert out.sequences.tolist() == ref.sequences.tolist()
    for a, b in zip(out.scores + out.logits, ref.scores + ref.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert out[0] is out.sequences and out["scores"] is out.scores


def test_repetition_penalty_skips_left_padding_like_transformers(pair):
    hf, ours = pair
    ids, mask = left_pad([[PAD + 1, 5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16]])
    ids[0, :4] = 20  # the padding holds a real id: transformers 5 leaves it out of the penalty
    ref = hf_generate(hf, input_ids=ids, attention_mask=mask, max_new_tokens=10, repetition_penalty=5.0)
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, repetition_penalty=5.0,
                        eos_token_id=[299], pad_token_id=PAD)
    assert out.tolist() == ref.tolist()


def test_use_cache_false_gives_the_same_ids(pair):
    hf, ours = pair
    batch = image_batch(ours)
    cached = ours.generate(**batch, max_new_tokens=8, eos_token_id=[299])
    recomputed = ours.generate(**batch, max_new_tokens=8, eos_token_id=[299], use_cache=False)
    assert cached.tolist() == recomputed.tolist()
    assert ours.generate(**batch, max_new_tokens=6, num_beams=2, use_cache=False).tolist() == \
        ours.generate(**batch, max_new_tokens=6, num_beams=2).tolist()


def test_generation_config_object_and_dict(pair):
    hf, ours = pair
    ids = torch.tensor([[4, 5, 6, 7]])
    gc = transformers.GenerationConfig(max_new_tokens=7, num_beams=2, eos_token_id=[299], pad_token_id=PAD)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, generation_config=gc)
    assert ours.generate(input_ids=ids, generation_config=gc).tolist() == ref.tolist()
    assert ours.generate(input_ids=ids, generation_config=gc.to_dict()).tolist() == ref.tolist()
    assert ours.generate(input_ids=ids, generation_config=gc, max_new_tokens=3).shape[1] == 4 + 3  # kwargs win
    with pytest.raises(ValueError, match="no_repeat_ngram_size=2 not supported"):
        ours.generate(input_ids=ids, generation_config=transformers.GenerationConfig(no_repeat_ngram_size=2))


class _Ban:
    """A transformers-style logits processor written by a user (no transformers import needed)."""

    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] = -float("inf")
        return scores


def test_user_logits_processors_and_stopping_criteria(pair):
    hf, ours = pair
    batch = image_batch(ours)
    free = ours.generate(**batch, max_new_tokens=8, eos_token_id=[299])
    banned = int(free[0, -8])
    processors = [_Ban(banned), transformers.generation.logits_process.TemperatureLogitsWarper(0.7)]
    stop_after_5 = transformers.generation.stopping_criteria.MaxLengthCriteria(batch["input_ids"].shape[1] + 5)
    with torch.no_grad():
        ref = hf.generate(**batch, max_new_tokens=8, eos_token_id=[299], pad_token_id=PAD, do_sample=False,
                          logits_processor=transformers.LogitsProcessorList(processors),
                          stopping_criteria=transformers.StoppingCriteriaList([stop_after_5]))
    out = ours.generate(**batch, max_new_tokens=8, eos_token_id=[299], pad_token_id=PAD,
                        logits_processor=processors, stopping_criteria=[stop_after_5])
    assert out.tolist() == ref.tolist() and banned not in out[0, -5:].tolist()


def test_stop_strings_match_transformers(pair, tmp_path):
    """With a byte-level BPE tokenizer (multi-token words) saved for transformers too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf, ours = pair
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(["stop the top stopper at stops " * 3, "abc def ghi " * 5],
                          trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=t)
    ids = torch.tensor([[40, 41, 42, 43]])
    free = ours.generate(input_ids=ids, max_new_tokens=12, eos_token_id=[299])[0, 4:].tolist()
    text = t.decode(free)
    stop = text[len(text) // 2: len(text) // 2 + 2] or text[-1]  # a piece of what will be generated
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, max_new_tokens=12, eos_token_id=[299], pad_token_id=PAD, do_sample=False,
                          stop_strings=[stop], tokenizer=hf_tok)
    out = ours.generate(input_ids=ids, max_new_tokens=12, eos_token_id=[299], stop_strings=[stop], tokenizer=t)
    assert out.tolist() == ref.tolist()
    with pytest.raises(ValueError, match="stop_strings needs the tokenizer"):
        ours.generate(input_ids=ids, max_new_tokens=3, stop_strings=["x"])


def test_transformers_text_iterator_streamer_gets_the_prompt_first(pair):
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf, ours = pair
    vocab = {f"t{i}": i for i in range(300)}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=t)
    ids = torch.tensor([[4, 5, 6, 7]])
    streamer = transformers.TextIteratorStreamer(hf_tok, skip_prompt=True)
    out = ours.generate(input_ids=ids, max_new_tokens=6, eos_token_id=[299], streamer=streamer)
    streamed = "".join(streamer)
    assert streamed.split() == [f"t{i}" for i in out[0, 4:].tolist()]


def test_sampling_with_num_return_sequences(pair):
    _, ours = pair
    ids = torch.tensor([[4, 5, 6, 7], [8, 9, 10, 11]])
    out = ours.generate(input_ids=ids, max_new_tokens=6, do_sample=True, num_return_sequences=3, seed=0)
    assert out.shape == (6, 10) and out[:3, :4].eq(ids[0]).all() and out[3:, :4].eq(ids[1]).all()
    with pytest.raises(ValueError, match="greedy search returns one sequence"):
        ours.generate(input_ids=ids, max_new_tokens=2, num_return_sequences=2)
