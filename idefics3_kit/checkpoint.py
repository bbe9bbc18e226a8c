"""Safetensors checkpoints in the Hugging Face layout: tensor names, sharding, loading.

The mapping between our module names and Hugging Face tensor names lives here, not in the
components: ``vision.*`` <-> ``model.vision_model.*``, ``connector.*`` <-> ``model.connector.*``,
``decoder.model.*`` <-> ``model.text_model.*`` and ``decoder.lm_head.*`` <-> ``lm_head.*``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

# (our prefix, Hugging Face prefix), most specific first
IDEFICS3_PREFIXES = (
    ("decoder.lm_head.", "lm_head."),
    ("decoder.model.", "model.text_model."),
    ("vision.", "model.vision_model."),
    ("connector.", "model.connector."),
)


def to_hf_name(name: str, prefixes=IDEFICS3_PREFIXES) -> str:
    for ours, theirs in prefixes:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def from_hf_name(name: str, prefixes=IDEFICS3_PREFIXES) -> str | None:
    for ours, theirs in prefixes:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return None


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (single file or sharded index)."""
    index = os.path.join(path, SAFE_INDEX)
    single = os.path.join(path, SAFE_SINGLE)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(exc).__name__}: {exc})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{index}: lists shard files that do not exist: {', '.join(missing)}")
        return [os.path.join(path, f) for f in files]
    if os.path.exists(single):
        return [single]
    raise CheckpointError(f"{path}: no {SAFE_SINGLE} or {SAFE_INDEX} found")


def iter_tensors(files: Iterable[str]):
    """Yield (name, tensor) from safetensors files, naming the file on any read error."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from None


def read_header_shapes(files: Iterable[str]) -> dict[str, tuple]:
    """Tensor name -> shape from the safetensors headers, without reading any data."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from None
    return shapes


def load_into(module: torch.nn.Module, path: str, *, dtype=None, device=None, prefixes=IDEFICS3_PREFIXES,
              tied: dict[str, str] | None = None, ignore=None) -> None:
    """Load a checkpoint into ``module`` (which may live on the meta device).

    Every parameter must be present with the right shape and no tensor may be left over;
    otherwise nothing is assigned and the error lists what is wrong. Tensors are cast to
    ``dtype`` and moved to ``device`` one by one, so peak memory is one copy of the weights.
    ``tied`` maps a parameter to the one it shares storage with (e.g. a tied LM head).
    ``ignore`` (a predicate on Hugging Face tensor names) skips tensors that belong to other
    parts of a larger checkpoint, e.g. the text tower of a CLIP dual encoder.
    """
    files = checkpoint_files(path)
    expected = {name: tuple(p.shape) for name, p in module.named_parameters()}
    tied = tied or {}
    shapes = read_header_shapes(files)
    if ignore is not None:
        shapes = {k: v for k, v in shapes.items() if not ignore(k)}
    _validate(expected, shapes, prefixes, tied, path)
    state = {}
    for hf_name, tensor in iter_tensors(files):
        if ignore is not None and ignore(hf_name):
            continue
        ours = from_hf_name(hf_name, prefixes)
        if ours is None or ours not in expected:
            continue
        if tensor.is_floating_point() and dtype is not None:
            tensor = tensor.to(dtype)
        state[ours] = tensor.to(device) if device is not None else tensor
    for name, source in tied.items():
        if name not in state:
            state[name] = state[source]
    module.load_state_dict(state, strict=True, assign=True)
    _retie(module, tied)


def _retie(module: torch.nn.Module, tied: dict[str, str]) -> None:
    """``load_state_dict(assign=True)`` gives each name its own Parameter; share them again."""
    for name, source in tied.items():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        setattr(owner, attr, module.get_parameter(source))


def _validate(expected: dict, shapes: dict, prefixes, tied: dict, path: str) -> None:
    found = {}
    unexpected = []
    for hf_name, shape in shapes.items():
        ours = from_hf_name(hf_name, prefixes)
        if ours in tied:
            continue  # a tied tensor saved anyway: ignored, its source is used
        if ours is None or ours not in expected:
            unexpected.append(hf_name)
        else:
            found[ours] = shape
    missing = [to_hf_name(n, prefixes) for n in expected if n not in found and n not in tied]
    wrong = [f"{to_hf_name(n, prefixes)}: expected {list(expected[n])}, got {list(s)}"
             for n, s in found.items() if tuple(s) != expected[n]]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(sorted(missing))}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(sorted(unexpected))}")
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): {'; '.join(sorted(wrong))}")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match the model config: " + " | ".join(problems))


def save(module: torch.nn.Module, path: str, *, prefixes=IDEFICS3_PREFIXES, skip: Iterable[str] = (),
         max_shard_bytes: int = 5 * 1024 ** 3) -> None:
    """Write ``module``'s parameters as safetensors in the Hugging Face layout (sharded if large)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    skip = set(skip)
    tensors = {to_hf_name(n, prefixes): p.detach().contiguous().cpu()
               for n, p in module.named_parameters() if n not in skip}
    shards = _shard(tensors, max_shard_bytes)
    for stale in (SAFE_SINGLE, SAFE_INDEX):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SAFE_SINGLE), metadata={"format": "pt"})
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(path, SAFE_INDEX), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)


def _shard(tensors: dict, max_bytes: int) -> list[dict]:
    shards, current, size = [], {}, 0
    for key in sorted(tensors):
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    shards.append(current)
    return shards
