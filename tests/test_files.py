"""Nothing lost on faults: every save of a user's files is all-old or all-new, whatever fails midway.

Faults injected: a full disk (ENOSPC from a patched writer; from a real 1 MiB tmpfs where this
process may mount one), an exception midway, and SIGKILL of a child process in the middle of a
save. After each, the previous checkpoint loads and gives the same answers, and no temporary
is left behind (a killed process's temporary is removed by the next save).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import idefics3_kit as ik
from idefics3_kit import files
from idefics3_kit.hf import weights
from idefics3_kit.processing import Processor
from idefics3_kit.recipes.demo.model import shipped_model_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device (injected)")


def listing(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if (folder / name).is_file()}


def leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder.parent) if n.startswith(f".{folder.name}.")]


@pytest.fixture
def checkpoint(tmp_path):
    """A complete checkpoint (model + processor) written by us, and its bytes."""
    target = tmp_path / "ckpt"
    shutil.copytree(shipped_model_dir(), target)
    model = ik.VLM.from_pretrained(target)
    model.save_pretrained(target)
    return target, listing(target)


def perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    return model


# ---- single files ------------------------------------------------------------------------------


def test_write_bytes_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "plan.png"
    target.write_bytes(b"old")
    monkeypatch.setattr(files.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        files.write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["plan.png"]


def test_write_json_of_unserializable_data_writes_nothing(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("{}")
    with pytest.raises(TypeError):
        files.write_json(target, {"x": object()})
    assert target.read_text() == "{}" and os.listdir(tmp_path) == ["config.json"]


# ---- folders: model and processor --------------------------------------------------------------


@pytest.mark.parametrize("fault", ["enospc_in_weights", "exception_in_config", "keyboard_interrupt"])
def test_model_save_fault_leaves_the_old_checkpoint(checkpoint, monkeypatch, fault):
    target, before = checkpoint
    model = perturbed(ik.VLM.from_pretrained(target))
    if fault == "enospc_in_weights":
        monkeypatch.setattr(weights, "_shard", disk_full)
    elif fault == "exception_in_config":
        monkeypatch.setattr(files, "write_json", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("midway")))
    else:
        monkeypatch.setattr(weights, "save_state", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises((OSError, RuntimeError, KeyboardInterrupt)):
        model.save_pretrained(target)
    monkeypatch.undo()
    assert listing(target) == before and not leftovers(target)
    ik.VLM.from_pretrained(target)
    Processor.from_pretrained(target)


def test_model_save_fault_between_shards_keeps_the_old_shards(tmp_path, monkeypatch):
    target = tmp_path / "sharded"
    model = ik.VLM.from_pretrained(shipped_model_dir())
    model.save_pretrained(target, max_shard_bytes=2 ** 20)
    before = listing(target)
    assert sum(n.startswith("model-") for n in before) > 1
    calls = []
    real = files.write_bytes

    def fail_on_second_shard(path, data):
        calls.append(path)
        if len(calls) == 2:
            disk_full()
        real(path, data)

    monkeypatch.setattr(files, "write_bytes", fail_on_second_shard)
    with pytest.raises(OSError):
        perturbed(model).save_pretrained(target, max_shard_bytes=2 ** 20)
    monkeypatch.undo()
    assert listing(target) == before and not leftovers(target)
    loaded = ik.VLM.from_pretrained(target)
    fresh = ik.VLM.from_pretrained(shipped_model_dir())
    for (name, a), b in zip(loaded.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_successful_save_keeps_the_other_files_of_the_folder(checkpoint):
    target, before = checkpoint
    (target / "README.md").write_text("mine")
    perturbed(ik.VLM.from_pretrained(target)).save_pretrained(target)
    after = listing(target)
    assert after["README.md"] == b"mine" and after["tokenizer.json"] == before["tokenizer.json"]
    assert after["model.safetensors"] != before["model.safetensors"]


def test_processor_save_fault_leaves_the_old_processor(checkpoint, monkeypatch):
    target, before = checkpoint
    proc = Processor.from_pretrained(target)
    proc.chat_template = "{{ messages }}"
    real = files.write_json

    def fail_after_first(path, *a, **k):
        if path.endswith("processor_config.json"):
            raise OSError(errno.EIO, "Input/output error (injected)")
        real(path, *a, **k)

    monkeypatch.setattr(files, "write_json", fail_after_first)
    with pytest.raises(OSError, match="Input/output"):
        proc.save_pretrained(target)
    monkeypatch.undo()
    assert listing(target) == before and not leftovers(target)
    assert Processor.from_pretrained(target).template != "{{ messages }}"


# ---- a process killed mid-save -------------------------------------------------------------------

KILL_MID_SAVE = """
import os, signal, sys
import torch
import idefics3_kit as ik
from idefics3_kit import files

target, where = sys.argv[1], sys.argv[2]
model = ik.VLM.from_pretrained(target)
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
real = files.write_bytes

def killed(path, data):
    if where == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    with open(path, "wb") as f:  # half of the new weights on disk, then the kill
        f.write(data[: len(data) // 2])
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

files.write_bytes = killed
model.save_pretrained(target)
"""


@pytest.mark.parametrize("where", ["before", "midway"])
def test_sigkill_mid_save_leaves_the_old_checkpoint(checkpoint, tmp_path, where):
    target, before = checkpoint
    script = tmp_path / "kill.py"
    script.write_text(KILL_MID_SAVE)
    proc = subprocess.run([sys.executable, str(script), str(target), where], cwd=REPO, capture_output=True,
                          env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert listing(target) == before
    assert leftovers(target)  # the killed process could not clean up ...
    ik.VLM.from_pretrained(target)
    perturbed(ik.VLM.from_pretrained(target)).save_pretrained(target)
    assert not leftovers(target)  # ... the next save does


# ---- a real full disk --------------------------------------------------------------------------


def _small_tmpfs(path) -> bool:
    """Mount a 1 MiB tmpfs at ``path`` (needs root or an unprivileged mount namespace)."""
    if shutil.which("mount") is None:
        return False
    os.makedirs(path, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True)
    return result.returncode == 0


def test_a_real_full_disk(tmp_path):
    """On a 1 MiB tmpfs, saving the 10 MB demo model fails with ENOSPC and the old small file stays."""
    mount = tmp_path / "small"
    if not _small_tmpfs(mount):
        pytest.skip("cannot mount a small tmpfs here (not root); the patched-writer tests cover ENOSPC")
    try:
        target = mount / "ckpt"
        shutil.copytree(os.path.join(shipped_model_dir()), target,
                        ignore=shutil.ignore_patterns("*.safetensors", "*.png"))
        before = listing(target)
        model = ik.VLM.from_pretrained(shipped_model_dir())
        with pytest.raises(OSError) as info:
            model.save_pretrained(target)
        assert info.value.errno == errno.ENOSPC
        assert listing(target) == before and not leftovers(target)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# ---- the trainer's checkpoint is one unit -------------------------------------------------------

KILL_TRAINER = """
import os, signal, sys
import idefics3_kit.recipes.demo
from idefics3_kit import files
from idefics3_kit.train import Trainer, checkpoint
import json

cfg, where = json.loads(sys.argv[1]), sys.argv[2]
real_json, real_text = files.write_json, files.write_text

def kill_at_step_4(path, *a, **k):
    if "step-00000004" in path and where == "before_state":
        os.kill(os.getpid(), signal.SIGKILL)
    real_json(path, *a, **k)

def kill_before_latest(path, *a, **k):
    if path.endswith("latest") and where == "before_latest" and "step-00000004" in a[0]:
        os.kill(os.getpid(), signal.SIGKILL)
    real_text(path, *a, **k)

files.write_json, files.write_text = kill_at_step_4, kill_before_latest
Trainer(config=cfg, progress=False).fit()
"""


@pytest.mark.parametrize("where", ["before_state", "before_latest"])
def test_trainer_killed_mid_checkpoint_resumes_from_the_previous_one(tmp_path, where):
    import json

    from idefics3_kit.train import Trainer, checkpoint
    from tests.train.photos import write_jsonl

    photos = write_jsonl(tmp_path / "photos")
    cfg = {"out_dir": str(tmp_path / "run"), "model": {"init": shipped_model_dir()},
           "data": {"source": str(photos), "num_workers": 0}, "steps": 4, "batch_size": 2, "lr": 1e-3,
           "warmup_steps": 1, "save_every": 2, "num_threads": 1, "seed": 0}
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(KILL_TRAINER))
    proc = subprocess.run([sys.executable, str(script), json.dumps(cfg), where], cwd=REPO, capture_output=True,
                          env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    good = checkpoint.latest(cfg["out_dir"])
    assert good.endswith("step-00000002")
    assert checkpoint.read_state(good)["step"] == 2
    # the resume continues from step 2's weights and optimizer, and writes step 4 again
    trainer = Trainer(config=cfg, progress=False)
    trainer.fit()
    assert checkpoint.latest(cfg["out_dir"]).endswith("step-00000004")
    assert not [n for n in os.listdir(os.path.dirname(good)) if n.endswith(".tmp")]
