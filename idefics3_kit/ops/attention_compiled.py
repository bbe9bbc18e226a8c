"""Dispatch from ``ops.attention`` to the compiled kernels (filled in by the extension issue)."""


def dispatch(q, k, v, *, causal, key_padding_mask, scale):
    """Return the compiled result, or None when no compiled kernel covers this call."""
    return None
