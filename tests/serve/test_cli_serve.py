"""``idefics3-kit serve``: flags documented and checked before the model loads; a clear line without FastAPI."""

from __future__ import annotations

import argparse
import sys

import pytest

from idefics3_kit import cli


def _serve_parser():
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]


def test_help_names_the_issue_s_flags():
    # every flag having help text is checked for all commands in tests/test_cli.py
    text = _serve_parser().format_help()
    for flag in ("--host", "--port", "--dtype", "--device", "--quantization", "--max-batch-size", "--api-key",
                 "--allowed-image-dir", "--allow-remote-images"):
        assert flag in text


@pytest.mark.parametrize("args,message", [
    (["--port", "0"], "--port must be in 1..65535"),
    (["--max-batch-size", "0"], "--max-batch-size must be an integer >= 1"),
    (["--request-timeout", "0"], "--request-timeout must be > 0"),
    (["--allowed-image-dir", "/no/such/dir"], "--allowed-image-dir /no/such/dir: not a directory"),
    ([], "model directory not found: /no/such/model"),
])
def test_bad_flags_are_one_line_before_loading(capsys, args, message):
    pytest.importorskip("fastapi")
    assert cli.main(["serve", "/no/such/model", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_without_fastapi_the_error_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert cli.main(["serve", "/no/such/model"]) == 2
    err = capsys.readouterr().err
    assert 'pip install -c constraints.txt "idefics3_kit[serve]"' in err and err.count("\n") == 1


def test_the_core_package_imports_without_fastapi():
    import subprocess

    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None; import idefics3_kit, "
            "idefics3_kit.cli; idefics3_kit.cli.build_parser(); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_load_quantizes_the_decoder(method):
    """``--quantization`` loads through VLM.from_pretrained(quantization=...): no torchao needed."""
    import torch

    from idefics3_kit.recipes.demo.model import shipped_model_dir
    from idefics3_kit.serve.server import load

    model, processor = load(shipped_model_dir(), quantization=method)
    assert model.quantization_config["bits"] == {"int8": 8, "int4": 4}[method]
    assert model.feature_cache is not None
    ids = processor(text=["hello"], return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=3)
    assert ids.shape[1] < out.shape[1] <= ids.shape[1] + 3
    assert torch.equal(out[:, :ids.shape[1]], ids)


def test_load_refuses_an_unknown_quantization():
    from idefics3_kit.recipes.demo.model import shipped_model_dir
    from idefics3_kit.serve.server import load

    with pytest.raises(ValueError, match="quantization must be one of"):
        load(shipped_model_dir(), quantization="int3")
