"""The training loop: schedule, label masking, loss going down, resume, freezing, CLI."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from idefics3_kit import train as T
from idefics3_kit.recipes.demo import training as demo_training
from idefics3_kit.recipes.demo.synthetic import make_example


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from idefics3_kit.recipes.demo.model import build_processor

    return build_processor(str(tmp_path_factory.mktemp("proc")), vocab_size=320)


def tiny_cfg(tmp_path, processor_dir, **changes) -> T.TrainConfig:
    cfg = T.TrainConfig(out_dir=str(tmp_path / "run"), processor={"path": processor_dir}, steps=4, batch_size=4,
                        lr=3e-3, warmup_steps=1, save_every=2, num_threads=1)
    return dataclasses.replace(cfg, **changes)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = T.TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [T.lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert T.lr_factor(100, cfg) == pytest.approx(0.1)


def test_collator_labels_only_the_answer(processor):
    examples = [make_example(i) for i in range(5)]
    batch = T.Collator(processor)(examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for i, example in enumerate(examples):
        labels = batch["labels"][i]
        text = processor.decode(labels[labels != -100].tolist())
        assert text == f" {example.answer}<end_of_utterance>\n"
        assert (batch["input_ids"][i][labels != -100] == labels[labels != -100]).all()
        assert batch["attention_mask"][i, 0] == 1  # right padded for training


def test_training_lowers_the_loss_and_resumes_exactly(tmp_path, processor, tmp_path_factory):
    proc_dir = str(tmp_path_factory.mktemp("p"))
    processor.save_pretrained(proc_dir)
    torch.manual_seed(0)
    straight = T.train(tiny_cfg(tmp_path / "a", proc_dir, steps=4), progress=False)
    half = tiny_cfg(tmp_path / "b", proc_dir, steps=4, save_every=100)
    T.train(half, progress=False, stop_after=2)  # an interrupted run
    state = torch.load(f"{half.out_dir}/last/{T.STATE_FILE}", weights_only=False)
    assert state["step"] == 2
    resumed = T.train(half, progress=False)  # picks up at step 2
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    collate = T.Collator(processor)
    batch = collate([make_example(123_456 + i) for i in range(8)])
    fresh = demo_training.build_demo_model({"demo": True}, processor)
    with torch.no_grad():
        assert straight(**batch).loss < fresh(**batch).loss


def test_freezing_keeps_components_fixed(tmp_path, processor, tmp_path_factory):
    proc_dir = str(tmp_path_factory.mktemp("p"))
    processor.save_pretrained(proc_dir)
    cfg = tiny_cfg(tmp_path, proc_dir, steps=2, freeze=["vision", "decoder"], model={"demo": True})
    torch.manual_seed(0)
    before = demo_training.build_demo_model(cfg.model, processor).state_dict()
    torch.manual_seed(0)
    after = T.train(cfg, progress=False).state_dict()
    for name, tensor in before.items():
        changed = not torch.equal(tensor, after[name])
        assert changed == name.startswith("connector."), name


def test_bad_configs_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"TrainConfig.freeze: unknown components \['eyes'\]"):
        T.TrainConfig(freeze=["eyes"])
    bad = tmp_path / "c.json"
    bad.write_text('{"stepz": 3}')
    with pytest.raises(ValueError, match=r"c.json: unknown fields \['stepz'\]"):
        T.TrainConfig.from_file(str(bad))


def test_cli_train(tmp_path, processor, tmp_path_factory):
    proc_dir = str(tmp_path_factory.mktemp("p"))
    processor.save_pretrained(proc_dir)
    cfg_file = tmp_path / "train.json"
    cfg_file.write_text('{"processor": {"path": "%s"}, "batch_size": 2, "steps": 1, "num_threads": 1}' % proc_dir)
    result = subprocess.run([sys.executable, "-m", "idefics3_kit.cli", "train", "--config", str(cfg_file),
                             "--out-dir", str(tmp_path / "out"), "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "last" / "model.safetensors").exists()
    missing = subprocess.run([sys.executable, "-m", "idefics3_kit.cli", "train", "--config", str(tmp_path / "no.json")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "training config not found" in missing.stderr


# ---- synthetic data and the curriculum ---------------------------------------------------------


def test_describe_names_every_shape_with_its_cell():
    from idefics3_kit.recipes.demo.synthetic import CELL_NAMES, COLOURS, SHAPES

    for seed in range(40):
        example = make_example(seed, "describe")
        words = example.answer.split()
        if len(words) == 1:  # a word image: the word itself
            continue
        groups = [words[i:i + 4] for i in range(0, len(words), 4)]  # [row, column, colour, shape]
        assert len(words) % 4 == 0 and 1 <= len(groups) <= 3, example.answer
        cells = [CELL_NAMES.index(" ".join(g[:2])) for g in groups]
        assert cells == sorted(set(cells)), example.answer  # reading order, one shape per cell
        assert all(g[2] in COLOURS and g[3] in SHAPES for g in groups), example.answer


def test_max_shapes_caps_the_shapes():
    for seed in range(30):
        assert make_example(seed, "count", max_shapes=1).answer == "one"
        assert make_example(seed, "side", max_shapes=1).answer in ("left", "right")  # side keeps two
    with pytest.raises(ValueError, match="max_shapes must be 1, 2 or 3, got 4"):
        make_example(0, max_shapes=4)
    with pytest.raises(ValueError, match="unknown question kind 'smell'"):
        make_example(0, "smell")


def test_curriculum_stages_apply_by_step_and_resume_identically():
    data = {"seed": 3, "kinds": ["count"], "stages": [{"until_step": 2, "kinds": ["count"], "max_shapes": 1}]}
    assert demo_training.data_stage(data, 1)["max_shapes"] == 1 and demo_training.data_stage(data, 2) == {}
    stream = demo_training.synthetic_batches(data, batch_size=4, examples_per_step=8)  # grad_accum 2
    batches = [next(stream) for _ in range(6)]  # steps 0, 0, 1, 1, 2, 2
    assert all(e.answer == "one" for b in batches[:4] for e in b)
    resumed = demo_training.synthetic_batches(data, batch_size=4, start_index=16, examples_per_step=8)
    for expected in batches[4:]:
        got = next(resumed)
        assert [e.answer for e in got] == [e.answer for e in expected]
        assert [e.image.tobytes() for e in got] == [e.image.tobytes() for e in expected]
    with pytest.raises(ValueError, match="needs 'until_step'"):
        demo_training.data_stage({"stages": [{"kinds": ["count"]}]}, 0)


def test_tile_labels_put_each_shape_in_its_cell():
    from idefics3_kit.recipes.demo.synthetic import NO_LABEL, make_tile_labels

    for seed in range(30):
        labels = make_tile_labels(seed)
        if labels.word != NO_LABEL:
            assert labels.cell_shapes == [NO_LABEL] * 4
            continue
        filled = [s != NO_LABEL for s in labels.cell_shapes]
        assert 1 <= sum(filled) <= 3 and filled == [c != NO_LABEL for c in labels.cell_colours]


def test_vision_warm_up_trains_only_the_vision_side(processor):
    torch.manual_seed(0)
    model = demo_training.build_demo_model({"demo": True}, processor)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = demo_training.warm_up_vision(model, processor, {"steps": 2, "batch_size": 4, "lr": 1e-3}, progress=False)
    assert loss == loss  # finite
    after = model.state_dict()
    assert set(after) == set(before)  # the heads are not part of the model
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]) == name.startswith("decoder."), name


@pytest.mark.parametrize("per_token", [True, False])
def test_vision_warm_up_per_token_or_tile_mean(processor, per_token):
    torch.manual_seed(0)
    model = demo_training.build_demo_model({"demo": True}, processor)
    spec = {"steps": 1, "batch_size": 2, "per_token": per_token, "word_fraction": 0.5}
    assert demo_training.warm_up_vision(model, processor, spec, progress=False) > 0


def test_vision_warm_up_rejects_unknown_keys(processor):
    model = demo_training.build_demo_model({"demo": True}, processor)
    with pytest.raises(ValueError, match="unknown keys \\['step'\\]"):
        demo_training.warm_up_vision(model, processor, {"step": 10}, progress=False)


def test_word_fraction_controls_word_images():
    from idefics3_kit.recipes.demo.synthetic import NO_LABEL, make_tile_labels

    assert all(make_tile_labels(s, word_fraction=1.0).word != NO_LABEL for s in range(10))
    assert all(make_tile_labels(s, word_fraction=0.0).word == NO_LABEL for s in range(10))


def test_demo_model_takes_component_overrides(processor):
    model = demo_training.build_demo_model({"demo": True, "decoder": {"num_key_value_heads": 6}}, processor)
    assert model.config.decoder.num_key_value_heads == 6
    assert model.config.vision == demo_training.build_demo_model({"demo": True}, processor).config.vision


def test_demo_model_rejects_unknown_overrides(processor):
    with pytest.raises((TypeError, ValueError), match="decoderr"):
        demo_training.build_demo_model({"demo": True, "decoderr": {"hidden_size": 64}}, processor)
