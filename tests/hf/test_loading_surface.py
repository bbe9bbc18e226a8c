"""transformers' from_pretrained arguments: Hub ids (offline, against a cache this test fills),
dtype="auto" and torch_dtype, device_map, refused arguments; and the model/config surface."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import idefics3_kit as ik
from idefics3_kit.hf import hub
from idefics3_kit.processing import Processor
from idefics3_kit.recipes.demo.model import shipped_model_dir

pytest.importorskip("huggingface_hub")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(cache, repo_id: str, source: str, commit: str = COMMIT) -> str:
    """The Hub cache layout huggingface_hub reads offline: models--org--name/{refs/main, snapshots/<commit>/}."""
    root = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(root, "snapshots", commit)
    shutil.copytree(source, snapshot)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


def test_a_hub_id_loads_offline_from_the_cache(tmp_path, monkeypatch):
    fill_cache(tmp_path / "cache", "someone/tiny-smolvlm", shipped_model_dir())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = ik.VLM.from_pretrained("someone/tiny-smolvlm", cache_dir=tmp_path / "cache")
    proc = Processor.from_pretrained("someone/tiny-smolvlm", cache_dir=tmp_path / "cache")
    local = ik.VLM.from_pretrained(shipped_model_dir())
    for (name, a), b in zip(model.state_dict().items(), local.state_dict().values()):
        assert torch.equal(a, b), name
    assert proc.image_token_id == model.image_token_id
    again = ik.VLM.from_pretrained("someone/tiny-smolvlm", cache_dir=tmp_path / "cache", revision=COMMIT,
                                   local_files_only=True)
    assert again.num_parameters() == model.num_parameters()


def test_a_missing_hub_id_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="'nobody/nothing' could not be found.*offline"):
        ik.VLM.from_pretrained("nobody/nothing", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="nobody/nothing"):
        Processor.from_pretrained("nobody/nothing", cache_dir=tmp_path)


def test_paths_are_not_mistaken_for_hub_ids(tmp_path):
    assert not hub.is_hub_id("./ckpt") and not hub.is_hub_id("/abs/ckpt") and not hub.is_hub_id("a/b/c")
    assert hub.is_hub_id("HuggingFaceTB/SmolVLM-256M-Instruct")
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        ik.VLM.from_pretrained(str(tmp_path / "nope"))


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16")
    ik.VLM.from_pretrained(shipped_model_dir(), dtype=torch.bfloat16).save_pretrained(path)
    return path


def test_dtype_auto_and_torch_dtype(bf16_checkpoint):
    assert ik.VLM.from_pretrained(bf16_checkpoint, dtype="auto").dtype == torch.bfloat16
    assert ik.VLM.from_pretrained(shipped_model_dir(), dtype="auto").dtype == torch.float32
    assert ik.VLM.from_pretrained(bf16_checkpoint, torch_dtype=torch.float32).dtype == torch.float32
    assert ik.VLM.from_pretrained(bf16_checkpoint, torch_dtype="auto").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="disagree"):
        ik.VLM.from_pretrained(bf16_checkpoint, dtype=torch.float16, torch_dtype=torch.float32)


def test_dtype_auto_reads_config_json(bf16_checkpoint, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(bf16_checkpoint, path)
    config = json.loads((path / "config.json").read_text())
    config["torch_dtype"] = "float16"
    (path / "config.json").write_text(json.dumps(config))
    assert ik.VLM.from_pretrained(path, dtype="auto").dtype == torch.float16


def test_device_map():
    assert ik.VLM.from_pretrained(shipped_model_dir(), device_map="cpu").device.type == "cpu"
    if not torch.cuda.is_available():
        assert ik.VLM.from_pretrained(shipped_model_dir(), device_map="auto").device.type == "cpu"
    with pytest.raises(ValueError, match="device= or device_map="):
        ik.VLM.from_pretrained(shipped_model_dir(), device="cpu", device_map="cpu")
    with pytest.raises(ValueError, match="as a dict"):
        ik.VLM.from_pretrained(shipped_model_dir(), device_map={"": 0})


def test_spreading_layers_over_devices_gives_the_same_logits():
    """The pipeline placement (device_map='auto' with several GPUs), run here over two CPU 'devices'."""
    plain = ik.VLM.from_pretrained(shipped_model_dir())
    spread = ik.VLM.from_pretrained(shipped_model_dir())
    hub.spread(spread, [torch.device("cpu"), torch.device("cpu")])
    assert len(spread.hf_device_map) == len(spread.decoder.model.layers)
    ids = torch.tensor([[1, 5, 9, 12]])
    torch.testing.assert_close(spread(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert spread.generate(input_ids=ids, max_new_tokens=4).tolist() == \
        plain.generate(input_ids=ids, max_new_tokens=4).tolist()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(trust_remote_code=True), ValueError, "trust_remote_code=True is not supported"),
    (dict(quantization_config={"load_in_8bit": True}), ValueError, "quantization_config"),
    (dict(colour="red"), TypeError, "unexpected argument 'colour'"),
])
def test_refused_loading_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        ik.VLM.from_pretrained(shipped_model_dir(), **kwargs)
    ik.VLM.from_pretrained(shipped_model_dir(), low_cpu_mem_usage=True, attn_implementation="sdpa",
                           trust_remote_code=False)


# ---- the model and config surface ----------------------------------------------------------------


def test_config_answers_transformers_names():
    cfg = ik.VLM.from_pretrained(shipped_model_dir()).config
    assert cfg.text_config is cfg.decoder and cfg.vision_config is cfg.vision
    assert cfg.model_type == "idefics3" and cfg.vocab_size == cfg.decoder.vocab_size
    assert cfg.hidden_size == cfg.decoder.hidden_size and cfg.tie_word_embeddings == cfg.decoder.tie_word_embeddings
    assert cfg.eos_token_id == cfg.decoder.eos_token_id and cfg.get_text_config() is cfg.decoder
    assert json.loads(cfg.to_json_string())["model_type"] == "idefics3"


def test_num_parameters_embeddings_and_resizing(tmp_path):
    model = ik.VLM.from_pretrained(shipped_model_dir())
    total = model.num_parameters()
    assert isinstance(total, int) and total == model.parameter_counts()["total"]
    for p in model.vision.parameters():
        p.requires_grad_(False)
    assert model.num_parameters(only_trainable=True) == total - model.parameter_counts()["vision"]
    emb = model.get_input_embeddings()
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert model.num_parameters(exclude_embeddings=True) == total - embeddings  # every nn.Embedding, as transformers
    old_rows, old_vocab = emb.weight.detach().clone(), model.config.vocab_size
    new = model.resize_token_embeddings(old_vocab + 3, pad_to_multiple_of=8)
    assert new.weight.shape[0] % 8 == 0 and model.config.vocab_size == new.weight.shape[0]
    assert torch.equal(new.weight[:old_vocab], old_rows)
    torch.testing.assert_close(new.weight[old_vocab:], old_rows.mean(0).expand(new.weight.shape[0] - old_vocab, -1))
    assert model.get_output_embeddings().weight.shape[0] == model.config.vocab_size
    model.save_pretrained(tmp_path)
    assert ik.VLM.from_pretrained(tmp_path).config.vocab_size == model.config.vocab_size
    with pytest.raises(ValueError, match="drop the <image> token"):
        model.resize_token_embeddings(model.image_token_id)
