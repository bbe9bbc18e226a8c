import os

import pytest
from hypothesis import settings

settings.register_profile("default", deadline=None, max_examples=30)
settings.register_profile("ci", deadline=None, max_examples=30, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: a saved transformers checkpoint dir per geometry (cached for the session)."""
    from tests.hf_checkpoints import make_checkpoint

    cache = {}

    def get(geometry: str):
        if geometry not in cache:
            path = tmp_path_factory.mktemp(geometry)
            make_checkpoint(path, geometry)
            cache[geometry] = str(path)
        return cache[geometry]

    return get
