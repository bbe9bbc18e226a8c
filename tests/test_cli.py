"""CLI smoke tests through a subprocess, with a tiny checkpoint (random weights, tiny BPE tokenizer)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")

import idefics3_kit as ik  # noqa: E402
from idefics3_kit import cli  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["<pad>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>"]
HAS_PROCESSOR = importlib.util.find_spec("idefics3_kit.processing") is not None
needs_processor = pytest.mark.skipif(not HAS_PROCESSOR, reason="idefics3_kit.processing (the Processor issue) is "
                                     "not in this tree yet; these run once both branches are merged")


def run_cli(*args, stdin: str | None = None, bootstrap: str | None = None, timeout: int = 120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if bootstrap is None:
        cmd = [sys.executable, "-m", "idefics3_kit.cli", *args]
    else:
        cmd = [sys.executable, "-c", bootstrap, *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["User: What is in this image? Assistant: a cat on a mat, café 🙂"] * 20, trainer)
    return t


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint dir: our model (vocab = the tokenizer's), tokenizer.json, processor files if
    transformers can write them, and a test image."""
    path = tmp_path_factory.mktemp("tiny_ckpt")
    tok = build_tokenizer()
    tok.save(str(path / "tokenizer.json"))
    cfg = ik.VLMConfig.preset("tiny")
    eou = tok.token_to_id("<end_of_utterance>")
    cfg = cfg.replace(decoder=cfg.decoder.replace(vocab_size=tok.get_vocab_size(), eos_token_id=eou, pad_token_id=0,
                                                  bos_token_id=1),
                      image_token_id=tok.token_to_id("<image>"))
    torch.manual_seed(0)
    ik.VLM(cfg).save_pretrained(path)
    _write_processor_files(path, cfg)
    from PIL import Image

    import numpy as np

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(path / "photo.png")
    return path


def _write_processor_files(path, cfg) -> None:
    """HF processor files (what a real checkpoint ships), written by transformers when installed."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.models.idefics3 import Idefics3Processor
        from transformers.models.idefics3 import Idefics3ImageProcessorPil
    except ImportError:
        return
    try:
        hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), pad_token="<pad>",
                                         bos_token="<|im_start|>", eos_token="<end_of_utterance>")
        tile = cfg.vision.image_size
        improc = Idefics3ImageProcessorPil(size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile})
        template = ("<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
                    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
                    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
                    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
                    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
        proc = Idefics3Processor(image_processor=improc, tokenizer=hf_tok, image_seq_len=cfg.image_seq_len,
                                 chat_template=template)
        proc.save_pretrained(str(path))
        improc.save_pretrained(str(path))  # preprocessor_config.json, as released checkpoints have it
        tok_json = path / "tokenizer.json"  # keep our own tokenizer file (same content, tokenizers format)
        assert tok_json.exists()
    except Exception as exc:  # noqa: BLE001 - optional: only the real-processor tests need these files
        print(f"processor files not written: {exc}")


# ---- a stand-in processor (until the Processor issue is merged) ----------------------------

STUB = textwrap.dedent('''
    import json, os, sys, types
    import numpy as np, torch
    from tokenizers import Tokenizer

    class Processor:
        """Minimal stand-in with the Processor API: one tile per image, no row/col tags."""
        def __init__(self, path):
            self.tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
            cfg = json.load(open(os.path.join(path, "config.json")))
            self.size = cfg["vision_config"]["image_size"]
            self.seq = (self.size // cfg["vision_config"]["patch_size"] // cfg["scale_factor"]) ** 2

        @classmethod
        def from_pretrained(cls, path):
            return cls(path)

        def apply_chat_template(self, messages, add_generation_prompt=False):
            out = "<|im_start|>"
            for m in messages:
                body = "".join("<image>" if c["type"] == "image" else c["text"] for c in m["content"])
                out += m["role"].capitalize() + ": " + body + "<end_of_utterance>\\n"
            return out + ("Assistant:" if add_generation_prompt else "")

        def __call__(self, text, images=None, return_tensors="pt", padding=True):
            imgs = [im for row in (images or []) for im in row]
            s = text[0].replace("<image>", "<fake_token_around_image><global-img>" + "<image>" * self.seq
                                + "<fake_token_around_image>")
            ids = torch.tensor([self.tokenizer.encode(s).ids])
            out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if imgs:
                arr = [np.asarray(im.convert("RGB").resize((self.size, self.size)), dtype=np.float32) / 127.5 - 1
                       for im in imgs]
                out["pixel_values"] = torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2)[None]
            return out

        def decode(self, ids, skip_special_tokens=True):
            return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    mod = types.ModuleType("idefics3_kit.processing")
    mod.Processor = Processor
    sys.modules["idefics3_kit.processing"] = mod
    from idefics3_kit.cli import main
    sys.exit(main(sys.argv[1:]))
''')


# The real Processor when it is in the tree; the stand-in above only for a tree without it.
PROCESSOR_BOOTSTRAP = None if HAS_PROCESSOR else STUB


# ---- help, components, errors --------------------------------------------------------------

@pytest.mark.parametrize("command", ["generate", "chat", "inspect", "components", "serve"])
def test_help_documents_every_flag(command):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    text = sub.format_help()
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in text
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help text"
    r = run_cli(command, "--help")
    assert r.returncode == 0 and "usage: idefics3-kit " + command in r.stdout


def test_components_lists_the_samplers():
    r = run_cli("components")
    assert r.returncode == 0
    line = next(l for l in r.stdout.splitlines() if l.startswith("sampler"))
    for name in ("greedy", "top_k", "top_p", "min_p", "temperature", "repetition_penalty"):
        assert name in line


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/no/such/dir", "--prompt", "hi"], "model directory not found"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--image", "/no/such.jpg"], "image not found"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--top-p", "lots"], "invalid float value"),
    (["generate", "--model", "{ckpt}"], "required: --prompt"),
    (["inspect", "--model", "/no/such/dir"], "model directory not found"),
    (["chat", "--model", "{ckpt}", "--dtype", "int3"], "invalid choice"),
])
def test_user_errors_are_one_line_with_nonzero_exit(checkpoint, args, message):
    r = run_cli(*[a.replace("{ckpt}", str(checkpoint)) for a in args])
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_inspect(checkpoint):
    r = run_cli("inspect", "--model", str(checkpoint), "--image", str(checkpoint / "photo.png"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    total = sum(p.numel() for p in ik.VLM.from_pretrained(checkpoint).parameters())
    assert f"VLM ({total:,} parameters)" in out
    for kind in ("vision", "connector", "decoder"):
        assert kind in out
    assert "context: 2,048 tokens" in out and "image tokens" in out and "token budget" in out


# ---- generate / chat through the processor -------------------------------------------

def test_generate_through_the_processor(checkpoint):
    args = ["generate", "--model", str(checkpoint), "--image", str(checkpoint / "photo.png"),
            "--prompt", "What is in this image?", "--max-new-tokens", "12"]
    r = run_cli(*args, bootstrap=PROCESSOR_BOOTSTRAP)
    assert r.returncode == 0, r.stderr
    s = run_cli(*args, "--stream", "--no-progress", bootstrap=PROCESSOR_BOOTSTRAP)
    assert s.returncode == 0, s.stderr
    assert s.stdout == r.stdout  # streaming prints the same answer as the one-shot decode
    assert "generating" in r.stderr or "loading" in r.stderr  # progress bars on stderr


def test_generate_sampling_is_reproducible_with_seed(checkpoint):
    args = ["generate", "--model", str(checkpoint), "--prompt", "hi", "--max-new-tokens", "10", "--sample",
            "--temperature", "0.9", "--top-p", "0.9", "--seed", "3", "--no-progress", "--dtype", "bf16"]
    a, b = run_cli(*args, bootstrap=PROCESSOR_BOOTSTRAP), run_cli(*args, bootstrap=PROCESSOR_BOOTSTRAP)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout


def test_chat_multi_turn_through_the_processor(checkpoint):
    script = f"/image {checkpoint / 'photo.png'}\nWhat is this?\n/image /missing.png\nAnd now?\n/reset\nhi\n/quit\n"
    r = run_cli("chat", "--model", str(checkpoint), "--max-new-tokens", "6", "--no-progress",
                stdin=script, bootstrap=PROCESSOR_BOOTSTRAP)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 3
    assert "image not found: /missing.png" in r.stderr and "conversation cleared" in r.stderr


# ---- with the real Processor (after the merge) ---------------------------------------------

@needs_processor
def test_generate_with_real_processor(checkpoint):
    if not (checkpoint / "processor_config.json").exists() and not (checkpoint / "preprocessor_config.json").exists():
        pytest.skip("transformers could not write the processor files for the tiny checkpoint")
    args = ["generate", "--model", str(checkpoint), "--image", str(checkpoint / "photo.png"),
            "--prompt", "What is in this image?", "--max-new-tokens", "8"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    s = run_cli(*args, "--stream")
    assert s.returncode == 0, s.stderr
    assert s.stdout == r.stdout


@needs_processor
def test_chat_with_real_processor(checkpoint):
    if not (checkpoint / "preprocessor_config.json").exists():
        pytest.skip("transformers could not write the processor files for the tiny checkpoint")
    script = f"/image {checkpoint / 'photo.png'}\nWhat is this?\nAnd the colours?\n"
    r = run_cli("chat", "--model", str(checkpoint), "--max-new-tokens", "5", "--no-progress", stdin=script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2


@needs_processor
def test_model_stream_with_real_processor(checkpoint):
    from idefics3_kit.processing import Processor
    from PIL import Image

    proc = Processor.from_pretrained(checkpoint)
    model = ik.VLM.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    batch = proc(text=[prompt], images=[[Image.open(checkpoint / "photo.png")]], return_tensors="pt", padding=True)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask") if k in batch}
    ids = model.generate(**batch, max_new_tokens=16)
    text = "".join(model.stream(proc, **batch, max_new_tokens=16))
    assert text == proc.decode(ids[0, batch["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)


def test_checkpoint_fixture_is_consistent(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    assert cfg["image_token_id"] == tokenizers.Tokenizer.from_file(str(checkpoint / "tokenizer.json")).token_to_id(
        "<image>")


@pytest.mark.parametrize("hw, sizes, grid", [
    ((900, 1600), (2048, 512), (3, 4)), ((1600, 900), (2048, 512), (4, 3)), ((300, 300), (2048, 512), (4, 4)),
    ((100, 2000), (2048, 512), (1, 4)), ((2000, 100), (2048, 512), (4, 1)), ((480, 640), (2048, 512), (3, 4)),
    ((3, 10), (1456, 364), (2, 4)), ((364, 728), (1456, 364), (2, 4)), ((20000, 500), (1456, 364), (4, 1)),
])
def test_inspect_tile_grid_matches_the_reference_table(hw, sizes, grid):
    # idefics3-reference.md §1.12 worked examples (H x W in, rows x cols out)
    from idefics3_kit.components.splitter import SplitterConfig, plan_tiles

    plan = plan_tiles(*hw, SplitterConfig(longest_edge=sizes[0], tile_size=sizes[1]))
    assert (plan.rows, plan.cols) == grid


# ---- version, Ctrl-C and history in chat ----------------------------------------------

def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"idefics3-kit {ik.__version__}"


def _chat_with(monkeypatch, lines, answer):
    """Run ``chat`` in-process with a scripted prompt (``lines``; an exception in it is raised
    at the prompt) and ``answer(turn)`` standing in for the model."""
    class FakeModel:
        def enable_feature_cache(self):
            pass

        def enable_packed_weights(self, parts=("vision", "connector"), *, decoder_max_bytes=0):
            return 0

    monkeypatch.setattr(cli, "_load", lambda args: (FakeModel(), None))
    turns = []

    def fake_answer(model, proc, messages, images, args, stream, out=None):
        turns.append(messages)
        return answer(len(turns))

    def fake_input(prompt=""):
        item = lines.pop(0) if lines else EOFError()
        if isinstance(item, BaseException):
            raise item
        return item

    monkeypatch.setattr(cli, "_answer", fake_answer)
    monkeypatch.setattr("builtins.input", fake_input)
    args = cli.build_parser().parse_args(["chat", "--model", "unused"])
    return args.func(args), turns


def test_ctrl_c_during_an_answer_stops_that_answer_not_the_chat(monkeypatch, capsys):
    def answer(n):
        if n == 1:
            raise KeyboardInterrupt
        return "fine"

    code, turns = _chat_with(monkeypatch, ["first", "second"], answer)
    assert code == 0 and len(turns) == 2
    # the interrupted turn is not kept: the second question goes out without the first
    texts = [m["content"][-1]["text"] for m in turns[1]]
    assert texts == ["second"]
    assert "answer stopped" in capsys.readouterr().err


def test_ctrl_c_at_the_prompt_drops_the_line(monkeypatch):
    code, turns = _chat_with(monkeypatch, [KeyboardInterrupt(), "hello"], lambda n: "hi")
    assert code == 0 and len(turns) == 1


def test_chat_history_is_kept_between_sessions_on_a_terminal(monkeypatch, tmp_path):
    readline = pytest.importorskip("readline")
    history = tmp_path / "history"
    monkeypatch.setattr(cli, "HISTORY_FILE", str(history))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    saved = []
    monkeypatch.setattr("atexit.register", lambda fn: saved.append(fn))
    readline.clear_history()
    cli._line_editing()
    readline.add_history("what is in the picture?")
    for fn in saved:
        fn()
    assert "what is in the picture?" in history.read_text()
    readline.clear_history()
    cli._line_editing()  # the next session reads it back
    assert readline.get_history_item(readline.get_current_history_length()) == "what is in the picture?"


def test_chat_without_a_terminal_leaves_readline_alone(monkeypatch):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    registered = []
    monkeypatch.setattr("atexit.register", lambda fn: registered.append(fn))
    cli._line_editing()
    assert registered == []
