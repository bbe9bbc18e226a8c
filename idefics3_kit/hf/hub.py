"""Where a checkpoint is, in which dtype, on which devices: transformers' ``from_pretrained``
arguments (a local folder or a Hub id, ``dtype="auto"``, ``torch_dtype``, ``device_map``).

Hub ids go through ``huggingface_hub.snapshot_download`` (the ``hub`` extra), which honours
``HF_HUB_OFFLINE``, ``HF_HOME``/``HF_HUB_CACHE``, ``cache_dir``, ``revision``, ``token`` and
``local_files_only``; only the files a checkpoint needs are fetched (configs, tokenizer, chat
template, safetensors: never pickled weights).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .. import files
from .parts import resolve_dtype
from .weights import checkpoint_files, read_header_dtypes

CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.md"]
_HF_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def is_hub_id(name: str) -> bool:
    """'org/name' (or 'name'): not an existing path, no leading '.', '/' or '~'."""
    return (isinstance(name, str) and not os.path.exists(name) and name.count("/") <= 1 and bool(name)
            and not name.startswith((".", "/", "~")) and "\\" not in name)


def locate(path_or_id, *, revision: str | None = None, cache_dir=None, local_files_only: bool | None = None,
           token=None, what: str = "checkpoint directory") -> str:
    """A local checkpoint folder for a folder path or a Hub id (downloaded or found in the cache)."""
    name = os.fspath(path_or_id)
    if os.path.isdir(name) or not is_hub_id(name):
        return files.readable_directory(name, what)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{what} not found: {name} (to load it from the Hugging Face Hub, install the "
                                "hub extra: pip install 'idefics3_kit[hub]')") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    try:
        return snapshot_download(name, revision=revision, cache_dir=None if cache_dir is None else os.fspath(cache_dir),
                                 local_files_only=bool(local_files_only) or offline, token=token,
                                 allow_patterns=CHECKPOINT_FILES)
    except Exception as exc:  # huggingface_hub's errors: not found, offline and not cached, gated, ...
        hint = " (offline: HF_HUB_OFFLINE or local_files_only, and it is not in the cache)" if \
            (local_files_only or offline) else ""
        raise FileNotFoundError(f"{what} {name!r} could not be found locally or on the Hub{hint}: "
                                f"{type(exc).__name__}: {exc}") from None


def resolve_load_dtype(dtype, torch_dtype, path: str) -> torch.dtype | None:
    """``dtype`` (or transformers' older ``torch_dtype``) as a torch dtype; "auto" reads it from the
    checkpoint (config.json's ``dtype``/``torch_dtype``, else the weights' float dtype)."""
    if torch_dtype is not None:
        if dtype is not None and resolve_dtype(dtype) != resolve_dtype(torch_dtype) and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one (torch_dtype is "
                             "transformers' older name for dtype)")
        dtype = torch_dtype
    if dtype != "auto":
        return resolve_dtype(dtype)
    config = files.read_json_if_exists(os.path.join(path, "config.json"), "config.json")
    for source in (config, config.get("text_config") or {}):
        named = source.get("dtype") or source.get("torch_dtype")
        if isinstance(named, str) and named in ("float32", "bfloat16", "float16"):
            return resolve_dtype(named)
    floats = [dt for dt, _ in read_header_dtypes(checkpoint_files(path)).values() if dt in _HF_DTYPES]
    return _HF_DTYPES[max(set(floats), key=floats.count)] if floats else None


# ---- device_map ----------------------------------------------------------------------------------


def plan_devices(device_map, device) -> list[torch.device] | None:
    """The devices to put the model on: one (the usual case), several (decoder layers spread over
    them), or None (leave it where it loads: the CPU)."""
    if device_map is not None and device is not None:
        raise ValueError("pass device= or device_map=, not both")
    if device_map is None:
        return None if device is None else [torch.device(device)]
    if isinstance(device_map, dict):
        raise ValueError("device_map as a dict of module names is not supported; use 'auto', 'cpu', 'cuda', "
                         "'cuda:N' or a torch.device (docs/transformers.md)")
    if device_map in ("auto", "balanced", "sequential"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [torch.device("cuda", i) for i in range(count)] or [torch.device("cpu")]
    try:
        return [torch.device(device_map)]
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map={device_map!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or a torch.device")\
            from None


def spread(model: nn.Module, devices: list[torch.device]) -> None:
    """Put the vision tower, connector and embeddings on the first device, the decoder layers in
    contiguous groups over all of them, the final norm and LM head on the last; each layer's
    inputs follow it there (a forward pre-hook), so the model runs as a pipeline over the devices.
    The fast paths step aside for hooked modules (ops.fast_path), so the ordinary path runs."""
    if len(devices) == 1:
        model.to(devices[0])
        return
    decoder: Any = model.decoder  # a VLM's decoder component (model.layers / model.norm, lm_head, tie_weights)
    layers = decoder.model.layers
    first, last = devices[0], devices[-1]
    model.to(first)
    per = -(-len(layers) // len(devices))
    for i, layer in enumerate(layers):
        layer.to(devices[min(i // per, len(devices) - 1)])
        layer.register_forward_pre_hook(_inputs_follow, with_kwargs=True)
    for module in (decoder.model.norm, decoder.lm_head):
        module.to(last)
        module.register_forward_pre_hook(_inputs_follow, with_kwargs=True)
    decoder.tie_weights()  # a tied head shares the embeddings' storage: it stays with them
    # setattr: a plain dict attribute (nn.Module's typed __setattr__ expects a Tensor or a Module)
    setattr(model, "hf_device_map", {f"decoder.model.layers.{i}": str(next(l.parameters()).device)
                                     for i, l in enumerate(layers)})


def _inputs_follow(module: nn.Module, args, kwargs):
    device = next(module.parameters()).device
    return _to(args, device), _to(kwargs, device)


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


__all__ = ["locate", "resolve_load_dtype", "plan_devices", "spread", "is_hub_id"]
