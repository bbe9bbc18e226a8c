"""`idefics3-kit plan`: the printed budget, the picture, --model, and one-line errors."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from idefics3_kit import Processor, SplitterConfig, registry
from idefics3_kit.cli import main

CAT = str(Path(__file__).parent / "data" / "chelsea.png")  # 451×300


def test_plan_prints_the_budget_and_draws(tmp_path, capsys):
    out = tmp_path / "split.png"
    assert main(["plan", CAT, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for line in ("rows          3", "cols          4", "tiles         13", "image tokens  832"):
        assert line in printed
    picture = Image.open(out)
    assert picture.width > 640 + 256 and picture.height > 256


def test_plan_with_a_model_and_overrides(tmp_path, capsys):
    from tests.processor_checkpoints import tiny_tokenizer

    splitter = registry.create("splitter", "idefics3", SplitterConfig(longest_edge=96, tile_size=32))
    Processor(tiny_tokenizer(), splitter, image_seq_len=3).save_pretrained(tmp_path / "model")
    assert main(["plan", CAT, "--model", str(tmp_path / "model")]) == 0
    printed = capsys.readouterr().out
    assert "tiles         7" in printed and "image tokens  21" in printed and "prompt tokens" in printed
    assert main(["plan", CAT, "--no-split", "--out", str(tmp_path / "one.png")]) == 0
    assert "tiles         1 (unsplit)" in capsys.readouterr().out


def test_plan_errors_are_one_line(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert "image file not found" in err and len(err.strip().splitlines()) == 1
    assert main(["plan", CAT, "--tile-size", "0"]) == 2
    assert "--tile-size must be positive" in capsys.readouterr().err
    assert main(["plan", CAT, "--model", str(tmp_path)]) == 2
    assert "tokenizer.json not found" in capsys.readouterr().err
