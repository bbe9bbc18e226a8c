"""Registry behaviour, plugins, and a test that exercises every registered component."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import idefics3_kit as ik
from idefics3_kit import registry


def test_list_components_has_the_builtin_parts():
    listed = registry.list_components()
    assert set(listed) == set(registry.KINDS)
    assert "siglip" in listed["vision"] and "pixel_shuffle" in listed["connector"] and "llama3" in listed["decoder"]
    assert registry.list_components("vision") == listed["vision"]


def test_duplicate_name_names_both():
    class Twin(torch.nn.Module):
        config_class = ik.ConnectorConfig

    with pytest.raises(ValueError, match=r"duplicate connector component 'pixel_shuffle'.*PixelShuffleConnector.*Twin"):
        registry.register("connector", "pixel_shuffle")(Twin)


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match=r"unknown decoder component 'gpt9'.*known decoder components: .*llama3"):
        registry.create("decoder", "gpt9")


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown component kind 'audio'"):
        registry.list_components("audio")


def test_create_with_dict_and_overrides():
    conn = registry.create("connector", "pixel_shuffle", {"scale_factor": 2, "in_dim": 8, "out_dim": 4},
                           scale_factor=1)
    assert conn.scale_factor == 1
    with pytest.raises(TypeError, match="expects a ConnectorConfig"):
        registry.create("connector", "pixel_shuffle", ik.DecoderConfig())


# ---- every registered component, built from its default config --------------------------------


def _cheap_init(module: torch.nn.Module) -> torch.nn.Module:
    """Small deterministic weights: filling is ~10x faster than random init at real sizes."""
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.fill_(0.02 if i % 2 else -0.01)
    return module


def _build_default(kind: str, name: str, **overrides):
    entry = registry.get(kind, name)
    cfg = registry.make_config(entry, None, overrides)
    with torch.device("meta"):  # real-size defaults: allocate without slow random init
        module = entry.builder(cfg)
    return _cheap_init(module.to_empty(device="cpu")), cfg


def _check_vision(name):
    module, cfg = _build_default("vision", name)
    p = module.patch_size
    pixels = torch.randn(2, 3, 2 * p, 2 * p)
    mask = torch.ones(2, 2, 2, dtype=torch.bool)
    mask[1, 1] = False  # a partially padded tile
    with torch.no_grad():
        out = module(pixels, mask)
    assert out.shape == (2, 4, module.hidden_size) and torch.isfinite(out).all()


def _check_connector(name):
    module, cfg = _build_default("connector", name, in_dim=16, out_dim=24)
    s = cfg.scale_factor
    with torch.no_grad():
        out = module(torch.randn(2, (2 * s) ** 2, 16))
    assert out.shape == (2, 4, 24)


def _check_decoder(name):
    # The default config with only the vocabulary cut to 1024 rows: real default vocabularies
    # (Qwen2's 151,936) make the embedding and head dominate the test's time, not its coverage.
    module, cfg = _build_default("decoder", name, vocab_size=1024)
    ids = torch.randint(0, cfg.vocab_size, (2, 3))
    with torch.no_grad():
        out = module(input_ids=ids)
        embeds = module.embed(ids)
        cached = module(inputs_embeds=embeds[:, :2], cache=module.new_cache(2, 8))
    assert out.logits.shape == (2, 3, cfg.vocab_size)
    assert embeds.shape == (2, 3, module.hidden_size)
    assert cached.logits.shape == (2, 2, cfg.vocab_size)


CHECKERS = {"vision": _check_vision, "connector": _check_connector, "decoder": _check_decoder}


def _all_components():
    return [(kind, name) for kind, names in registry.list_components().items() for name in names]


@pytest.mark.parametrize("kind,name", _all_components())
def test_every_registered_component_builds_and_runs(kind, name):
    if kind in CHECKERS:
        CHECKERS[kind](name)
    else:  # kinds with their own interface are covered by _check_<kind> in their test modules
        entry = registry.get(kind, name)
        assert registry.create(kind, name) is not None, entry


# ---- plugins through entry points ---------------------------------------------------------------


@pytest.fixture()
def installed_plugin(tmp_path):
    site = tmp_path / "site"
    pkg = Path(__file__).parent / "plugin_pkg"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(pkg)], check=True)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        registry.unregister("connector", "demo_avgpool")
        sys.modules.pop("ik_demo_plugin", None)


def test_plugin_is_listed_built_and_used_in_a_vlm(installed_plugin):
    with pytest.warns(RuntimeWarning, match=r"plugin 'broken' \(ik_demo_plugin_missing_module\) failed to load"):
        registry.load_plugins(force=True)
    assert "demo_avgpool" in registry.list_components("connector")
    cfg = ik.VLMConfig.preset("tiny").replace(connector=ik.ConnectorConfig(name="demo_avgpool", scale_factor=2))
    model = ik.VLM(cfg).eval()
    assert type(model.connector).__name__ == "AvgPoolConnector"
    size = cfg.vision.image_size
    ids = torch.cat([torch.tensor([[5, 6]]), torch.full((1, cfg.image_seq_len), cfg.image_token_id)], dim=1)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.rand(1, 1, 3, size, size) + 0.1)
    assert out.logits.shape == (1, ids.shape[1], cfg.decoder.vocab_size)
    # the library keeps working after the broken plugin's warning
    assert "llama3" in registry.list_components("decoder")
