"""Errors that carry one clear line for the user: what is wrong and how to fix it."""


class SwinlabError(ValueError):
    """Base class for user-facing errors. The message is a single line naming the problem and the fix."""


class ConfigError(SwinlabError):
    """A model, data or training setting that cannot work."""


class CheckpointError(SwinlabError):
    """A checkpoint that cannot be read or does not fit the requested model."""
