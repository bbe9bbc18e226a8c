"""Validation at the boundary: values that cannot be right are refused where they enter, with one
error style (what, expected, got); the values the issue tracker found accepted are each here."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import idefics3_kit as ik
from idefics3_kit import cli
from idefics3_kit.components.splitter import SplitterConfig
from idefics3_kit.recipes.demo.model import shipped_model_dir

BASE = ik.VLMConfig.preset("tiny")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ik.VLM(BASE).eval()


# ---- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("build,match", [
    (lambda: BASE.decoder.replace(rms_norm_eps=-1e-5), r"DecoderConfig.rms_norm_eps: must be a finite number > 0"),
    (lambda: BASE.decoder.replace(rms_norm_eps=float("nan")), r"rms_norm_eps: .* got nan"),
    (lambda: BASE.vision.replace(layer_norm_eps=float("inf")), r"VisionConfig.layer_norm_eps"),
    (lambda: BASE.decoder.replace(rope_theta=0.0), r"rope_theta: must be a finite number > 0, got 0.0"),
    (lambda: BASE.decoder.replace(rope_scaling={"rope_type": "linear", "factor": 0.0}), r"rope_scaling: factor"),
    (lambda: BASE.connector.replace(scale_factor=2.5), r"ConnectorConfig.scale_factor: must be a positive integer"),
    (lambda: BASE.decoder.replace(tie_word_embeddings="no"), r"tie_word_embeddings: must be true or false"),
    (lambda: BASE.replace(vision=BASE.decoder), r"VLMConfig.vision: expects a VisionConfig"),
    (lambda: BASE.replace(decoder=BASE.decoder.replace(hidden_act="relu2")), r"hidden_act: unsupported activation"),
    (lambda: ik.VLM(BASE.replace(vision=BASE.vision.replace(hidden_act="relu"))),
     r"VisionConfig.hidden_act: unsupported activation 'relu'"),
    (lambda: BASE.replace(decoder=BASE.decoder.replace(pad_token_id=10 ** 6)), r"pad_token_id"),
])
def test_model_config_values_that_cannot_be_right(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


@pytest.mark.parametrize("build,match", [
    (lambda: SplitterConfig.from_hf({"do_image_splitting": "no"}), r"do_image_splitting must be true or false"),
    (lambda: SplitterConfig.from_hf({"do_resize": 1}), r"do_resize must be true or false"),
    (lambda: SplitterConfig(image_mean=(float("nan"), 0.5, 0.5)), r"image_mean: must be finite"),
    (lambda: SplitterConfig(image_std=(0.5, 0.0, 0.5)), r"image_std: must be non-zero"),
    (lambda: SplitterConfig(image_std=(0.5, 0.5)), r"image_std"),
    (lambda: SplitterConfig(rescale_factor=0.0), r"rescale_factor: must be a finite number > 0"),
    (lambda: SplitterConfig.from_hf({"size": {}}), r"size: must be a non-empty object"),
    (lambda: SplitterConfig.from_hf({"max_image_size": {}}), r"max_image_size: must be a non-empty object"),
    (lambda: SplitterConfig.from_hf({"size": {"longest_edge": -4}}), r"longest_edge"),
])
def test_processor_settings_that_cannot_be_right(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# ---- model inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("pixels,match", [
    (torch.ones(1, 1, 3, 64, 64, dtype=torch.uint8), r"pixel_values must hold the processor's normalized floats, "
                                                      r"got torch.uint8"),
    (torch.ones(1, 1, 3, 64, 64, dtype=torch.bool), r"got torch.bool"),
    (torch.full((1, 1, 3, 64, 64), float("nan")), r"pixel_values hold NaN or inf"),
    (torch.full((1, 1, 3, 64, 64), float("inf")), r"pixel_values hold NaN or inf"),
])
def test_pixel_values_of_the_wrong_kind(model, pixels, match):
    ids = torch.full((1, 4), model.image_token_id)
    with pytest.raises(ValueError, match=match):
        model(input_ids=ids, pixel_values=pixels)


def test_image_tokens_without_pixels(model):
    with pytest.raises(ValueError, match=r"1 <image> token\(s\) .* but no pixel_values"):
        model(input_ids=torch.tensor([[1, model.image_token_id]]))


def test_all_ignored_labels_give_loss_zero_and_a_warning(model):
    """transformers divides 0 by 0 (NaN); ours is 0 with a warning: a NaN would poison the running
    mean of a training loop, while 0 is the loss of learning nothing (docs/reliability.md)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.full((1, 3), -100))
    assert out.loss.item() == 0.0 and out.loss.requires_grad is torch.is_grad_enabled()
    assert any("every label is -100" in str(w.message) for w in caught)


# ---- generation --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), r"at least one prompt token"),
    (dict(input_ids=torch.zeros(0, 3, dtype=torch.long)), r"at least one prompt token"),
    (dict(input_ids=torch.tensor([1, 2])), r"input_ids \[batch, length\], got \(2,\)"),
    (dict(input_ids=torch.tensor([[1.0, 2.0]])), r"integer token ids, got dtype torch.float32"),
    (dict(input_ids=torch.tensor([[1, 9999]])), r"token id 9999, outside the vocabulary \[0, 512\)"),
    (dict(input_ids=torch.tensor([[1, 2]]), pad_token_id=10 ** 6), r"pad_token_id=1000000 is outside"),
    (dict(input_ids=torch.tensor([[1, 2]]), eos_token_id=[3, -3]), r"eos_token_id=-3 is outside"),
    (dict(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.tensor([[0, 0]])), r"rows \[0\] mask out every"),
    (dict(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 1, 1]])), r"must match input_ids"),
    (dict(input_ids=torch.tensor([[1, 2]]), do_sample=True, top_p=2.0), r"top_p must be in \[0, 1\]"),
    (dict(input_ids=torch.tensor([[1, 2]]), max_new_tokens=-1), r"max_new_tokens must be an integer >= 0"),
])
def test_generate_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(**kwargs)


def test_nan_logits_stop_generation_with_the_step_named():
    torch.manual_seed(0)
    broken = ik.VLM(BASE).eval()
    with torch.no_grad():
        broken.decoder.lm_head.weight[:, 0] = float("nan")  # NaN from the first step on
    with pytest.raises(FloatingPointError, match=r"NaN/inf logits at generation step 0 for rows \[0, 1\]"):
        broken.generate(input_ids=torch.tensor([[1, 2], [3, 4]]), max_new_tokens=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_logits_names_exactly_the_rows_with_nan_or_inf(dtype, bad):
    from idefics3_kit.generation import check_logits

    logits = torch.randn(4, 300).to(dtype)
    logits[0, 0] = 1e30 if dtype == torch.float32 else 1e38  # large but finite: fine
    check_logits(logits, 5)
    check_logits(torch.empty(0, 300, dtype=dtype), 0)
    for rows in ([0], [1, 3], [0, 1, 2, 3]):
        broken = logits.clone()
        for r in rows:
            broken[r, (7 * r) % 300] = bad
        with pytest.raises(FloatingPointError, match=rf"at generation step 5 for rows \{rows}"):
            check_logits(broken, 5)


# ---- processor -----------------------------------------------------------------------------------


def test_processor_inputs():
    from idefics3_kit.processing import Processor

    proc = Processor.from_pretrained(shipped_model_dir())
    with pytest.raises(ValueError, match="`text` is an empty list"):
        proc(text=[])
    with pytest.raises(ValueError, match="message 0: 'role'"):
        proc.apply_chat_template([{"content": "hi"}])


def test_a_tokenizer_without_the_image_token_is_refused(tmp_path):
    import json
    import shutil

    from idefics3_kit.processing import Processor

    target = tmp_path / "ckpt"
    shutil.copytree(shipped_model_dir(), target)
    data = json.loads((target / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<image>"]
    data["model"]["vocab"].pop("<image>", None)
    (target / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="<image>"):
        Processor.from_pretrained(target)


# ---- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv,match", [
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--device", "cuda"], r"--device cuda: no CUDA GPU"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--device", "banana"], r"--device 'banana' is not"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--threads", "-1"], r"--threads must be >= 1, got -1"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--sample", "--top-p", "2"], r"--top-p must be in"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--sample", "--temperature", "0"], r"--temperature"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "-5"], r"--max-new-tokens must be"),
    (["generate", "--model", "{ckpt}", "--prompt", "hi", "--image", "{ckpt}"], r"is a directory"),
    (["train", "--config", "{bad_config}"], r"weight_decay: must be >= 0"),
    (["export", "--run", "{corrupt_run}", "--out", "{tmp}/x"], r"trainer_state.json"),
])
def test_cli_errors_are_one_line(argv, match, tmp_path, capsys):
    import json
    import os

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": {"source": "x.jsonl"}, "weight_decay": -1}))
    run = tmp_path / "run" / "checkpoints" / "step-00000001"
    run.mkdir(parents=True)
    (run / "trainer_state.json").write_text("{broken")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-00000001\n")
    fill = dict(ckpt=shipped_model_dir(), bad_config=str(bad), corrupt_run=str(tmp_path / "run"), tmp=str(tmp_path))
    code = cli.main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert __import__("re").search(match, err), err
    assert not os.path.exists(tmp_path / "x")


def test_chat_survives_invalid_utf8_on_stdin():
    stdin = b"\xff\xfe not text\nhello\n/quit\n"
    proc = subprocess.run([sys.executable, "-m", "idefics3_kit.cli", "chat", "--model", shipped_model_dir(),
                           "--max-new-tokens", "2", "--no-progress"], input=stdin, capture_output=True,
                          timeout=180, env={"PYTHONIOENCODING": "utf-8", "PATH": "/usr/bin:/bin",
                                            "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])})
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"not valid UTF-8" in proc.stderr and proc.stdout.count(b"assistant>") == 1


def test_an_unexpected_exception_is_one_line_with_exit_1(monkeypatch, capsys):
    def bug(args):
        raise RuntimeError("something of ours broke")

    monkeypatch.setattr(cli, "cmd_components", bug)
    parser_args = ["components"]
    monkeypatch.setattr(cli, "add_components_parser",
                        lambda sub: sub.add_parser("components").set_defaults(func=bug))
    monkeypatch.setattr(cli, "PARSERS", [cli.add_components_parser])
    assert cli.main(parser_args) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: something of ours broke" in err and "--debug" in err
