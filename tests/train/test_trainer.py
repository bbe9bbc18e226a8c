"""The Trainer on real photographs: it learns, it scales over processes without changing the
numbers, it resumes at another world size, it exports what transformers and peft load.

The model is the shipped demo model (2.6 M parameters, 48-px tiles), so every run takes seconds.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

import idefics3_kit as ik
import idefics3_kit.recipes.demo  # noqa: F401  (the demo's sources, as the CLI registers them)
from idefics3_kit.recipes.demo.model import shipped_model_dir
from idefics3_kit.train import Trainer, TrainConfig, checkpoint, metrics
from tests.train.photos import write_jsonl


def config(out_dir, source, **changes) -> dict:
    cfg = {"out_dir": str(out_dir), "model": {"init": shipped_model_dir()},
           "data": {"source": str(source), "num_workers": 0}, "steps": 5, "batch_size": 4, "lr": 1e-3,
           "warmup_steps": 1, "save_every": 100, "num_threads": 1, "seed": 0}
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def losses(out_dir) -> list[float]:
    return [r["loss"] for r in metrics.read(str(out_dir)) if "loss" in r]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("photos"))


def test_a_jsonl_of_photos_trains_and_its_loss_falls(tmp_path, photos):
    trainer = Trainer(config=config(tmp_path / "run", photos, steps=12, lr=3e-3, data={"num_workers": 2}),
                      progress=False)  # the processor runs in two DataLoader workers
    trainer.fit()
    curve = losses(tmp_path / "run")
    assert len(curve) == 12 and sum(curve[-3:]) / 3 < 0.6 * sum(curve[:3]) / 3, curve
    records = metrics.read(str(tmp_path / "run"))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "padded_fraction"} <= set(records[0])
    final = tmp_path / "run" / "final"
    assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    assert checkpoint.latest(str(tmp_path / "run")).endswith("step-00000012")


# ---- the same numbers on 1 and 2 processes ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(rank: int, world: int, port: int, cfg: dict, until) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    import idefics3_kit.recipes.demo  # noqa: F401

    try:
        Trainer(config=cfg, progress=False).fit(until=until)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(cfg: dict, world: int = 1, until=None) -> None:
    if world == 1:
        Trainer(config=cfg, progress=False).fit(until=until)
        return
    import torch.multiprocessing as mp

    mp.spawn(_process, args=(world, _free_port(), cfg, until), nprocs=world, join=True)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_give_the_losses_of_one(tmp_path, photos, strategy):
    run(config(tmp_path / "one", photos))
    run(config(tmp_path / "two", photos, parallel={"strategy": strategy}), world=2)
    torch.testing.assert_close(losses(tmp_path / "two"), losses(tmp_path / "one"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_at_another_world_size_continues_the_curve(tmp_path, photos, before, after):
    run(config(tmp_path / "straight", photos))
    split = config(tmp_path / "split", photos, parallel={"strategy": "ddp"})
    run(split, world=before, until=3)
    assert checkpoint.latest(str(tmp_path / "split")).endswith("step-00000003")
    run(split, world=after)
    torch.testing.assert_close(losses(tmp_path / "split"), losses(tmp_path / "straight"), atol=1e-5, rtol=1e-5)


def test_a_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, photos, monkeypatch):
    cfg = config(tmp_path / "run", photos, save_every=2, steps=4)
    run(cfg, until=2)
    good = checkpoint.latest(str(tmp_path / "run"))

    def crash(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(checkpoint.dcp, "save", crash)
    with pytest.raises(OSError, match="injected"):
        run(cfg, until=4)
    monkeypatch.undo()
    assert checkpoint.latest(str(tmp_path / "run")) == good  # the partial one never became latest
    trainer = Trainer(config=cfg, progress=False)
    trainer._prepare()
    assert trainer.step == 2


# ---- what trains -------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_equal_gradients():
    torch.manual_seed(0)
    model = ik.VLM.from_pretrained(shipped_model_dir()).train()
    g = torch.Generator().manual_seed(0)
    s = model.config.vision.image_size
    ids = torch.randint(3, 200, (2, 30), generator=g)
    ids[:, 1:1 + model.image_seq_len] = model.image_token_id
    batch = dict(input_ids=ids, pixel_values=torch.randn(2, 1, 3, s, s, generator=g), labels=ids)

    def grads():
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    recomputed = grads()
    model.gradient_checkpointing_disable()
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_freeze_and_a_learning_rate_per_component(tmp_path, photos):
    cfg = config(tmp_path / "run", photos, steps=2, freeze=["vision"], lr_per_component={"connector": 5e-3})
    trainer = Trainer(config=cfg, progress=False)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]) == name.startswith("vision."), name
    lrs = {g["name"]: g["base_lr"] for g in trainer.optimizer.param_groups}
    assert lrs["connector"] == 5e-3 and lrs["decoder"] == 1e-3 and not any(k.startswith("vision") for k in lrs)


def test_lora_trains_exports_merged_for_transformers_and_the_adapter_for_peft(tmp_path, photos):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = config(tmp_path / "run", photos, steps=3, lr=1e-2,
                 lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                       "components": ["decoder"]}, freeze=["vision", "connector"])
    trainer = Trainer(config=cfg, progress=False)
    trainer.fit()
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and n.startswith("decoder.") for n in trained)
    merged = trainer.export(str(tmp_path / "merged"))
    adapter = trainer.export(str(tmp_path / "adapter"), adapter=True)

    g = torch.Generator().manual_seed(0)
    model = trainer.model.eval()
    s = model.config.vision.image_size
    ids = torch.randint(3, 200, (1, 24), generator=g)
    ids[:, 1:1 + model.image_seq_len] = model.image_token_id
    pixels = torch.randn(1, 1, 3, s, s, generator=g)
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels).logits
        hf = transformers.Idefics3ForConditionalGeneration.from_pretrained(merged).eval()
        torch.testing.assert_close(hf(input_ids=ids, pixel_values=pixels).logits, ours, atol=1e-4, rtol=1e-4)
        base = transformers.Idefics3ForConditionalGeneration.from_pretrained(shipped_model_dir()).eval()
        assert not torch.allclose(base(input_ids=ids, pixel_values=pixels).logits, ours, atol=1e-3)  # it learned
        with_adapter = peft.PeftModel.from_pretrained(base, adapter).eval()
        torch.testing.assert_close(with_adapter(input_ids=ids, pixel_values=pixels).logits, ours, atol=1e-4,
                                   rtol=1e-4)


# ---- evaluation and the config ---------------------------------------------------------------------


def test_held_out_eval_with_exact_match(tmp_path, photos):
    cfg = config(tmp_path / "run", photos, steps=2, eval={"fraction": 0.25, "every": 1, "exact_match": True,
                                                             "max_new_tokens": 4})
    trainer = Trainer(config=cfg, progress=False)
    assert len(trainer.eval_data) == 4 and len(trainer.train_data) == 12
    trainer.fit()
    records = metrics.read(str(tmp_path / "run"))
    assert all({"eval_loss", "eval_exact_match"} <= set(r) for r in records)
    assert all(0 <= r["eval_exact_match"] <= 1 for r in records)


def test_yaml_config_and_unknown_keys(tmp_path, photos):
    pytest.importorskip("yaml")
    good = tmp_path / "good.yaml"
    good.write_text(f"out_dir: {tmp_path / 'run'}\nmodel: {{init: {shipped_model_dir()}}}\n"
                    f"data: {{source: {photos}, num_workers: 0}}\nsteps: 1\nbatch_size: 2\n")
    assert TrainConfig.from_file(str(good)).data.source == str(photos)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {source: x.jsonl, max_lenght: 5}\nlr_per_componet: {}\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lr_per_componet'\]"):
        TrainConfig.from_file(str(bad))
    bad.write_text("data: {source: x.jsonl, max_lenght: 5}\n")
    with pytest.raises(ValueError, match=r"TrainConfig.data: unknown key\(s\) \['max_lenght'\]"):
        TrainConfig.from_file(str(bad))


@pytest.mark.parametrize("field,value,match", [
    ("weight_decay", -0.1, "weight_decay: must be >= 0"),
    ("max_grad_norm", float("nan"), "max_grad_norm: must be a finite number"),
    ("batch_size", 0, "batch_size: must be >= 1"),
    ("device", "tpu", "device: must be one of"),
    ("freeze", ["eyes"], r"unknown components \['eyes'\]"),
    ("lr_per_component", {"decoder": 0}, "lr_per_component.decoder: must be > 0"),
])
def test_bad_config_values_name_the_field(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(config(tmp_path, "data.jsonl", **{field: value}))


def test_gradient_accumulation_gives_the_losses_of_one_big_batch(tmp_path, photos):
    run(config(tmp_path / "one", photos, steps=3))
    run(config(tmp_path / "accum", photos, steps=3, micro_batch_size=1))  # 4 micro-batches per step
    torch.testing.assert_close(losses(tmp_path / "accum"), losses(tmp_path / "one"), atol=1e-5, rtol=1e-5)


def test_cpu_offload_on_the_cpu_is_refused(tmp_path, photos):
    trainer = Trainer(config=config(tmp_path / "run", photos, parallel={"strategy": "fsdp2", "cpu_offload": True}),
                      progress=False)
    with pytest.raises(ValueError, match="cpu_offload .* on the CPU already"):
        trainer.fit()


def test_global_batch_must_split_over_processes(tmp_path):
    cfg = TrainConfig.from_dict(config(tmp_path, "data.jsonl", batch_size=6, micro_batch_size=4))
    with pytest.raises(ValueError, match="micro_batch_size: 4 does not divide the 6"):
        cfg.micro_batches(1)
    with pytest.raises(ValueError, match="cannot be split over 4 processes"):
        cfg.micro_batches(4)
    assert TrainConfig.from_dict(config(tmp_path, "x", batch_size=8, micro_batch_size=2)).micro_batches(2) == (2, 2)


def test_cli_trains_a_yaml_config_and_exports(tmp_path, photos):
    import subprocess
    import sys

    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps(config(tmp_path / "run", photos, steps=2)))
    done = subprocess.run([sys.executable, "-m", "idefics3_kit.cli", "train", "--config", str(cfg), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = subprocess.run([sys.executable, "-m", "idefics3_kit.cli", "export", "--run", str(tmp_path / "run"),
                          "--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert ik.VLM.from_pretrained(tmp_path / "hf").config == ik.VLM.from_pretrained(tmp_path / "run" / "final").config
