"""Loading is safe by construction: nothing in a file runs code, reads outside the checkpoint,
blocks on a FIFO, or allocates what the file cannot hold; each refusal names the file."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading

import pytest
import torch
from safetensors.torch import save_file

import idefics3_kit as ik
from idefics3_kit.processing import Processor
from idefics3_kit.recipes.demo.model import shipped_model_dir
from idefics3_kit.train import checkpoint
from idefics3_kit.train.distributed import Runtime


def finishes(fn, seconds: float = 20.0):
    """Run ``fn`` in a thread and return what it raised; a hang (a FIFO opened) fails the test."""
    outcome = {}

    def target():
        try:
            fn()
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the loader blocked (it opened a FIFO?)"
    return outcome["error"]


@pytest.fixture
def ckpt(tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(shipped_model_dir(), target)
    return target


def shard(ckpt, tmp_path, names: dict[str, str]):
    """Re-save ckpt as shards named by ``names`` (tensor prefix -> file path as the index writes it)."""
    from safetensors.torch import load_file

    tensors = load_file(ckpt / "model.safetensors")
    os.remove(ckpt / "model.safetensors")
    weight_map = {}
    for i, (target, name) in enumerate(names.items()):
        part = {k: v for j, (k, v) in enumerate(sorted(tensors.items())) if j % len(names) == i}
        path = name if os.path.isabs(name) else os.path.join(ckpt, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(part, path)
        weight_map.update({k: name for k in part})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


# ---- paths -------------------------------------------------------------------------------------


@pytest.mark.parametrize("escape", ["absolute", "dotdot", "symlink"])
def test_shards_outside_the_checkpoint_are_refused(ckpt, tmp_path, escape):
    outside = str(tmp_path / "elsewhere" / "model-2.safetensors")
    if escape == "absolute":
        names = {"a": "model-1.safetensors", "b": outside}
    elif escape == "dotdot":
        names = {"a": "model-1.safetensors", "b": "../elsewhere/model-2.safetensors"}
    else:
        names = {"a": "model-1.safetensors", "b": outside}
    shard(ckpt, tmp_path, names)
    if escape == "symlink":  # the index names a file inside, which is a link to outside
        os.symlink(outside, ckpt / "model-2.safetensors")
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: os.path.basename(v) for k, v in index["weight_map"].items()}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        ik.VLM.from_pretrained(ckpt)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"])
def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(ckpt, name):
    os.remove(ckpt / name)
    os.mkfifo(ckpt / name)
    load = Processor.from_pretrained if name in ("tokenizer.json", "preprocessor_config.json") else \
        ik.VLM.from_pretrained
    error = finishes(lambda: load(ckpt))
    assert isinstance(error, ValueError) and "not a regular file" in str(error) and name in str(error), error


def test_a_folder_in_place_of_config_json(ckpt):
    os.remove(ckpt / "config.json")
    os.mkdir(ckpt / "config.json")
    with pytest.raises(ValueError, match="config.json.*is a directory"):
        ik.VLM.from_pretrained(ckpt)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_folder_is_not_reported_missing(ckpt):
    os.chmod(ckpt, 0)
    try:
        with pytest.raises(ValueError, match="permission denied"):
            ik.VLM.from_pretrained(ckpt)
    finally:
        os.chmod(ckpt, 0o755)


# ---- safetensors headers -----------------------------------------------------------------------


def rewrite_header(path, edit):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header = edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def first_tensor(header) -> str:
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize("case,match", [
    ("huge_length", "header claims"),
    ("offsets_past_end", "do not lie inside"),
    ("shape_bigger_than_bytes", "expected"),
    ("unknown_dtype", "unknown dtype"),
    ("negative_size", "shape must be"),
    ("not_json", "not valid JSON"),
])
def test_safetensors_headers_are_checked_before_any_allocation(ckpt, case, match):
    path = ckpt / "model.safetensors"
    if case == "huge_length":
        data = path.read_bytes()
        path.write_bytes((2 ** 62).to_bytes(8, "little") + data[8:])
    elif case == "not_json":
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        path.write_bytes(data[:8] + b"\xff" * n + data[8 + n:])
    else:
        def edit(header):
            info = header[first_tensor(header)]
            if case == "offsets_past_end":
                info["data_offsets"] = [info["data_offsets"][0], 2 ** 50]
            elif case == "shape_bigger_than_bytes":
                info["shape"] = [2 ** 20, 2 ** 20]
            elif case == "unknown_dtype":
                info["dtype"] = "F128"
            else:
                info["shape"] = [-1, 4]
            return header
        rewrite_header(path, edit)
    with pytest.raises(ValueError, match=match) as info:
        ik.VLM.from_pretrained(ckpt)
    assert "model.safetensors" in str(info.value)


# ---- non-finite weights --------------------------------------------------------------------------


def test_nan_weights_are_named_at_load_unless_allowed(ckpt):
    from safetensors.torch import load_file

    tensors = load_file(ckpt / "model.safetensors")
    name = next(k for k in sorted(tensors) if "q_proj" in k)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"NaN or inf.*{name}"):
        ik.VLM.from_pretrained(ckpt)
    model = ik.VLM.from_pretrained(ckpt, allow_nonfinite=True)
    assert sum(int(torch.isnan(p).sum()) for p in model.parameters()) == 1


def test_one_tensor_of_another_dtype_is_named(ckpt):
    from safetensors.torch import load_file

    tensors = load_file(ckpt / "model.safetensors")
    name = sorted(tensors)[3]
    tensors[name] = tensors[name].to(torch.float16)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=name):
        ik.VLM.from_pretrained(ckpt)
    ik.VLM.from_pretrained(ckpt, dtype=torch.float32)  # a dtype given: every tensor is cast to it


# ---- trainer checkpoints -------------------------------------------------------------------------


@pytest.fixture
def trainer_checkpoint(tmp_path):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    out = str(tmp_path / "run")
    path = checkpoint.save(out, 1, model, optimizer, Runtime(), {"config": {}})
    return out, path, model, optimizer


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_dcp_metadata_pickle_runs_nothing(trainer_checkpoint, tmp_path):
    out, path, model, optimizer = trainer_checkpoint
    marker = tmp_path / "pwned"
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(_RunsCode(marker), f)
    with pytest.raises(ValueError, match=r"posix.system|os.system"):
        checkpoint.load(path, model, optimizer)
    assert not marker.exists()


def test_truncated_dcp_metadata_is_named(trainer_checkpoint):
    out, path, model, optimizer = trainer_checkpoint
    meta = os.path.join(path, ".metadata")
    data = open(meta, "rb").read()
    with open(meta, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"\.metadata"):
        checkpoint.load(path, model, optimizer)


def test_a_crafted_optimizer_item_runs_nothing(trainer_checkpoint, tmp_path):
    """The optimizer's non-tensor items are read with torch.load(weights_only=True)."""
    out, path, model, optimizer = trainer_checkpoint
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsCode(marker))
    for name in os.listdir(path):
        if name.endswith(".distcp"):
            blob = open(os.path.join(path, name), "rb").read()
            # every torch.save'd item in the data file starts with a zip header: corrupt them all
            patched = blob.replace(b"PK\x03\x04", payload[:4], 1)
            with open(os.path.join(path, name), "wb") as f:
                f.write(patched)
    error = finishes(lambda: checkpoint.load(path, model, optimizer))
    assert error is not None and not marker.exists()


def test_trainer_state_is_json_and_checked(trainer_checkpoint):
    out, path, model, optimizer = trainer_checkpoint
    state = os.path.join(path, checkpoint.STATE_FILE)
    assert json.load(open(state))["step"] == 1
    with open(state, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="trainer_state.json"):
        checkpoint.load(path, model, optimizer)


def test_latest_pointer_checks(trainer_checkpoint):
    out, path, model, optimizer = trainer_checkpoint
    pointer = os.path.join(out, "checkpoints", "latest")
    with open(pointer, "w") as f:
        f.write("../../etc")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpoint.latest(out)
    os.remove(pointer)
    os.mkfifo(pointer)
    error = finishes(lambda: checkpoint.latest(out))
    assert isinstance(error, ValueError) and "not a regular file" in str(error)
