"""examples/assemble_clip_qwen2.py runs, from transformers checkpoints and from configs."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "assemble_clip_qwen2.py"


@pytest.mark.parametrize("source", ["checkpoints", "configs"])
def test_example_runs(tmp_path, monkeypatch, capsys, source):
    spec = importlib.util.spec_from_file_location("assemble_clip_qwen2", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if source == "configs":
        monkeypatch.setattr(module, "write_tiny_checkpoints", lambda root: None)
    module.main(tmp_path)
    out = capsys.readouterr().out
    assert "'vision': 'clip', 'connector': 'pixel_shuffle', 'decoder': 'qwen2'" in out
    assert "reloaded logits identical: True" in out
