"""Errors that carry one clear line for the user: what is wrong and how to fix it."""


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
