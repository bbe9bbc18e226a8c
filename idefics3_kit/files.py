"""Reading and writing the files users own: the one place for JSON objects, regular-file checks and
atomic writes.

Reading: ``read_json_object`` (config.json, tokenizer and processor configs, a safetensors index,
training configs) and ``regular_file`` (everything else a path names) refuse what is not a regular
file (a FIFO would block a read forever, a device would stream without end) and fail with a
ValueError naming the file and what is wrong.

Writing: ``write_bytes`` / ``write_text`` / ``write_json`` write a temporary sibling, fsync it and
rename it over the target; ``atomic_directory`` does the same for a whole checkpoint folder
(model or processor): the new files go into a temporary sibling folder, which then takes the
target's place in one atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``). Whatever fails
(a full disk, an I/O error, an exception, Ctrl-C, a kill), the folder holds either the whole old
content or the whole new one, and the temporary is removed (a killed process leaves only a
hidden ``.NAME.*.tmp`` sibling, which the next save of that folder removes).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import stat
import tempfile
from typing import Any, Callable, Iterator


def regular_file(path: str | os.PathLike, what: str | None = None) -> str:
    """``path`` when it names a regular file; a ValueError naming it otherwise (missing, a folder,
    a FIFO, a device, unreadable)."""
    path = os.fspath(path)
    label = path if not what or os.path.basename(path) == what else f"{path} ({what})"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{label}: file not found") from None
    except OSError as exc:
        raise ValueError(f"{label}: cannot read it ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{label}: is a directory, expected a file")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{label}: not a regular file (a FIFO, socket or device is never read)")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{label}: cannot read it (permission denied)")
    return path


def readable_directory(path: str | os.PathLike, what: str = "folder") -> str:
    """``path`` when it names a folder this process can list; a clear error otherwise."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    if not os.path.isdir(path):
        raise ValueError(f"{path}: is not a folder ({what} expected)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ValueError(f"{path}: cannot read the {what} (permission denied)")
    return path


def read_json_object(path: str | os.PathLike, what: str | None = None) -> dict:
    """The JSON object stored in ``path``; a ValueError naming the file (and ``what`` it is) otherwise."""
    path = os.fspath(path)
    label = path if not what or os.path.basename(path) == what else f"{path} ({what})"
    regular_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{label}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{label}: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{label}: must hold a JSON object, holds a {type(data).__name__}")
    return data


def read_json_if_exists(path: str | os.PathLike, what: str | None = None) -> dict:
    """``read_json_object`` for an optional file: {} when there is none."""
    return read_json_object(path, what) if os.path.lexists(path) else {}


# ---- writing ------------------------------------------------------------------------------------


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, fsync, rename."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any, **dump_kwargs) -> None:
    """A JSON file written atomically (indent 2 and a final newline unless told otherwise)."""
    dump_kwargs.setdefault("indent", 2)
    write_text(path, json.dumps(data, **dump_kwargs) + "\n")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, owned: Callable[[str], bool]) -> Iterator[str]:
    """Write a folder's new content into the yielded temporary sibling; on success it replaces
    ``target`` in one atomic exchange.

    ``owned(name)`` says which of the target's existing top-level entries this save replaces (a
    model's weights and configs, say); every other entry (the processor's files beside a model's,
    a README) is carried over into the new folder through hard links, so saving a model does not
    remove the tokenizer saved there before. On any failure the target is untouched and the
    temporary is removed.
    """
    target = os.path.abspath(os.fspath(target))
    parent, name = os.path.dirname(target), os.path.basename(target)
    os.makedirs(parent, exist_ok=True)
    _remove_leftovers(parent, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        if os.path.isdir(target):
            _carry_over(target, tmp, owned)
        _fsync_directory(tmp)
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(new: str, target: str) -> None:
    """Put the finished folder ``new`` in ``target``'s place in one step; the old content is removed."""
    if os.path.isdir(target):
        _exchange(new, target)  # ``new`` now holds the old content
        shutil.rmtree(new, ignore_errors=True)
    else:
        os.rename(new, target)
    _fsync_directory(os.path.dirname(os.path.abspath(target)))


def _remove_leftovers(parent: str, name: str) -> None:
    """Temporaries of earlier saves of this folder that a killed process left behind."""
    prefix = f".{name}."
    for entry in os.listdir(parent):
        if entry.startswith(prefix) and entry.endswith(".tmp"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _carry_over(old: str, new: str, owned: Callable[[str], bool]) -> None:
    for entry in os.listdir(old):
        if owned(entry) or os.path.lexists(os.path.join(new, entry)):
            continue
        source, dest = os.path.join(old, entry), os.path.join(new, entry)
        if os.path.isdir(source) and not os.path.islink(source):
            shutil.copytree(source, dest, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, dest)


def _link_or_copy(source: str, dest: str) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), dest)
        return
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> None:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE). Where the system has no
    such call, ``b`` moves aside and ``a`` takes its place: two renames, and only between them
    is the old content under ``a`` instead of ``b``."""
    libc = _libc()
    renameat2 = getattr(libc, "renameat2", None) if libc is not None else None
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")
    aside = a + ".old"
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _fsync_directory(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
