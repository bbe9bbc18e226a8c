"""Samplers: kept sets, transformers' semantics, reproducibility, the registry contract."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from idefics3_kit import registry
from idefics3_kit.components import sampler as S

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def logits_batch(draw, max_batch=3, max_vocab=40):
    b = draw(st.integers(1, max_batch))
    v = draw(st.integers(1, max_vocab))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, v, generator=g) * scale
    if draw(st.booleans()):  # ties
        x = x.round()
    return x


def kept(filtered: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(filtered)


# ---- the registry contract -----------------------------------------------------------------

@pytest.mark.parametrize("name", registry.list_components("sampler"))
def test_every_sampler_builds_from_default_config_and_runs(name):
    comp = registry.create("sampler", name)
    logits = torch.randn(3, 11)
    state = S.SamplerState(tokens=torch.randint(0, 11, (3, 5)), new_tokens=0,
                           eos_token_ids=torch.tensor([1]), generators=torch.Generator().manual_seed(0))
    for st_ in (None, state):
        out = comp(logits, st_)
        if comp.role == "selector":
            assert out.shape == (3,) and out.dtype == torch.long
        else:
            assert comp.role == "processor" and out.shape == logits.shape
    assert torch.equal(logits, logits.clone())  # inputs untouched


def test_chain_order_is_transformers_order():
    chain = S.build_chain(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, min_p=0.05,
                          repetition_penalty=1.1, min_new_tokens=2)
    assert chain.describe() == ("repetition_penalty -> min_new_tokens -> temperature -> top_k -> top_p -> "
                                "min_p -> multinomial")
    assert S.build_chain(do_sample=False, temperature=0.7, top_p=0.9).describe() == "greedy"


# ---- kept sets (hypothesis) ----------------------------------------------------------------

@SETTINGS
@given(logits_batch(), st.integers(1, 50), st.integers(0, 1000))
def test_top_k_kept_set(x, k, seed):
    out = S.filter_top_k(x, k)
    keep = kept(out)
    kk = min(k, x.shape[1])
    kth = x.topk(kk, dim=-1).values[:, -1:]
    assert torch.equal(keep, x >= kth)
    assert (keep.sum(-1) >= 1).all() and (keep.sum(-1) >= kk).all()
    ids = S.sample_from_logits(out, S.draw_uniform(x.shape[0], torch.Generator().manual_seed(seed), "cpu"))
    assert keep[torch.arange(x.shape[0]), ids].all()


@SETTINGS
@given(logits_batch(), st.floats(0.0, 1.0), st.integers(0, 1000))
def test_top_p_kept_set(x, p, seed):
    out = S.filter_top_p(x, p)
    keep = kept(out)
    assert (keep.sum(-1) >= 1).all()
    top = x == x.amax(-1, keepdim=True)
    assert (keep & top).any(-1).all()  # a most likely token always stays (any one of a tie)
    probs = x.softmax(-1)
    # the kept mass reaches p (up to float rounding)
    assert ((probs * keep).sum(-1) >= p - 1e-5).all()
    ids = S.sample_from_logits(out, S.draw_uniform(x.shape[0], torch.Generator().manual_seed(seed), "cpu"))
    assert keep[torch.arange(x.shape[0]), ids].all()


@SETTINGS
@given(logits_batch(), st.floats(0.0, 1.0), st.integers(0, 1000))
def test_min_p_kept_set(x, min_p, seed):
    out = S.filter_min_p(x, min_p)
    keep = kept(out)
    probs = x.softmax(-1)
    expect = probs >= min_p * probs.amax(-1, keepdim=True)
    expect[torch.arange(x.shape[0]), probs.argmax(-1)] = True
    assert torch.equal(keep, expect)
    assert (keep.sum(-1) >= 1).all()
    ids = S.sample_from_logits(out, S.draw_uniform(x.shape[0], torch.Generator().manual_seed(seed), "cpu"))
    assert keep[torch.arange(x.shape[0]), ids].all()


@SETTINGS
@given(logits_batch(), st.integers(1, 20), st.floats(0.0, 1.0), st.floats(0.0, 0.5), st.integers(0, 1000))
def test_full_chain_never_samples_outside_every_filter(x, k, p, min_p, seed):
    chain = S.build_chain(do_sample=True, temperature=0.8, top_k=k, top_p=p, min_p=min_p)
    filtered = chain.process(x)
    state = S.SamplerState(generators=torch.Generator().manual_seed(seed))
    ids = chain(x, state)
    assert kept(filtered)[torch.arange(x.shape[0]), ids].all()


@SETTINGS
@given(st.integers(0, 1000))
def test_sample_never_returns_a_zero_probability_token_even_at_u_near_one(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 30, generator=g)
    x[:, 20:] = float("-inf")
    for u in (0.0, 0.5, 1.0 - 1e-16, 0.9999999999):
        ids = S.sample_from_logits(x, torch.full((4,), u, dtype=torch.float64))
        assert (ids < 20).all()


# ---- transformers' semantics ---------------------------------------------------------------

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as LP  # noqa: E402


@SETTINGS
@given(logits_batch(max_vocab=50), st.floats(0.5, 2.0), st.integers(1, 12), st.integers(0, 1000))
def test_repetition_penalty_equals_transformers(x, penalty, length, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, x.shape[1], (x.shape[0], length), generator=g)
    ours = S.RepetitionPenalty(S.RepetitionPenaltyConfig(penalty=penalty))(x, S.SamplerState(tokens=tokens))
    ref = LP.RepetitionPenaltyLogitsProcessor(penalty)(tokens, x.clone())
    assert torch.equal(ours, ref)


@SETTINGS
@given(logits_batch(max_vocab=50), st.integers(1, 60), st.floats(0.0, 1.0), st.floats(0.0, 1.0),
       st.floats(0.1, 3.0))
def test_filters_equal_transformers(x, k, p, min_p, t):
    ids = torch.zeros(x.shape[0], 1, dtype=torch.long)
    assert torch.equal(S.Temperature(S.TemperatureConfig(temperature=t))(x), LP.TemperatureLogitsWarper(t)(ids, x))
    assert torch.equal(S.filter_top_k(x, k), LP.TopKLogitsWarper(k)(ids, x))
    assert torch.equal(S.filter_top_p(x, p), LP.TopPLogitsWarper(p)(ids, x)) if 0 < p < 1 else True
    assert torch.equal(S.filter_min_p(x, min_p), LP.MinPLogitsWarper(min_p)(ids, x)) if 0 <= min_p <= 1 else True


# ---- reproducibility -----------------------------------------------------------------------

def test_fixed_seed_is_reproducible_and_per_row_generators_are_batch_independent():
    x = torch.randn(3, 100)
    chain = S.build_chain(do_sample=True, temperature=1.5)

    def run(gens, rows=x, n=20):
        state = S.SamplerState(generators=gens)
        return torch.stack([chain(rows, state) for _ in range(n)], 1)

    a = run(S.make_generators(seed=7, batch_size=3))
    b = run(S.make_generators(seed=7, batch_size=3))
    assert torch.equal(a, b)
    assert not torch.equal(a, run(S.make_generators(seed=8, batch_size=3)))
    per_row = run(S.make_generators(seed=[11, 12, 13], batch_size=3))
    alone = run(S.make_generators(seed=[12], batch_size=1), rows=x[1:2])
    assert torch.equal(per_row[1:2], alone)


def test_sampling_follows_the_distribution():
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    logits = probs.log().expand(20000, 4)
    ids = S.sample_from_logits(logits, S.draw_uniform(20000, torch.Generator().manual_seed(0), "cpu"))
    freq = torch.bincount(ids, minlength=4).float() / 20000
    assert torch.allclose(freq, probs[0], atol=0.02) and freq[3] == 0


def test_min_new_tokens_masks_eos_until_reached():
    proc = S.MinNewTokens(S.MinNewTokensConfig(min_new_tokens=2))
    x = torch.zeros(2, 5)
    state = S.SamplerState(eos_token_ids=torch.tensor([1, 3]), new_tokens=1)
    assert torch.isinf(proc(x, state)[:, [1, 3]]).all()
    state.new_tokens = 2
    assert torch.equal(proc(x, state), x)


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="TopPConfig.top_p"):
        S.TopPConfig(top_p=1.5)
    with pytest.raises(ValueError, match="TemperatureConfig.temperature"):
        S.TemperatureConfig(temperature=0.0)
    with pytest.raises(ValueError, match="TopKConfig.top_k"):
        S.TopKConfig(top_k=0)
