"""Errors a user can fix: the CLI prints their message (which names the input and the fix), not a traceback."""


class UserError(Exception):
    """Bad input, config or data; the message says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A config file or override that does not match its dataclass."""
