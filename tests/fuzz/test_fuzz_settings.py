"""Settings from files: a preprocessor_config.json, a config.json, a training config with any field
set to any JSON value either builds a valid object or raises an error naming the field."""

from __future__ import annotations

import math

from hypothesis import strategies as st

import idefics3_kit as ik
from idefics3_kit.components.splitter import SplitterConfig
from idefics3_kit.train import TrainConfig
from tests.fuzz.outcomes import fuzz, outcome

json_scalars = (st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12) | st.sampled_from([0, 1, 2, -1, 0.5])
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)


def mutated(base: dict, keys):
    """``base`` with a few of ``keys`` (paths) set to arbitrary JSON values or removed."""
    @st.composite
    def build(draw):
        data = _copy(base)
        paths = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True))
        for path in paths:
            parent = data
            for part in path[:-1]:
                parent = parent.setdefault(part, {}) if isinstance(parent.get(part), dict) else parent
            if draw(st.booleans()) and path[-1] in parent:
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(json_values)
        return data, [part for path in paths for part in path]
    return build()


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


# ---- preprocessor_config.json ---------------------------------------------------------------------

PREPROCESSOR = SplitterConfig().to_hf()
PREPROCESSOR_KEYS = [(k,) for k in PREPROCESSOR] + [("size", "longest_edge"), ("max_image_size", "longest_edge")]


def check_preprocessor(case):
    data, names = case
    kind, value = outcome(lambda: SplitterConfig.from_hf(data), names=tuple(names) + ("preprocessor",))
    if kind == "ok":
        assert value.tile_size >= 1 and value.longest_edge >= 1
        assert all(math.isfinite(m) for m in value.image_mean) and all(s != 0 for s in value.image_std)


test_preprocessor_config, test_preprocessor_config_full = fuzz(mutated(PREPROCESSOR, PREPROCESSOR_KEYS))(
    check_preprocessor)


# ---- config.json --------------------------------------------------------------------------------

MODEL = ik.VLMConfig.preset("tiny").to_hf_dict()
MODEL_KEYS = ([(k,) for k in MODEL] + [("vision_config", k) for k in MODEL["vision_config"]]
              + [("text_config", k) for k in MODEL["text_config"]]
              + [("text_config", "rope_scaling"), ("text_config", "rope_scaling", "factor")])


def check_model_config(case):
    data, names = case
    kind, value = outcome(lambda: ik.VLMConfig.from_hf_dict(data), names=tuple(names) + ("config", "Config"))
    if kind == "ok":
        assert value.decoder.rms_norm_eps > 0 and 0 <= value.image_token_id < value.decoder.vocab_size


test_model_config, test_model_config_full = fuzz(mutated(MODEL, MODEL_KEYS))(check_model_config)


# ---- training configs ---------------------------------------------------------------------------

TRAIN = {"out_dir": "runs/x", "model": {"init": "ckpt"}, "data": {"source": "data.jsonl"}, "steps": 10,
         "batch_size": 4, "lr": 1e-4, "weight_decay": 0.0, "max_grad_norm": 1.0, "warmup_steps": 1,
         "lora": {"r": 8}, "eval": {"fraction": 0.1}, "parallel": {"strategy": "ddp"}}
TRAIN_KEYS = ([(k,) for k in TRAIN] + [("data", k) for k in ("source", "max_length", "num_workers", "shuffle")]
              + [("lora", k) for k in ("r", "alpha", "dropout", "target_modules")]
              + [("eval", k) for k in ("fraction", "every")] + [("parallel", "strategy"), ("betas",),
                                                                  ("freeze",), ("lr_per_component",)])


def check_train_config(case):
    data, names = case
    kind, value = outcome(lambda: TrainConfig.from_dict(data), names=("TrainConfig",))
    if kind == "ok":
        assert value.lr > 0 and value.weight_decay >= 0 and value.max_grad_norm >= 0


test_train_config, test_train_config_full = fuzz(mutated(TRAIN, TRAIN_KEYS))(check_train_config)
