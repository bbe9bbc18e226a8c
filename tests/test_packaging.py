"""Packaging: an isolated build fails loudly with the command that works, the wheel pins the torch
its extension was compiled against, the version lives in one place, and the package is typed."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import idefics3_kit

ROOT = pathlib.Path(__file__).resolve().parent.parent

# runs setup.py as pip's isolated build would: torch cannot be imported
NO_TORCH_SETUP = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
sys.meta_path.insert(0, NoTorch())
sys.argv = ["setup.py", *sys.argv[1:]]
runpy.run_path("setup.py", run_name="__main__")
"""


def _setup(*args, env=None):
    return subprocess.run([sys.executable, "-c", NO_TORCH_SETUP, *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=120)


def test_a_build_without_torch_fails_loudly_with_the_command_that_works():
    result = _setup("build_ext", "--dry-run")
    assert result.returncode != 0
    assert "pip install --no-build-isolation ." in result.stderr + result.stdout
    assert "IDEFICS3_KIT_SKIP_EXT=1" in result.stderr + result.stdout


def test_metadata_needs_no_torch():
    result = _setup("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == idefics3_kit.__version__


def test_the_wheel_requires_the_torch_it_was_built_against():
    import torch

    namespace: dict = {"__file__": str(ROOT / "setup.py")}
    source = (ROOT / "setup.py").read_text().split("\next_modules, cmdclass = _extensions()")[0]
    exec(compile(source, "setup.py", "exec"), namespace)  # the helpers only; nothing is built
    requirement = namespace["_torch_requirement"](["an extension"])
    assert requirement == f"torch=={torch.__version__.split('+')[0]}"
    assert namespace["_torch_requirement"]([]) == "torch>=2.4"  # a pure-Python install runs any torch


def test_the_version_has_one_home():
    homes = [p for p in (ROOT / "idefics3_kit").rglob("*.py") if re.search(r"^__version__ =", p.read_text(), re.M)]
    assert [p.name for p in homes] == ["version.py"]
    assert "version=_version()" in (ROOT / "setup.py").read_text()


def test_the_package_is_typed():
    assert (ROOT / "idefics3_kit" / "py.typed").exists()
    assert '"py.typed"' in (ROOT / "setup.py").read_text()
