"""The fuzz suite: a fast subset runs with every ``make test``; the full set (``@pytest.mark.slow``,
many more examples per property) runs when selected: ``pytest -m slow tests/fuzz`` or
``IDEFICS3_KIT_FULL_FUZZ=1``."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    selected = "slow" in (config.getoption("-m") or "") or os.environ.get("IDEFICS3_KIT_FULL_FUZZ") == "1"
    if selected:
        return
    skip = pytest.mark.skip(reason="full fuzz set: run with -m slow or IDEFICS3_KIT_FULL_FUZZ=1")
    for item in items:
        if "slow" in item.keywords and "fuzz" in str(item.fspath):
            item.add_marker(skip)
