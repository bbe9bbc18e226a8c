"""What a run trains: LoRA adapters through peft, frozen components, a learning rate per component,
and the adapter written in peft's layout for the Hugging Face model.

With LoRA, the components named in ``lora.components`` train only their adapters (peft freezes
their weights); the other components train fully unless ``freeze`` names them.
"""

from __future__ import annotations

import os
import re

import torch
import torch.nn as nn

from .. import files
from ..hf import weights
from .config import COMPONENTS, LoraConfig, TrainConfig

# where each component's modules live in a Hugging Face Idefics3 checkpoint (regex prefixes)
HF_COMPONENT_PREFIXES = {"vision": r"model\.vision_model", "connector": r"model\.connector",
                         "decoder": r"model\.text_model"}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def component_of(name: str) -> str:
    """The component a parameter belongs to, from its name (wrapper segments ignored)."""
    first = weights.clean_name(name).split(".")[0]
    if first not in COMPONENTS:
        raise ValueError(f"parameter {name!r} belongs to no component ({', '.join(COMPONENTS)})")
    return first


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Inject peft LoRA layers into ``model`` in place (the modules of ``cfg.components`` whose names
    end in one of ``cfg.target_modules``); returns ``model``."""
    try:
        import peft
    except ImportError:
        raise ValueError("lora needs peft (pip install idefics3_kit[train])") from None
    pattern = _target_pattern(cfg.components, cfg.target_modules, {c: re.escape(c) for c in COMPONENTS})
    if not any(re.fullmatch(pattern, name) for name, _ in model.named_modules()):
        raise ValueError(f"lora.target_modules {cfg.target_modules} match no module of the components "
                         f"{cfg.components}")
    # peft annotates lora_alpha as int, but only divides it by r: a float alpha works (and is ours)
    peft.inject_adapter_in_model(peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha,  # type: ignore[arg-type]
                                                 lora_dropout=cfg.dropout, target_modules=pattern), model)
    return model


def _target_pattern(components, target_modules, prefixes) -> str:
    """A regex peft matches against whole module names: a module of one of ``components`` whose
    last name is one of ``target_modules``."""
    where = "|".join(prefixes[c] for c in components)
    names = "|".join(re.escape(m) for m in target_modules)
    return rf"(?:{where})\..*\.(?:{names})"


def set_trainable(model: nn.Module, cfg: TrainConfig) -> None:
    """requires_grad per parameter: frozen components none; LoRA components only their adapters."""
    lora_components = set(cfg.lora.components) if cfg.lora else set()
    for name, param in model.named_parameters():
        component = component_of(name)
        if component in cfg.freeze:
            param.requires_grad_(False)
        elif component in lora_components:
            param.requires_grad_("lora_" in name)
        else:
            param.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: every component is frozen")


def optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with one group per (component, decay): weight decay only on matrices, the learning
    rate of ``lr_per_component`` or ``lr``. Each group keeps its ``base_lr`` for the schedule."""
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((component_of(name), param.dim() >= 2), []).append(param)
    out = []
    for (component, decay), params in sorted(groups.items()):
        lr = cfg.lr_per_component.get(component, cfg.lr)
        out.append({"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": lr, "base_lr": lr,
                    "name": f"{component}{'' if decay else '/no_decay'}"})
    return torch.optim.AdamW(out, lr=cfg.lr, betas=tuple(cfg.betas))


def save_adapter(model: nn.Module, path: str, cfg: LoraConfig, state: dict | None = None) -> None:
    """The LoRA adapters in peft's layout for transformers' Idefics3ForConditionalGeneration:
    ``adapter_model.safetensors`` (``base_model.model.<Hugging Face module name>.lora_A.weight``)
    and ``adapter_config.json`` whose target modules name the Hugging Face modules, so
    ``peft.PeftModel.from_pretrained(Idefics3ForConditionalGeneration...(base), path)`` loads it."""
    import peft
    from safetensors.torch import save as safetensors_bytes

    raw = state if state is not None else {n: p.detach() for n, p in model.named_parameters()}
    tensors = {}
    for name, tensor in raw.items():
        name = weights.clean_name(name)
        if ".lora_" not in name:
            continue
        module, _, rest = name.partition(".lora_")
        kind, _, tail = rest.partition(".")  # "A", "default.weight"
        _, _, param = tail.partition(".")
        hf = weights.to_hf_name(f"{module}.x").removesuffix(".x")
        tensors[f"base_model.model.{hf}.lora_{kind}.{param}"] = tensor.detach().contiguous().cpu()
    if not tensors:
        raise ValueError("the model has no LoRA adapters to save")
    os.makedirs(path, exist_ok=True)
    files.write_bytes(os.path.join(path, ADAPTER_WEIGHTS), safetensors_bytes(tensors, metadata={"format": "pt"}))
    # peft annotates lora_alpha as int, but only divides it by r: a float alpha works
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,  # type: ignore[arg-type]
                             target_modules=_target_pattern(cfg.components, cfg.target_modules,
                                                            HF_COMPONENT_PREFIXES))
    files.write_json(os.path.join(path, ADAPTER_CONFIG), _jsonable(config.to_dict()), sort_keys=True)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return getattr(value, "value", str(value))  # enums (task_type, peft_type)
