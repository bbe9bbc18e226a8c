"""One process or many: the device, the process group torchrun describes, and the model wrapper.

Nothing here is a parallel runtime of its own: ``torchrun`` starts the processes and sets
RANK / WORLD_SIZE / LOCAL_RANK; ``torch.distributed`` (gloo on the CPU, NCCL on GPUs) connects
them; DDP or FSDP2's ``fully_shard`` shares the work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Runtime:
    """Where this process stands: its rank among ``world_size`` and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto", strategy: str = "none") -> Runtime:
    """The runtime of this process; joins the process group when torchrun started several."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    kind = _device_type(device)
    if world > 1 and strategy == "none":
        raise ValueError(f"parallel.strategy is 'none' but torchrun started {world} processes; set "
                         "parallel.strategy to 'ddp' or 'fsdp2'")
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
    target = torch.device(kind, local_rank) if kind == "cuda" else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Runtime(rank, world, local_rank, target)


def _device_type(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but this torch sees no CUDA device (a CPU build of torch, or no GPU); "
                         "use device 'cpu' or 'auto'")
    return device


def all_reduce_sum(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The sum over every process (the value itself in one process)."""
    if runtime.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def wrap(model: nn.Module, strategy: str, runtime: Runtime, *, bf16: bool = False, cpu_offload: bool = False,
         reshard_after_forward: bool = True) -> nn.Module:
    """The model as the strategy trains it: DDP, or FSDP2 with each vision layer, the rest of the
    vision tower, the connector and each decoder layer sharded apart (their own hooks gather
    their parameters, so a part called on its own works too), then the root. One process: as is."""
    if cpu_offload and runtime.device.type != "cuda":
        raise ValueError("parallel.cpu_offload keeps FSDP2's parameters and optimizer state in CPU memory while "
                         "GPUs compute; this run computes on the CPU already: leave it false")
    if not runtime.distributed or strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for part in shard_units(model):
        fully_shard(part, **kwargs)
    fully_shard(model, **kwargs)
    return model


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards apart, innermost first: every layer of the vision encoder and of the
    decoder (the ``layers`` lists), then the vision encoder and the connector as wholes."""
    vision, decoder = cast(nn.Module, model.vision), cast(nn.Module, model.decoder)
    units: list[nn.Module] = []
    for part in (vision, decoder):
        for module in part.modules():
            if isinstance(module, nn.ModuleList) and module is not None and _is_layer_stack(module):
                units += list(module)
    return units + [vision, cast(nn.Module, model.connector)]


def _is_layer_stack(stack: nn.ModuleList) -> bool:
    return len(stack) > 0 and len({type(m) for m in stack}) == 1


def unwrap(model: nn.Module) -> nn.Module:
    """The VLM inside a DDP wrapper (FSDP2 changes the module in place: it is the VLM)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model
