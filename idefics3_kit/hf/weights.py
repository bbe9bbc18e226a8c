"""Safetensors checkpoints in the Hugging Face layout: tensor names, tying, sharding, loading, saving.

The mapping between our module names and Hugging Face tensor names lives here, not in the
components: ``vision.*`` <-> ``model.vision_model.*``, ``connector.*`` <-> ``model.connector.*``,
``decoder.model.*`` <-> ``model.text_model.*`` and ``decoder.lm_head.*`` <-> ``lm_head.*``.

Tying: a module that shares a parameter says so with ``tied_weights()`` (name -> the name it
shares storage with; the decoder does); ``tied_parameters`` collects those over a whole model, and
checkpoints store only the source.

Saving sees through the wrappers users put on a model (``export_state``): activation-checkpoint,
torch.compile and FSDP1 name segments are dropped, peft LoRA layers are saved merged into their
base weights, torchao quantized weights dequantized, and DTensor parameters (FSDP2, tensor
parallel) gathered with ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` (a
collective: every rank calls it; rank 0 gets the tensors).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import cast

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import files

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

# (our prefix, Hugging Face prefix), most specific first
IDEFICS3_PREFIXES = (
    ("decoder.lm_head.", "lm_head."),
    ("decoder.model.", "model.text_model."),
    ("vision.", "model.vision_model."),
    ("connector.", "model.connector."),
)
# name segments that wrappers insert (activation checkpointing, torch.compile, FSDP1)
WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


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


# ---- tying ------------------------------------------------------------------------------------------


def tied_parameters(module: nn.Module) -> dict[str, str]:
    """Every tied parameter under ``module`` (full names): name -> the name it shares storage with."""
    tied = {}
    for prefix, sub in module.named_modules():
        declare = getattr(sub, "tied_weights", None)
        if callable(declare):
            dot = f"{prefix}." if prefix else ""
            tied.update({dot + name: dot + source for name, source in declare().items()})
    return {clean_name(k): clean_name(v) for k, v in tied.items()}


def retie(module: nn.Module) -> None:
    """Share the tied parameters again (``load_state_dict(assign=True)`` gives each name its own)."""
    for sub in module.modules():
        tie = getattr(sub, "tie_weights", None)
        if callable(tie) and callable(getattr(sub, "tied_weights", None)):
            tie()


# ---- reading ----------------------------------------------------------------------------------------


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (single file or sharded index).

    A shard must be a regular file inside the checkpoint folder: an index naming an absolute path
    or a path that leaves the folder (``../``, a symlink out of it) is refused.
    """
    index = os.path.join(path, SAFE_INDEX)
    single = os.path.join(path, SAFE_SINGLE)
    if os.path.lexists(index):
        weight_map = files.read_json_object(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: not a valid safetensors index (no 'weight_map' of file names)")
        shard_names = sorted(set(weight_map.values()))
        missing = [f for f in shard_names if not os.path.lexists(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{index}: lists shard files that do not exist: {', '.join(missing)}")
        return [_inside(path, name, index) for name in shard_names]
    if os.path.lexists(single):
        return [files.regular_file(single)]
    raise CheckpointError(f"{path}: no {SAFE_SINGLE} or {SAFE_INDEX} found")


def _inside(folder: str, name: str, index: str) -> str:
    root = os.path.realpath(folder)
    resolved = os.path.realpath(os.path.join(folder, name))
    if os.path.isabs(name) or os.path.commonpath([root, resolved]) != root:
        raise CheckpointError(f"{index}: shard {name!r} lies outside the checkpoint folder {folder}; refused")
    return files.regular_file(resolved, "safetensors shard")


# safetensors dtype names -> bytes per element
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(file: str) -> dict[str, tuple[str, tuple]]:
    """Tensor name -> (safetensors dtype, shape), from the file's header, checked against the file
    before anything is allocated: the header's length, every tensor's dtype, and that its byte
    range lies inside the file and holds exactly shape × dtype bytes."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: not a safetensors file ({size} bytes, shorter than its header length)")
        length = int.from_bytes(head, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise CheckpointError(f"{file}: safetensors header claims {length} bytes but the file has {size - 8} "
                                  "after the length field (truncated or not a safetensors file)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{file}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header must be a JSON object")
    data_bytes = size - 8 - length
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = _check_entry(file, name, info, data_bytes)
    return out


def _check_entry(file: str, name: str, info, data_bytes: int) -> tuple[str, tuple]:
    where = f"{file}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: header entry must be an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of sizes >= 0, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} do not lie inside the file's {data_bytes} data bytes")
    want = SAFETENSORS_DTYPES[dtype] * _product(shape)
    if offsets[1] - offsets[0] != want:
        raise CheckpointError(f"{where}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype} "
                              f"({want} expected)")
    return dtype, tuple(shape)


def _product(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def iter_tensors(paths: Iterable[str]):
    """Yield (file, name, tensor) from safetensors files, naming the file on any read error."""
    from safetensors import SafetensorError, safe_open

    for file in paths:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    yield file, key, f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from None


def read_header_dtypes(paths: Iterable[str]) -> dict[str, tuple[str, tuple]]:
    """Tensor name -> (dtype, shape) over every file of a checkpoint (headers only, checked)."""
    out = {}
    for file in paths:
        out.update(read_header(file))
    return out


def read_header_shapes(paths: Iterable[str]) -> dict[str, tuple]:
    """Tensor name -> shape from the safetensors headers, without reading any data."""
    return {name: shape for name, (_, shape) in read_header_dtypes(paths).items()}


def load_into(module: nn.Module, path: str, *, dtype=None, device=None, prefixes=IDEFICS3_PREFIXES,
              ignore=None, allow_nonfinite: bool = False, convert=None) -> None:
    """Load a checkpoint into ``module`` (which may live on the meta device).

    Every parameter must be present with the right shape and no tensor may be left over;
    otherwise nothing is assigned and the error lists what is wrong. Tensors are cast to
    ``dtype`` and moved to ``device`` one by one, so peak memory is one copy of the weights.
    Without ``dtype`` the checkpoint's floating tensors must share one dtype (a stray one is named).
    A tensor holding NaN or inf is an error naming it unless ``allow_nonfinite``.
    Tied parameters (``tied_parameters``) are taken from their source. ``ignore`` (a predicate on
    Hugging Face tensor names) skips tensors that belong to other parts of a larger checkpoint,
    e.g. the text tower of a CLIP dual encoder. ``convert(name, tensor)``, when given, sees each
    tensor as it is read (after the checks and the cast) and returns what is kept: a quantizer
    keeps its own copy and returns a meta tensor, so the float weights are never all in memory.
    """
    paths = checkpoint_files(path)
    expected = {name: tuple(p.shape) for name, p in module.named_parameters()}
    tied = tied_parameters(module)
    headers = read_header_dtypes(paths)
    if ignore is not None:
        headers = {k: v for k, v in headers.items() if not ignore(k)}
    _validate(expected, {k: shape for k, (_, shape) in headers.items()}, prefixes, tied, path)
    if dtype is None:
        _check_one_float_dtype(headers, path)
    state, nonfinite = {}, []
    for file, hf_name, tensor in iter_tensors(paths):
        if ignore is not None and ignore(hf_name):
            continue
        ours = from_hf_name(hf_name, prefixes)
        if ours is None or ours not in expected or ours in tied:
            continue
        if tensor.is_floating_point():
            if not allow_nonfinite and not bool(torch.isfinite(tensor).all()):
                nonfinite.append(f"{hf_name} ({os.path.basename(file)})")
            if dtype is not None:
                tensor = tensor.to(dtype)
        if convert is not None:
            tensor = convert(ours, tensor)
        state[ours] = tensor.to(device) if device is not None and tensor.device.type != "meta" else tensor
    if nonfinite:
        raise CheckpointError(f"{path}: {len(nonfinite)} tensor(s) hold NaN or inf values: "
                              f"{', '.join(sorted(nonfinite)[:8])}{' ...' if len(nonfinite) > 8 else ''}; "
                              "the model would compute NaN (pass allow_nonfinite=True to load them anyway)")
    for name, source in tied.items():
        state[name] = state[source]
    module.load_state_dict(state, strict=True, assign=True)
    retie(module)


def _check_one_float_dtype(headers: dict, path: str) -> None:
    floats = {name: dt for name, (dt, _) in headers.items() if dt in ("F16", "BF16", "F32", "F64")}
    kinds = sorted(set(floats.values()), key=lambda dt: -list(floats.values()).count(dt))
    if len(kinds) > 1:
        odd = sorted(name for name, dt in floats.items() if dt != kinds[0])
        raise CheckpointError(f"{path}: the checkpoint mixes float dtypes: {len(odd)} tensor(s) are not {kinds[0]} "
                              f"like the rest ({', '.join(f'{n} is {floats[n]}' for n in odd[:5])}"
                              f"{' ...' if len(odd) > 5 else ''}); pass dtype= to load every tensor in one dtype")


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


# ---- what a wrapped model holds, as a plain model would name it ------------------------------------


def clean_name(name: str) -> str:
    """A parameter name without the segments wrappers insert."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def _is_lora_layer(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("base_layer", "get_delta_weight", "active_adapters", "lora_A"))


def _merged_lora_weight(layer) -> torch.Tensor:
    """The weight a peft LoRA layer computes with: base + every active adapter's delta (unless merged)."""
    weight = layer.base_layer.weight.detach()
    if getattr(layer, "merged", False):
        return weight
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    return weight


def _plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor holding ``t``'s values (quantized tensor subclasses dequantized)."""
    t = t.detach()
    if type(t) not in (torch.Tensor, nn.Parameter) and callable(getattr(t, "dequantize", None)):
        t = t.dequantize()
    return t.contiguous().cpu()


def _is_distributed(module: nn.Module) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in module.parameters())


def export_state(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """Every parameter of ``module`` as a plain CPU tensor under the name a plain, unwrapped model
    uses, tied parameters once (under their source). In a process group, only rank 0 gets them
    (None elsewhere): distributed parameters are gathered first (a collective that every rank
    must join), replicated ones (DDP) are rank 0's."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if _is_distributed(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # a model's state dict holds tensors (its declared ValueType also covers optimizer states)
        raw = cast("dict[str, torch.Tensor]",
                   get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))
        params = {clean_name(n) for n, _ in module.named_parameters()}
        raw = {n: t for n, t in raw.items() if clean_name(n) in params}
    else:
        raw = dict(module.named_parameters())
    if rank != 0:
        return None
    tied = tied_parameters(module)
    lora = {clean_name(n): m for n, m in module.named_modules() if _is_lora_layer(m)}
    state = {}
    for name, tensor in raw.items():
        name = clean_name(name)
        if name in tied or ".lora_" in name or ".lora_magnitude_vector" in name:
            continue
        if ".base_layer." in name:
            owner, _, attr = name.partition(".base_layer.")
            name = f"{owner}.{attr}"
            if attr == "weight" and owner in lora:
                tensor = _merged_lora_weight(lora[owner])
        state[name] = _plain_tensor(tensor)
    return state


# ---- writing ----------------------------------------------------------------------------------------


MODEL_FILES = ("config.json", "generation_config.json", SAFE_SINGLE, SAFE_INDEX)


def is_model_file(name: str) -> bool:
    """The files a model's ``save_pretrained`` owns in a checkpoint folder (weights and configs)."""
    return name in MODEL_FILES or (name.startswith("model-") and name.endswith(".safetensors"))


def save_state(state: dict[str, torch.Tensor], path: str, *, prefixes=IDEFICS3_PREFIXES,
               max_shard_bytes: int = 5 * 1024 ** 3) -> None:
    """Write ``state`` (our names) as safetensors in the Hugging Face layout (sharded if large).

    Each file is written to a temporary name and renamed into place; stale weight files of an
    earlier save in another layout (single file vs shards) are removed after the new ones exist.
    ``VLM.save_pretrained`` writes into a fresh folder that then replaces the old one whole.
    """
    from safetensors.torch import save as save_bytes

    os.makedirs(path, exist_ok=True)
    tensors = {to_hf_name(n, prefixes): t for n, t in state.items()}
    shards = _shard(tensors, max_shard_bytes)
    written = []
    if len(shards) == 1:
        files.write_bytes(os.path.join(path, SAFE_SINGLE), save_bytes(shards[0], metadata={"format": "pt"}))
        written.append(SAFE_SINGLE)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            files.write_bytes(os.path.join(path, fname), save_bytes(shard, metadata={"format": "pt"}))
            written.append(fname)
            for key, t in shard.items():
                weight_map[key] = fname
                total += t.numel() * t.element_size()
        files.write_json(os.path.join(path, SAFE_INDEX),
                         {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        written.append(SAFE_INDEX)
    _remove_stale(path, written)


def _remove_stale(path: str, written: list[str]) -> None:
    for name in os.listdir(path):
        stale = name in (SAFE_SINGLE, SAFE_INDEX) or (name.startswith("model-") and name.endswith(".safetensors"))
        if stale and name not in written:
            os.remove(os.path.join(path, name))


def _shard(tensors: dict, max_bytes: int) -> list[dict]:
    shards: list[dict] = []
    current: dict = {}
    size = 0
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
