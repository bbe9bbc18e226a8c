"""Command lines: any mix of commands, flags and values ends with status 0, or status 2 and one
line on stderr naming the problem; never a traceback, never status 1 (our own bug)."""

from __future__ import annotations

import contextlib
import io
import os

from hypothesis import strategies as st

from idefics3_kit import cli
from idefics3_kit.recipes.demo.model import shipped_model_dir
from tests.fuzz.outcomes import fuzz

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTO = os.path.join(os.path.dirname(HERE), "data", "coffee.png")
MODEL = shipped_model_dir()

values = st.sampled_from(["0", "1", "-1", "2", "0.5", "nan", "inf", "-inf", "1e309", "x", "", "cuda", "cpu", "meta",
                          "cuda:3", "bf16", "fp64", MODEL, PHOTO, "/nonexistent", "/dev/null", HERE, "\udcff"])
flags = st.sampled_from(["--model", "--image", "--prompt", "--device", "--threads", "--dtype", "--max-new-tokens",
                         "--min-new-tokens", "--temperature", "--top-k", "--top-p", "--min-p",
                         "--repetition-penalty", "--seed", "--sample", "--stream", "--tile-size", "--longest-edge",
                         "--image-seq-len", "--no-split", "--no-progress", "--run", "--out", "--adapter", "--config"])
commands = st.sampled_from(["generate", "plan", "inspect", "components", "export", "nonsense"])


@st.composite
def argv(draw):
    words = [draw(commands)]
    if words[0] == "generate" and draw(st.booleans()):
        words += ["--model", MODEL, "--prompt", "hi", "--max-new-tokens", "1", "--no-progress"]
    if words[0] == "plan" and draw(st.booleans()):
        words.append(PHOTO)
    for _ in range(draw(st.integers(0, 4))):
        words.append(draw(flags))
        if draw(st.integers(0, 3)):
            words.append(draw(values))
    return words


def check_cli(words):
    err, out = io.StringIO(), io.StringIO()
    if "--out" in words:  # never write pictures or exports into the repository
        words = [w if w != "--out" else "--out=/tmp/idefics3_kit_fuzz_out/x" for w in words]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli.main(words)
        except SystemExit as exc:  # argparse: a bad flag
            code = exc.code
    message = err.getvalue()
    assert code in (0, 2), (words, code, message)
    assert "Traceback" not in message, (words, message)
    if code == 2:
        lines = [line for line in message.splitlines() if line.strip()]
        assert lines and "error" in lines[-1], (words, message)


test_command_lines, test_command_lines_full = fuzz(argv(), fast=25, full=300)(check_cli)
