"""The README's main job and the registry listing, through the command line."""

import os
import subprocess
import sys

import pytest

from idefics3_kit.recipes.demo.model import shipped_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.exists(os.path.join(shipped_model_dir(), "config.json"))


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "idefics3_kit.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


@pytest.mark.skipif(not SHIPPED, reason="no trained demo model is shipped")
def test_demo_answers_about_the_bundled_and_a_fresh_image(tmp_path):
    result = run_cli("demo", "--seed", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("vision", "siglip", "connector", "pixel_shuffle", "decoder", "llama3", "parameters",
                     "image tokens", "Q: What colour is the circle?\n  A: red\n", "fresh image (seed 3)"):
        assert expected in out, out
    assert (tmp_path / "demo_split.png").exists()


def test_demo_preset_prints_tree_parameters_tokens_and_predictions():
    result = run_cli("demo", "--preset", "tiny")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("vision", "siglip", "connector", "pixel_shuffle", "decoder", "llama3", "parameters",
                     "image tokens", "predicted next tokens"):
        assert expected in out


def test_components_command_lists_registry():
    result = run_cli("components")
    assert result.returncode == 0, result.stderr
    assert "llama3" in result.stdout and "siglip" in result.stdout


def test_bad_preset_is_one_line_error():
    result = run_cli("demo", "--preset", "nope")
    assert result.returncode == 2
    assert "unknown preset 'nope'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(SHIPPED, reason="a trained demo model is shipped")
def test_demo_without_a_shipped_model_says_so_and_shows_the_random_preset(tmp_path):
    result = run_cli("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no trained demo model is shipped" in result.stdout and "predicted next tokens" in result.stdout
