"""Quantized models (VLM.quantize, from_pretrained(quantization=...), the saved layout): generate
equals the dequantized-weights model's, checkpoints round-trip, bad requests are named, and
torchao's weight-only quantization runs generate (the fast paths step aside)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn as nn

import idefics3_kit as ik
from idefics3_kit import ops
from idefics3_kit.ops import quant

GEN = dict(max_new_tokens=6, eos_token_id=[])
METHODS = [("int8", None), ("int4", 32)]


def _model_and_batch(dtype=torch.float32, tie=False):
    torch.manual_seed(0)
    cfg = ik.VLMConfig.preset("tiny")
    if tie:
        cfg = cfg.replace(decoder=cfg.decoder.replace(tie_word_embeddings=True))
    model = ik.VLM(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.image_token_id, (2, 12), generator=g)
    ids[:, 2:2 + cfg.image_seq_len] = cfg.image_token_id
    pixels = torch.randn(2, 1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g).to(dtype)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :2] = 0
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


class _DequantizedLinear(nn.Linear):
    """A float linear holding a dequantized weight that, like the quantized format's decode step,
    feeds at most MAX_ROWS rows through the activation quantization (quantize_activations)."""

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if rows <= quant.MAX_ROWS:
            xq, xs = quant.quantize_activations(x)
            x = (xq.float() * xs.repeat_interleave(quant.ACT_BLOCK, dim=-1)[..., :x.shape[-1]]).to(x.dtype)
        return super().forward(x)


def _dequantized_copy(model):
    """The model with every QuantizedLinear replaced by a _DequantizedLinear holding its dequantized weight."""
    out = ik.VLM(model.config).to(model.dtype).eval()
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, quant.QuantizedLinear):
            parent, _, attr = name.rpartition(".")
            lin = _DequantizedLinear(module.in_features, module.out_features, bias=module.bias is not None,
                                     dtype=model.dtype)
            lin.weight.data = module.dequantized_weight(torch.float32).to(module.scales.dtype)
            if module.bias is not None:
                lin.bias.data = module.bias.data
            setattr(out.get_submodule(parent), attr, lin)
            state[f"{name}.weight"] = lin.weight
    for name, p in model.named_parameters():
        if not name.endswith((".qweight", ".scales")) and name not in state:
            state[name] = p
    out.load_state_dict(state, strict=False)
    return out


@pytest.mark.parametrize("method,group", METHODS)
@pytest.mark.parametrize("tie", [False, True])
def test_generate_equals_the_dequantized_model(method, group, tie):
    model, batch = _model_and_batch(tie=tie)
    model.quantize(method, group_size=group)
    assert isinstance(model.decoder.lm_head, quant.QuantizedLinear)
    assert isinstance(model.decoder.model.layers[0].mlp.down_proj, quant.QuantizedLinear)
    assert isinstance(model.decoder.model.embed_tokens, nn.Embedding)  # embeddings stay float
    ids = model.generate(**batch, **GEN)
    assert torch.equal(ids, _dequantized_copy(model).generate(**batch, **GEN))


@pytest.mark.parametrize("method,group", METHODS)
def test_bf16_compiled_decode_step_matches_reference_path(method, group):
    """The compiled kernels (one decode_layers call) vs the reference path (dequantize + bf16
    matmul): the same logits up to bf16 rounding (the reference rounds each dequantized weight)."""
    model, _ = _model_and_batch(torch.bfloat16)
    dec = model.quantize(method, group_size=group).decoder
    ids = torch.randint(3, 400, (2, 7), generator=torch.Generator().manual_seed(2))
    logits = []
    for reference in (False, True):
        with ops.use_reference(reference), torch.inference_mode():
            cache = dec.new_cache(2, 8)
            dec(input_ids=ids[:, :6], cache=cache)
            logits.append(dec(input_ids=ids[:, 6:], cache=cache).logits.float())
    scale = logits[1].abs().max()
    assert (logits[0] - logits[1]).abs().max() <= 0.03 * scale
    assert (logits[0].argmax(-1) == logits[1].argmax(-1)).all()


@pytest.mark.parametrize("method,group", METHODS)
def test_save_and_load_round_trip(tmp_path, method, group):
    model, batch = _model_and_batch(torch.bfloat16, tie=True)
    model.quantize(method, group_size=group, lm_head=False)
    assert isinstance(model.decoder.lm_head, nn.Linear)  # kept float (and still tied)
    expected = model.generate(**batch, **GEN)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["method"] == "idefics3_kit" and cfg["bits"] == (8 if method == "int8" else 4)
    assert cfg["group_size"] == group and "decoder.model.layers.0.self_attn.q_proj" in cfg["modules"]
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.text_model.layers.0.self_attn.q_proj.qweight" in names
    assert "model.text_model.layers.0.self_attn.q_proj.scales" in names
    loaded = ik.VLM.from_pretrained(tmp_path)
    assert loaded.quantization_config == model.quantization_config
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert torch.equal(loaded.generate(**batch, **GEN), expected)


@pytest.mark.parametrize("method,group", METHODS)
def test_quantize_on_load_equals_quantize_after_load(tmp_path, method, group):
    model, batch = _model_and_batch(torch.bfloat16, tie=True)
    model.save_pretrained(tmp_path)
    on_load = ik.VLM.from_pretrained(tmp_path, quantization=method, group_size=group)
    after = ik.VLM.from_pretrained(tmp_path).quantize(method, group_size=group)
    assert on_load.quantization_config == after.quantization_config
    s1, s2 = on_load.state_dict(), after.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not any(p.is_meta for p in on_load.parameters())
    assert torch.equal(on_load.generate(**batch, **GEN), after.generate(**batch, **GEN))


def test_vision_and_connector_quantize_too():
    model, batch = _model_and_batch()
    model.quantize("int8", components=("decoder", "vision", "connector"))
    assert any(isinstance(m, quant.QuantizedLinear) for m in model.vision.modules())
    assert model.generate(**batch, **GEN).shape == (2, 18)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="int3"), "quantization must be 'int8' or 'int4'"),
    (dict(method="int8", group_size=32), "group_size applies to int4 only"),
    (dict(method="int4", group_size=48), "group_size must be one of"),
    (dict(method="int4", group_size=128), "does not divide in_features 96"),
    (dict(method="int8", components=("tokenizer",)), "components must name some of"),
])
def test_bad_requests_are_named(kwargs, match):
    model, _ = _model_and_batch()
    with pytest.raises(ValueError, match=match):
        model.quantize(**kwargs)
    assert not any(isinstance(m, quant.QuantizedLinear) for m in model.modules())  # nothing changed


def test_quantizing_twice_and_changing_bits_on_load_are_refused(tmp_path):
    model, _ = _model_and_batch(torch.bfloat16)
    model.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize("int4")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="saved quantized to 8 bits"):
        ik.VLM.from_pretrained(tmp_path, quantization="int4")


def test_foreign_quantization_config_is_refused(tmp_path):
    model, _ = _model_and_batch(torch.bfloat16)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not idefics3_kit's"):
        ik.VLM.from_pretrained(tmp_path)


# ---- torchao interop ---------------------------------------------------------------------------

def _torchao_int4_config():
    """torchao's int4 weight-only quantization in a form that runs on the CPU. In torchao 0.18
    ``Int4WeightOnlyConfig`` has no CPU packing (its formats need mslk or CUDA); the CPU-capable
    one is ``IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))``."""
    quantization = pytest.importorskip("torchao.quantization")
    from torchao.quantization.granularity import PerGroup
    return quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))


@pytest.mark.parametrize("which", ["int8", "int4"])
def test_torchao_quantized_model_generates(which, monkeypatch):
    quantization = pytest.importorskip("torchao.quantization")
    # The decoder's fast paths must step aside for torchao's tensors: compared token for token with
    # the reference path. The (unquantized) vision tower would take the AMX attention kernel outside
    # use_reference(), whose bf16 rounding differs from SDPA's: keep it on SDPA in both runs.
    monkeypatch.setattr(importlib.import_module("idefics3_kit.ops.attention"), "_flash_vision", lambda q: False)
    model, batch = _model_and_batch(torch.bfloat16)
    config = quantization.Int8WeightOnlyConfig() if which == "int8" else _torchao_int4_config()
    quantization.quantize_(model.decoder, config)
    weight = model.decoder.model.layers[0].self_attn.q_proj.weight
    assert type(weight) not in (torch.Tensor, nn.Parameter)  # a torchao tensor subclass: fast paths step aside
    assert model.decoder._plain_llama_layers() is not None  # (the modules are plain; the tensors are not)
    got = model.generate(**batch, **GEN)
    with ops.use_reference():
        assert torch.equal(model.generate(**batch, **GEN), got)
