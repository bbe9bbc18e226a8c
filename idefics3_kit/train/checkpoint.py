"""Training checkpoints through torch.distributed.checkpoint (DCP): sharded, atomic, reshardable.

    OUT_DIR/checkpoints/step-00000400/   model + optimizer (DCP files, one per process) + trainer_state.json
    OUT_DIR/checkpoints/latest           the name of the newest complete checkpoint

Every process writes its shards into ``step-N.tmp``; when all are done, rank 0 writes
``trainer_state.json`` (JSON), renames the folder to ``step-N`` and then points
``latest`` at it (a temporary file renamed over the old one). A crash at any moment leaves
``latest`` naming the previous complete checkpoint, which is what a resume loads; leftover
``.tmp`` folders are removed by the next save. Loading goes through
``get_state_dict``/``set_state_dict``, so a checkpoint written by N processes loads into M
(DDP, FSDP2 or one process): DCP reshards.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .. import files
from .distributed import Runtime, barrier

FOLDER = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"


def _root(out_dir: str) -> str:
    return os.path.join(out_dir, FOLDER)


def latest(out_dir: str) -> str | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = os.path.join(_root(out_dir), LATEST)
    if not os.path.lexists(pointer):
        return None
    files.regular_file(pointer, "the latest-checkpoint pointer")
    with open(pointer, encoding="utf-8", errors="replace") as f:
        name = f.read(256).strip()
    path = os.path.join(_root(out_dir), name)
    if not name or os.sep in name or not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise ValueError(f"{pointer}: names {name!r}, which is not a complete checkpoint of this run")
    return path


def save(out_dir: str, step: int, model, optimizer, runtime: Runtime, state: dict, keep: int = 2) -> str:
    """Write the checkpoint of ``step`` (a collective: every process calls it); returns its folder."""
    root = _root(out_dir)
    name = f"step-{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    if latest(out_dir) == final:  # this step is the checkpoint the run resumed from
        barrier(runtime)
        return final
    if runtime.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(runtime)
    model_state, optim_state = get_state_dict(model, optimizer)
    with _one_process_is_fine():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    barrier(runtime)
    if runtime.is_main:
        files.write_json(os.path.join(tmp, STATE_FILE), {**state, "step": step, "world_size": runtime.world_size})
        _replace_folder(tmp, final)
        files.write_text(os.path.join(root, LATEST), name + "\n")
        _prune(root, keep)
    barrier(runtime)
    return final


def _replace_folder(new: str, final: str) -> None:
    """``new`` becomes ``final``. A folder already there (a run killed before ``latest`` moved, or a
    run restarted from an older checkpoint) is not the latest one, so it may be replaced."""
    if os.path.isdir(final):
        files.replace_directory(new, final)
    else:
        os.replace(new, final)


def read_state(path: str) -> dict:
    """A checkpoint's trainer_state.json (step, world size, the run's config)."""
    return files.read_json_object(os.path.join(path, STATE_FILE), STATE_FILE)


def load(path: str, model, optimizer) -> dict:
    """Load a checkpoint into ``model`` and ``optimizer`` (any world size); returns its trainer state.

    Nothing in the files can run code: DCP's metadata (a pickle) is read by an unpickler that
    builds only DCP's own metadata classes, and its non-tensor items (the optimizer's
    hyperparameters) with ``torch.load(weights_only=True)``.
    """
    state = read_state(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    loaded: dict[str, Any] = {"model": model_state, "optimizer": optim_state}
    with _one_process_is_fine():
        try:
            dcp.load(loaded, storage_reader=_SafeReader(path), planner=_SafePlanner())
        except CheckpointException as exc:  # DCP gathers each process's failure into one BaseException
            raise ValueError(f"{path}: cannot load the checkpoint: {_first_failure(exc)}") from None
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    return state


def _first_failure(exc: CheckpointException) -> str:
    """The first process's error (DCP stores (exception, traceback) pairs per rank)."""
    failures = list(exc.failures.values())
    if not failures:
        return "unknown failure"
    first = failures[0][0] if isinstance(failures[0], tuple) else failures[0]
    return f"{type(first).__name__}: {first}"


# the globals a DCP .metadata pickle may name (module, name); every other one is refused
_METADATA_GLOBALS = {("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                     ("pathlib", "PureWindowsPath"), ("torch", "Size"), ("collections", "OrderedDict"),
                     ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                     ("torch.serialization", "_get_layout")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or module == "torch.distributed.checkpoint.metadata":
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata names {module}.{name}, which a DCP checkpoint never "
                                     "holds; refused (the file may have been tampered with)")


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        path = os.path.join(self.path, ".metadata")
        files.regular_file(path, "DCP metadata")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a valid checkpoint metadata file ({exc})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value) -> None:
        loaded = torch.load(value, weights_only=True)  # plain data and tensors only
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


@contextlib.contextmanager
def _one_process_is_fine():
    """DCP warns that it saves in a single process when torch.distributed is not initialized:
    here that is intended (a run of one process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _prune(root: str, keep: int) -> None:
    """Remove all but the newest ``keep`` complete checkpoints, and any leftover partial one."""
    names = sorted(n for n in os.listdir(root) if n.startswith("step-"))
    complete = [n for n in names if not n.endswith(".tmp")]
    for name in complete[:-keep] + [n for n in names if n.endswith(".tmp")]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
