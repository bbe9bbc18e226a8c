"""Built-in components; importing this package registers them (one module per kind)."""

from . import connector, decoder, sampler, splitter, vision  # noqa: F401
