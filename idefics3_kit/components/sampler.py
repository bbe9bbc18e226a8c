"""Samplers: next-token logits [B, V] -> next token ids [B], as a chain of registered parts.

Every sampler component has the same interface::

    component(logits [B, V] float, state: SamplerState | None = None) -> logits [B, V] or ids [B]

There are two roles, told apart by the class attribute ``role``:

- ``"processor"`` (``repetition_penalty``, ``min_new_tokens``, ``temperature``, ``top_k``,
  ``top_p``, ``min_p``): returns new logits of the same shape; filtered tokens get ``-inf``.
  Processors never modify their input in place.
- ``"selector"`` (``greedy``, ``multinomial``): returns the chosen ids [B] (int64).

``state`` carries what some parts need: the tokens so far (prompt, padding included, plus the
generated ones, exactly what transformers' processors see as ``input_ids``), the number of
new tokens, the eos ids and the random generators. With ``state=None`` a processor that needs
history does nothing and ``multinomial`` draws from torch's global generator.

The chain (``build_chain``) applies the parts in transformers' order:

    repetition_penalty -> min_new_tokens -> [do_sample only: temperature -> top_k -> top_p -> min_p]
    -> greedy (argmax) or multinomial

The semantics of each processor are those of transformers' logits processors of the same name
(``generation/logits_process.py``), including ties (top-k keeps every token tied with the k-th
largest) and ``min_tokens_to_keep=1``. Every row of a batch is processed independently.

Randomness: ``multinomial`` draws one uniform number per row and inverts the row's CDF, so a
sample depends only on the row's probabilities and its uniform. ``SamplerState.generators`` is
either one ``torch.Generator`` for the whole batch (``B`` uniforms per step) or one generator per
row; with per-row generators a row samples the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .. import ops, registry
from ..registry import register


# ---- state -----------------------------------------------------------------------------------

@dataclass
class SamplerState:
    """What the sampler chain may look at besides the logits.

    tokens: [B, T] all tokens so far (prompt, padding included, then the generated ones).
    new_tokens: how many tokens were generated so far (0 at the first step).
    eos_token_ids: [E] int64 ids that end a sequence (may be empty).
    generators: None (global RNG), one torch.Generator, or a list with one per row.
    pad_lengths: [B] how many left-padding tokens start each row; transformers (5.x) leaves them
        out of the repetition penalty. None: no padding.
    """

    tokens: torch.Tensor | None = None
    new_tokens: int = 0
    eos_token_ids: torch.Tensor | None = None
    generators: object = None
    pad_lengths: torch.Tensor | None = None  # [B] left-padding tokens of each row (not penalized)


def make_generators(seed=None, generator=None, batch_size: int = 1, device="cpu"):
    """The ``generators`` of a SamplerState from ``seed=`` (int or one int per row) or ``generator=``."""
    if seed is not None and generator is not None:
        raise ValueError("pass seed= or generator=, not both")
    if generator is not None:
        gens = generator
    elif seed is None:
        return None
    elif isinstance(seed, int):
        gens = torch.Generator(device=device)
        gens.manual_seed(seed)
    else:
        gens = []
        for s in seed:
            g = torch.Generator(device=device)
            g.manual_seed(int(s))
            gens.append(g)
    if isinstance(gens, (list, tuple)) and len(gens) != batch_size:
        raise ValueError(f"got {len(gens)} per-row seeds/generators for a batch of {batch_size}")
    return gens


def draw_uniform(batch_size: int, generators, device) -> torch.Tensor:
    """[B] float64 uniforms in [0, 1), from one generator, one per row, or the global RNG."""
    if generators is None or isinstance(generators, torch.Generator):
        return torch.rand(batch_size, generator=generators, dtype=torch.float64, device=device)
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=device) for g in generators])


# ---- pure functions (each testable alone) ---------------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, tokens: torch.Tensor, penalty: float,
                             pad_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: every id present in ``tokens`` [B, T] has its
    logit divided by ``penalty`` if positive, multiplied by it if negative (once per id); the first
    ``pad_lengths[b]`` tokens of row b (its left padding) do not count."""
    b, v = logits.shape
    tokens = tokens.long().clamp(0, v)
    if pad_lengths is not None:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        tokens = tokens.masked_fill(positions[None, :] < pad_lengths.to(tokens.device)[:, None], v)
    seen = torch.zeros(b, v + 1, dtype=torch.bool, device=logits.device)  # column v: ids >= v
    seen.scatter_(1, tokens, True)
    seen = seen[:, :v]
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def suppress_tokens(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Set the logits of ``ids`` to -inf in every row."""
    out = logits.clone()
    out[:, ids] = float("-inf")
    return out


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the tokens whose logit is >= the k-th largest of the row (ties kept)."""
    k = min(max(int(k), 1), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering as transformers does it: sort ascending, drop the tokens whose cumulative
    probability is <= 1 - p, always keep the most likely one."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - p)
    drop_sorted[:, -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop the tokens whose probability is below ``min_p`` x the row's top probability."""
    probs = logits.softmax(dim=-1)
    top = probs.amax(dim=-1, keepdim=True)
    drop = probs < min_p * top
    drop.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, float("-inf"))


def sample_from_logits(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: ids [B] from logits [B, V] and uniforms [B] in [0, 1).

    A token with probability 0 (logit -inf) is never returned.
    """
    probs = logits.float().softmax(dim=-1).double()  # [B, V]
    cdf = probs.cumsum(dim=-1)
    target = (uniform.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)  # [B, 1]
    ids = torch.searchsorted(cdf, target, right=True).squeeze(1)  # first index with cdf > target
    vocab = torch.arange(probs.shape[1], device=probs.device)
    last_kept = torch.where(probs > 0, vocab, -1).amax(dim=-1)  # rounding guard for target == total
    return torch.minimum(ids, last_kept)


# ---- registered components -------------------------------------------------------------------

@dataclass(frozen=True)
class GreedyConfig:
    name: str = "greedy"


@register("sampler", "greedy")
class Greedy:
    """The most likely token of each row (the first one on ties, like torch.argmax)."""

    config_class = GreedyConfig
    role = "selector"

    def __init__(self, config: GreedyConfig = GreedyConfig()):
        self.config = config

    def __call__(self, logits: torch.Tensor, state: SamplerState | None = None) -> torch.Tensor:
        return ops.argmax_last(logits)


@dataclass(frozen=True)
class MultinomialConfig:
    name: str = "multinomial"


@register("sampler", "multinomial")
class Multinomial:
    """A token drawn from softmax(logits) of each row with the state's generator(s)."""

    config_class = MultinomialConfig
    role = "selector"

    def __init__(self, config: MultinomialConfig = MultinomialConfig()):
        self.config = config

    def __call__(self, logits: torch.Tensor, state: SamplerState | None = None) -> torch.Tensor:
        gens = state.generators if state is not None else None
        return sample_from_logits(logits, draw_uniform(logits.shape[0], gens, logits.device))


@dataclass(frozen=True)
class TemperatureConfig:
    name: str = "temperature"
    temperature: float = 1.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"TemperatureConfig.temperature: must be > 0, got {self.temperature}")


@register("sampler", "temperature")
class Temperature:
    """logits / temperature."""

    config_class = TemperatureConfig
    role = "processor"

    def __init__(self, config: TemperatureConfig = TemperatureConfig()):
        self.config = config

    def __call__(self, logits: torch.Tensor, state: SamplerState | None = None) -> torch.Tensor:
        return logits / self.config.temperature


@dataclass(frozen=True)
class TopKConfig:
    name: str = "top_k"
    top_k: int = 50

    def __post_init__(self):
        if not (isinstance(self.top_k, int) and self.top_k > 0):
            raise ValueError(f"TopKConfig.top_k: must be a positive integer, got {self.top_k!r}")


@register("sampler", "top_k")
class TopK:
    """Keep the k most likely tokens of each row (ties with the k-th kept)."""

    config_class = TopKConfig
    role = "processor"

    def __init__(self, config: TopKConfig = TopKConfig()):
        self.config = config

    def __call__(self, logits: torch.Tensor, state: SamplerState | None = None) -> torch.Tensor:
        return filter_top_k(logits, self.config.top_k)


@dataclass(frozen=True)
class TopPConfig:
    name: str = "top_p"
    top_p: float = 0.9

    def __post_init__(self):
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"TopPConfig.top_p: must be in [0, 1], got {self.top_p}")


@register("sampler", "top_p")
class TopP:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""

    config_class = TopPConfig
    role = "processor"

    def __init__(self, config: TopPConfig = TopPConfig()):
        self.config = config

    def __call__(self, logits: torch.Tensor, state: SamplerState | None = None) -> torch.Tensor:
        return filter_top_p(logits, self.config.top_p)


@dataclass(frozen=True)
class MinPConfig:
    name: str = "min_p"
    min_p: float = 0.05

    def __post_init__(self):
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"MinPConfig.min_p: must be in [0, 1], got {self.min_p}")


@register("sampler", "min_p")
class MinP:
    """Keep the tokens with probability >= min_p x the row's top probability."""

    config_class = MinPConfig
    role = "processor"

    def __init__(self, config: MinPConfig = MinPConfig()):
        self.config = config

    def __call__(self, logits: torch.Tensor, state: SamplerState | None = None) -> torch.Tensor:
        return filter_min_p(logits, self.config.min_p)


@dataclass(frozen=True)
class RepetitionPenaltyConfig:
    name: str = "repetition_penalty"
    penalty: float = 1.1

    def __post_init__(self):
        if not self.penalty > 0:
            raise ValueError(f"RepetitionPenaltyConfig.penalty: must be > 0, got {self.penalty}")


@register("sampler", "repetition_penalty")
class RepetitionPenalty:
    """Penalize every token already in the row (prompt included, left padding not), transformers'
    CTRL-style penalty."""

    config_class = RepetitionPenaltyConfig
    role = "processor"

    def __init__(self, config: RepetitionPenaltyConfig = RepetitionPenaltyConfig()):
        self.config = config

    def __call__(self, logits: torch.Tensor, state: SamplerState | None = None) -> torch.Tensor:
        if state is None or state.tokens is None or state.tokens.shape[1] == 0:
            return logits
        return apply_repetition_penalty(logits, state.tokens, self.config.penalty, state.pad_lengths)


@dataclass(frozen=True)
class MinNewTokensConfig:
    name: str = "min_new_tokens"
    min_new_tokens: int = 0

    def __post_init__(self):
        if not (isinstance(self.min_new_tokens, int) and self.min_new_tokens >= 0):
            raise ValueError(f"MinNewTokensConfig.min_new_tokens: must be an integer >= 0, "
                             f"got {self.min_new_tokens!r}")


@register("sampler", "min_new_tokens")
class MinNewTokens:
    """Forbid the eos ids until ``min_new_tokens`` tokens have been generated."""

    config_class = MinNewTokensConfig
    role = "processor"

    def __init__(self, config: MinNewTokensConfig = MinNewTokensConfig()):
        self.config = config

    def __call__(self, logits: torch.Tensor, state: SamplerState | None = None) -> torch.Tensor:
        if state is None or state.eos_token_ids is None or state.eos_token_ids.numel() == 0:
            return logits
        if state.new_tokens >= self.config.min_new_tokens:
            return logits
        return suppress_tokens(logits, state.eos_token_ids.to(logits.device))


# ---- the chain -------------------------------------------------------------------------------

class SamplerStep(Protocol):
    """A processor (``-> logits [B, V]``) or a selector (``-> ids [B]``) of the chain."""

    def __call__(self, logits: torch.Tensor, state: SamplerState | None = None) -> torch.Tensor: ...


@dataclass
class SamplerChain:
    """Processors applied in order, then one selector: ``chain(logits, state) -> ids [B]``."""

    processors: list[SamplerStep] = field(default_factory=list)
    selector: SamplerStep | None = None

    def process(self, logits: torch.Tensor, state: SamplerState | None = None) -> torch.Tensor:
        for p in self.processors:
            logits = p(logits, state)
        return logits

    def __call__(self, logits: torch.Tensor, state: SamplerState | None = None) -> torch.Tensor:
        if self.selector is None:
            raise TypeError("SamplerChain has no selector: give one, e.g. registry.create('sampler', 'greedy')")
        return self.selector(self.process(logits, state), state)

    def describe(self) -> str:
        parts = [f"{getattr(p, 'component_name', type(p).__name__)}" for p in self.processors]
        parts.append(getattr(self.selector, "component_name", type(self.selector).__name__))
        return " -> ".join(parts)


class UserProcessor:
    """A transformers-style logits processor ``fn(input_ids [B, T], scores [B, V]) -> scores`` as a
    part of the chain (transformers' own LogitsProcessor objects work as they are)."""

    role = "processor"

    def __init__(self, fn):
        if not callable(fn):
            raise TypeError(f"a logits processor must be callable (input_ids, scores) -> scores, got "
                            f"{type(fn).__name__}")
        self.fn = fn
        self.component_name = type(fn).__name__

    def __call__(self, logits: torch.Tensor, state: SamplerState | None = None) -> torch.Tensor:
        tokens = state.tokens if state is not None else None
        out = self.fn(tokens, logits)
        if not isinstance(out, torch.Tensor) or out.shape != logits.shape:
            raise ValueError(f"logits processor {self.component_name} must return scores of shape "
                             f"{tuple(logits.shape)}, got {getattr(out, 'shape', type(out).__name__)}")
        return out


WARPERS = ("temperature", "top_k", "top_p", "min_p")  # the parts that only act when sampling


def with_user_processors(chain: "SamplerChain", processors) -> "SamplerChain":
    """The chain with the user's processors where transformers puts them: after the built-in
    processors, before the sampling warpers (temperature, top-k, top-p, min-p)."""
    if not processors:
        return chain
    user = [p if isinstance(p, UserProcessor) else UserProcessor(p) for p in processors]
    parts = list(chain.processors)
    cut = next((i for i, p in enumerate(parts) if getattr(p, "component_name", None) in WARPERS), len(parts))
    return SamplerChain(parts[:cut] + user + parts[cut:], chain.selector)


def build_chain(do_sample: bool = False, temperature: float | None = None, top_k: int | None = None,
                top_p: float | None = None, min_p: float | None = None,
                repetition_penalty: float | None = None, min_new_tokens: int | None = None) -> SamplerChain:
    """The sampler chain for transformers-style generation arguments (None / neutral values skip
    a part; temperature/top-k/top-p/min-p only act when ``do_sample``, as in transformers)."""
    procs = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        procs.append(registry.create("sampler", "repetition_penalty", penalty=float(repetition_penalty)))
    if min_new_tokens:
        procs.append(registry.create("sampler", "min_new_tokens", min_new_tokens=int(min_new_tokens)))
    if do_sample:
        if temperature is not None and temperature != 1.0:
            procs.append(registry.create("sampler", "temperature", temperature=float(temperature)))
        if top_k is not None and top_k != 0:
            procs.append(registry.create("sampler", "top_k", top_k=int(top_k)))
        if top_p is not None and top_p < 1.0:
            procs.append(registry.create("sampler", "top_p", top_p=float(top_p)))
        if min_p is not None and min_p > 0.0:
            procs.append(registry.create("sampler", "min_p", min_p=float(min_p)))
    selector = registry.create("sampler", "multinomial" if do_sample else "greedy")
    return SamplerChain(procs, selector)
