"""torch.export and torch.compile: the vision encoder exports and compiles as one graph, the VLM
forward compiles without graph breaks (docs/architecture.md says where the eager-only shortcuts are).

Compiled with the "eager" / "aot_eager" backends: they trace exactly what inductor would get
(graph breaks included) without minutes of code generation on a 2-core machine.
"""

from __future__ import annotations

import pytest
import torch

import idefics3_kit as ik

MAX_GRAPH_BREAKS = 3  # the bound; today there are none


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model():
    torch.manual_seed(0)
    return ik.VLM(ik.VLMConfig.preset("tiny")).eval()


def _vision_inputs(model):
    s = model.config.vision.image_size
    grid = s // model.config.vision.patch_size
    pixels = torch.randn(3, 3, s, s)
    mask = torch.ones(3, grid, grid, dtype=torch.bool)
    mask[1, grid // 2:] = False  # a partially padded tile
    return pixels, mask


def _vlm_batch(model):
    cfg = model.config
    s, per_tile = cfg.vision.image_size, cfg.image_seq_len
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.image_token_id, (2, 14), generator=g)
    ids[0, 1:1 + 2 * per_tile] = cfg.image_token_id  # sample 0: two tiles
    ids[1, 1:1 + per_tile] = cfg.image_token_id  # sample 1: one tile and a padding tile
    pixels = torch.randn(2, 2, 3, s, s, generator=g)
    pixels[1, 1] = 0
    pixel_mask = torch.ones(2, 2, s, s, dtype=torch.long)
    pixel_mask[1, 1] = 0
    pixel_mask[0, 1, s // 2:] = 0  # a partial tile
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :1] = 0
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask,
                labels=ids.masked_fill(ids == cfg.image_token_id, -100))


def test_vision_encoder_exports_with_a_patch_mask():
    model = _model()
    pixels, mask = _vision_inputs(model)
    exported = torch.export.export(model.vision, (pixels, mask))
    with torch.no_grad():
        assert torch.equal(exported.module()(pixels, mask), model.vision(pixels, mask))


def test_vision_encoder_compiles_as_one_graph():
    model = _model()
    pixels, mask = _vision_inputs(model)
    compiled = torch.compile(model.vision, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixels, mask), model.vision(pixels, mask), atol=1e-6, rtol=0)
        torch.testing.assert_close(compiled(pixels, None), model.vision(pixels, None), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_encoder_compiles_as_one_graph_in_each_dtype(dtype):
    """bf16 takes the attention router past the CPU-feature check (the AMX kernel's), which must not
    break the graph (it read /proc/cpuinfo under tracing once)."""
    model = _model().to(dtype)
    pixels, mask = _vision_inputs(model)
    compiled = torch.compile(model.vision, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixels.to(dtype), None), model.vision(pixels.to(dtype), None),
                                   atol=1e-6 if dtype == torch.float32 else 2e-2, rtol=0)


def test_vlm_forward_graph_breaks():
    model = _model()
    explanation = torch._dynamo.explain(model)(**_vlm_batch(model))
    reasons = [str(r.reason).splitlines()[0] for r in explanation.break_reasons]
    assert explanation.graph_break_count <= MAX_GRAPH_BREAKS, reasons


def test_compiled_vlm_forward_matches_eager():
    model = _model()
    batch = _vlm_batch(model)
    with torch.no_grad():
        eager = model(**batch)
        compiled = torch.compile(model, backend="aot_eager")(**batch)
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.loss, eager.loss, atol=1e-5, rtol=1e-5)
    n_real = eager.image_hidden_states.shape[0]  # compiled: every tile, the real ones first
    torch.testing.assert_close(compiled.image_hidden_states[:n_real], eager.image_hidden_states, atol=1e-5, rtol=0)
