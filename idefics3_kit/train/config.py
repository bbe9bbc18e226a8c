"""The training configuration: nested dataclasses read from JSON or YAML, unknown keys refused.

Every field is documented in docs/finetune.md. The sizes are global so that a run means the same
thing on any number of processes: ``batch_size`` examples make one optimizer step, split over
the processes and into micro-batches of ``micro_batch_size`` examples per process (gradient
accumulation makes up the rest). A run resumed at another world size therefore sees the same
data in the same steps.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .. import files

COMPONENTS = ("vision", "connector", "decoder")
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("none", "ddp", "fsdp2")


def _fail(where: str, message: str):
    raise ValueError(f"{where}: {message}")


def _check_number(where: str, value, *, minimum=None, above=None, below=None, integer=False):
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        _fail(where, f"must be a finite {'integer' if integer else 'number'}, got {value!r}")
    if minimum is not None and value < minimum:
        _fail(where, f"must be >= {minimum}, got {value!r}")
    if above is not None and not value > above:
        _fail(where, f"must be > {above}, got {value!r}")
    if below is not None and not value < below:
        _fail(where, f"must be < {below}, got {value!r}")


def _check_bool(where: str, value):
    if not isinstance(value, bool):
        _fail(where, f"must be true or false, got {value!r}")


@dataclass
class DataConfig:
    """Where the training conversations come from and how they are cut and batched."""

    source: Any = None  # a .jsonl/.json/.parquet file, a datasets.save_to_disk dir, a datasets.Dataset, or a name
    options: dict = field(default_factory=dict)  # settings of a named source (the demo's "synthetic")
    max_length: int | None = None  # longer conversations are truncated, never through an image (then skipped)
    skip_bad_records: bool = False  # count and skip bad records instead of stopping at the first
    group_by_length: bool = True  # batches of similar lengths (less padding)
    num_workers: int = 2  # DataLoader worker processes running the processor
    shuffle: bool = True

    def validate(self, where: str) -> None:
        if self.source is None:
            _fail(f"{where}.source", "is required: a data file or directory, or a registered source name "
                                     "such as 'synthetic'")
        if self.max_length is not None:
            _check_number(f"{where}.max_length", self.max_length, minimum=1, integer=True)
        _check_number(f"{where}.num_workers", self.num_workers, minimum=0, integer=True)
        for name in ("skip_bad_records", "group_by_length", "shuffle"):
            _check_bool(f"{where}.{name}", getattr(self, name))
        if not isinstance(self.options, dict):
            _fail(f"{where}.options", f"must be an object, got {type(self.options).__name__}")


@dataclass
class EvalConfig:
    """A held-out split scored every ``every`` steps: the loss, and optionally exact match of answers."""

    source: Any = None  # a separate data file; or hold out ``fraction`` of the training data
    fraction: float = 0.0
    every: int = 0  # 0: only at the end of the run (when there is an eval split)
    exact_match: bool = False  # also generate the last assistant turn and compare it with the data's
    max_new_tokens: int = 32
    max_examples: int | None = None

    def validate(self, where: str) -> None:
        _check_number(f"{where}.fraction", self.fraction, minimum=0, below=1)
        _check_number(f"{where}.every", self.every, minimum=0, integer=True)
        _check_number(f"{where}.max_new_tokens", self.max_new_tokens, minimum=1, integer=True)
        _check_bool(f"{where}.exact_match", self.exact_match)
        if self.max_examples is not None:
            _check_number(f"{where}.max_examples", self.max_examples, minimum=1, integer=True)
        if self.source is not None and self.fraction:
            _fail(where, "give either source or fraction, not both")

    @property
    def enabled(self) -> bool:
        return self.source is not None or self.fraction > 0


@dataclass
class ParallelConfig:
    """How the processes started by torchrun share the work."""

    strategy: str = "none"  # none (one process), ddp, fsdp2 (fully_shard per vision and decoder layer)
    cpu_offload: bool = False  # fsdp2: parameters, gradients and optimizer state on the CPU
    reshard_after_forward: bool = True  # fsdp2: free the gathered parameters after each forward

    def validate(self, where: str) -> None:
        if self.strategy not in STRATEGIES:
            _fail(f"{where}.strategy", f"must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        for name in ("cpu_offload", "reshard_after_forward"):
            _check_bool(f"{where}.{name}", getattr(self, name))
        if self.cpu_offload and self.strategy != "fsdp2":
            _fail(f"{where}.cpu_offload", "needs strategy fsdp2")


@dataclass
class LoraConfig:
    """Low-rank adapters through peft on the modules named by ``target_modules`` in ``components``."""

    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"])
    components: list = field(default_factory=lambda: ["decoder"])

    def validate(self, where: str) -> None:
        _check_number(f"{where}.r", self.r, minimum=1, integer=True)
        _check_number(f"{where}.alpha", self.alpha, above=0)
        _check_number(f"{where}.dropout", self.dropout, minimum=0, below=1)
        if (not isinstance(self.target_modules, (list, tuple)) or not self.target_modules
                or not all(isinstance(m, str) and m for m in self.target_modules)):
            _fail(f"{where}.target_modules", f"must be a non-empty list of module names, got {self.target_modules!r}")
        _check_components(f"{where}.components", self.components, allow_empty=False)


def _check_components(where: str, names, allow_empty: bool = True) -> None:
    if not isinstance(names, (list, tuple)) or (not names and not allow_empty):
        _fail(where, f"must be a list of components ({', '.join(COMPONENTS)}), got {names!r}")
    bad = [c for c in names if c not in COMPONENTS]
    if bad:
        _fail(where, f"unknown components {bad}; choose from {list(COMPONENTS)}")


_SECTIONS = {"data": DataConfig, "eval": EvalConfig, "parallel": ParallelConfig, "lora": LoraConfig}


@dataclass
class TrainConfig:
    """One training run. ``idefics3-kit train --config FILE`` reads it; docs/finetune.md documents it."""

    out_dir: str = "runs/train"
    model: dict = field(default_factory=dict)  # {"init": dir} | {"preset": name, ...} | {"from_parts": {...}} | ...
    processor: dict = field(default_factory=dict)  # {"path": dir} (default: the model's dir) | {"build": {...}}
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    steps: int = 1000
    batch_size: int = 16  # examples per optimizer step, over all processes
    micro_batch_size: int = 0  # examples per forward per process; 0: batch_size / processes
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.95)
    max_grad_norm: float = 1.0  # 0: no clipping
    device: str = "auto"
    bf16: bool = False  # bf16 autocast (the weights stay float32)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None
    freeze: list = field(default_factory=list)  # components kept fixed
    lr_per_component: dict = field(default_factory=dict)  # {"connector": 1e-3}: a learning rate per component
    save_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 1
    tensorboard: bool | None = None  # None: when TensorBoard is installed
    seed: int = 0
    num_threads: int = 0  # torch CPU threads; 0: torch's default

    def __post_init__(self):
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, _build(cls, value, f"TrainConfig.{name}"))
            elif not isinstance(value, cls) and not (name == "lora" and value is None):
                _fail(f"TrainConfig.{name}", f"must be an object of {cls.__name__} settings, got {value!r}")
        if not isinstance(self.betas, (list, tuple)):
            _fail("TrainConfig.betas", f"needs two values such as [0.9, 0.95], got {self.betas!r}")
        self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        c = "TrainConfig"
        if not isinstance(self.out_dir, (str, os.PathLike)) or not os.fspath(self.out_dir):
            _fail(f"{c}.out_dir", f"must be a folder path, got {self.out_dir!r}")
        for name in ("steps", "batch_size", "save_every", "log_every", "keep_checkpoints"):
            _check_number(f"{c}.{name}", getattr(self, name), minimum=1, integer=True)
        for name in ("micro_batch_size", "warmup_steps", "seed", "num_threads"):
            _check_number(f"{c}.{name}", getattr(self, name), minimum=0, integer=True)
        _check_number(f"{c}.lr", self.lr, above=0)
        _check_number(f"{c}.min_lr_ratio", self.min_lr_ratio, minimum=0)
        if self.min_lr_ratio > 1:
            _fail(f"{c}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio!r}")
        _check_number(f"{c}.weight_decay", self.weight_decay, minimum=0)
        _check_number(f"{c}.max_grad_norm", self.max_grad_norm, minimum=0)
        if len(self.betas) != 2:
            _fail(f"{c}.betas", f"needs two values, got {list(self.betas)}")
        for i, beta in enumerate(self.betas):
            _check_number(f"{c}.betas[{i}]", beta, minimum=0, below=1)
        if self.device not in DEVICES:
            _fail(f"{c}.device", f"must be one of {list(DEVICES)}, got {self.device!r}")
        for name in ("bf16", "gradient_checkpointing"):
            _check_bool(f"{c}.{name}", getattr(self, name))
        if self.tensorboard is not None:
            _check_bool(f"{c}.tensorboard", self.tensorboard)
        _check_components(f"{c}.freeze", self.freeze)
        if not isinstance(self.lr_per_component, dict):
            _fail(f"{c}.lr_per_component", "must be an object such as {\"connector\": 1e-3}")
        _check_components(f"{c}.lr_per_component", list(self.lr_per_component))
        for name, lr in self.lr_per_component.items():
            _check_number(f"{c}.lr_per_component.{name}", lr, above=0)
        for name in ("model", "processor"):
            if not isinstance(getattr(self, name), dict):
                _fail(f"{c}.{name}", f"must be an object, got {type(getattr(self, name)).__name__}")
        self.data.validate(f"{c}.data")
        self.eval.validate(f"{c}.eval")
        self.parallel.validate(f"{c}.parallel")
        if self.lora is not None:
            self.lora.validate(f"{c}.lora")

    def micro_batches(self, world_size: int) -> tuple[int, int]:
        """(micro_batch_size, gradient accumulation steps) for ``world_size`` processes."""
        c = "TrainConfig"
        if self.batch_size % world_size:
            _fail(f"{c}.batch_size", f"{self.batch_size} examples per step cannot be split over {world_size} "
                                     "processes; make it a multiple of the process count")
        per_process = self.batch_size // world_size
        micro = self.micro_batch_size or per_process
        if per_process % micro:
            _fail(f"{c}.micro_batch_size", f"{micro} does not divide the {per_process} examples each of the "
                                           f"{world_size} process(es) handles per step")
        return micro, per_process // micro

    # ---- files ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "TrainConfig") -> "TrainConfig":
        return _build(cls, data, where)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TrainConfig":
        """A config from a .json or .yaml/.yml file; unknown keys are an error naming them."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"training config not found: {path}")
        if path.endswith((".yaml", ".yml")):
            data = _read_yaml(path)
        else:
            data = files.read_json_object(path, "training config")
        try:
            return cls.from_dict(data, "TrainConfig")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, data: Mapping[str, Any], where: str):
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: must be an object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    values = dict(data)
    for name, section in _SECTIONS.items():
        if name in values and isinstance(values[name], Mapping) and name in known:
            values[name] = _build(section, values[name], f"{where}.{name}")
    return cls(**values)


def _read_yaml(path: str) -> dict:
    try:
        import yaml
    except ImportError:
        raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write the config as JSON") \
            from None
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)  # plain data only: no Python objects from the file
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a mapping of settings, holds a {type(data).__name__}")
    return data
