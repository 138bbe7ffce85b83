"""Errors that carry a message meant for the user (file, line or key, and what to do)."""


class RemixError(Exception):
    """Base class: the CLI prints the message and exits non-zero without a traceback."""


class ConfigError(RemixError):
    """A recipe, override or DeepSpeed config is invalid."""


class DataError(RemixError):
    """A dataset file or source is missing or malformed."""
