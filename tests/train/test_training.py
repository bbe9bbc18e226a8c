"""The demo recipe through the Trainer: the synthetic source, the curriculum, the demo model and
its vision warm-up, the schedule, resume, freezing and the CLI."""

import subprocess
import sys

import pytest
import torch

from idefics3_kit import train as T
from idefics3_kit.recipes.demo import training as demo_training
from idefics3_kit.recipes.demo.synthetic import make_example
from idefics3_kit.train import checkpoint, metrics


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from idefics3_kit.recipes.demo.model import build_processor

    return build_processor(str(tmp_path_factory.mktemp("proc")), vocab_size=320)


@pytest.fixture(scope="module")
def processor_dir(processor, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("p"))
    processor.save_pretrained(path)
    return path


def demo_cfg(out_dir, processor_dir, **changes) -> dict:
    cfg = {"out_dir": str(out_dir), "model": {"demo": True}, "processor": {"path": processor_dir},
           "data": {"source": "synthetic", "options": {"seed": 0}, "num_workers": 0}, "steps": 4, "batch_size": 4,
           "lr": 3e-3, "warmup_steps": 1, "save_every": 2, "num_threads": 1}
    cfg.update(changes)
    return cfg


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = T.TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1, data={"source": "synthetic"})
    factors = [T.lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert T.lr_factor(100, cfg) == pytest.approx(0.1)


def test_synthetic_conversations_label_only_the_answer(processor):
    source = demo_training.synthetic_source({"seed": 0}, global_batch=5, steps=1)
    items = [source[i] for i in range(5)]
    batch = T.ConversationCollator(processor)(items)["inputs"]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for i in range(5):
        example = source.example(i)
        labels = batch["labels"][i]
        assert processor.decode(labels[labels != -100].tolist()) == f" {example.answer}<end_of_utterance>\n"
        assert (batch["input_ids"][i][labels != -100] == labels[labels != -100]).all()
        assert batch["attention_mask"][i, 0] == 1  # right padded for training


def test_the_demo_trains_through_the_trainer_and_resumes_exactly(tmp_path, processor, processor_dir):
    torch.manual_seed(0)
    straight = T.Trainer(config=demo_cfg(tmp_path / "a", processor_dir), progress=False).fit()
    half = demo_cfg(tmp_path / "b", processor_dir, save_every=100)
    T.Trainer(config=half, progress=False).fit(until=2)  # an interrupted run
    assert checkpoint.read_state(checkpoint.latest(half["out_dir"]))["step"] == 2
    resumed = T.Trainer(config=half, progress=False).fit()  # picks up at step 2
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    curve = [r["loss"] for r in metrics.read(str(tmp_path / "a"))]
    assert curve[-1] < curve[0]


def test_freezing_keeps_components_fixed(tmp_path, processor, processor_dir):
    cfg = demo_cfg(tmp_path, processor_dir, steps=2, freeze=["vision", "decoder"])
    trainer = T.Trainer(config=cfg, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    after = trainer.fit().state_dict()
    for name, tensor in before.items():
        changed = not torch.equal(tensor, after[name])
        assert changed == name.startswith("connector."), name


def test_bad_configs_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"TrainConfig.freeze: unknown components \['eyes'\]"):
        T.TrainConfig(freeze=["eyes"], data={"source": "synthetic"})
    bad = tmp_path / "c.json"
    bad.write_text('{"stepz": 3}')
    with pytest.raises(ValueError, match=r"c.json: TrainConfig: unknown key\(s\) \['stepz'\]"):
        T.TrainConfig.from_file(str(bad))
    with pytest.raises(ValueError, match="data.options: unknown key"):
        demo_training.synthetic_source({"seeed": 1}, global_batch=1, steps=1)


def test_cli_train(tmp_path, processor_dir):
    import json

    cfg_file = tmp_path / "train.json"
    cfg_file.write_text(json.dumps(demo_cfg(tmp_path / "x", processor_dir, steps=1, batch_size=2)))
    result = subprocess.run([sys.executable, "-m", "idefics3_kit.cli", "train", "--config", str(cfg_file),
                             "--out-dir", str(tmp_path / "out"), "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()
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
    source = demo_training.synthetic_source(data, global_batch=8, steps=3)  # 8 examples per step
    examples = [source.example(i) for i in range(24)]  # steps 0, 1, 2
    assert all(e.answer == "one" for e in examples[:16])
    again = demo_training.synthetic_source(data, global_batch=8, steps=3)
    for i in range(16, 24):  # example i is a pure function of i: a resumed run draws the same
        assert again.example(i).answer == examples[i].answer
        assert again.example(i).image.tobytes() == examples[i].image.tobytes()
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
