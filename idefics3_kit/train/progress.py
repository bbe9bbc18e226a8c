"""Progress bars that need no extra dependency: tqdm when it is installed, else a quiet iterator."""

from __future__ import annotations


class _Quiet:
    """The part of tqdm's interface the library uses, doing nothing."""

    def __init__(self, iterable=None, **_):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass


def progress_bar(iterable=None, disable: bool = False, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, or a silent stand-in when tqdm is missing or ``disable``."""
    if not disable:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return tqdm(iterable, **kwargs)
    return _Quiet(iterable)
