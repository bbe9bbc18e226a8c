"""The README's main job and the registry listing, through the command line."""

import subprocess
import sys


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "idefics3_kit.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_demo_prints_tree_parameters_tokens_and_predictions():
    result = run_cli("demo")
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
