"""Errors that carry one clear line for the user: what is wrong and how to fix it."""
from __future__ import annotations

import errno
import os
import pathlib


class SwinlabError(ValueError):
    """Base class for user-facing errors. The message is a single line naming the problem and the fix."""


class ConfigError(SwinlabError):
    """A model, data or training setting that cannot work."""


class CheckpointError(SwinlabError):
    """A checkpoint that cannot be read or does not fit the requested model."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``exc``'s message (its type name when the message is empty), cut to ``limit`` characters: how
    another library's error is quoted inside one of ours without breaking the one-line rule."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def _blocker(path: pathlib.Path) -> pathlib.Path:
    """The nearest existing path at or above ``path`` (what decides whether it can be created)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return pathlib.Path(".")


def unwritable_reason(path: str | os.PathLike, exc: OSError | None = None) -> str:
    """Why ``path`` cannot be created or written, in words: an existing part of it that is a file, a folder that is
    not writable or on a read-only filesystem, or the error's own reason."""
    path = pathlib.Path(path)
    block = _blocker(path)
    if block != path and not block.is_dir():
        return f"{block} is a file, not a folder"
    code = getattr(exc, "errno", None)
    if code == errno.EROFS:
        return f"{block} is on a read-only filesystem"
    if code in (errno.EACCES, errno.EPERM) or (exc is None and not os.access(block, os.W_OK)):
        return f"{block} is not writable (permission denied)"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return exc.strerror or os.strerror(code)
    return (getattr(exc, "strerror", None) or str(exc)) if exc is not None else "it cannot be written"


# errors of a write that the user fixes by freeing space or choosing another place (not bugs)
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST,
                errno.EISDIR)


def write_failure(exc: BaseException) -> str | None:
    """One line for an ``OSError`` of a place that cannot be written (full disk, read-only, not permitted, a file
    where a folder should be) that no command caught itself, naming the path; None for any other error."""
    if not isinstance(exc, OSError) or exc.errno not in WRITE_ERRNOS:
        return None
    path = exc.filename if exc.filename is not None else None
    if path is None:
        return f"a write failed ({exc.strerror or exc}): free disk space or choose a folder you can write to"
    return (f"could not write {path}: {unwritable_reason(path, exc)}: files written before are intact; free disk "
            f"space or choose a folder you can write to")
